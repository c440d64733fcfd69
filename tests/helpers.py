"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def in_repo(repo_root: Path) -> Iterator[None]:
    """Run workflows from the repo root (they resolve ``data_manifests/``, ``sample_data/`` and ``%bundles/...``
    from there) and restore torch's thread count, which the workflows set."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
