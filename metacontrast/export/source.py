"""The run an export starts from: an MLflow fine-tune run, or a checkpoint with the settings it was trained with.

:func:`find_source` takes one of the two and lays the settings given to the exporter over the run's:

* :func:`source_from_mlflow` -- the run's logged ``config.json`` (else its params), its ``model.pt`` artifact
  and the test metrics of its evaluate run, all read through :mod:`metacontrast.tracking`;
* :func:`source_from_checkpoint` -- the settings given (defaults from ``finetune.json``), test metrics from
  ``<checkpoint folder>/evaluation/summary.json`` when the evaluate workflow wrote one.

:func:`load_weights` reads a checkpoint as the plain CPU state dict a bundle ships, with the settings it records.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import REPO_ROOT
from ..layout import RunLayout
from ..tracking import download_artifact, finite_metrics, get_run, local_tracking_uri, search_runs
from ..tracking.store import STORE_FILE
from ..variants import RANDOM
from ..workflows.checkpoints import load_checkpoint, state_dict_of, state_file
from ..workflows.metrics import flatten_summary
from . import ExportError
from .configs import FINETUNE_CONFIG

__all__ = ["BundleSource", "find_source", "load_weights", "repo_path", "source_from_checkpoint", "source_from_mlflow"]

#: tags that name a fine-tune run's (method, dataset, L, seed) cell; its evaluate run carries the same
RUN_KEYS = ("method", "dataset", "num_labeled", "seed")


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


def repo_path(path: str | Path) -> Path:
    """A path as the workflows saw it (relative to the repository root, where they run)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of the checkpoint at ``path``, detached, contiguous, on the CPU, with its ``_metadata``
    (where a fine-tuned model records its preprocessing and network: a bundle's ``model.pt`` keeps them)."""
    state = state_dict_of(load_checkpoint(path), path)
    weights = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        setattr(weights, "_metadata", copy.deepcopy(metadata))
    return weights


def _store_uri(uri: str, run_id: str = "") -> str:
    """A store given as a run folder (``<output_dir>``) or a ``.db`` file becomes its ``sqlite:///`` URI.

    A run folder without a store of its own is the folder of a run logged elsewhere (a results grid logs every
    run into ``<runs>/<dataset>/mlruns.db``): its ``finetune_run.json`` names the store of run ``run_id``.
    """
    path = Path(uri).expanduser()
    if "://" not in uri and path.is_dir():
        local = local_tracking_uri(path)
        record = state_file(path, "finetune")
        if not (path / STORE_FILE).is_file() and record.is_file():
            recorded = json.loads(record.read_text())
            if recorded.get("tracking_uri") and recorded.get("mlflow_run_id") == run_id:
                return str(recorded["tracking_uri"])
        return local
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


def _evaluate_run(uri: str, run: Any) -> Any | None:
    """The newest FINISHED evaluate run of ``run``'s experiment and cell that started after it, or ``None``."""
    tags = {"workflow": "evaluate", **{k: run.data.tags[k] for k in RUN_KEYS if k in run.data.tags}}
    found = search_runs(uri, None, tags, status="FINISHED")
    same = [r for r in found if r.info.experiment_id == run.info.experiment_id and r.info.start_time >= run.info.start_time]
    return same[0] if same else None


def source_from_mlflow(run_id: str, tracking_uri: str, workdir: str | Path) -> BundleSource:
    """The fine-tune run ``run_id``: its ``config.json`` (else its params), its ``model.pt`` artifact, and the
    test metrics of the newest FINISHED evaluate run with the same method, dataset, L and seed that started
    after it (the grid's and the README's evaluate step).

    ``tracking_uri`` is an MLflow URI, or the run's output folder / ``mlruns.db`` for the default local store (a
    folder whose run was logged into another store, a grid's, names that store in its ``finetune_run.json``).
    """
    uri = _store_uri(tracking_uri, run_id)
    try:
        run = get_run(uri, run_id)
    except LookupError as err:
        raise ExportError(str(err)) from None
    tags = dict(run.data.tags)
    if tags.get("workflow") != "finetune":
        raise ExportError(f"MLflow run {run_id} is a {tags.get('workflow', 'untagged')!r} run; export a fine-tune run")
    if run.info.status != "FINISHED":
        raise ExportError(f"MLflow run {run_id} is {run.info.status}, not FINISHED: its model.pt is not the run's result")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
        settings = json.loads(download_artifact(uri, run_id, "config.json", workdir).read_text())
    except (LookupError, OSError, json.JSONDecodeError):
        settings = _unflatten(run.data.params)
    try:
        checkpoint = download_artifact(uri, run_id, "model.pt", workdir)
    except LookupError as err:
        raise ExportError(f"{err}; pass the checkpoint with --ckpt") from None
    for key in RUN_KEYS:
        if key in tags:
            settings.setdefault(key, tags[key])
    evaluation = _evaluate_run(uri, run)
    return BundleSource(
        checkpoint=checkpoint, settings=settings, run_id=run_id, tracking_uri=uri,
        eval_metrics=finite_metrics(evaluation.data.metrics) if evaluation else {},
        evaluate_run_id=evaluation.info.run_id if evaluation else None, logged=True,
    )  # fmt: skip


def source_from_checkpoint(
    ckpt: str | Path,
    dataset: str,
    datalist: str | None = None,
    features: Sequence[int] | None = None,
    preprocessing_overrides: Mapping[str, Any] | None = None,
    method: str = RANDOM,
    num_labeled: int | None = None,
    seed: int | None = None,
    **settings: Any,
) -> BundleSource:
    """A checkpoint and the settings it was fine-tuned with (the keys of ``finetune.json``).

    ``features`` defaults to the model's (:func:`~.bundle.write_bundle`); ``datalist`` to ``data_manifests/<dataset>.json``.
    Test metrics come from ``<checkpoint folder>/evaluation/summary.json`` when the evaluate workflow
    wrote one there.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ExportError(f"checkpoint {ckpt} does not exist")
    values = {
        "method": method, "dataset": dataset, "datalist": datalist or f"data_manifests/{dataset}.json",
        **({"features": list(features)} if features is not None else {}),
        "preprocessing_overrides": dict(preprocessing_overrides or {}),
        **({"num_labeled": num_labeled} if num_labeled is not None else {}), **({"seed": seed} if seed is not None else {}),
        **settings,
    }  # fmt: skip
    metrics: dict[str, float] = {}
    summary = RunLayout.evaluation_dir(ckpt.parent) / "summary.json"
    if summary.is_file():
        metrics = finite_metrics(flatten_summary(json.loads(summary.read_text()), prefix="test"))
    return BundleSource(checkpoint=ckpt, settings=values, eval_metrics=metrics)


def find_source(workdir: str | Path, run_id: str | None = None, tracking_uri: str = "", ckpt: str | None = None, **given: Any) -> BundleSource:
    """The run to export: ``run_id`` (an MLflow fine-tune run) in ``tracking_uri``, or ``ckpt``; either way with
    the settings ``given`` (keys of ``finetune.json``; ``None`` = not given) laid over the run's.

    Artifacts of an MLflow run are downloaded into ``workdir``.
    """
    if run_id is not None and not isinstance(run_id, str):
        raise ExportError(f"run_id must be text; quote it on the command line (--run_id '\"...\"'), got {run_id!r}")
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(json.loads(FINETUNE_CONFIG.read_text())))
    if unknown:
        raise ExportError(f"unknown options {unknown}: further options must be keys of {FINETUNE_CONFIG.relative_to(REPO_ROOT)}")
    if (run_id is None) == (ckpt is None):
        raise ExportError("give either run_id (an MLflow fine-tune run) or ckpt (a checkpoint with its settings)")
    if run_id is not None:
        if not tracking_uri:
            raise ExportError("run_id needs tracking_uri (an MLflow URI, or the run's output folder)")
        source = source_from_mlflow(run_id, tracking_uri, workdir)
    elif "dataset" not in given:
        raise ExportError("ckpt needs the dataset it was fine-tuned on (--dataset)")
    else:
        source = source_from_checkpoint(ckpt, **given)
    source.settings.update(given)
    return source
