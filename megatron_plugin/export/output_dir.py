"""Write a result folder so that a failure leaves nothing behind at the requested path.

Everything is written into a hidden sibling folder and renamed into place at the end (a rename
on one filesystem is atomic); on any error the sibling is removed. An existing output is only
accepted when it is an empty directory, so an export never mixes files with an older one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_plugin.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """The --output folder is taken; the message says to choose another or remove it."""


def check_output_free(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputExistsError(
            f"{output} already exists and is not empty; choose a new --output or remove it first"
        )


@contextlib.contextmanager
def staged_output(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `output`, on failure it is removed."""
    output = Path(output).absolute()
    check_output_free(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        check_output_free(output)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
