"""Errors the user can act on: one line, naming the file and what is wrong."""

from __future__ import annotations

import os


class DataError(Exception):
    """Bad input data: `str(err)` is a one-line message `path: problem`."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class TrainingError(Exception):
    """Training stopped for a reason the user must act on (one line)."""
