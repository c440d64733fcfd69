"""The exported bundle's configs, derived from the repository's shared workflows at export time.

* ``train.json``: ``bundles/common/configs/finetune.json`` with this package as ``scripts``, bundle-relative
  paths and the run's recipe as defaults (:func:`make_train_config`);
* ``evaluate.json``: ``bundles/common/configs/evaluate.json`` made standalone, each ``%finetune.json#key``
  replaced by train.json's value (:func:`make_evaluate_config`);
* ``inference.json``: ``templates/inference.json`` with the run's classes, widths and preprocessing
  (:func:`make_inference_config`);
* ``datalist.json``: the manifest, without a DICOM manifest's entries (:func:`exportable_manifest`).

A change to the shared workflows reaches the next export without a second copy to keep in step.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from . import ExportError, vendor

__all__ = [
    "EVALUATE_CONFIG",
    "FINETUNE_CONFIG",
    "TEMPLATES",
    "config_strings",
    "exportable_manifest",
    "make_evaluate_config",
    "make_inference_config",
    "make_train_config",
    "preprocessing_of",
    "vendored_modules",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"
FINETUNE_CONFIG = REPO_ROOT / "bundles" / "common" / "configs" / "finetune.json"
EVALUATE_CONFIG = REPO_ROOT / "bundles" / "common" / "configs" / "evaluate.json"
#: run settings that are not part of the training recipe (where and how a run happened, or derived)
NOT_RECIPE = frozenset({"datalist", "dataset_dir", "device", "epochs", "labeled_volumes", "pretrained_ckpt", "output_dir",
                        "runs_dir", "cache_dir", "tracking_uri", "experiment_name", "ckpt"})  # fmt: skip
_REF = re.compile(r"@([A-Za-z_][\w]*)")


def config_strings(value: Any) -> list[str]:
    """Every string of a config, keys included, except the ``_doc_`` texts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "_doc_" for s in (config_strings(k) + config_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in config_strings(v)]
    return []


def _with_first(config: Mapping[str, Any], first: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of ``first`` set and placed after ``_doc_`` / ``imports``."""
    head = {k: config[k] for k in ("_doc_", "imports") if k in config}
    rest = {k: v for k, v in config.items() if k not in head and k not in first}
    return {**head, **first, **rest}


def _close_references(config: dict[str, Any], donor: Mapping[str, Any]) -> dict[str, Any]:
    """Add to ``config`` every top-level key it refers to (``@key``) but lacks, taken from ``donor``."""
    while True:
        missing = {m for s in config_strings(config) for m in _REF.findall(s) if m not in config}
        if not missing:
            return config
        unknown = sorted(m for m in missing if m not in donor)
        if unknown:
            raise ExportError(f"the exported config refers to {unknown}, which neither it nor train.json defines")
        config.update({m: copy.deepcopy(donor[m]) for m in sorted(missing)})


def preprocessing_of(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The run's preprocessing (``pixel_size``, ``spatial_size``): ``preprocessing_overrides[dataset]`` as the
    exporter resolved it from the manifest."""
    return dict(settings["preprocessing_overrides"][str(settings["dataset"])])


def make_inference_config(settings: Mapping[str, Any], labels: Mapping[str, str], info: Mapping[str, Any], dataset_dir: str) -> dict[str, Any]:
    """``templates/inference.json`` with this run's classes, network widths and preprocessing."""
    config = json.loads((TEMPLATES / "inference.json").read_text())
    preprocessing = preprocessing_of(settings)
    values = {
        "labels": {str(k): v for k, v in labels.items()},
        "features": [int(f) for f in settings["features"]],
        "norm": str(settings.get("norm", "instance")),
        "pixel_size": [float(p) for p in preprocessing["pixel_size"]],
        "spatial_size": [int(s) for s in preprocessing["spatial_size"]],
        "dataset_dir": dataset_dir,
        "image_glob": info["image_glob"],
    }
    for key, value in values.items():
        if key not in config:
            raise ExportError(f"templates/inference.json lacks the key {key!r}")
        config[key] = value
    return config


def make_train_config(settings: Mapping[str, Any], dataset_dir: str, encoder: bool, origin: str) -> dict[str, Any]:
    """``finetune.json`` with ``scripts`` for this package, bundle-relative paths and this run's recipe as defaults;
    ``encoder``: the bundle ships ``models/pretrained_encoder.pt`` to start from."""
    finetune = json.loads(FINETUNE_CONFIG.read_text())
    config = vendor.rewrite_config(copy.deepcopy(finetune))
    recipe = {k: copy.deepcopy(v) for k, v in settings.items() if k in config and k not in NOT_RECIPE}
    config.update(recipe)
    config["_doc_"] = (
        f"Fine-tune workflow of the exported bundle (bundles/common/configs/finetune.json of metacontrast{', ' + origin if origin else ''}), "
        "with the exported run's recipe as defaults. Run from the bundle folder: python -m monai.bundle run --config_file "
        "configs/train.json --dataset_dir <data>. " + str(finetune.get("_doc_", ""))
    )
    return _with_first(config, {
        "bundle_root": ".",
        "dataset": settings["dataset"],
        "dataset_dir": dataset_dir,
        "datalist": "$@bundle_root + '/configs/datalist.json'",
        "runs_dir": "$@bundle_root + '/eval'",
        "output_dir": "$@bundle_root + '/eval'",
        "cache_dir": "$@bundle_root + '/eval/cache'",
        "pretrained_ckpt": "$@bundle_root + '/models/pretrained_encoder.pt'" if encoder else "",
    })  # fmt: skip


def make_evaluate_config(train: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``evaluate.json`` made standalone: each ``%<finetune.json>#key`` becomes train.json's value of ``key``."""
    evaluate = json.loads(EVALUATE_CONFIG.read_text())
    config: dict[str, Any] = {}
    for key, value in evaluate.items():
        if isinstance(value, str) and value.startswith("%"):
            path, _, ref = value[1:].partition("#")
            if Path(path).name != FINETUNE_CONFIG.name or ref not in train:
                raise ExportError(f"evaluate.json: cannot resolve {value!r} against the exported train.json")
            config[key] = copy.deepcopy(train[ref])
        else:
            config[key] = copy.deepcopy(value)
    config = vendor.rewrite_config(config)
    config["_doc_"] = (
        f"Evaluate workflow of the exported bundle (bundles/common/configs/evaluate.json of metacontrast{', ' + origin if origin else ''}): "
        "models/model.pt on the test split of configs/datalist.json. Run from the bundle folder: python -m monai.bundle run "
        "--config_file configs/evaluate.json --dataset_dir <data>. " + str(evaluate.get("_doc_", ""))
    )
    config = _with_first(config, {"bundle_root": "."})
    config["ckpt"] = "$@bundle_root + '/models/model.pt'"
    return _close_references(config, train)


def vendored_modules() -> list[str]:
    """The modules of this package the exported configs use, with their import closure (:mod:`.vendor`)."""
    shared = [json.loads(FINETUNE_CONFIG.read_text()), json.loads(EVALUATE_CONFIG.read_text())]
    references = vendor.config_references(shared) | {f"{vendor.PACKAGE}.export.writer", f"{vendor.PACKAGE}.export.transforms"}
    return vendor.import_closure({vendor.resolve_module(r) for r in references})


def exportable_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as shipped in a bundle.  A DICOM manifest's entries are withheld: its paths are the
    user's series folders, whose names are often the PatientID (TCIA's are), and an exported bundle must
    carry no patient identifier.  Labels, meta labels and preprocessing stay; point ``datalist`` at your own
    manifest to train or evaluate with the bundle."""
    if manifest.get("layout") != "dicom":
        return dict(manifest)
    withheld: dict[str, Sequence[Any]] = {split: [] for split in ("pretrain", "train", "val", "test")}
    note = "entries withheld: DICOM series folder names may be patient identifiers; pass --datalist <your manifest>"
    return {**manifest, **withheld, "_note": note}
