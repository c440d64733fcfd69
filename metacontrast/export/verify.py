"""Checks on an exported bundle, the Zoo's and ours, run before the bundle is moved into place.

* :func:`check_portable` -- a config points nowhere into this repository;
* :func:`check_metadata` -- ``metadata.json`` validates against the JSON schema of the specification kept in
  ``tests/schemas/`` (``monai.bundle.verify_metadata`` needs to download the Zoo's);
* :func:`check_bundle` -- the weights load strictly into ``network_def``, which computes what
  :class:`~metacontrast.nets.SegmentationUNet` computes on a ``(2, 1, H, W)`` batch; ``verify_net_in_out`` and
  ``ckpt_export`` pass; the TorchScript model gives the eager output (``atol = rtol = 1e-5``).

Each raises :class:`~metacontrast.export.ExportError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from .. import REPO_ROOT
from ..nets.unet import SegmentationUNet
from . import ExportError
from .configs import config_strings, preprocessing_of

__all__ = ["METADATA_SCHEMA", "check_bundle", "check_metadata", "check_portable"]

METADATA_SCHEMA = REPO_ROOT / "tests" / "schemas" / "mb_metadata.schema.json"


def check_portable(name: str, config: Mapping[str, Any]) -> None:
    """The exported config ``name`` must not point into this repository."""
    for text in config_strings(config):
        if text.startswith("%") or "bundles/" in text or "data_manifests/" in text or "sample_data/" in text:
            raise ExportError(f"{name} still refers to the repository: {text!r}")


def check_metadata(metadata: Mapping[str, Any], schema_path: str | Path = METADATA_SCHEMA) -> None:
    """Validate ``metadata`` against the JSON schema of the MONAI Bundle specification's metadata
    (``monai.bundle.verify_metadata`` needs to download the Zoo's schema), plus the Zoo's rule that
    ``version`` is a key of ``changelog``."""
    schema = json.loads(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(dict(metadata)), key=lambda e: list(e.path))
    if errors:
        raise ExportError("metadata.json does not follow the bundle specification: " + "; ".join(
            f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5]))  # fmt: skip
    if metadata["version"] not in metadata.get("changelog", {}):
        raise ExportError(f"metadata.json: version {metadata['version']} is not in the changelog")


def check_bundle(bundle: Path, state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any], num_classes: int) -> None:
    """The Zoo's checks and ours on the bundle written at ``bundle`` (its root) for weights ``state_dict``
    fine-tuned with ``settings`` (``features``, ``norm``, the preprocessing's ``spatial_size``)."""
    features = [int(f) for f in settings["features"]]
    meta, inference = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    parser = ConfigParser()
    parser.read_config(inference)
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def").eval()
    try:
        network.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as err:
        raise ExportError(f"models/model.pt does not fit inference.json's network_def (features {features}?): {err}") from None
    reference = SegmentationUNet(in_channels=1, out_channels=num_classes, features=features, norm=settings.get("norm", "instance")).eval()
    reference.load_state_dict(dict(state_dict), strict=True)
    spatial_size = [int(s) for s in preprocessing_of(settings)["spatial_size"]]
    x = torch.rand(2, 1, *spatial_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = network(x)
        if not torch.equal(eager, reference(x)):
            raise ExportError("inference.json's network_def does not compute what SegmentationUNet computes")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, device="cpu", bundle_root=str(bundle))
    ckpt_export(net_id="network_def", filepath=str(bundle / "models" / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=inference, bundle_root=str(bundle))  # fmt: skip
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu")
    with torch.no_grad():
        if not torch.allclose(scripted(x), eager, atol=1e-5, rtol=1e-5):
            raise ExportError("models/model.ts does not give the eager network's output")
