"""Errors raised when raw data cannot enter a manifest."""

from __future__ import annotations

import os
from pathlib import Path


class InvalidVolumeError(ValueError):
    """A volume (or the case folder around it) that is unreadable or inconsistent.

    The message always starts with the offending file or folder, followed by the problem, so a
    user reading a log line knows what to fix: ``"/data/p001/p001_frame01.nii.gz: contains NaN"``.

    Attributes:
        path: the file or folder at fault.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        """Keep the two-argument constructor picklable (multiprocessing, pytest-xdist)."""
        return (type(self), (self.path, self.problem))
