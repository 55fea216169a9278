"""The package's user errors: one base class, one way every command line reports them.

A `UserError` is something the user can fix (a config key, a path, a checkpoint that does not fit);
its message says what and how. The CLIs (`recipes.run`, `preprocess`, `export`) print it as one
`error: ...` line on stderr and exit with `EXIT_USER_ERROR`, without a traceback. Anything else is a
bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

# argparse exits 2 on a bad command line; a bad config or input is the same kind of mistake.
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or state that the user can fix; the message names the key/file and what to do."""

    # True where every rank of a run finds the same error (a check of shared files against the
    # shared config): the CLI then prints it once, from rank 0.
    same_on_every_rank = False


def report_user_error(error: BaseException, stream: TextIO | None = None, every_rank: bool = True) -> int:
    """Print `error: ...` once for this process and return the exit code.

    Under torchrun each process that hits an error prints it once, prefixed with its rank when that
    is not 0, so that an error seen by one rank only is not lost. Errors that every rank finds alike
    (a config checked before training starts) pass `every_rank=False`: rank 0 alone prints them.
    """
    rank = os.environ.get("RANK", "0")
    if rank != "0" and not every_rank:
        return EXIT_USER_ERROR
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print(f"{prefix}error: {error}", file=stream or sys.stderr, flush=True)
    return EXIT_USER_ERROR
