"""User errors: one base class; every command line prints one `error: ...` line and exits 2."""

from __future__ import annotations

import sys

import pytest

from megatron_plugin.config import ConfigError
from megatron_plugin.errors import EXIT_USER_ERROR, UserError
from megatron_plugin.export.hf_config import UnsupportedModelError
from megatron_plugin.export.output_dir import OutputExistsError
from megatron_plugin.preprocess.errors import PreprocessError
from megatron_plugin.training.checkpoint import CheckpointError

from conftest import run_python


@pytest.mark.parametrize("error_type", [ConfigError, PreprocessError, OutputExistsError, UnsupportedModelError,
                                        CheckpointError])
def test_every_user_error_derives_from_one_base(error_type):
    assert issubclass(error_type, UserError)


def _fails_cleanly(result, *expected: str) -> list[str]:
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    for text in expected:
        assert text in result.stderr
    return lines


def test_run_cli_reports_every_override_error_at_once():
    result = run_python(["-m", "megatron_plugin.recipes.run", "smoke", "train.max_steps=ten", "data.paths=/x",
                         "optim.lrr=1"], check=False)
    lines = _fails_cleanly(result, "train.max_steps takes an integer, got 'ten'",
                           "data.paths is a list; write data.paths=[/x]", "did you mean optim.lr")
    assert len(lines) == 1 and lines[0].startswith("error: 3 problems")


def test_run_cli_reports_every_validation_error_at_once():
    result = run_python(["-m", "megatron_plugin.recipes.run", "smoke", "train.max_steps=0", "log.interval=0",
                         "precision.dtype=fp64"], check=False)
    _fails_cleanly(result, "train.max_steps=0", "log.interval=0", "precision.dtype='fp64'")


def test_preprocess_cli_error():
    result = run_python(["-m", "megatron_plugin.preprocess", "--input", "/nonexistent/corpus.jsonl",
                         "--output-prefix", "/tmp/never_written"], check=False)
    assert _fails_cleanly(result, "/nonexistent/corpus.jsonl")[0].startswith("error: ")


def test_export_cli_error(tmp_path):
    result = run_python(["-m", "megatron_plugin.export", "--checkpoint", str(tmp_path / "none"),
                         "--output", str(tmp_path / "hf")], check=False)
    assert _fails_cleanly(result, "does not exist")[0].startswith("error: ")


def test_under_torchrun_a_config_error_is_printed_once_without_traceback():
    result = run_python(["-m", "megatron_plugin.recipes.run", "smoke", "parallel.tensor=4"], nproc=2,
                        check=False, timeout=300)
    # torchrun itself exits 1 (and prints its own report) when a worker exits 2.
    assert result.returncode != 0
    assert "[rank0]: Traceback" not in result.stderr and "megatron_plugin/recipes" not in result.stderr
    mine = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(mine) == 1 and mine[0].startswith("error: "), result.stderr
    assert "torchrun --nproc-per-node 4" in result.stderr


def test_report_prefixes_nonzero_ranks(monkeypatch, capsys):
    from megatron_plugin.errors import report_user_error

    monkeypatch.setenv("RANK", "3")
    assert report_user_error(ConfigError("bad key")) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "[rank 3] error: bad key\n"
    assert report_user_error(ConfigError("bad key"), every_rank=False) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    report_user_error(ConfigError("bad key"), stream=sys.stdout)
    assert capsys.readouterr().out == "error: bad key\n"
