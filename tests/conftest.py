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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice-cache folder shared by the workflows of one test module."""
    return tmp_path_factory.mktemp("slice_cache")


def _data_folder(data_root: Path, *parts: str) -> Path:
    """``data_root/parts...``, or skip the test naming the folder that is missing."""
    path = data_root.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def acdc_dir(data_root: Path) -> Path:
    return _data_folder(data_root, "acdc", "training")


@pytest.fixture(scope="session")
def hippocampus_dir(data_root: Path) -> Path:
    return _data_folder(data_root, "hippocampus")


@pytest.fixture(scope="session")
def dicom_dir(data_root: Path) -> Path:
    return _data_folder(data_root, "dicom_pgbm")


@pytest.fixture(scope="session")
def sample_grid(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real results grid on the embedded sample, made once per session by one ``run_grid`` call.

    Random init and GCL, L = 1, seed 0, U-Net widths 8..128; GCL pre-trains for 2 iterations, fine-tuning
    runs 4 iterations of batch 16 (2 epochs, validated each), evaluate scores the test volume.  Returns the
    folders and the MLflow store; a test that changes something there must put it back.
    """
    from metacontrast.reporting.grid import run_grid
    from tests.helpers import in_repo

    root = tmp_path_factory.mktemp("sample_grid")
    dataset_dir = repo_root / "sample_data" / "hippocampus"
    with in_repo(repo_root):
        paths = run_grid(
            dataset="sample", dataset_dir=str(dataset_dir), methods=["random", "gcl"], labeled=[1], seeds=[0],
            runs_dir=str(root / "runs"), results_dir=str(root / "results"),
            overrides={"features": [8, 16, 32, 64, 128], "cache_dir": str(root / "cache")},
            pretrain_overrides={"max_iterations": 2},
            finetune_overrides={"max_iterations": 4, "val_interval": 1, "batch_size": 16},
        )  # fmt: skip
    return {"root": root, "runs_dir": root / "runs", "dataset_dir": dataset_dir, "results": paths,
            "tracking_uri": f"sqlite:///{(root / 'runs' / 'sample' / 'mlruns.db').resolve()}"}  # fmt: skip
