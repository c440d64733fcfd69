"""Loading checkpoints safely, and what an output folder says about the run it holds.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file whose unpickling
would import or call anything else is refused (:class:`UnsafeCheckpointError`), so a crafted
checkpoint cannot run code.  Every error names the file.

:func:`prepare_output_dir` keeps one run per output folder: ``<output_dir>/<workflow>_run.json`` holds
the config hash and the MLflow run id, a different config there is refused (:class:`OutputDirConflict`)
unless overwriting is asked for, and the same config is resumed (see
:class:`metacontrast.workflows.handlers.TrainingCheckpointer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import volume_preprocessing
from ..io import atomic_write
from ..nets.unet import PretrainedWeightsMismatch, SegmentationUNet, load_pretrained

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded as weights only (possibly crafted to run code) or is corrupt."""


def _unpickler_reason(message: str) -> str:
    """The informative part of torch's weights-only refusal, e.g. ``Unsupported global: GLOBAL io.open``."""
    match = re.search(r"(Unsupported [^\n]*?)(?: was not an allowed global|\. Please|\.?\n|\.?$)", message)
    reason = match.group(1) if match else message.strip().splitlines()[-1]
    return re.sub(r"\x1b\[[0-9;]*m", "", reason)[:200]


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused and nothing in it was run: it is not a weights-only file "
            f"({_unpickler_reason(str(err))}); load only checkpoints written by these workflows"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UnsafeCheckpointError(f"checkpoint {path} is truncated or corrupt: {err}") from None


def state_dict_of(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{"state_dict": ...}``, ``{"model": ...}`` or a bare state dict."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise UnsafeCheckpointError(f"checkpoint {path} holds no state dict")


def norm_of(checkpoint: Any, path: str | Path) -> str:
    """The U-Net normalisation layer (``"instance"`` or ``"batch"``) of a loaded checkpoint.

    ``checkpoint["network"]["norm"]`` where the file records it (``encoder.pt``); otherwise read off the
    weights: BatchNorm keeps running statistics, instance norm (no affine parameters) keeps nothing.
    """
    network = checkpoint.get("network") if isinstance(checkpoint, dict) else None
    if isinstance(network, dict) and "norm" in network:
        return str(network["norm"])
    return "batch" if any(k.endswith(".running_mean") for k in state_dict_of(checkpoint, path)) else "instance"


def checkpoint_norm(path: str | Path, default: str = "instance") -> str:
    """:func:`norm_of` the checkpoint at ``path``; ``default`` for an empty path (random init) or a file not
    written yet (a config parsed before its run; loading the weights then names the missing file).  The workflow
    configs take the network's ``norm`` from here, so fine-tuning a batch-norm encoder builds a batch-norm
    U-Net and evaluating that fine-tune builds it again."""
    return norm_of(load_checkpoint(path), path) if path and Path(path).is_file() else default


def initialise_encoder(network: SegmentationUNet, pretrained_ckpt: str, freeze_encoder: bool = False) -> list[str]:
    """Load a pre-training output (encoder, maybe decoder blocks) into the segmentation U-Net.

    Empty ``pretrained_ckpt`` keeps the random initialisation (the baseline).  ``freeze_encoder`` stops
    gradients to the encoder blocks (the paper's "frozen encoder" ablation).  An encoder trained with
    another normalisation layer than ``network.norm`` is refused (``PretrainedWeightsMismatch``).  Returns
    the loaded keys.
    """
    loaded: list[str] = []
    if pretrained_ckpt:
        checkpoint = load_checkpoint(pretrained_ckpt)
        norm = norm_of(checkpoint, pretrained_ckpt)
        if norm != str(network.norm).lower():
            raise PretrainedWeightsMismatch(f"pretrained checkpoint {pretrained_ckpt} was trained with {norm} norm, "
                                            f"the network uses {str(network.norm).lower()} norm (set norm to {norm!r})")
        loaded = load_pretrained(network, state_dict_of(checkpoint, pretrained_ckpt), source=f"pretrained checkpoint {pretrained_ckpt}")
    if freeze_encoder:
        network.freeze_encoder()
    return loaded


# ----------------------------------------------------------------------------------------------
# the output folder: which config it holds, which MLflow run it continues
# ----------------------------------------------------------------------------------------------

#: environment variable that, set to 1, lets any workflow start over in a folder holding another config
OVERWRITE_ENV = "METACONTRAST_OVERWRITE_OUTPUT"
#: settings that may differ between a run and its resumption (they do not change what is computed)
VOLATILE_KEYS = frozenset({"device"})
STATE_FORMAT = 1


class OutputDirConflict(ValueError):
    """The output folder holds a run of a different config (raised before any training)."""


def state_file(output_dir: str | Path, workflow: str) -> Path:
    """``<output_dir>/<workflow>_run.json``: the config hash and MLflow run id of the folder's run."""
    return Path(output_dir) / f"{workflow}_run.json"


def _canonical(config: Any) -> Any:
    """The config as plain JSON values (what is hashed and stored), volatile keys left out."""
    plain = json.loads(json.dumps(config, sort_keys=True, default=str))
    if isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in VOLATILE_KEYS}
    return plain


def _config_hash(config: Any) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, limit: int = 8) -> list[str]:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {json.dumps(old.get(k, '<absent>'))} -> {json.dumps(new.get(k, '<absent>'))}" for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


@dataclass
class RunState:
    """What an output folder says about its run: config hash, stored config, MLflow run id.

    Made by :func:`prepare_output_dir`; ``mlflow_run_id`` is the run to continue (``None`` for a
    fresh folder), and :meth:`record_run` stores the run id once tracking has started.
    """

    output_dir: Path
    workflow: str
    config_hash: str
    config: Any
    mlflow_run_id: str | None = None
    resumed: bool = False

    @property
    def path(self) -> Path:
        return state_file(self.output_dir, self.workflow)

    def record_run(self, run_id: str | None, tracking_uri: str = "", experiment_name: str = "") -> None:
        self.mlflow_run_id = run_id
        _write_json(self.path, {
            "format": STATE_FORMAT, "workflow": self.workflow, "config_hash": self.config_hash, "config": self.config,
            "mlflow_run_id": run_id, "tracking_uri": tracking_uri, "experiment_name": experiment_name,
        })  # fmt: skip


def _overwrite_requested(overwrite: bool | str | None) -> bool:
    if isinstance(overwrite, str):
        overwrite = overwrite.strip().lower() in ("1", "true", "yes")
    return bool(overwrite) or os.environ.get(OVERWRITE_ENV, "").strip().lower() in ("1", "true", "yes")


def prepare_output_dir(output_dir: str | Path, workflow: str, config: Any, overwrite: bool | str = False,
                       checkpoint_glob: str = "training_*iteration=*.pt*") -> RunState:
    """Check that ``output_dir`` holds no run of another config, and say which MLflow run to continue.

    The folder's ``<workflow>_run.json`` stores the config hash of the run that wrote it.  A different
    config raises :class:`OutputDirConflict` naming the keys that differ, unless ``overwrite`` (or the
    environment variable ``METACONTRAST_OVERWRITE_OUTPUT=1``) is set: then the folder's training
    checkpoints of ``workflow`` are deleted and a fresh run (and MLflow run) starts there.  The same
    config continues: its MLflow run id is returned for ``start_run(resume_run_id=...)`` and the
    training checkpointer resumes from the folder's latest good checkpoint.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    canonical = _canonical(config)
    digest = _config_hash(canonical)
    path = state_file(output_dir, workflow)
    state = RunState(output_dir, workflow, digest, canonical)
    if not path.is_file():
        return state
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        logger.warning("%s is unreadable (%s); treating %s as a fresh folder", path, err, output_dir)
        return state
    if previous.get("config_hash") == digest:
        state.mlflow_run_id = previous.get("mlflow_run_id") or None
        state.resumed = True
        return state
    if not _overwrite_requested(overwrite):
        diffs = _differences(previous.get("config"), canonical)
        raise OutputDirConflict(
            f"output folder {output_dir} holds a {workflow} run of a different config (hash {previous.get('config_hash')} "
            f"there, {digest} now; {'; '.join(diffs) if diffs else 'see ' + str(path)}). Use another output_dir, or start over "
            f"in this folder with --overwrite True (or {OVERWRITE_ENV}=1), which deletes its {workflow} training checkpoints."
        )
    removed = list(output_dir.glob(checkpoint_glob))  # every TrainingCheckpointer's files (any prefix), *.corrupt too
    for p in removed:
        p.unlink()
    path.unlink()
    logger.warning("overwrite: %s held a %s run of another config; removed %d training checkpoint(s), starting over",
                   output_dir, workflow, len(removed))
    return state


# ----------------------------------------------------------------------------------------------
# a fine-tuned model carries its preprocessing and network settings
# ----------------------------------------------------------------------------------------------

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
    """:func:`model_settings_of` the checkpoint at ``path`` (loaded weights-only; errors name the file)."""
    return model_settings_of(load_checkpoint(path))


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
