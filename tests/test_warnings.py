"""Only the library warnings we expect on CPU are silenced; any other warning still shows."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

# Imports and builds what the trainer does at start-up (the warnings fire at import and when the
# TransformerConfig and the local layer spec are made), then warns twice more: a changed Megatron
# message and the expected text from a module that is not Megatron-Core's.
SCRIPT = """
import sys, warnings
if sys.argv[1] == "install":
    from megatron_plugin.runtime import expected_warnings
    expected_warnings.install()
import megatron.core.optimizer
import megatron.core.distributed
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
get_gpt_layer_local_spec()
warnings.warn_explicit("Apex is not installed. Falling back to something new", UserWarning,
                       "backends.py", 1, module="megatron.core.models.backends")
warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to X", UserWarning,
                       "build.py", 1, module="megatron_plugin.model.build")
"""


def _stderr(mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=300)
    return result.stderr


def test_expected_warnings_are_silenced_and_others_show():
    quiet = _stderr("install")
    assert "Falling back to Torch Norm" not in quiet
    assert "Falling back to Torch optimizers" not in quiet
    assert "full scope is deprecated" not in quiet
    # Not on the list: a changed message, and the known text from another module.
    assert "Falling back to something new" in quiet
    assert "Falling back to X" in quiet
    assert quiet.count("Warning:") == 2, quiet


def test_without_the_filters_megatron_warns():
    # The script above does reach every warning the filters are for.
    loud = _stderr("plain")
    for text in ("Falling back to Torch Norm", "Falling back to Torch optimizers",
                 "full scope is deprecated"):
        assert text in loud


def test_newcomer_smoke_run_and_resume_print_no_warning_and_no_config_dump(tmp_path):
    from conftest import run_python

    args = ["-m", "megatron_plugin.recipes.run", "smoke", f"run.dir={tmp_path}", "train.max_steps=4",
            "optim.warmup_steps=1", "log.interval=2", "checkpoint.interval=2", "eval.interval=2", "eval.iters=1"]
    quiet = {"PYTHONWARNINGS": ""}  # conftest's runs ignore warnings; this one must show them
    first = run_python(args, env=quiet)
    resumed = run_python(args[:-5] + ["train.max_steps=6", "log.interval=2", "checkpoint.interval=2",
                                      "eval.interval=2", "eval.iters=1"], env=quiet)
    assert "resumed from" in resumed.stderr
    for run in (first, resumed):
        output = run.stdout + run.stderr
        assert "Warning" not in output, output
        assert "full config" in output and "ffn_hidden_size:" not in output  # summary, not the yaml
    assert "ffn_hidden_size:" in (tmp_path / "config.yaml").read_text()
