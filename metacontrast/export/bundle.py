"""Export a fine-tuned run as a flat, self-contained MONAI Model Zoo bundle.

:func:`export_bundle` takes a fine-tune run -- an MLflow run id (its logged ``config.json`` and
``model.pt``; :func:`source_from_mlflow`) or a checkpoint and the settings it was trained with
(:func:`source_from_checkpoint`) -- and writes, e.g., ``dist/gcl_acdc_mri_segmentation/``::

    configs/metadata.json    every field of the MONAI Bundle specification, network_data_format with the
                             input spacing (pixdim) and crop (spatial_shape), channel_def from the manifest
    configs/inference.json   templates/inference.json filled in: bundle_root, device, network_def,
                             preprocessing, inferer, postprocessing, output_dir, dataset_dir, datalist
    configs/train.json       bundles/common/configs/finetune.json with this run's recipe as defaults
    configs/evaluate.json    bundles/common/configs/evaluate.json, standalone
    configs/datalist.json    the dataset manifest (paths relative to dataset_dir)
    configs/logging.conf
    models/model.pt          plain state dict; models/model.ts: TorchScript by monai.bundle.ckpt_export
    models/pretrained_encoder.pt   the encoder the fine-tune started from, when there was one
    scripts/                 the modules of this package the configs use (:mod:`.vendor`), as ``scripts.*``
    docs/README.md           model card (results rows copied from results/<dataset>/table.md)
    docs/data_license.txt, LICENSE

The configs of the bundle are derived from the repository's shared workflows at export time, so a
change to those reaches the next export without a second copy to keep in step.  Before the bundle is
moved into place the exporter checks it the way the Zoo does: the weights load strictly into
``network_def``, ``network_def`` computes what ``SegmentationUNet`` computes, ``verify_net_in_out`` and
``ckpt_export`` pass, the TorchScript model gives the eager output, and the metadata validates against
the JSON schema of the specification kept in ``tests/schemas/`` (when that file is present).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import string
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import REPO_ROOT
from ..tracking import filter_string, finite_metrics, local_tracking_uri, open_client
from . import vendor

logger = logging.getLogger(__name__)

__all__ = [
    "BundleSource",
    "ExportError",
    "check_metadata",
    "export_bundle",
    "source_from_checkpoint",
    "source_from_mlflow",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"
FINETUNE_CONFIG = REPO_ROOT / "bundles" / "common" / "configs" / "finetune.json"
EVALUATE_CONFIG = REPO_ROOT / "bundles" / "common" / "configs" / "evaluate.json"
LOGGING_CONF = REPO_ROOT / "bundles" / "common" / "configs" / "logging.conf"
LICENSE_FILE = REPO_ROOT / "LICENSE"
METADATA_SCHEMA = REPO_ROOT / "tests" / "schemas" / "mb_metadata.schema.json"
#: the Model Zoo's schema for metadata.json (used by ``monai.bundle verify_metadata`` where it can download)
ZOO_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: packages the exported configs use through MONAI rather than by import: (distribution, why)
MONAI_BACKENDS_REQUIRED = (("nibabel", "NIfTI reading and writing"), ("pytorch-ignite", "monai.engines"),
                           ("scipy", "HD95 / ASD in evaluate.json"))  # fmt: skip
MONAI_BACKENDS_DICOM = (("itk", "DICOM-series input (LoadImaged reads a series folder with ITK)"),)
#: run settings that are not part of the training recipe (where and how a run happened, or derived)
NOT_RECIPE = frozenset({"datalist", "dataset_dir", "device", "epochs", "labeled_volumes", "pretrained_ckpt", "output_dir",
                        "runs_dir", "cache_dir", "tracking_uri", "experiment_name", "ckpt"})  # fmt: skip
EVAL_METRICS = (("mean_dice", "test_dice_mean"), ("mean_hd95_mm", "test_hd95_mean"), ("mean_asd_mm", "test_asd_mean"))
MONAI_REFERENCE = "M. J. Cardoso et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701 (2022)"
_REF = re.compile(r"@([A-Za-z_][\w]*)")


class ExportError(RuntimeError):
    """The run cannot be exported as asked, or the exported bundle failed a check."""


# ------------------------------------------------------------------------------------------------
# what is exported
# ------------------------------------------------------------------------------------------------


@dataclass
class BundleSource:
    """A fine-tune run to export.

    Attributes:
        checkpoint: the fine-tuned weights (a state dict, or ``{"model"|"state_dict": ...}``; weights only).
        settings: the run's hyper-parameters as the fine-tune workflow logs them (``hyper_parameters`` of
            ``finetune.json``): at least ``dataset``, ``datalist``, ``features``; also ``method``,
            ``num_labeled``, ``seed``, ``preprocessing_overrides`` and the recipe.
        eval_metrics: test metrics of the run's evaluation as logged (``test_dice_mean`` ...), if any.
        run_id, tracking_uri, evaluate_run_id: where it came from, for the model card.
        logged: ``settings`` are the run's logged hyper-parameters (not values given with a checkpoint,
            where anything not given is the workflow's default and is said to be so).
    """

    checkpoint: Path
    settings: dict[str, Any]
    eval_metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    tracking_uri: str | None = None
    evaluate_run_id: str | None = None
    logged: bool = False


def _tracking_uri(uri: str) -> str:
    """A store given as a run folder (``<output_dir>``) or a ``.db`` file becomes its ``sqlite:///`` URI."""
    path = Path(uri).expanduser()
    if "://" not in uri and path.is_dir():
        return local_tracking_uri(path)
    if "://" not in uri and path.suffix == ".db":
        return f"sqlite:///{path.resolve().as_posix()}"
    return uri


def _unflatten(params: Mapping[str, str]) -> dict[str, Any]:
    """MLflow params as logged by ``flatten_config`` (``a.b`` keys, JSON leaves) back to a nested dict."""
    out: dict[str, Any] = {}
    for key, text in params.items():
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            value = text
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def source_from_mlflow(run_id: str, tracking_uri: str, workdir: str | Path) -> BundleSource:
    """The fine-tune run ``run_id``: its ``config.json`` (else its params), its ``model.pt`` artifact, and the
    test metrics of the newest FINISHED evaluate run with the same method, dataset, L and seed that started
    after it (the grid's and the README's evaluate step).

    ``tracking_uri`` is an MLflow URI, or the run's output folder / ``mlruns.db`` for the default local store.
    """
    from mlflow.exceptions import MlflowException  # heavy: MLflow takes seconds to import

    uri = _tracking_uri(tracking_uri)
    client = open_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ExportError(f"no MLflow run {run_id} in {uri}: {err}") from None
    tags = dict(run.data.tags)
    if tags.get("workflow") != "finetune":
        raise ExportError(f"MLflow run {run_id} is a {tags.get('workflow', 'untagged')!r} run; export a fine-tune run")
    if run.info.status != "FINISHED":
        raise ExportError(f"MLflow run {run_id} is {run.info.status}, not FINISHED: its model.pt is not the run's result")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        settings = json.loads(Path(client.download_artifacts(run_id, "config.json", str(workdir))).read_text())
    except (MlflowException, OSError, json.JSONDecodeError):
        settings = _unflatten(run.data.params)
    try:
        checkpoint = Path(client.download_artifacts(run_id, "model.pt", str(workdir)))
    except (MlflowException, OSError) as err:
        raise ExportError(f"MLflow run {run_id} has no model.pt artifact ({err}); pass the checkpoint with --ckpt") from None
    for key in ("method", "dataset", "num_labeled", "seed"):
        if key in tags:
            settings.setdefault(key, tags[key])
    evaluation = _evaluate_run(client, run, tags)
    return BundleSource(
        checkpoint=checkpoint, settings=settings, run_id=run_id, tracking_uri=uri,
        eval_metrics=finite_metrics(evaluation.data.metrics) if evaluation else {},
        evaluate_run_id=evaluation.info.run_id if evaluation else None, logged=True,
    )  # fmt: skip


def _evaluate_run(client: Any, run: Any, tags: Mapping[str, str]) -> Any | None:
    keys = {k: tags[k] for k in ("method", "dataset", "num_labeled", "seed") if k in tags}
    query = filter_string({"workflow": "evaluate", **keys}, status="FINISHED")
    found = client.search_runs([run.info.experiment_id], query, order_by=["attributes.start_time DESC"])
    after = [r for r in found if r.info.start_time >= run.info.start_time]
    return after[0] if after else None


def source_from_checkpoint(
    ckpt: str | Path,
    dataset: str,
    datalist: str | None = None,
    features: Sequence[int] | None = None,
    preprocessing_overrides: Mapping[str, Any] | None = None,
    method: str = "random",
    num_labeled: int | None = None,
    seed: int | None = None,
    **settings: Any,
) -> BundleSource:
    """A checkpoint and the settings it was fine-tuned with (the keys of ``finetune.json``).

    ``features`` defaults to ``finetune.json``'s; ``datalist`` to ``data_manifests/<dataset>.json``.
    Test metrics come from ``<checkpoint folder>/evaluation/summary.json`` when the evaluate workflow
    wrote one there.
    """
    from ..workflows.metrics import flatten_summary

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ExportError(f"checkpoint {ckpt} does not exist")
    defaults = json.loads(FINETUNE_CONFIG.read_text())
    values = {
        "method": method, "dataset": dataset, "datalist": datalist or f"data_manifests/{dataset}.json",
        "features": list(features) if features is not None else defaults["features"],
        "preprocessing_overrides": dict(preprocessing_overrides or {}),
        **({"num_labeled": num_labeled} if num_labeled is not None else {}), **({"seed": seed} if seed is not None else {}),
        **settings,
    }  # fmt: skip
    metrics: dict[str, float] = {}
    summary = ckpt.parent / "evaluation" / "summary.json"
    if summary.is_file():
        metrics = finite_metrics(flatten_summary(json.loads(summary.read_text()), prefix="test"))
    return BundleSource(checkpoint=ckpt, settings=values, eval_metrics=metrics)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _repo_path(path: str | Path) -> Path:
    """A path as the workflows saw it (relative to the repository root, where they run)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _git_origin() -> str:
    """``commit <short sha>`` of this repository (``+ local changes`` when the exported code differs), or ``""``."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "metacontrast", "bundles/common"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"commit {sha}" + (" + local changes" if dirty else "")


def _dataset_info(manifest: Mapping[str, Any]) -> dict[str, Any]:
    table = json.loads((TEMPLATES / "datasets.json").read_text())
    info = dict(table["default"])
    info.update(table.get(manifest.get("layout", ""), {}))
    info.update(table.get(manifest.get("name", ""), {}))
    return info


def _initialisation(settings: Mapping[str, Any]) -> str:
    """How the fine-tune started, as far as the settings tell."""
    method, pretrained = str(settings.get("method", "random")), settings.get("pretrained_ckpt")
    if pretrained:
        return f"the encoder pre-trained by {method} (`{pretrained}`)"
    if method == "random" or pretrained == "":
        return "a random initialisation (no pre-training)"
    return f"a {method} pre-trained encoder (its file was not given to the exporter)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _method_references(method: str) -> list[str]:
    """References of the method's bundle (``bundles/<method>/configs/metadata.json``), none for random init."""
    base = re.split(r"[+/]", method)[0]
    path = REPO_ROOT / "bundles" / base / "configs" / "metadata.json"
    if base in ("", "random", "common") or not path.is_file():
        return []
    return [str(r) for r in json.loads(path.read_text()).get("references", [])]


def _strings(value: Any) -> list[str]:
    """Every string of a config, keys included, except the ``_doc_`` texts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "_doc_" for s in (_strings(k) + _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _with_first(config: Mapping[str, Any], first: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of ``first`` set and placed after ``_doc_`` / ``imports``."""
    head = {k: config[k] for k in ("_doc_", "imports") if k in config}
    rest = {k: v for k, v in config.items() if k not in head and k not in first}
    return {**head, **first, **rest}


def _close_references(config: dict[str, Any], donor: Mapping[str, Any]) -> dict[str, Any]:
    """Add to ``config`` every top-level key it refers to (``@key``) but lacks, taken from ``donor``."""
    while True:
        missing = {m for s in _strings(config) for m in _REF.findall(s) if m not in config}
        if not missing:
            return config
        unknown = sorted(m for m in missing if m not in donor)
        if unknown:
            raise ExportError(f"the exported config refers to {unknown}, which neither it nor train.json defines")
        config.update({m: copy.deepcopy(donor[m]) for m in sorted(missing)})


def _check_portable(name: str, config: Mapping[str, Any]) -> None:
    """The exported configs must not point into this repository."""
    for text in _strings(config):
        if text.startswith("%") or "bundles/" in text or "data_manifests/" in text or "sample_data/" in text:
            raise ExportError(f"{name} still refers to the repository: {text!r}")


# ------------------------------------------------------------------------------------------------
# the configs
# ------------------------------------------------------------------------------------------------


def make_inference_config(labels: Mapping[str, str], settings: Mapping[str, Any], preprocessing: Mapping[str, Any],
                          info: Mapping[str, Any], dataset_dir: str) -> dict[str, Any]:  # fmt: skip
    """``templates/inference.json`` with this run's classes, network widths and preprocessing."""
    config = json.loads((TEMPLATES / "inference.json").read_text())
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


def make_train_config(finetune: Mapping[str, Any], settings: Mapping[str, Any], dataset_dir: str, encoder: bool, origin: str) -> dict[str, Any]:
    """``finetune.json`` with ``scripts`` for this package, bundle-relative paths and this run's recipe as defaults."""
    config = vendor.rewrite_config(copy.deepcopy(dict(finetune)))
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


def make_evaluate_config(evaluate: Mapping[str, Any], train: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``evaluate.json`` made standalone: each ``%<finetune.json>#key`` becomes train.json's value of ``key``."""
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


# ------------------------------------------------------------------------------------------------
# metadata and model card
# ------------------------------------------------------------------------------------------------


def _versions(vendored: Sequence[str], layout: str) -> dict[str, Any]:
    """The version fields: MONAI, PyTorch, NumPy, and ``required_packages_version`` -- what the vendored code
    imports plus the MONAI back-ends the configs use (``itk`` only for a DICOM dataset).

    No ``optional_packages_version``: MONAI (1.2 and later) reads it as a deprecated name of
    ``required_packages_version`` and, where both are given, keeps only the optional list.
    """
    import importlib.metadata

    imported = vendor.distributions(vendor.third_party_imports(vendored))
    required = {k: v for k, v in imported.items() if k not in ("torch", "monai", "numpy")}
    backends = MONAI_BACKENDS_REQUIRED + (MONAI_BACKENDS_DICOM if layout == "dicom" else ())
    for dist, _why in backends:
        required[dist] = vendor.plain_version(importlib.metadata.version(dist))
    return {
        "monai_version": vendor.plain_version(importlib.metadata.version("monai")),
        "pytorch_version": vendor.plain_version(importlib.metadata.version("torch")),
        "numpy_version": vendor.plain_version(importlib.metadata.version("numpy")),
        "required_packages_version": dict(sorted(required.items())),
    }


def _eval_metrics(metrics: Mapping[str, float], labels: Mapping[str, str]) -> dict[str, float]:
    out = {name: round(metrics[key], 4) for name, key in EVAL_METRICS if key in metrics}
    for name in [v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]:
        if f"test_dice_{name}" in metrics:
            out[f"dice_{_slug(name)}"] = round(metrics[f"test_dice_{name}"], 4)
    if "test_n_volumes" in metrics:
        out["test_volumes"] = int(metrics["test_n_volumes"])
    return out


def make_metadata(
    source: BundleSource, manifest: Mapping[str, Any], preprocessing: Mapping[str, Any], info: Mapping[str, Any],
    versions: Mapping[str, Any], version: str, changelog: Mapping[str, str], name: str,
) -> dict[str, Any]:  # fmt: skip
    settings, labels = source.settings, {str(k): v for k, v in manifest["labels"].items()}
    foreground = [v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]
    classes = ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])))
    px, py = (float(p) for p in preprocessing["pixel_size"])
    h, w = (int(s) for s in preprocessing["spatial_size"])
    method = str(settings.get("method", "random"))
    init = _initialisation(settings).split(" (", 1)[0]
    shape_text = (f"per-volume 1st-99th percentile intensity scaling to [0, 1] (clipped), in-plane resampling to "
                  f"{px:g} x {py:g} mm (bilinear), centre crop/pad to {h} x {w}, 2D slices along the last array axis")  # fmt: skip
    metadata: dict[str, Any] = {
        "schema": ZOO_SCHEMA_URL,
        "version": version,
        "changelog": dict(changelog),
        **versions,
        "name": name,
        "task": (f"Segmentation of {', '.join(foreground)} in {info['modality']} volumes, slice by slice "
                 f"({info['display_name'] or manifest.get('name', '')})"),
        "description": (
            f"2D U-Net (MONAI UNet, residual units, widths {list(settings['features'])}) fine-tuned from {init} with "
            f"L = {settings.get('num_labeled', '?')} labelled volume(s) of {manifest.get('name', '')} (metacontrast shared fine-tune "
            f"workflow). Inference predicts each slice along the last array axis and writes the label map on the "
            f"image's own voxel grid."
        ),
        "authors": "metacontrast contributors",
        "copyright": "Copyright (c) metacontrast contributors",
        "data_source": info["data_source"],
        "data_type": "nibabel",
        "image_classes": f"single-channel {info['modality']} slice; {shape_text}",
        "label_classes": f"single-channel label map: {classes}",
        "pred_classes": f"{len(labels)} channels, one logit per class ({classes}); the label is the argmax",
        **({"eval_metrics": _eval_metrics(source.eval_metrics, labels)} if _eval_metrics(source.eval_metrics, labels) else {}),
        "intended_use": "Research only: not for clinical use or diagnosis.",
        "references": [*_method_references(method), *([info["citation"]] if info["citation"] else []), MONAI_REFERENCE],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": info["modality"], "num_channels": 1,
                    "spatial_shape": [h, w], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                    "channel_def": {"0": "image"}, "pixdim": [px, py], "preprocessing": shape_text,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "labels", "modality": info["modality"], "num_channels": len(labels), "spatial_shape": [h, w],
                    "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": labels,
                }
            },
        },  # fmt: skip
    }
    return metadata


def results_rows(results_dir: str | Path | None, dataset: str, method: str) -> str:
    """The rows of ``method`` (and the random init) from ``<results_dir>/<dataset>/table.md``, with its
    heading, header and notes, verbatim; ``""`` when there is no table or no such row."""
    if results_dir is None:
        return ""
    table = Path(results_dir) / dataset / "table.md"
    if not table.is_file():
        return ""
    lines = table.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(rows) < 3:
        return ""
    wanted = {method, "random"}
    picked = [lines[i] for i in rows[2:] if any(f'id="method-{m}"' in lines[i] for m in wanted)]
    if not any(f'id="method-{method}"' in line for line in picked):
        return ""
    heading = [line for line in lines[: rows[0]] if line.strip()]
    notes = [line for line in lines[rows[-1] + 1 :] if line.strip()]
    return "\n".join([*heading, "", lines[rows[0]], lines[rows[1]], *picked, "", *notes])


def _performance(source: BundleSource, labels: Mapping[str, str], dataset: str, rows: str, results_dir: Any) -> str:
    parts = []
    metrics = source.eval_metrics
    if "test_dice_mean" in metrics:
        names = [v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]
        per_class = ", ".join(f"{n} {metrics[f'test_dice_{n}']:.3f}" for n in names if f"test_dice_{n}" in metrics)
        n = int(metrics.get("test_n_volumes", 0))
        where = f"MLflow evaluate run `{source.evaluate_run_id}`" if source.evaluate_run_id else "the evaluate workflow's `summary.json`"
        line = (f"This model on the test split of `{dataset}` ({n} volumes; {where}): 3D Dice "
                f"{metrics['test_dice_mean']:.3f} ± {metrics.get('test_dice_std', float('nan')):.3f}"
                f" (per class: {per_class})")  # fmt: skip
        for label, key in (("HD95", "test_hd95_mean"), ("ASD", "test_asd_mean")):
            if key in metrics:
                line += f", {label} {metrics[key]:.2f} mm"
        parts.append(line + ". Dice: 3D Dice per foreground class on the source voxel grid, averaged over classes, per volume.")
    if rows:
        parts.append(f"The rows of this method in the results table (`{Path(results_dir).name}/{dataset}/table.md`, "
                     f"written by `scripts/run_grid.py` from MLflow runs; other seeds and L are separate models):\n\n{rows}")  # fmt: skip
    if not parts:
        parts.append("No evaluation was logged for this run. Score it with `configs/evaluate.json` (see Usage).")
    return "\n\n".join(parts)


def make_model_card(source: BundleSource, manifest: Mapping[str, Any], preprocessing: Mapping[str, Any], info: Mapping[str, Any],
                    metadata: Mapping[str, Any], train: Mapping[str, Any], vendored: Sequence[str], origin: str,
                    results_dir: str | Path | None, has_encoder: bool) -> str:  # fmt: skip
    settings, labels = source.settings, {str(k): v for k, v in manifest["labels"].items()}
    dataset = str(settings["dataset"])
    method = str(settings.get("method", "random"))
    foreground = [v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]
    length = (f"{train.get('max_iterations')} iterations" if int(train.get("max_iterations") or 0) > 0
              else f"{train.get('max_epochs')} epochs")  # fmt: skip
    target = lambda key: str(train.get(key, {}).get("_target_", "?")).rsplit(".", 1)[-1] if isinstance(train.get(key), dict) else "?"
    recipe = (f"{target('optimizer')} (learning rate {train.get('learning_rate')}, {target('lr_scheduler')}), {target('loss')}, "
              f"batch size {train.get('batch_size')}, {length}, validation every {train.get('val_interval')} epochs")  # fmt: skip
    if not source.logged:
        recipe += (" (exported from a checkpoint, not a logged run: values not given to the exporter are the "
                   "fine-tune workflow's defaults)")  # fmt: skip
    init_description = _initialisation(settings)
    provenance = [f"- Exported by `scripts/export_bundle.py` (metacontrast{', ' + origin if origin else ''})."]
    if source.run_id:
        provenance.append(f"- Fine-tune run: MLflow run `{source.run_id}` (experiment store `{source.tracking_uri}`).")
    else:
        provenance.append(f"- Fine-tuned weights: `{source.checkpoint.name}` given with the settings it was trained with.")
    if source.evaluate_run_id:
        provenance.append(f"- Evaluation: MLflow run `{source.evaluate_run_id}`.")
    provenance.append(f"- Vendored code in `scripts/`: {', '.join(f'`{p}`' for p in vendored)}.")
    citations = [f"- {r}" for r in metadata.get("references", [])]
    values = {
        "title": metadata["name"],
        "authors": metadata["authors"],
        "modality": info["modality"],
        "label_names": ", ".join(foreground),
        "method": method,
        "num_res_units": 2,
        "features": str([int(f) for f in settings["features"]]),
        "init_description": init_description,
        "num_labeled": settings.get("num_labeled", "?"),
        "seed": settings.get("seed", "?"),
        "labeled_volumes": ", ".join(map(str, settings.get("labeled_volumes", []))) or "not logged",
        "recipe": recipe,
        "channel_def": ", ".join(f"{k} {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))),
        "data_source": f"{info['data_source']}. Manifest `{manifest.get('name', dataset)}`.",
        "split_counts": " / ".join(str(len(manifest.get(s, []))) for s in ("pretrain", "train", "val", "test")),
        "pixel_size_text": " x ".join(f"{float(p):g}" for p in preprocessing["pixel_size"]),
        "spatial_size_text": " x ".join(str(int(s)) for s in preprocessing["spatial_size"]),
        "performance": _performance(source, labels, dataset, results_rows(results_dir, dataset, method), results_dir),
        "image_glob": f"`{info['image_glob']}`",
        "dataset_dir_example": info["dataset_dir"],
        "train_init": "the shipped pre-trained encoder (`models/pretrained_encoder.pt`)" if has_encoder else (
            "a random initialisation, as this model did" if init_description.startswith("a random")
            else "a random initialisation (the encoder this model started from is not shipped)"),
        "origin": origin or "an unknown commit",
        "dataset": dataset,
        "provenance": "\n".join(provenance),
        "citations": "\n".join(citations),
    }
    return string.Template((TEMPLATES / "README.md").read_text()).substitute(values)


def check_metadata(metadata: Mapping[str, Any], schema_path: str | Path = METADATA_SCHEMA) -> None:
    """Validate ``metadata`` against the JSON schema of the MONAI Bundle specification's metadata
    (``monai.bundle.verify_metadata`` needs to download the Zoo's schema), plus the Zoo's rule that
    ``version`` is a key of ``changelog``."""
    import jsonschema

    schema = json.loads(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(dict(metadata)), key=lambda e: list(e.path))
    if errors:
        raise ExportError("metadata.json does not follow the bundle specification: " + "; ".join(
            f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5]))  # fmt: skip
    if metadata["version"] not in metadata.get("changelog", {}):
        raise ExportError(f"metadata.json: version {metadata['version']} is not in the changelog")


# ------------------------------------------------------------------------------------------------
# checks on the written bundle
# ------------------------------------------------------------------------------------------------


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from ..workflows.checkpoints import load_checkpoint, state_dict_of

    return {k: v.detach().cpu().contiguous() for k, v in state_dict_of(load_checkpoint(path), path).items()}


def check_bundle(bundle: Path, state_dict: Mapping[str, torch.Tensor], features: Sequence[int], num_classes: int,
                 spatial_size: Sequence[int], norm: str = "instance") -> None:  # fmt: skip
    """The Zoo's checks and ours on a written bundle (``bundle`` is its root); raises :class:`ExportError`."""
    from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

    from ..nets.unet import SegmentationUNet

    configs, meta = bundle / "configs", str(bundle / "configs" / "metadata.json")
    inference = str(configs / "inference.json")
    parser = ConfigParser()
    parser.read_config(inference)
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def").eval()
    try:
        network.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as err:
        raise ExportError(f"models/model.pt does not fit inference.json's network_def (features {list(features)}?): {err}") from None
    reference = SegmentationUNet(in_channels=1, out_channels=num_classes, features=features, norm=norm).eval()
    reference.load_state_dict(dict(state_dict), strict=True)
    x = torch.rand(2, 1, *[int(s) for s in spatial_size], generator=torch.Generator().manual_seed(0))
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


# ------------------------------------------------------------------------------------------------
# the exporter
# ------------------------------------------------------------------------------------------------


def exportable_manifest(manifest: dict) -> dict:
    """The manifest as shipped in a bundle.  A DICOM manifest's entries are withheld: its paths are the
    user's series folders, whose names are often the PatientID (TCIA's are), and an exported bundle must
    carry no patient identifier.  Labels, meta labels and preprocessing stay; point ``datalist`` at your own
    manifest to train or evaluate with the bundle."""
    if manifest.get("layout") != "dicom":
        return manifest
    withheld = {split: [] for split in ("pretrain", "train", "val", "test")}
    note = "entries withheld: DICOM series folder names may be patient identifiers; pass --datalist <your manifest>"
    return {**manifest, **withheld, "_note": note}


def export_bundle(
    dest: str | None = None,
    run_id: str | None = None,
    tracking_uri: str = "",
    ckpt: str | None = None,
    dataset: str | None = None,
    datalist: str | None = None,
    features: Sequence[int] | None = None,
    preprocessing_overrides: Mapping[str, Any] | None = None,
    pixel_size: Sequence[float] | None = None,
    spatial_size: Sequence[int] | None = None,
    method: str | None = None,
    num_labeled: int | None = None,
    seed: int | None = None,
    pretrained_ckpt: str | None = None,
    name: str | None = None,
    version: str = "0.1.0",
    changelog: str | None = None,
    dataset_dir: str | None = None,
    results_dir: str | None = str(REPO_ROOT / "results"),
    include_encoder: bool = True,
    schema: str | None = str(METADATA_SCHEMA),
    overwrite: bool = False,
    **recipe: Any,
) -> str:
    """Write a Model Zoo bundle of a fine-tuned run and check it; returns the bundle folder.

    The run is either ``run_id`` (an MLflow fine-tune run) in ``tracking_uri`` (a URI, or the run's output
    folder for its default local store), or ``ckpt`` with the settings it was trained with (``dataset``,
    ``datalist``, ``features``, ``preprocessing_overrides``, ``method``, ``num_labeled``, ``seed``,
    ``pretrained_ckpt``; given with ``run_id`` they override the run's).  ``pixel_size`` /
    ``spatial_size`` override the preprocessing of either.

    Args:
        dest: the bundle folder (default ``dist/<name>`` in this repository).
        name: the bundle name (default ``<method>_<dataset>_<modality>_segmentation``).
        version, changelog: the bundle's version and its changelog line; the entries of an existing
            bundle at ``dest`` for other versions are kept.
        dataset_dir: the data folder the exported configs default to (default: a Zoo-style placeholder).
        results_dir: where ``<dataset>/table.md`` is read for the model card (``None``: no table).
        pretrained_ckpt: the pre-trained encoder the fine-tune started from ("" = random init).
        include_encoder: ship that encoder as ``models/pretrained_encoder.pt`` (train.json's default start).
        schema: JSON schema to validate metadata.json with (``None``: skip).
        overwrite: replace an existing bundle at ``dest`` (otherwise that is an error).
        recipe: further keys of ``finetune.json`` the weights were trained with (``--batch_size 8
            --max_iterations 600`` ...): with ``ckpt`` they are the recipe ``train.json`` and the model card
            state; with ``run_id`` they override the logged values.
    """
    if run_id is not None and not isinstance(run_id, str):
        raise ExportError(f"run_id must be text; quote it on the command line (--run_id '\"...\"'), got {run_id!r}")
    unknown = sorted(set(recipe) - set(json.loads(FINETUNE_CONFIG.read_text())))
    if unknown:
        raise ExportError(f"unknown options {unknown}: further options must be keys of {FINETUNE_CONFIG.relative_to(REPO_ROOT)}")
    if (run_id is None) == (ckpt is None):
        raise ExportError("give either run_id (an MLflow fine-tune run) or ckpt (a checkpoint with its settings)")
    with tempfile.TemporaryDirectory(prefix="export_") as work:
        if run_id is not None:
            if not tracking_uri:
                raise ExportError("run_id needs tracking_uri (an MLflow URI, or the run's output folder)")
            source = source_from_mlflow(run_id, tracking_uri, work)
            if ckpt is not None:
                source.checkpoint = Path(ckpt)
        else:
            if dataset is None:
                raise ExportError("ckpt needs the dataset it was fine-tuned on (--dataset)")
            extra = {k: v for k, v in (("num_labeled", num_labeled), ("seed", seed)) if v is not None}
            source = source_from_checkpoint(ckpt, dataset, datalist, features, preprocessing_overrides, method or "random", **extra)
        for key, value in (("dataset", dataset), ("datalist", datalist), ("features", features), ("method", method),
                           ("preprocessing_overrides", preprocessing_overrides), ("num_labeled", num_labeled), ("seed", seed),
                           ("pretrained_ckpt", pretrained_ckpt), *recipe.items()):  # fmt: skip
            if value is not None:
                source.settings[key] = value
        return str(_export(source, dest, name, version, changelog, dataset_dir, results_dir, include_encoder, schema, overwrite,
                           pixel_size, spatial_size))  # fmt: skip


def _export(source: BundleSource, dest: str | None, name: str | None, version: str, changelog: str | None, dataset_dir: str | None,
            results_dir: str | None, include_encoder: bool, schema: str | None, overwrite: bool,
            pixel_size: Sequence[float] | None, spatial_size: Sequence[int] | None) -> Path:  # fmt: skip
    from ..workflows.data import preprocessing_settings, read_manifest

    settings = source.settings
    for key in ("dataset", "features"):
        if key not in settings:
            raise ExportError(f"the run's settings lack {key!r}")
    dataset = str(settings["dataset"])
    settings.setdefault("datalist", f"data_manifests/{dataset}.json")
    settings.setdefault("method", "random")
    manifest_path = _repo_path(settings["datalist"])
    manifest = read_manifest(manifest_path)
    preprocessing = preprocessing_settings(manifest, settings.get("preprocessing_overrides") or {}, dataset)
    if pixel_size is not None:
        preprocessing["pixel_size"] = list(pixel_size)
    if spatial_size is not None:
        preprocessing["spatial_size"] = list(spatial_size)
    settings["preprocessing_overrides"] = {**(settings.get("preprocessing_overrides") or {}), dataset: dict(preprocessing)}
    info = _dataset_info(manifest)
    data_dir = dataset_dir or info["dataset_dir"]
    modality = {"MR": "mri"}.get(info["modality"], _slug(info["modality"]))
    name = name or f"{_slug(str(settings['method']))}_{_slug(dataset)}_{modality}_segmentation"
    dest_path = Path(dest) if dest else REPO_ROOT / "dist" / name
    if dest_path.exists() and not overwrite:
        raise ExportError(f"{dest_path} exists; pass --overwrite True to replace it")
    origin = _git_origin()

    from ..workflows.checkpoints import norm_of

    state_dict = _load_weights(source.checkpoint)
    settings["norm"] = norm_of(state_dict, source.checkpoint)  # the weights' own, whatever the run logged
    encoder = _repo_path(settings["pretrained_ckpt"]) if include_encoder and settings.get("pretrained_ckpt") else None
    if encoder is not None and not encoder.is_file():
        logger.warning("the pre-trained encoder %s is gone: train.json will start from a random initialisation", encoder)
        encoder = None

    finetune, evaluate = json.loads(FINETUNE_CONFIG.read_text()), json.loads(EVALUATE_CONFIG.read_text())
    train_cfg = make_train_config(finetune, settings, data_dir, encoder is not None, origin)
    evaluate_cfg = make_evaluate_config(evaluate, train_cfg, origin)
    inference_cfg = make_inference_config(manifest["labels"], settings, preprocessing, info, data_dir)
    for label, cfg in (("train.json", train_cfg), ("evaluate.json", evaluate_cfg), ("inference.json", inference_cfg)):
        _check_portable(label, cfg)
    references = vendor.config_references([finetune, evaluate]) | {f"{vendor.PACKAGE}.export.writer", f"{vendor.PACKAGE}.export.transforms"}
    modules = vendor.import_closure({vendor.resolve_module(r) for r in references})

    old_changelog = {}
    if (dest_path / "configs" / "metadata.json").is_file():
        old_changelog = json.loads((dest_path / "configs" / "metadata.json").read_text()).get("changelog", {})
    default_line = (f"exported from MLflow run {source.run_id}" if source.run_id else f"exported from {source.checkpoint.name}") + (
        f": {settings['method']} fine-tuned on {dataset} with L = {settings.get('num_labeled', '?')}, seed {settings.get('seed', '?')}")
    log = {version: changelog or default_line, **{k: v for k, v in old_changelog.items() if k != version}}
    log = dict(sorted(log.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in re.split(r"[.\-]", kv[0])], reverse=True))

    dest_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.", dir=dest_path.parent))
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        (staging / "docs").mkdir()
        vendored = [p.as_posix() for p in vendor.vendor(modules, staging / "scripts", origin)]
        versions = _versions(modules, manifest.get("layout", ""))
        metadata = make_metadata(source, manifest, preprocessing, info, versions, version, log, _title(settings, info, dataset))
        if schema:
            check_metadata(metadata, schema)
        configs = {"metadata.json": metadata, "inference.json": inference_cfg, "train.json": train_cfg, "evaluate.json": evaluate_cfg}
        for file, cfg in configs.items():
            (staging / "configs" / file).write_text(json.dumps(cfg, indent=2) + "\n")
        (staging / "configs" / "datalist.json").write_text(json.dumps(exportable_manifest(manifest), indent=2, sort_keys=True) + "\n")
        shutil.copyfile(LOGGING_CONF, staging / "configs" / "logging.conf")
        shutil.copyfile(LICENSE_FILE, staging / "LICENSE")
        shutil.copyfile(TEMPLATES / "data_license" / info["data_license"], staging / "docs" / "data_license.txt")
        torch.save(state_dict, staging / "models" / "model.pt")
        if encoder is not None:
            torch.save(_load_weights(encoder), staging / "models" / "pretrained_encoder.pt")
        card = make_model_card(source, manifest, preprocessing, info, metadata, train_cfg, vendored, origin, results_dir, encoder is not None)
        (staging / "docs" / "README.md").write_text(card)
        check_bundle(staging, state_dict, [int(f) for f in settings["features"]], len(manifest["labels"]), preprocessing["spatial_size"], settings["norm"])
        if dest_path.exists():
            shutil.rmtree(dest_path)
        staging.rename(dest_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s", dest_path)
    print(f"exported bundle {dest_path} (version {version}); run its inference from that folder with: "
          f"python -m monai.bundle run --config_file configs/inference.json --dataset_dir <images>")  # fmt: skip
    return dest_path


def _title(settings: Mapping[str, Any], info: Mapping[str, Any], dataset: str) -> str:
    method = str(settings.get("method", "random"))
    label = "random-init" if method == "random" else method.upper() if method.isalpha() else method
    return f"{label} {info['display_name'] or dataset} {info['modality']} segmentation (L={settings.get('num_labeled', '?')})"
