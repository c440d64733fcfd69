"""Evaluate a fine-tuned 2D network in 3D on the original voxel grid.

For each volume of a split: preprocess it exactly as in training -- with the preprocessing the fine-tuned model
records (:func:`settings_for_evaluation`), whatever the manifest is named -- (MetaTensor tracking on), predict
slice by slice with ``monai.inferers.SliceInferer``, map the label map back to the source grid with
``monai.transforms.Invertd`` (nearest), score it against the untouched source label with
:func:`~metacontrast.workflows.metrics.volume_metrics` (spacing in mm), and write the prediction as
NIfTI with the source volume's affine.  ``dataset_dir`` may be a slice pack that carries the split's source labels
(:mod:`metacontrast.data.pack`): the packed images are scored the same way.  Outputs: ``metrics.csv`` (one row per volume), ``summary.json``
(mean and std per class and over classes, counts of missed classes) and ``predictions/<volume_id>.nii.gz``.
Outputs name volumes only by their ``volume_id`` (a salted pseudonym for DICOM data), never by the
source path (DICOM folder names can hold the PatientID), and a prediction of a DICOM series carries
only its geometry, no DICOM attribute.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Invertd
from torch import nn
from tqdm import tqdm

from ..data.dicom import load_volume
from ..data.pack import SlicePackError, is_slice_pack, packed_volumes, source_label
from ..data.transforms import volume_preprocessing
from ..io import atomic_write
from ..layout import RunLayout
from .checkpoints import load_checkpoint, state_dict_of
from .data import cap, preprocessing_settings, read_manifest
from .metrics import flatten_summary, summarise, volume_metrics, write_metrics_csv, write_summary
from .model_settings import ModelSettingsConflict, read_model_settings, resolve_model_settings, settings_equal


def _absolute(entry: Mapping[str, Any], dataset_dir: str | Path) -> dict[str, Any]:
    out = dict(entry)
    for key in ("image", "label"):
        if key in out:
            out[key] = str(Path(dataset_dir) / out[key])
    return out


def predict_volume(network: nn.Module, image: torch.Tensor, spatial_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """(1, H, W, D) preprocessed image -> (1, H, W, D) label map, slice by slice along the last axis."""
    inferer = SliceInferer(roi_size=tuple(spatial_size), sw_batch_size=64, spatial_dim=2, progress=False)
    with torch.no_grad():
        logits = inferer(image[None].to(device), network)
    return logits.argmax(dim=1).to("cpu", torch.uint8)


def to_source_grid(pred: torch.Tensor, preprocessed_image: MetaTensor, preprocessing) -> torch.Tensor:
    """Undo crop/pad and in-plane resampling of a (1, H, W, D) label map: -> (X, Y, Z) on the source grid."""
    tracked = MetaTensor(pred.float(), meta=preprocessed_image.meta, applied_operations=preprocessed_image.applied_operations)
    inverter = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)
    restored = inverter({"pred": tracked, "image": preprocessed_image})["pred"]
    return torch.as_tensor(restored)[0].round().to(torch.uint8)


def save_prediction(pred: torch.Tensor, source: Path, source_volume: MetaTensor, path: Path) -> Path:
    """Write a label map as NIfTI on the source volume's grid (atomically).

    A NIfTI source lends its own header and affine, so every tool reads the prediction where it reads the
    source (ACDC's headers disagree between sform and pixdim, which MONAI resolves on reading; copying
    MONAI's affine would move the prediction for tools that trust the sform).  A DICOM series has no
    header to copy; its MONAI affine (RAS) is written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith((".nii", ".nii.gz")):
        header_source = nib.load(source)
        image = nib.Nifti1Image(pred.numpy().astype(np.uint8), header_source.affine, header=header_source.header.copy())
        image.set_data_dtype(np.uint8)
    else:
        image = nib.Nifti1Image(pred.numpy().astype(np.uint8), np.asarray(source_volume.affine, dtype=np.float64))
    with atomic_write(path, "wb") as handle:
        handle.write(image.to_bytes() if not str(path).endswith(".gz") else _gzip(image))
    return path


def _gzip(image: nib.Nifti1Image) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _preprocessed(entries: Sequence[Mapping[str, Any]], dataset_dir: str | Path, settings: Mapping[str, Any],
                  preprocessing: Any) -> Iterator[tuple[Mapping[str, Any], MetaTensor, Path]]:
    """``(entry, preprocessed image (1, H, W, D) with its transform trace, source label file)`` per entry.

    From raw scans the image is preprocessed here.  From a slice pack (:mod:`metacontrast.data.pack`) the packed
    image is used, and the trace that maps a prediction back is made by preprocessing the source label the pack
    carries, which shares the image's grid: the spatial steps depend on the grid only, not on the intensities.
    """
    if not is_slice_pack(dataset_dir):
        for entry in entries:
            yield entry, preprocessing(_absolute({"image": entry["image"]}, dataset_dir))["image"], Path(dataset_dir) / entry["label"]
        return
    packed = packed_volumes(dataset_dir, entries, settings["pixel_size"], settings["spatial_size"], with_labels=False)
    for entry, item in zip(entries, packed):
        label_path = source_label(dataset_dir, entry["volume_id"])
        grid = preprocessing({"image": str(label_path)})["image"]
        if tuple(grid.shape) != tuple(item["image"].shape):
            raise SlicePackError(f"{label_path}: preprocessed to {tuple(grid.shape)}, the packed image of {entry['volume_id']} "
                                 f"is {tuple(item['image'].shape)}; repack")
        yield entry, MetaTensor(item["image"], meta=grid.meta, applied_operations=grid.applied_operations), label_path


def evaluate_split(
    network: nn.Module,
    entries: Sequence[Mapping[str, Any]],
    dataset_dir: str | Path,
    settings: Mapping[str, Any],
    labels: Mapping[str, str],
    output_dir: str | Path,
    device: str | torch.device = "cpu",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict, restore, score and save every volume of ``entries``; returns (rows, summary)."""
    device = torch.device(device)
    network = network.to(device).eval()
    output_dir = Path(output_dir)
    preprocessing = volume_preprocessing(settings["pixel_size"], settings["spatial_size"])
    class_names = {int(k): v for k, v in labels.items()}
    rows = []
    for entry, image, label_path in tqdm(_preprocessed(entries, dataset_dir, settings, preprocessing), total=len(entries), desc="evaluating volumes"):
        pred = to_source_grid(predict_volume(network, image, settings["spatial_size"], device), image, preprocessing)
        source_label = load_volume(label_path)
        if tuple(pred.shape) != tuple(source_label.shape):
            # named by volume_id, not by path: DICOM folder names can hold the PatientID
            raise RuntimeError(f"restored prediction {tuple(pred.shape)} does not match the label of {entry['volume_id']} {tuple(source_label.shape)}")
        save_prediction(pred, label_path, source_label, output_dir / "predictions" / f"{entry['volume_id']}.nii.gz")
        rows.append(volume_metrics(pred, torch.as_tensor(source_label).round().long(), entry["spacing"], class_names, entry["volume_id"]))
    summary = summarise(rows)
    write_metrics_csv(rows, output_dir / "metrics.csv")
    write_summary(summary, output_dir / "summary.json")
    return rows, summary


def score_saved_predictions(
    entries: Sequence[Mapping[str, Any]], dataset_dir: str | Path, labels: Mapping[str, str], predictions_dir: str | Path
) -> list[dict[str, Any]]:
    """Recompute the metrics from ``predictions/<volume_id>.nii.gz`` files (audits a logged evaluation)."""
    class_names = {int(k): v for k, v in labels.items()}
    rows = []
    for entry in entries:
        pred = torch.as_tensor(np.asarray(nib.load(Path(predictions_dir) / f"{entry['volume_id']}.nii.gz").dataobj))
        label = torch.as_tensor(load_volume(Path(dataset_dir) / entry["label"])).round().long()
        rows.append(volume_metrics(pred, label, entry["spacing"], class_names, entry["volume_id"]))
    return rows


def settings_for_evaluation(
    ckpt: str,
    datalist: str,
    dataset: str,
    preprocessing_overrides: Mapping | None = None,
    features: Sequence[int] | None = None,
    fallback_features: Sequence[int] | None = None,
    norm: str | None = None,
    allow_preprocessing_override: bool = False,
    last_ckpt: str = "",
) -> dict[str, Any]:
    """What the evaluate workflow runs ``ckpt`` with: its own preprocessing and network, as fine-tuning recorded them.

    A fine-tuned ``model.pt`` records its preprocessing (pixel size, crop, intensity normalisation), network and
    classes (:func:`~metacontrast.workflows.model_settings.record_model_settings`); those are used whatever the
    manifest's name or its ``preprocessing`` block say.  What the config asks for explicitly -- the entries of
    ``preprocessing_overrides[dataset]``, ``features`` (``None`` = the model's) and ``norm`` -- must agree, else
    :class:`~metacontrast.workflows.model_settings.ModelSettingsConflict` names the file, the key and both values
    (``allow_preprocessing_override``: the requested preprocessing is used, with a warning).  A checkpoint that
    records nothing is evaluated as before: the manifest's preprocessing updated by ``preprocessing_overrides``,
    ``features`` (else ``fallback_features``, the fine-tune config's), ``norm``.  ``last_ckpt`` (model_final.pt),
    when it exists and records settings, must record the same ones.  Returns
    :func:`~metacontrast.workflows.model_settings.resolve_model_settings`'s dict, ``network`` complete.
    """
    manifest = read_manifest(datalist)
    resolved = resolve_model_settings(
        ckpt, preprocessing_settings(manifest, preprocessing_overrides, dataset), (preprocessing_overrides or {}).get(dataset, {}),
        {"features": features, "norm": norm}, manifest["labels"], allow_preprocessing_override,
        requested_from=f"the evaluate config (preprocessing_overrides[{dataset!r}], features, norm)",
    )  # fmt: skip
    recorded = resolved["model"]
    if not resolved["recorded"]:
        resolved["network"] = {"features": [int(f) for f in (features if features is not None else fallback_features or ())],
                               "norm": norm or "instance", "out_channels": len(manifest["labels"]), "in_channels": 1}
    if recorded and last_ckpt and Path(last_ckpt).is_file():
        last = read_model_settings(last_ckpt)
        differing = [(key, last.get(key), recorded.get(key)) for key in ("preprocessing", "network", "labels")
                     if last is not None and not settings_equal(last.get(key), recorded.get(key))]
        if differing:
            raise ModelSettingsConflict(last_ckpt, differing, f"{ckpt} (evaluated beside it)")
    return resolved


def run_evaluation(
    network: nn.Module,
    ckpt: str,
    datalist: str,
    dataset_dir: str,
    dataset: str,
    output_dir: str,
    tracking: Any,
    split: str = "test",
    max_volumes: int = 0,
    preprocessing_overrides: Mapping | None = None,
    device: str = "cpu",
    last_ckpt: str = "",
    model_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluate workflow: load ``ckpt`` (weights only), score ``split``, log everything to MLflow.

    ``model_settings`` (from :func:`settings_for_evaluation`: the config does this) gives the preprocessing;
    without it the manifest's, updated by ``preprocessing_overrides[dataset]``, is used.  The preprocessing
    used is logged as the params ``preprocessing.pixel_size`` ... and ``preprocessing.source`` (``model``: the
    checkpoint's own; ``model+override``: ``allow_preprocessing_override`` replaced some; ``config``: the
    checkpoint records none).

    ``ckpt`` (the fine-tune's best-by-validation ``model.pt``) is logged as ``<split>_dice_mean`` ...
    with its outputs in ``evaluation/``.  When ``last_ckpt`` names a file (the fine-tune's last weights,
    ``model_final.pt``) it is scored too, logged as ``<split>_last_dice_mean`` ..., outputs in
    ``evaluation_last/``: with few validation volumes the best-by-validation choice is itself noisy, and
    the two side by side show how much the selection moved the result.  Returns the summary of ``ckpt``.
    """
    manifest = read_manifest(datalist)
    entries = cap(manifest[split], max_volumes)
    if model_settings is None:
        settings, source = preprocessing_settings(manifest, preprocessing_overrides, dataset), "config"
    else:
        settings = dict(model_settings["preprocessing"])
        source = ("model+override" if model_settings.get("overridden") else "model") if model_settings.get("recorded") else "config"
        recorded_class = (model_settings.get("model") or {}).get("network", {}).get("class")
        if recorded_class and recorded_class != type(network).__name__:
            raise ModelSettingsConflict(ckpt, [("network.class", recorded_class, type(network).__name__)], "the evaluate config (semi_supervised)",
                                        "Set semi_supervised to the fine-tune's (cross_pseudo builds the two-decoder U-Net)")
    tracking.log_params({"preprocessing": {"source": source, **{k: settings[k] for k in ("pixel_size", "spatial_size")}}})
    print(f"evaluate: {split} volumes preprocessed to {' x '.join(f'{p:g}' for p in settings['pixel_size'])} mm, "
          f"{' x '.join(str(int(n)) for n in settings['spatial_size'])} ({'from ' + Path(ckpt).name if source != 'config' else 'from the config'})")
    scored = [(ckpt, split, False)]  # (checkpoint, metric prefix, whether it is the last weights)
    if last_ckpt and Path(last_ckpt).is_file():
        scored.append((last_ckpt, f"{split}_last", True))
    elif last_ckpt:
        print(f"evaluate: no last checkpoint {last_ckpt}; only {ckpt} is scored")
    summaries = []
    for path, prefix, last in scored:
        network.load_state_dict(state_dict_of(load_checkpoint(path), path))
        out = RunLayout.evaluation_dir(output_dir, last)
        artifact_folder = out.name if last else None  # the last weights' files go under their folder's name
        rows, summary = evaluate_split(network, entries, dataset_dir, settings, manifest["labels"], out, device)
        tracking.log_metrics(flatten_summary(summary, prefix=prefix))
        for name in ("metrics.csv", "summary.json"):
            tracking.log_artifact(out / name, artifact_path=artifact_folder)
        mean = summary["mean"]
        print(
            f"evaluate {Path(path).name}: {len(rows)} {split} volumes, Dice {mean['dice']['mean']:.3f} +- {mean['dice']['std']:.3f}, "
            f"HD95 {mean['hd95']['mean']:.2f} mm, ASD {mean['asd']['mean']:.2f} mm; outputs in {out}"
        )
        summaries.append(summary)
    tracking.end()
    print(f"evaluate finished; MLflow run {tracking.run_id}")
    return summaries[0]
