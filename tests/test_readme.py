"""CI runs exactly the test command the README gives newcomers."""

import os
import re

from conftest import REPO


def _read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", _read("README.md"), flags=re.S)
    quick_start = [c.strip() for c in commands[:2]]
    assert quick_start[0].endswith("python -m megatron_plugin.recipes.run smoke")
    assert quick_start[1].endswith("python -m pytest -q")
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    assert quick_start[1] in ci_lines


def test_every_test_ci_runs_on_both_lines_exists():
    """Each BOTH_LINES entry selects collected tests (a renamed test would silently drop out)."""
    import subprocess
    import sys

    from conftest import BOTH_LINES

    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "both_lines"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    for key in BOTH_LINES:
        assert any(line == key or line.startswith(key + "::") for line in listed), key
