"""Error type and the reasons a document can be skipped (the manifest counts each by name)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_plugin.errors import UserError

MALFORMED_JSON = "malformed_json"
MISSING_KEY = "missing_key"
NON_STRING = "non_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY = "empty_document"
UNREADABLE_FILE = "unreadable_file"
REASONS = (MALFORMED_JSON, MISSING_KEY, NON_STRING, INVALID_UTF8, EMPTY, UNREADABLE_FILE)


class PreprocessError(UserError):
    """A user-facing error: the message names the file, line and key, and what to do."""


@dataclass(frozen=True)
class BadRecord:
    """One bad input record found by a worker: where it is and why."""

    reason: str
    path: str
    line: int  # 1-based line (JSONL/text) or row (Parquet); 0 for a whole file
    detail: str

    def message(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.detail} [{self.reason}]"


HOW_TO_SKIP = "pass --on-error skip to skip such records and count them in the manifest"
