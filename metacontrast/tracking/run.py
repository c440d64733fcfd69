"""The MLflow run every workflow logs through, built so that tracking can never stop a training run.

* :func:`start_run` opens (or resumes) a run and returns a :class:`TrackingRun`, usable as a context
  manager.  The store is chosen as :mod:`metacontrast.tracking.store` says; if a server fails during the
  run, the run moves to the local store under ``output_dir`` and the tags and params logged so far are
  replayed there.  Every other logging error is a :class:`~metacontrast.tracking.store.TrackingWarning`
  (once per kind of call) and the call is dropped: logging never raises.
* **What is logged** is only what the workflows pass: tags, the bundle config (flattened params plus
  ``config.json``, :mod:`metacontrast.tracking.params`), metrics and files.
* **Resume.**  ``resume_run_id`` continues a run instead of opening a second one
  (:func:`metacontrast.workflows.checkpoints.start_workflow_run` keeps the id in the output folder).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .params import MAX_BATCH, config_hash, flatten_config, identifying
from .store import (
    TrackingWarning,
    get_experiment_id,
    is_remote,
    local_tracking_uri,
    open_client,
    redact,
    server_reachable,
    sqlite_path,
    warn_fallback,
)

__all__ = ["CONFIG_ARTIFACT", "TrackingRun", "active_run", "start_run", "workflow_run_name"]

logger = logging.getLogger(__name__)

CONFIG_ARTIFACT = "config.json"

_active_runs: list[TrackingRun] = []


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite-or-NaN floats from numbers, 0-d tensors and small tensors (``key_0``, ``key_1`` ...)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            flat = value.detach().float().cpu().flatten()
            if flat.numel() == 1:
                out[str(key)] = float(flat[0])
            else:
                out.update({f"{key}_{i}": float(v) for i, v in enumerate(flat.tolist())})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
        elif hasattr(value, "item") and getattr(value, "size", 0) == 1:  # numpy scalar
            out[str(key)] = float(value.item())
        else:
            logger.debug("not a metric, skipped: %s=%r", key, type(value))
    return out


class TrackingRun:
    """An MLflow run that never raises from its logging methods.  Made by :func:`start_run`.

    Attributes:
        run_id: the MLflow run id (``None`` only if no store could be opened at all).
        tracking_uri: the store the run lives in now (the local one after a fallback).
        is_fallback: ``True`` when the run was moved to the local store because of an outage.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        tags: Mapping[str, Any],
        output_dir: str | os.PathLike[str],
        resume_run_id: str | None = None,
        requested_uri: str | None = None,
    ) -> None:
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.output_dir = Path(output_dir)
        self.requested_uri = requested_uri or tracking_uri
        self.tracking_uri = tracking_uri
        self.is_fallback = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._tags = {str(k): str(v) for k, v in tags.items() if not identifying(str(k))}
        self._params: dict[str, str] = {}
        self._warned: set[str] = set()
        self._client: Any = None
        self._ended = False
        try:
            self._open(resume_run_id)
        except Exception as exc:  # noqa: BLE001 - a tracking failure must not stop the workflow
            if tracking_uri != local_tracking_uri(self.output_dir):
                self._fail_over(f"{type(exc).__name__}: {exc}")
            else:
                self._warn("open", exc)
        if self.run_id is not None:
            logger.info("MLflow run %s (%s) in %s", self.run_id, run_name, redact(self.tracking_uri))

    # -- opening and failing over ---------------------------------------------------------------

    def _open(self, resume_run_id: str | None) -> None:
        client = open_client(self.tracking_uri)
        experiment_id = get_experiment_id(client, self.tracking_uri, self.experiment_name)
        run = None
        if resume_run_id:
            run = self._resumable(client, resume_run_id, experiment_id)
        if run is None:
            tags = dict(self._tags)
            if resume_run_id:
                tags["metacontrast.resume_requested"] = resume_run_id
            run = client.create_run(experiment_id, tags=tags, run_name=self.run_name)
        self._client, self.experiment_id, self.run_id = client, experiment_id, run.info.run_id

    def _resumable(self, client: Any, run_id: str, experiment_id: str) -> Any:
        """The run to continue, set back to RUNNING, or ``None`` (with a warning) if it is not here."""
        from mlflow.exceptions import MlflowException  # heavy: MLflow is imported only where a run logs

        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.experiment_id != experiment_id:
            warnings.warn(
                f"MLflow run {run_id} to resume is not in experiment {self.experiment_name!r} of "
                f"{redact(self.tracking_uri)}; starting a new run",
                TrackingWarning,
                stacklevel=4,
            )
            return None
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=self._tag_entities(self._tags))
        return run

    def _fail_over(self, reason: str) -> None:
        """Move the run to the local store under ``output_dir`` and replay its tags and params."""
        local_uri = local_tracking_uri(self.output_dir)
        warn_fallback(self.requested_uri, local_uri, reason)
        previous = self.run_id
        self.tracking_uri, self.is_fallback = local_uri, True
        self._tags["metacontrast.tracking_fallback_from"] = redact(self.requested_uri)
        if previous:
            self._tags["metacontrast.remote_run_id"] = previous
        self.run_id = None
        try:
            self._open(None)
            self._log_params_now(self._params)
        except Exception as exc:  # noqa: BLE001
            self._warn("open", exc)

    def _warn(self, what: str, exc: BaseException) -> None:
        if what in self._warned:
            logger.debug("MLflow %s failed again: %s", what, exc)
            return
        self._warned.add(what)
        warnings.warn(
            f"MLflow {what} failed and was skipped ({type(exc).__name__}: {exc}); training continues",
            TrackingWarning,
            stacklevel=4,
        )

    def _call(self, what: str, action: Callable[[Any, str], Any]) -> bool:
        """Run ``action(client, run_id)``; on failure fail over (remote outage) or warn; never raise."""
        if self.run_id is None or self._client is None:
            return False
        try:
            action(self._client, self.run_id)
            return True
        except Exception as exc:  # noqa: BLE001
            if is_remote(self.tracking_uri) and not server_reachable(self.tracking_uri):
                self._fail_over(f"{type(exc).__name__} during {what}")
                if self.run_id is not None:
                    try:
                        action(self._client, self.run_id)
                        return True
                    except Exception as exc2:  # noqa: BLE001
                        exc = exc2
            self._warn(what, exc)
            return False

    # -- logging ------------------------------------------------------------------------------

    @staticmethod
    def _tag_entities(tags: Mapping[str, str]) -> list[Any]:
        from mlflow.entities import RunTag  # heavy, as above

        return [RunTag(k, v) for k, v in tags.items()]

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        """Set run tags (values as text); identifying DICOM attribute names are refused."""
        clean = {str(k): str(v) for k, v in tags.items() if not identifying(str(k))}
        self._tags.update(clean)
        return self._call("set_tags", lambda c, r: c.log_batch(r, tags=self._tag_entities(clean)))

    def _log_params_now(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param  # heavy, as above

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + MAX_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> bool:
        """Log params (nested mappings are flattened like a config)."""
        flat = flatten_config(params)
        self._params.update(flat)
        return self._call("log_params", lambda c, r: self._log_params_now(flat))

    def log_config(self, config: Mapping[str, Any]) -> bool:
        """Log a (resolved) bundle config: flattened params, ``config.json`` and the ``config_hash`` tag."""
        ok = self.log_params(config)
        ok &= self.set_tags({"config_hash": config_hash(config)})
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        return self._call("log_config", lambda c, r: c.log_text(r, text, CONFIG_ARTIFACT)) and ok

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> bool:
        """Log scalar metrics (floats, 0-d tensors; small tensors as ``key_i``) at ``step``."""
        from mlflow.entities import Metric  # heavy, as above

        values = _scalars(metrics)
        if not values:
            return True
        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, int(step or 0)) for k, v in values.items()]
        return self._call("log_metrics", lambda c, r: c.log_batch(r, metrics=items))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> bool:
        """Log a file, or every file under a folder, as run artifacts."""
        path = Path(path)
        if not path.exists():
            self._warn(f"log_artifact({path})", FileNotFoundError(str(path)))
            return False
        if path.is_dir():
            return self._call("log_artifact", lambda c, r: c.log_artifacts(r, str(path), artifact_path))
        return self._call("log_artifact", lambda c, r: c.log_artifact(r, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (``FINISHED``, ``FAILED`` or ``KILLED``); later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        if self in _active_runs:
            _active_runs.remove(self)
        self._call("end", lambda c, r: c.set_terminated(r, status))
        if self.run_id is not None:
            logger.info("MLflow run %s %s in %s", self.run_id, status.lower(), redact(self.tracking_uri))

    def __enter__(self) -> TrackingRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def workflow_run_name(tags: Mapping[str, Any]) -> str:
    """A run's display name from its tags: ``<method>-<workflow>[-L<num_labeled>][-seed<seed>]`` (``gcl-pretrain``,
    ``gcl@improved-finetune-L1-seed0``, ``random-probe-seed2``); a pre-training, one per method, names no seed."""
    name = f"{tags['method']}-{tags['workflow']}"
    if "num_labeled" in tags:
        name += f"-L{tags['num_labeled']}"
    if "seed" in tags and tags["workflow"] != "pretrain":
        name += f"-seed{tags['seed']}"
    return name


def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str | None,
    tags: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    resume_run_id: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> TrackingRun:
    """Open an MLflow run (use as ``with start_run(...) as run:`` or call ``run.end()``).

    Args:
        tracking_uri: MLflow tracking URI; empty means SQLite at ``<output_dir>/mlruns.db``.
            An unreachable ``http(s)`` server falls back to that local store (one warning).
        experiment_name: created when missing (artifacts beside the database for SQLite stores).
        run_name: the run's display name; ``None``: :func:`workflow_run_name` of ``tags``.
        tags: e.g. ``workflow``, ``method``, ``dataset``, ``num_labeled``, ``seed`` (stored as text).
        output_dir: the workflow's output folder (default and fallback store live here).
        resume_run_id: continue this run (set back to RUNNING) instead of starting a new one;
            if it is not in the store, a new run is started with a warning.
        config: when given, logged with :meth:`TrackingRun.log_config`.
    """
    run_name = run_name if run_name is not None else workflow_run_name(tags)
    requested = tracking_uri or ""
    uri = requested or local_tracking_uri(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if is_remote(uri) and not server_reachable(uri):
        local = local_tracking_uri(output_dir)
        warn_fallback(uri, local, "no answer to GET /health")
        # a run that already fell back once (its id stored by the workflow) continues in the local store
        local_resume = resume_run_id if resume_run_id and _run_exists(local, resume_run_id) else None
        run = TrackingRun(local, experiment_name, run_name, tags, output_dir, local_resume, requested_uri=uri)
        run.is_fallback = True
        run.set_tags({"metacontrast.tracking_fallback_from": redact(uri)})
        if resume_run_id and not local_resume:
            run.set_tags({"metacontrast.remote_run_id": resume_run_id})
    else:
        run = TrackingRun(uri, experiment_name, run_name, tags, output_dir, resume_run_id)
    if config is not None:
        run.log_config(config)
    _active_runs.append(run)
    return run


def _run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether ``run_id`` is in the (local) store at ``tracking_uri``; never raises."""
    db_path = sqlite_path(tracking_uri)
    if db_path is not None and not db_path.exists():
        return False
    try:
        open_client(tracking_uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001
        return False


def active_run() -> TrackingRun | None:
    """The most recently started run that has not ended (what a handler without a run logs into)."""
    return _active_runs[-1] if _active_runs else None
