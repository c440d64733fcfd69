"""What an exported bundle says about itself: ``configs/metadata.json`` and the model card ``docs/README.md``.

* :func:`make_metadata` -- every field of the MONAI Bundle specification; ``network_data_format`` carries the
  input spacing (``pixdim``) and crop (``spatial_shape``), ``channel_def`` the manifest's classes;
* :func:`make_model_card` -- ``templates/README.md`` filled in, with the run's evaluation and its rows of
  ``results/<dataset>/table.md`` (:func:`results_rows`, copied verbatim, never retyped);
* :func:`changelog` -- the new version's line merged with those of a bundle already at the destination.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import string
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from ..method_name import split_method_name
from ..reporting.results import read_evaluate_csv
from ..reporting.tables import is_random_row, random_reference
from ..variants import RANDOM
from . import vendor
from .configs import TEMPLATES, preprocessing_of
from .source import BundleSource

__all__ = ["bundle_name", "changelog", "dataset_info", "git_origin", "make_metadata", "make_model_card", "results_rows", "versions"]

#: the Model Zoo's schema for metadata.json (used by ``monai.bundle verify_metadata`` where it can download)
ZOO_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: packages the exported configs use through MONAI rather than by import: (distribution, why)
MONAI_BACKENDS_REQUIRED = (("nibabel", "NIfTI reading and writing"), ("pytorch-ignite", "monai.engines"),
                           ("scipy", "HD95 / ASD in evaluate.json"))  # fmt: skip
MONAI_BACKENDS_DICOM = (("itk", "DICOM-series input (LoadImaged reads a series folder with ITK)"),)
EVAL_METRICS = (("mean_dice", "test_dice_mean"), ("mean_hd95_mm", "test_hd95_mean"), ("mean_asd_mm", "test_asd_mean"))
MONAI_REFERENCE = "M. J. Cardoso et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701 (2022)"


def git_origin() -> str:
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


def dataset_info(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What ``templates/datasets.json`` knows of the manifest's dataset (by layout, then name): display name,
    modality, source, citation, licence, image glob, example data folder."""
    table = json.loads((TEMPLATES / "datasets.json").read_text())
    info = dict(table["default"])
    info.update(table.get(manifest.get("layout", ""), {}))
    info.update(table.get(manifest.get("name", ""), {}))
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _sorted_labels(labels: Mapping[Any, str]) -> list[tuple[str, str]]:
    return sorted(((str(k), v) for k, v in labels.items()), key=lambda kv: int(kv[0]))


def bundle_name(settings: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """``<method>_<dataset>_<modality>_segmentation``, the Zoo's naming."""
    modality = {"MR": "mri"}.get(info["modality"], _slug(info["modality"]))
    return f"{_slug(str(settings['method']))}_{_slug(str(settings['dataset']))}_{modality}_segmentation"


def _title(settings: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    method = str(settings.get("method", RANDOM))
    label = "random-init" if is_random_row(method) else method.upper() if method.isalpha() else method
    return f"{label} {info['display_name'] or settings['dataset']} {info['modality']} segmentation (L={settings.get('num_labeled', '?')})"


def _initialisation(settings: Mapping[str, Any]) -> str:
    """How the fine-tune started, as far as the settings tell."""
    method, pretrained = str(settings.get("method", RANDOM)), settings.get("pretrained_ckpt")
    if pretrained:
        return f"the encoder pre-trained by {method} (`{pretrained}`)"
    if is_random_row(method) or pretrained == "":
        return "a random initialisation (no pre-training)"
    return f"a {method} pre-trained encoder (its file was not given to the exporter)"


def _method_references(method: str) -> list[str]:
    """References of the method's bundle (``bundles/<method>/configs/metadata.json``), none for random init."""
    base = split_method_name(method).bundle
    path = REPO_ROOT / "bundles" / base / "configs" / "metadata.json"
    if base in ("", RANDOM, "common") or not path.is_file():
        return []
    return [str(r) for r in json.loads(path.read_text()).get("references", [])]


def changelog(version: str, line: str, dest: Path) -> dict[str, str]:
    """``{version: line}`` merged with the changelog of the bundle at ``dest`` (if any), newest version first."""
    old: dict[str, str] = {}
    if (dest / "configs" / "metadata.json").is_file():
        old = json.loads((dest / "configs" / "metadata.json").read_text()).get("changelog", {})
    log = {version: line, **{k: v for k, v in old.items() if k != version}}
    return dict(sorted(log.items(), key=lambda kv: [int(p) if p.isdigit() else p for p in re.split(r"[.\-]", kv[0])], reverse=True))


def versions(vendored: Sequence[str], layout: str) -> dict[str, Any]:
    """The version fields: MONAI, PyTorch, NumPy, and ``required_packages_version`` -- what the vendored code
    imports plus the MONAI back-ends the configs use (``itk`` only for a DICOM dataset).

    No ``optional_packages_version``: MONAI (1.2 and later) reads it as a deprecated name of
    ``required_packages_version`` and, where both are given, keeps only the optional list.
    """
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
    for name in [v for k, v in _sorted_labels(labels) if int(k) != 0]:
        if f"test_dice_{name}" in metrics:
            out[f"dice_{_slug(name)}"] = round(metrics[f"test_dice_{name}"], 4)
    if "test_n_volumes" in metrics:
        out["test_volumes"] = int(metrics["test_n_volumes"])
    return out


def make_metadata(source: BundleSource, manifest: Mapping[str, Any], package_versions: Mapping[str, Any], version: str,
                  log: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """``metadata.json``: ``package_versions`` from :func:`versions`, ``log`` from :func:`changelog`."""
    settings, info, preprocessing = source.settings, dataset_info(manifest), preprocessing_of(source.settings)
    labels = {str(k): v for k, v in manifest["labels"].items()}
    foreground = [v for k, v in _sorted_labels(labels) if int(k) != 0]
    classes = ", ".join(f"{k} {v}" for k, v in _sorted_labels(labels))
    px, py = (float(p) for p in preprocessing["pixel_size"])
    h, w = (int(s) for s in preprocessing["spatial_size"])
    init = _initialisation(settings).split(" (", 1)[0]
    shape_text = (f"per-volume 1st-99th percentile intensity scaling to [0, 1] (clipped), in-plane resampling to "
                  f"{px:g} x {py:g} mm (bilinear), centre crop/pad to {h} x {w}, 2D slices along the last array axis")  # fmt: skip
    eval_metrics = _eval_metrics(source.eval_metrics, labels)
    return {
        "schema": ZOO_SCHEMA_URL,
        "version": version,
        "changelog": dict(log),
        **package_versions,
        "name": _title(settings, info),
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
        **({"eval_metrics": eval_metrics} if eval_metrics else {}),
        "intended_use": "Research only: not for clinical use or diagnosis.",
        "references": [*_method_references(str(settings.get("method", RANDOM))), *([info["citation"]] if info["citation"] else []),
                       MONAI_REFERENCE],  # fmt: skip
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


def results_rows(results_dir: str | Path | None, dataset: str, method: str) -> str:
    """The rows of ``method`` and of the random init it is compared with (same recipe and network, as the
    tables pair them: :func:`~metacontrast.reporting.tables.random_reference` over ``evaluate_runs.csv``) from
    ``<results_dir>/<dataset>/table.md``, with its heading, header and notes, verbatim; ``""`` when there is no
    table or no such row."""
    if results_dir is None:
        return ""
    folder = Path(results_dir) / dataset
    table, runs = folder / "table.md", folder / "evaluate_runs.csv"
    if not table.is_file():
        return ""
    lines = table.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(rows) < 3:
        return ""
    wanted = {method, random_reference(read_evaluate_csv(runs) if runs.is_file() else [], method)}
    picked = [lines[i] for i in rows[2:] if any(f'id="method-{m}"' in lines[i] for m in wanted)]
    if not any(f'id="method-{method}"' in line for line in picked):
        return ""
    heading = [line for line in lines[: rows[0]] if line.strip()]
    notes = [line for line in lines[rows[-1] + 1 :] if line.strip()]
    return "\n".join([*heading, "", lines[rows[0]], lines[rows[1]], *picked, "", *notes])


def _performance(source: BundleSource, labels: Mapping[str, str], results_dir: str | Path | None) -> str:
    """The card's performance section: the run's evaluation and its rows of the results table."""
    dataset, metrics, parts = str(source.settings["dataset"]), source.eval_metrics, []
    if "test_dice_mean" in metrics:
        names = [v for k, v in _sorted_labels(labels) if int(k) != 0]
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
    rows = results_rows(results_dir, dataset, str(source.settings.get("method", RANDOM)))
    if rows:
        parts.append(f"The rows of this method in the results table (`{Path(results_dir).name}/{dataset}/table.md`, "  # type: ignore[arg-type]
                     f"written by `scripts/run_grid.py` from MLflow runs; other seeds and L are separate models):\n\n{rows}")  # fmt: skip
    if not parts:
        parts.append("No evaluation was logged for this run. Score it with `configs/evaluate.json` (see Usage).")
    return "\n\n".join(parts)


def make_model_card(source: BundleSource, manifest: Mapping[str, Any], metadata: Mapping[str, Any], train: Mapping[str, Any],
                    vendored: Sequence[str], origin: str, results_dir: str | Path | None) -> str:  # fmt: skip
    """``docs/README.md``: what the model is, how it was trained (``train``: the exported train.json), how it
    scored, how to run it, where it came from (``origin``: :func:`git_origin`; ``vendored``: the files under
    ``scripts/``) and what to cite."""
    settings, info, preprocessing = source.settings, dataset_info(manifest), preprocessing_of(source.settings)
    labels = dict(_sorted_labels(manifest["labels"]))
    dataset = str(settings["dataset"])
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
    values = {
        "title": metadata["name"],
        "authors": metadata["authors"],
        "modality": info["modality"],
        "label_names": ", ".join(v for k, v in labels.items() if int(k) != 0),
        "method": str(settings.get("method", RANDOM)),
        "num_res_units": 2,
        "features": str([int(f) for f in settings["features"]]),
        "init_description": init_description,
        "num_labeled": settings.get("num_labeled", "?"),
        "seed": settings.get("seed", "?"),
        "labeled_volumes": ", ".join(map(str, settings.get("labeled_volumes", []))) or "not logged",
        "recipe": recipe,
        "channel_def": ", ".join(f"{k} {v}" for k, v in labels.items()),
        "data_source": f"{info['data_source']}. Manifest `{manifest.get('name', dataset)}`.",
        "split_counts": " / ".join(str(len(manifest.get(s, []))) for s in ("pretrain", "train", "val", "test")),
        "pixel_size_text": " x ".join(f"{float(p):g}" for p in preprocessing["pixel_size"]),
        "spatial_size_text": " x ".join(str(int(s)) for s in preprocessing["spatial_size"]),
        "performance": _performance(source, labels, results_dir),
        "image_glob": f"`{info['image_glob']}`",
        "dataset_dir_example": info["dataset_dir"],
        "train_init": "the shipped pre-trained encoder (`models/pretrained_encoder.pt`)" if train.get("pretrained_ckpt") else (
            "a random initialisation, as this model did" if init_description.startswith("a random")
            else "a random initialisation (the encoder this model started from is not shipped)"),
        "origin": origin or "an unknown commit",
        "dataset": dataset,
        "provenance": "\n".join(provenance),
        "citations": "\n".join(f"- {r}" for r in metadata.get("references", [])),
    }
    return string.Template((TEMPLATES / "README.md").read_text()).substitute(values)
