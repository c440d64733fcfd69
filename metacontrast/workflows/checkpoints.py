"""Loading checkpoints safely, and what an output folder says about the run it holds.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file whose unpickling
would import or call anything else is refused (:class:`UnsafeCheckpointError`), so a crafted
checkpoint cannot run code.  Every error names the file.

:func:`prepare_output_dir` keeps one run per output folder: ``<output_dir>/<workflow>_run.json`` holds
the config hash and the MLflow run id, a different config there is refused (:class:`OutputDirConflict`)
unless overwriting is asked for, and the same config is resumed (see
:class:`metacontrast.workflows.handlers.TrainingCheckpointer`); :func:`start_workflow_run`, which the
bundle configs call, opens or continues the folder's MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from ..layout import ENCODER_FILE
from ..nets.unet import PretrainedWeightsMismatch, SegmentationUNet, load_pretrained
from ..ranks import FollowerRun, is_leader
from ..tracking import TrackingRun, config_hash, start_run
from ..tracking.store import redact

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded as weights only (possibly crafted to run code) or is corrupt."""


class TrainingCheckpointGiven(ValueError):
    """A training checkpoint (``training_checkpoint_iteration=N.pt``, kept to resume a run) given where a model
    file is expected; the message names the model file of its folder to use instead."""


#: the model files of a fine-tune's folder and what each holds (a pre-training's is ``layout.ENCODER_FILE``)
MODEL_FILES = {"model.pt": "best by validation", "model_final.pt": "last weights"}


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


def is_training_checkpoint(checkpoint: Any) -> bool:
    """Whether a loaded checkpoint was written by :class:`~metacontrast.workflows.handlers.TrainingCheckpointer`
    (its ``format`` entry says at which iteration and of which objects)."""
    form = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    return isinstance(form, dict) and "iteration" in form and "objects" in form


def refuse_training_checkpoint(checkpoint: Any, path: str | Path) -> None:
    """Raise :class:`TrainingCheckpointGiven`, naming the model file to use, when ``checkpoint`` (loaded from
    ``path``) is a training checkpoint rather than a model file."""
    if not is_training_checkpoint(checkpoint):
        return
    path = Path(path)
    folder = path.parent
    files = {**MODEL_FILES, ENCODER_FILE: "the pre-trained encoder"}
    present = [name for name in files if (folder / name).is_file()]
    if not present:  # the run has not written its model yet: name what its workflow writes
        finetune, pretrain = state_file(folder, "finetune").is_file(), state_file(folder, "pretrain").is_file()
        present = [ENCODER_FILE] if pretrain and not finetune else list(MODEL_FILES) if finetune else list(files)
        where = "(not written yet: the run has not finished) "
    else:
        where = ""
    use = " or ".join(f"{folder / name} ({files[name]})" for name in present)
    raise TrainingCheckpointGiven(
        f"checkpoint {path} is a training checkpoint (iteration {checkpoint['format']['iteration']}, kept to resume the run), "
        f"not a model file: pass the model file of the same folder {where}instead: {use}"
    )


def state_dict_of(checkpoint: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{"state_dict": ...}``, ``{"model": ...}`` or a bare state dict.

    A training checkpoint is refused by name (:class:`TrainingCheckpointGiven`, naming the model file to use)."""
    refuse_training_checkpoint(checkpoint, path)
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
    digest = config_hash(canonical)  # canonical is plain JSON: the same 16 digits as before the hashes were one
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


def start_workflow_run(
    tracking_uri: str,
    experiment_name: str,
    tags: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    overwrite: bool | str = False,
    run_name: str | None = None,
) -> TrackingRun:
    """:func:`start_run` for a workflow that owns ``output_dir``: checked, resumable, recorded.

    First :func:`prepare_output_dir` checks that the folder holds no
    run of another config (``OutputDirConflict`` otherwise, unless ``overwrite``).  A folder holding a
    run of this config continues that MLflow run (its id is stored in ``<output_dir>/<workflow>_run.json``),
    so a crashed run that is started again stays one MLflow run; the id of the run opened here is then
    written back to that file before any training happens.  ``tags["workflow"]`` names the workflow.
    The run is named by :func:`~metacontrast.tracking.workflow_run_name` unless ``run_name`` is given.
    In a ``torchrun`` job rank 0 owns the folder and the run; other ranks get a
    :class:`~metacontrast.ranks.FollowerRun` that logs nothing.
    """
    if not is_leader():
        return FollowerRun()  # type: ignore[return-value]
    workflow = str(tags.get("workflow", "run"))
    state = prepare_output_dir(output_dir, workflow, config, overwrite=overwrite)
    run = start_run(tracking_uri, experiment_name, run_name, tags, output_dir, resume_run_id=state.mlflow_run_id, config=config)
    if state.resumed:
        run.set_tags({"metacontrast.resumed": "true"})
    state.record_run(run.run_id, redact(run.tracking_uri), experiment_name)
    return run
