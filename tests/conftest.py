"""Shared fixtures.

Tests read the real datasets from a folder they are given: ``--data-root PATH`` or the
``METACONTRAST_DATA_ROOT`` environment variable; the default is ``../shared/data`` beside the
repository, which is where CI puts it.  Tests that need a dataset that is absent are skipped
with the reason, never silently passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data-root", default=None, help="folder holding acdc/, hippocampus/, dicom_pgbm/")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_root(request: pytest.FixtureRequest) -> Path:
    given = request.config.getoption("--data-root") or os.environ.get("METACONTRAST_DATA_ROOT")
    root = Path(given) if given else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not found (pass --data-root)")
    return root


@pytest.fixture(scope="session")
def acdc_dir(data_root: Path) -> Path:
    path = data_root / "acdc" / "training"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def hippocampus_dir(data_root: Path) -> Path:
    path = data_root / "hippocampus"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def dicom_dir(data_root: Path) -> Path:
    path = data_root / "dicom_pgbm"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
