"""CPU mode refuses megatron-core versions it was not tested with, with a clear message."""

import megatron.core
import pytest

from megatron_plugin.runtime import cpu_mode


def test_untested_megatron_core_is_refused(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.15.2")
    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.16\.0, 0\.16\.1, 0\.19\.2 .* has 0\.15\.2"):
        cpu_mode.check_megatron_core_version()


def test_tested_versions_pass(monkeypatch):
    for version in cpu_mode.TESTED_MEGATRON_CORE:
        monkeypatch.setattr(megatron.core, "__version__", version)
        assert cpu_mode.check_megatron_core_version() == version
