"""A fine-tuned model carries its preprocessing and network settings (issue 20, item 5).

:func:`record_model_settings` (called by ``finetune.json``'s ``initialize``) stores the pixel size, spatial
size, intensity normalisation, labels and network settings in every state dict the network saves
(``model.pt``, ``model_final.pt``); :func:`resolve_model_settings` gives evaluate (and the exporter) the model's
own settings by default and refuses an explicit request for other ones (:class:`ModelSettingsConflict`) unless
an override is allowed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import volume_preprocessing
from ..nets.unet import SegmentationUNet
from .checkpoints import load_checkpoint, refuse_training_checkpoint

logger = logging.getLogger(__name__)


#: where a fine-tuned ``model.pt`` / ``model_final.pt`` keeps its settings: an entry of the state dict's own
#: ``_metadata`` (the per-module metadata PyTorch saves with every state dict).  Module prefixes never start
#: with ".", so this key cannot collide with one; the file stays a plain state dict that
#: ``network.load_state_dict(torch.load(path, weights_only=True))`` loads as before.
MODEL_SETTINGS_KEY = ".metacontrast"
MODEL_SETTINGS_FORMAT = 1
#: the network settings a checkpoint is compared on (the weights cannot be loaded into another network)
NETWORK_KEYS = ("class", "in_channels", "out_channels", "features", "norm")


class ModelSettingsConflict(ValueError):
    """A config asks for preprocessing or a network other than the ones a fine-tuned model records.

    Attributes: ``path`` (the checkpoint), ``conflicts`` (``[(key, model's value, requested value), ...]``)
    and, for the first conflict, ``key``, ``model_value`` and ``requested_value``.
    """

    def __init__(self, path: str | Path, conflicts: list[tuple[str, Any, Any]], requested_from: str = "the config", hint: str = "") -> None:
        self.path, self.conflicts = Path(path), list(conflicts)
        self.key, self.model_value, self.requested_value = self.conflicts[0]
        listed = "; ".join(f"{key}: the model's {json.dumps(model)}, requested {json.dumps(asked)}" for key, model, asked in self.conflicts)
        super().__init__(f"checkpoint {path} was fine-tuned with other settings than {requested_from} asks for ({listed})" + (f". {hint}" if hint else ""))


def _plain(value: Any) -> Any:
    """JSON values (tuples as lists, numpy scalars as numbers): what a weights-only checkpoint may hold."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def settings_equal(a: Any, b: Any) -> bool:
    """Equal as settings: numbers to 1e-6 (2.734 == 2.7340000001), lists and tuples alike, dicts key by key."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(settings_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        a, b = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return a.keys() == b.keys() and all(settings_equal(a[k], b[k]) for k in a)
    return a == b


def intensity_normalisation(pipeline: Any) -> dict[str, Any]:
    """The intensity step of a :func:`~metacontrast.data.transforms.volume_preprocessing` pipeline, read off
    the pipeline itself (so what is recorded is what ran): ``{"transform": "ScaleIntensityRangePercentiles",
    "lower": 1, "upper": 99, "b_min": 0.0, "b_max": 1.0, "clip": true, ...}``."""
    for transform in getattr(pipeline, "transforms", ()):
        scaler = getattr(transform, "scaler", None)
        if scaler is not None:
            fields = {k: v for k, v in vars(scaler).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
            return {"transform": type(scaler).__name__, **_plain(fields)}
    return {"transform": "none"}


def pipeline_intensity(pixel_size: Sequence[float], spatial_size: Sequence[int]) -> dict[str, Any]:
    """:func:`intensity_normalisation` of the pipeline this version builds for these sizes."""
    return intensity_normalisation(volume_preprocessing(pixel_size, spatial_size))


def network_settings(network: nn.Module) -> dict[str, Any]:
    """The settings a network is rebuilt from: class name, channels, ``features`` and ``norm``."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    return {"class": type(network).__name__, "in_channels": int(network.in_channels), "out_channels": int(network.out_channels),
            "features": [int(f) for f in network.features], "norm": str(network.norm).lower()}  # fmt: skip


def record_model_settings(network: nn.Module, data: Any, dataset: str = "", method: str = "", semi_supervised: str = "none") -> dict[str, Any]:
    """Make every state dict of ``network`` carry the settings it was fine-tuned with; returns them.

    The fine-tune config calls this once; from then on ``model.pt``, ``model_final.pt`` (and the network in
    the training checkpoints) hold, under ``state_dict._metadata[MODEL_SETTINGS_KEY]``::

        {"format": 1, "workflow": "finetune", "dataset": "acdc", "method": "gcl", "semi_supervised": "none",
         "labels": {"0": "background", "1": "RV", ...},
         "preprocessing": {"pixel_size": [2.734, 2.734], "spatial_size": [96, 96],
                           "intensity": {"transform": "ScaleIntensityRangePercentiles", "lower": 1, "upper": 99,
                                         "b_min": 0.0, "b_max": 1.0, "clip": true, "relative": false, "channel_wise": false}},
         "network": {"class": "SegmentationUNet", "in_channels": 1, "out_channels": 4,
                     "features": [16, 32, 64, 128, 256], "norm": "instance"}}

    ``data`` is the run's :class:`~metacontrast.workflows.data.FinetuneData` (its resolved ``settings`` and
    ``labels``).  Read back with :func:`read_model_settings`; evaluate uses them (:func:`resolve_model_settings`).
    """
    preprocessing = _plain(dict(data.settings))
    preprocessing["intensity"] = pipeline_intensity(preprocessing["pixel_size"], preprocessing["spatial_size"])
    settings = {
        "format": MODEL_SETTINGS_FORMAT, "workflow": "finetune", "dataset": str(dataset), "method": str(method),
        "semi_supervised": str(semi_supervised), "labels": {str(k): str(v) for k, v in data.labels.items()},
        "preprocessing": preprocessing, "network": network_settings(network),
    }  # fmt: skip
    frozen = json.dumps(settings)

    def stamp(module: nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            metadata[MODEL_SETTINGS_KEY] = json.loads(frozen)  # a fresh copy each time

    getattr(network, "module", network).register_state_dict_post_hook(stamp)
    return settings


def model_settings_of(checkpoint: Any) -> dict[str, Any] | None:
    """The settings a loaded fine-tuned checkpoint records, or ``None`` (written before they were recorded)."""
    if isinstance(checkpoint, dict) and not hasattr(checkpoint, "_metadata"):
        checkpoint = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), dict)), checkpoint)
    settings = (getattr(checkpoint, "_metadata", None) or {}).get(MODEL_SETTINGS_KEY)
    return dict(settings) if isinstance(settings, dict) else None


def read_model_settings(path: str | Path) -> dict[str, Any] | None:
    """:func:`model_settings_of` the checkpoint at ``path`` (loaded weights-only; errors name the file; a training
    checkpoint is refused naming the model file to use, :class:`~metacontrast.workflows.checkpoints.TrainingCheckpointGiven`)."""
    checkpoint = load_checkpoint(path)
    refuse_training_checkpoint(checkpoint, path)
    return model_settings_of(checkpoint)


def resolve_model_settings(
    path: str | Path,
    default_preprocessing: Mapping[str, Any],
    requested_preprocessing: Mapping[str, Any] | None = None,
    requested_network: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    allow_preprocessing_override: bool = False,
    requested_from: str = "the config",
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The preprocessing and network to run the fine-tuned model at ``path`` with.

    Args:
        default_preprocessing: what is used when the model records nothing (the manifest's, updated by
            ``preprocessing_overrides``): the behaviour before models recorded their settings.
        requested_preprocessing: what the config asks for explicitly (``preprocessing_overrides[<dataset>]``,
            an exporter's ``--pixel_size``); ``None`` values and absent keys ask for nothing.
        requested_network: ``features``, ``norm``, ``class``, ... asked for explicitly (``None`` = the model's).
        labels: the label map of the data the model is run on (must have the model's class indices).
        allow_preprocessing_override: run with a requested preprocessing that differs from the model's
            (a warning names both values) instead of refusing.
        recorded: the model's settings when already read (default: read from ``path``).
    Returns:
        ``{"recorded": bool, "model": the recorded settings or None, "preprocessing": {...}, "network": {...},
        "labels": {...}, "overridden": [keys]}``;
        ``network`` holds only the requested keys when the model records nothing.
    Raises:
        ModelSettingsConflict: a requested setting differs from the model's (preprocessing: unless
            ``allow_preprocessing_override``; network and class indices: always, the weights would not fit).
    """
    requested = {k: v for k, v in (requested_preprocessing or {}).items() if v is not None}
    asked_network = {k: v for k, v in (requested_network or {}).items() if v is not None}
    if recorded is None and Path(path).is_file():  # a missing file is named when the weights are loaded
        recorded = read_model_settings(path)
    if recorded is None:
        if Path(path).is_file():
            logger.warning("checkpoint %s records no preprocessing (written before fine-tuning recorded it): using %s as before; make "
                           "sure the model was fine-tuned with it", path, json.dumps(_plain({**default_preprocessing, **requested})))
        return {"recorded": False, "model": None, "preprocessing": _plain({**default_preprocessing, **requested}), "network": _plain(asked_network),
                "labels": _plain(dict(labels or {})), "overridden": []}  # fmt: skip
    model_network, model_labels = recorded.get("network", {}), recorded.get("labels", {})
    if labels is not None and sorted(map(int, labels)) != sorted(map(int, model_labels)):
        raise ModelSettingsConflict(path, [("labels", model_labels, _plain(dict(labels)))], "the data",
                                    "The model predicts other classes than the data's label maps hold")
    network_conflicts = [(f"network.{k}", model_network[k], _plain(v)) for k, v in asked_network.items()
                         if k in model_network and not settings_equal(model_network[k], v)]
    if network_conflicts:
        raise ModelSettingsConflict(path, network_conflicts, requested_from, "Its weights fit only the network it was trained as: "
                                    "leave these settings out (they default to the model's) or evaluate another checkpoint")
    preprocessing = _plain(dict(recorded["preprocessing"]))
    for key, value in default_preprocessing.items():
        preprocessing.setdefault(key, _plain(value))  # a setting this model predates
    conflicts = [(k, preprocessing[k], _plain(v)) for k, v in requested.items() if k in preprocessing and not settings_equal(preprocessing[k], v)]
    ours = pipeline_intensity(preprocessing["pixel_size"], preprocessing["spatial_size"])
    if "intensity" in recorded["preprocessing"] and "intensity" not in requested and not settings_equal(preprocessing["intensity"], ours):
        conflicts.append(("intensity", preprocessing["intensity"], ours))  # this version's pipeline normalises otherwise
    if conflicts and not allow_preprocessing_override:
        raise ModelSettingsConflict(path, conflicts, requested_from, "Leave the setting out to use the model's own, or set "
                                    "allow_preprocessing_override true to run with the requested one anyway")
    for key, model_value, value in conflicts:
        logger.warning("allow_preprocessing_override: running %s with %s %s although it was fine-tuned with %s %s",
                       path, key, json.dumps(value), key, json.dumps(model_value))
        preprocessing[key] = value
    if labels is not None and any(str(labels[k]) != str(model_labels.get(str(k), labels[k])) for k in labels):
        logger.warning("checkpoint %s names its classes %s, the data %s: scored under the data's names", path,
                       json.dumps(model_labels), json.dumps(_plain(dict(labels))))
    changed = [k for k in preprocessing if k in default_preprocessing and not settings_equal(preprocessing[k], default_preprocessing[k])]
    if changed and not conflicts:
        logger.info("%s: using the model's preprocessing %s, not the data's default %s", path,
                    {k: preprocessing[k] for k in changed}, {k: _plain(default_preprocessing[k]) for k in changed})
    return {"recorded": True, "model": _plain(dict(recorded)), "preprocessing": preprocessing, "network": _plain(dict(model_network)),
            "labels": _plain(dict(labels if labels is not None else model_labels)), "overridden": [k for k, _, _ in conflicts]}  # fmt: skip
