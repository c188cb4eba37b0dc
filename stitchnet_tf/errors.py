"""Errors the user can act on: one line, naming the file and what is wrong."""

from __future__ import annotations

import os


def printable(text: str) -> str:
    """`text` safe to print: bytes of a non-UTF-8 file name (which Python keeps as lone
    surrogates) are shown as `\\xff` escapes instead of failing the print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class DataError(Exception):
    """Bad input data: `str(err)` is a one-line message `path: problem`."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else printable(os.fsdecode(path))
        self.problem = printable(" ".join(str(problem).split()))  # always one line
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class TrainingError(Exception):
    """Training stopped for a reason the user must act on (one line)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (`on_sigterm`) so that temporaries are cleaned up on
    the way out, as for Ctrl-C."""


def on_sigterm(signum, frame) -> None:
    raise Terminated()
