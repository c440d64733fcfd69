"""The MLflow layer every workflow logs through, built so that tracking can never stop a training run.

* :func:`start_run` opens (or resumes) a run and returns a :class:`TrackingRun`, usable as a
  context manager.  With an empty ``tracking_uri`` the store is SQLite at
  ``<output_dir>/mlruns.db`` with artifacts under ``<output_dir>/mlartifacts``.
* **Outages.**  An ``http(s)://`` server is probed first (``GET /health``, a few seconds at most).
  If it does not answer, or fails later in the run (or any other store cannot be opened), the
  run moves to the local store under ``output_dir``: one :class:`TrackingFallbackWarning` per
  server and process names the local store and the command to view it; the tags and params
  logged so far are replayed there.  HTTP retries are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
  etc., unless the user set them) so a dead server costs seconds, not minutes.  Every other logging error is a
  :class:`TrackingWarning` (once per kind of call) and the call is dropped: logging never raises.
* **What is logged** is only what the workflows pass: tags, the bundle config (flattened params
  plus ``config.json``), metrics and files.  Nothing here reads the environment or DICOM headers,
  and config keys named like identifying DICOM attributes (``PatientName``, ``StudyDate`` ...)
  are dropped before logging as a last line of defence.
* **Resume.**  :func:`start_workflow_run` stores the run id in the workflow's output folder and, when the
  same command is run again there (after a crash), continues that run instead of opening a second one.
* :class:`MLflowEpochHandler` logs an ignite/MONAI engine's per-epoch ``engine.state.metrics`` and
  the epoch mean of the losses in ``engine.state.output`` into a :class:`TrackingRun`.
  ``monai.handlers.MLFlowHandler`` is not used because it opens its own run (or adopts "the latest
  active run" of the experiment, which can be another process's), cannot continue a given run id,
  and lets MLflow exceptions propagate into the engine; the fallback and resume contracts above
  need the run to be owned here, so the handler is a thin view onto :class:`TrackingRun`.
* :func:`search_runs`, :func:`find_run` and :func:`completed_runs` read runs back by tags (the
  results runner uses them to skip finished runs and to build tables); :func:`get_run` and
  :func:`download_artifact` read one run by id (the exporter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = [
    "MLflowEpochHandler",
    "TrackingFallbackWarning",
    "TrackingRun",
    "TrackingWarning",
    "active_run",
    "completed_runs",
    "config_hash",
    "download_artifact",
    "find_run",
    "flatten_config",
    "get_run",
    "local_tracking_uri",
    "runs_as_records",
    "scalar_losses",
    "search_runs",
    "server_reachable",
    "start_run",
    "start_workflow_run",
]

logger = logging.getLogger(__name__)

STORE_FILE = "mlruns.db"
ARTIFACT_DIR = "mlartifacts"
CONFIG_ARTIFACT = "config.json"
PROBE_TIMEOUT_S = 3.0
#: Bounded HTTP behaviour for MLflow's REST client; set only where the user has not set them.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# MLflow limits (mlflow.utils.validation): param values 6000 chars, keys 250, 100 params a batch.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_BATCH = 100
TRUNCATION_MARK = "...[truncated]"
#: DICOM keywords of identifying attributes: config keys with these names are never logged.
DICOM_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID", "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
        "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "AccessionNumber",
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "StudyID",
    }
)  # fmt: skip


class TrackingWarning(UserWarning):
    """A logging call failed and was dropped (training goes on)."""


class TrackingFallbackWarning(TrackingWarning):
    """The tracking server could not be reached; runs are logged to a local store instead."""


_warned_fallback: set[str] = set()
_active_runs: list[TrackingRun] = []


# ----------------------------------------------------------------------------------------------
# store resolution
# ----------------------------------------------------------------------------------------------


def local_tracking_uri(output_dir: str | os.PathLike[str]) -> str:
    """``sqlite:///<output_dir>/mlruns.db`` (absolute), the default and fallback store."""
    path = Path(output_dir).expanduser().resolve() / STORE_FILE
    return f"sqlite:///{path.as_posix()}"


def _is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _redact(uri: str) -> str:
    """The URI without any ``user:password@`` part, for messages and tags."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _bound_http_retries() -> None:
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def server_reachable(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an ``http(s)`` tracking server answers ``GET /health`` within ``timeout`` seconds.

    Any HTTP answer counts (an auth error is still a live server); local stores are always reachable.
    """
    if not _is_remote(tracking_uri):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments in a SQLite store: ``mlartifacts/`` beside the database.

    (MLflow's own default for a database store is ``./mlruns`` under the current directory.)
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(tracking_uri[len("sqlite:///") :])
    return (db_path.parent / ARTIFACT_DIR).resolve().as_uri()


def _warn_fallback(tracking_uri: str, local_uri: str, reason: str) -> None:
    key = _redact(tracking_uri)
    if key in _warned_fallback:
        logger.info("MLflow server %s still unavailable; logging to %s", key, local_uri)
        return
    _warned_fallback.add(key)
    where = local_uri[len("sqlite:///") :]
    warnings.warn(
        f"MLflow tracking store {key} is unavailable ({reason}); logging this run and later ones "
        f"locally to {where} (artifacts beside it in {ARTIFACT_DIR}/). "
        f"View them with: mlflow ui --backend-store-uri {local_uri}",
        TrackingFallbackWarning,
        stacklevel=3,
    )


def _client(tracking_uri: str) -> Any:
    import mlflow  # imported lazily: MLflow takes seconds to import

    _bound_http_retries()
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client: Any, tracking_uri: str, experiment_name: str, create: bool = True) -> str | None:
    """Id of ``experiment_name`` (restored if deleted, created if missing and ``create``)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        if not create:
            return None
        try:
            return client.create_experiment(experiment_name, artifact_location=_artifact_location(tracking_uri))
        except MlflowException:  # created meanwhile by a concurrent process
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ----------------------------------------------------------------------------------------------
# config flattening
# ----------------------------------------------------------------------------------------------


def config_hash(config: Mapping[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of the config as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _param_key(key: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return key


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    if len(text) > MAX_PARAM_VALUE:
        text = text[: MAX_PARAM_VALUE - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def _identifying(key: str) -> bool:
    return any(part in DICOM_IDENTIFYING_KEYWORDS for part in re.split(r"[.#/]", key))


def flatten_config(config: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Nested config as MLflow params: ``{"a.b.c": "value"}``.

    Lists and other leaves are JSON text; keys are made MLflow-safe and values truncated to
    MLflow's limits; keys naming identifying DICOM attributes are dropped.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and (value or not prefix):
            for k, v in value.items():
                visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
            return
        if _identifying(prefix):
            logger.warning("not logging config key %r: it names an identifying DICOM attribute", prefix)
            return
        flat[_param_key(prefix)] = _param_value(value)

    visit("", dict(config))
    return flat


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


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
        self._tags = {str(k): str(v) for k, v in tags.items() if not _identifying(str(k))}
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
            logger.info("MLflow run %s (%s) in %s", self.run_id, run_name, _redact(self.tracking_uri))

    # -- opening and failing over ---------------------------------------------------------------

    def _open(self, resume_run_id: str | None) -> None:
        client = _client(self.tracking_uri)
        experiment_id = _experiment_id(client, self.tracking_uri, self.experiment_name)
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
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.experiment_id != experiment_id:
            warnings.warn(
                f"MLflow run {run_id} to resume is not in experiment {self.experiment_name!r} of "
                f"{_redact(self.tracking_uri)}; starting a new run",
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
        _warn_fallback(self.requested_uri, local_uri, reason)
        previous = self.run_id
        self.tracking_uri, self.is_fallback = local_uri, True
        self._tags["metacontrast.tracking_fallback_from"] = _redact(self.requested_uri)
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
            if _is_remote(self.tracking_uri) and not server_reachable(self.tracking_uri):
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
        from mlflow.entities import RunTag

        return [RunTag(k, v) for k, v in tags.items()]

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        """Set run tags (values as text); identifying DICOM attribute names are refused."""
        clean = {str(k): str(v) for k, v in tags.items() if not _identifying(str(k))}
        self._tags.update(clean)
        return self._call("set_tags", lambda c, r: c.log_batch(r, tags=self._tag_entities(clean)))

    def _log_params_now(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

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
        from mlflow.entities import Metric

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
            logger.info("MLflow run %s %s in %s", self.run_id, status.lower(), _redact(self.tracking_uri))

    def __enter__(self) -> TrackingRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
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
        run_name: the run's display name.
        tags: e.g. ``workflow``, ``method``, ``dataset``, ``num_labeled``, ``seed`` (stored as text).
        output_dir: the workflow's output folder (default and fallback store live here).
        resume_run_id: continue this run (set back to RUNNING) instead of starting a new one;
            if it is not in the store, a new run is started with a warning.
        config: when given, logged with :meth:`TrackingRun.log_config`.
    """
    requested = tracking_uri or ""
    uri = requested or local_tracking_uri(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if _is_remote(uri) and not server_reachable(uri):
        local = local_tracking_uri(output_dir)
        _warn_fallback(uri, local, "no answer to GET /health")
        # a run that already fell back once (its id stored by the workflow) continues in the local store
        local_resume = resume_run_id if resume_run_id and _run_exists(local, resume_run_id) else None
        run = TrackingRun(local, experiment_name, run_name, tags, output_dir, local_resume, requested_uri=uri)
        run.is_fallback = True
        run.set_tags({"metacontrast.tracking_fallback_from": _redact(uri)})
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
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        return False
    try:
        _client(tracking_uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001
        return False


def start_workflow_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    tags: Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    overwrite: bool | str = False,
) -> TrackingRun:
    """:func:`start_run` for a workflow that owns ``output_dir``: checked, resumable, recorded.

    First :func:`metacontrast.workflows.checkpoints.prepare_output_dir` checks that the folder holds no
    run of another config (``OutputDirConflict`` otherwise, unless ``overwrite``).  A folder holding a
    run of this config continues that MLflow run (its id is stored in ``<output_dir>/<workflow>_run.json``),
    so a crashed run that is started again stays one MLflow run; the id of the run opened here is then
    written back to that file before any training happens.  ``tags["workflow"]`` names the workflow.
    In a ``torchrun`` job rank 0 owns the folder and the run; other ranks get a
    :class:`~metacontrast.engines.distributed.FollowerRun` that logs nothing.
    """
    from ..engines.distributed import FollowerRun, is_leader
    from .checkpoints import prepare_output_dir

    if not is_leader():
        return FollowerRun()  # type: ignore[return-value]
    workflow = str(tags.get("workflow", "run"))
    state = prepare_output_dir(output_dir, workflow, config, overwrite=overwrite)
    run = start_run(tracking_uri, experiment_name, run_name, tags, output_dir, resume_run_id=state.mlflow_run_id, config=config)
    if state.resumed:
        run.set_tags({"metacontrast.resumed": "true"})
    state.record_run(run.run_id, _redact(run.tracking_uri), experiment_name)
    return run


def active_run() -> TrackingRun | None:
    """The most recently started run that has not ended (what a handler without a run logs into)."""
    return _active_runs[-1] if _active_runs else None


# ----------------------------------------------------------------------------------------------
# reading runs back
# ----------------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _reading_uri(tracking_uri: str, output_dir: str | os.PathLike[str] | None) -> str:
    if not tracking_uri:
        if output_dir is None:
            raise ValueError("an empty tracking_uri needs output_dir (the default store is <output_dir>/mlruns.db)")
        return local_tracking_uri(output_dir)
    if _is_remote(tracking_uri) and not server_reachable(tracking_uri):
        if output_dir is None:
            raise ConnectionError(f"MLflow tracking server {_redact(tracking_uri)} does not answer")
        local = local_tracking_uri(output_dir)
        _warn_fallback(tracking_uri, local, "no answer to GET /health")
        return local
    return tracking_uri


def search_runs(
    tracking_uri: str,
    experiment_name: str | None,
    tags: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    status: str | None = None,
) -> list[Any]:
    """All runs whose tags equal ``tags`` (and status, if given), newest first.

    ``experiment_name`` limits the search to one experiment; ``None`` searches every active one.
    An empty ``tracking_uri`` reads ``<output_dir>/mlruns.db``; an unreachable server reads the
    local fallback store under ``output_dir`` (or raises ``ConnectionError`` without one).
    """
    uri = _reading_uri(tracking_uri, output_dir)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return []  # do not create an empty database just to read nothing
    client = _client(uri)
    if experiment_name is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        experiment_id = _experiment_id(client, uri, experiment_name, create=False)
        experiment_ids = [experiment_id] if experiment_id is not None else []
    if not experiment_ids:
        return []
    clauses = [f"tags.`{k}` = {_quote(str(v))}" for k, v in (tags or {}).items()]
    if status:
        clauses.append(f"attributes.status = {_quote(status)}")
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, " and ".join(clauses), max_results=1000,
            order_by=["attributes.start_time DESC"], page_token=token,
        )  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_run(
    tracking_uri: str,
    experiment_name: str | None,
    tags: Mapping[str, Any],
    output_dir: str | os.PathLike[str] | None = None,
    status: str | None = None,
) -> Any | None:
    """The newest run matching ``tags`` (and ``status``), or ``None``."""
    runs = search_runs(tracking_uri, experiment_name, tags, output_dir, status)
    return runs[0] if runs else None


def completed_runs(
    tracking_uri: str,
    experiment_name: str | None,
    tags: Mapping[str, Any],
    output_dir: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Runs matching ``tags`` that finished (status ``FINISHED``), newest first."""
    return search_runs(tracking_uri, experiment_name, tags, output_dir, status="FINISHED")


def get_run(tracking_uri: str, run_id: str) -> Any:
    """The run ``run_id`` (MLflow's ``Run``); ``LookupError`` when the store or the run does not exist."""
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        raise LookupError(f"no MLflow store at {tracking_uri}")
    try:
        return _client(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise LookupError(f"no MLflow run {run_id} in {_redact(tracking_uri)}: {err}") from None


def download_artifact(tracking_uri: str, run_id: str, path: str, dest: str | os.PathLike[str]) -> Path:
    """The artifact ``path`` of run ``run_id`` copied into the folder ``dest``; ``LookupError`` when it cannot be had."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(_client(tracking_uri).download_artifacts(run_id, path, str(dest)))
    except (MlflowException, OSError) as err:
        raise LookupError(f"MLflow run {run_id} has no {path} artifact ({err})") from None


# ----------------------------------------------------------------------------------------------
# the engine handler
# ----------------------------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar_losses(output: Any) -> dict[str, float]:
    """Loss terms from an engine output: a scalar, a dict (keys containing ``loss``) or a decollated list."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]  # MONAI decollates the batch; the loss is repeated in every item
    if isinstance(output, Mapping):
        return {str(k): float(v) for k, v in output.items() if "loss" in str(k).lower() and _is_scalar(v)}
    if _is_scalar(output):
        return {"loss": float(output)}
    return {}


class MLflowEpochHandler:
    """Logs, at every epoch end, ``engine.state.metrics`` and the epoch mean of each loss term.

    Attach it to a trainer (losses from ``engine.state.output``, metrics such as a training Dice)
    and/or to a MONAI evaluator (validation metrics; MONAI runs the evaluator with the trainer's
    epoch, so ``step`` lines up).  Logging failures never reach the engine.

    Args:
        run: the run to log into; ``None`` means :func:`active_run` at each epoch end.
        prefix: put before every name (e.g. ``"train_"``, ``"val_"``).
        output_transform: ``engine.state.output`` -> ``{name: float}`` losses to average.
        step_transform: ``engine`` -> the MLflow step (default: ``engine.state.epoch``).
        iteration_interval: also log the raw losses every N iterations (0 = never), as ``<name>_iter``.
        end_on_complete: end the run (FINISHED) when the engine completes.
    """

    def __init__(
        self,
        run: TrackingRun | None = None,
        prefix: str = "",
        output_transform: Callable[[Any], Mapping[str, float]] = scalar_losses,
        step_transform: Callable[[Engine], int] = lambda engine: engine.state.epoch,
        iteration_interval: int = 0,
        end_on_complete: bool = False,
    ) -> None:
        self.run = run
        self.prefix = prefix
        self.output_transform = output_transform
        self.step_transform = step_transform
        self.iteration_interval = iteration_interval
        self.end_on_complete = end_on_complete
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        if self.end_on_complete:
            engine.add_event_handler(Events.COMPLETED, self._end)

    def _target(self) -> TrackingRun | None:
        return self.run if self.run is not None else active_run()

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._counts.clear()

    def _accumulate(self, engine: Engine) -> None:
        try:
            losses = self.output_transform(engine.state.output)
        except Exception as exc:  # noqa: BLE001
            logger.debug("output_transform failed: %s", exc)
            return
        for name, value in losses.items():
            if math.isfinite(value):
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
        run = self._target()
        if run is not None and self.iteration_interval and engine.state.iteration % self.iteration_interval == 0:
            run.log_metrics({f"{self.prefix}{k}_iter": v for k, v in losses.items()}, step=engine.state.iteration)

    def epoch_values(self, engine: Engine) -> dict[str, Any]:
        """What :meth:`_log_epoch` logs: epoch-mean losses and ``engine.state.metrics``, prefixed."""
        values: dict[str, Any] = {f"{self.prefix}{k}": s / self._counts[k] for k, s in self._sums.items()}
        values.update({f"{self.prefix}{k}": v for k, v in (engine.state.metrics or {}).items()})
        return values

    def _log_epoch(self, engine: Engine) -> None:
        run = self._target()
        if run is not None:
            run.log_metrics(self.epoch_values(engine), step=int(self.step_transform(engine)))

    def _end(self, engine: Engine) -> None:
        run = self._target()
        if run is not None:
            run.end("FINISHED")


def runs_as_records(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Plain dicts ``{run_id, run_name, status, start_time, tags, params, metrics}`` for each run."""
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "start_time": r.info.start_time,
            "tags": dict(r.data.tags),
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]
