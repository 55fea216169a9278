"""The error that generation and evaluation raise for bad input."""

from __future__ import annotations


class GenerateError(ValueError):
    """Bad input (a path, a prompt, an option); the message names it and says what to do."""
