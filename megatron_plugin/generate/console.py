"""What the generate and evaluate CLIs share: one-line errors, quiet libraries."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable

from megatron_plugin.generate.errors import GenerateError


def user_errors() -> tuple:
    """Exceptions whose message is meant for the user: one `error:` line, exit status 2."""
    from megatron_plugin.config import ConfigError
    from megatron_plugin.export.hf_config import UnsupportedModelError
    from megatron_plugin.checkpoint_layout import CheckpointError

    return (GenerateError, CheckpointError, UnsupportedModelError, ConfigError)


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; user errors become `error: MESSAGE` on stderr and exit status 2."""
    try:
        return main()
    except user_errors() as err:
        message = " ".join(str(err).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 2


def quiet_libraries() -> None:
    """Megatron-Core and torch.distributed.checkpoint warn about Apex/TE absence and deprecations
    on import and on every load; none of it concerns the user's output."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # megatron-core 0.19: torch.distributed.checkpoint's notes on reading the common state, and
    # the log records (GPTModel deprecation, ...) listed in expected_warnings.
    from megatron_plugin.runtime import expected_warnings

    expected_warnings.install()
