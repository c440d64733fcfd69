"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn


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


def dice_per_class(a, b) -> dict[int, float]:
    """Dice of every foreground label present in either of two label maps (numpy arrays of one shape)."""
    import numpy as np

    out = {}
    for label in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0}):
        x, y = a == label, b == label
        out[int(label)] = 2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1)
    return out


def finetune_and_evaluate(repo_root: Path, root: Path, **overrides) -> dict:
    """Fine-tune and evaluate through ``monai.bundle.run`` from the repo root, as a user would, into ``root/out``
    (runs, slice cache and MLflow store under ``root``); returns the output folder, the local tracking URI and
    the FINISHED fine-tune run (the run the exporter takes)."""
    from monai.bundle import run as run_bundle

    from metacontrast.tracking import find_run, local_tracking_uri

    output_dir = root / "out"
    settings = {"runs_dir": str(root / "runs"), "output_dir": str(output_dir), "cache_dir": str(root / "cache"), **overrides}
    with in_repo(repo_root):
        run_bundle(config_file="bundles/common/configs/finetune.json", **settings)
        run_bundle(config_file="bundles/common/configs/evaluate.json", **settings)
    uri = local_tracking_uri(output_dir)
    finetune = find_run(uri, f"metacontrast-{settings.get('dataset', 'sample')}", {"workflow": "finetune"}, status="FINISHED")
    assert finetune is not None, f"no finished fine-tune run in {uri}"
    return {"root": root, "output_dir": output_dir, "uri": uri, "run_id": finetune.info.run_id}


def parsed_config(repo_root: Path, *config_files: str, **overrides) -> ConfigParser:
    """The bundle configs ``config_files`` (relative to the repo) merged in order, with ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config([str(repo_root / f) for f in config_files])
    parser.update(overrides)
    return parser


def pretrained_decoder_checkpoint(encoder: Path, features: list[int], blocks: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A fresh fine-tune U-Net and the ``encoder.pt`` state dict, after checking that the checkpoint holds the
    first ``blocks`` decoder (up) blocks and none of the others."""
    from metacontrast.nets import SegmentationUNet

    pretrained = torch.load(encoder, map_location="cpu", weights_only=True)["state_dict"]
    network = SegmentationUNet(in_channels=1, out_channels=3, features=features)
    decoder_keys = set(network.module_keys(network.decoder_blocks(blocks)))
    assert decoder_keys and decoder_keys < set(pretrained), f"the first {blocks} up blocks are in the checkpoint"
    assert not set(network.module_keys(network.decoder_blocks()[blocks:])) & set(pretrained), "the others are not"
    return network, pretrained


class TwoHeads(nn.Module):
    """A shared 'encoder' and a 'head' so mitigated and averaged parameters are both present (engine tests)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


#: what ``@data`` stands for when only a config's hyper-parameters are wanted (no slices are built)
DATA_STANDIN = {"_target_": "types.SimpleNamespace", "epoch_length": 1, "labeled_volume_ids": [], "unlabeled_volume_ids": []}


def logged_hyper_parameters(parser: Any) -> dict[str, Any]:
    """The ``hyper_parameters`` a workflow config logs (and checks, and hashes), evaluated without building its
    data: ``@data`` is replaced by :data:`DATA_STANDIN`.  Run from the repository root (:func:`in_repo`)."""
    parser["data"] = DATA_STANDIN
    return dict(parser.get_parsed_content("hyper_parameters"))
