"""Which MLflow store a run is logged to, failing over to a local one, and opening stores safely.

* With an empty ``tracking_uri`` the store is SQLite at ``<output_dir>/mlruns.db`` with artifacts under
  ``<output_dir>/mlartifacts`` (:func:`local_tracking_uri`).
* **Outages.**  An ``http(s)://`` server is probed first (``GET /health``, a few seconds at most,
  :func:`server_reachable`).  If it does not answer, the run moves to the local store under ``output_dir``:
  one :class:`TrackingFallbackWarning` per server and process names the local store and the command to view
  it.  HTTP retries are bounded (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` etc., unless the user set them) so a
  dead server costs seconds, not minutes.
* **Concurrency.**  MLflow creates a fresh SQLite store's tables when a process first opens it, and two
  processes doing so at the same moment crash one of them ("table ... already exists").  :func:`open_client`
  therefore opens a SQLite store, and :func:`get_experiment_id` creates an experiment, while holding an exclusive
  ``fcntl.flock`` on ``<database>.lock`` beside the database (:func:`store_lock`): processes that start
  together open the store one after the other, then work on it concurrently as SQLite allows.
* **Snapshots.**  :func:`snapshot_store` writes an xz-compressed copy of a SQLite store (taken with SQLite's
  backup API, so consistent while runs write to it): the results folder keeps its store beside its tables, so
  they can be re-derived, and extended, after the machine that ran the grid is gone.
"""

from __future__ import annotations

import fcntl
import logging
import lzma
import os
import shutil
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = [
    "ARTIFACT_DIR",
    "STORE_FILE",
    "TrackingFallbackWarning",
    "TrackingWarning",
    "open_client",
    "get_experiment_id",
    "is_remote",
    "local_tracking_uri",
    "reading_uri",
    "redact",
    "server_reachable",
    "snapshot_store",
    "sqlite_path",
    "store_lock",
    "warn_fallback",
]

logger = logging.getLogger(__name__)

STORE_FILE = "mlruns.db"
ARTIFACT_DIR = "mlartifacts"
LOCK_SUFFIX = ".lock"
PROBE_TIMEOUT_S = 3.0
#: Bounded HTTP behaviour for MLflow's REST client; set only where the user has not set them.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
SQLITE_PREFIX = "sqlite:///"


class TrackingWarning(UserWarning):
    """A logging call failed and was dropped (training goes on)."""


class TrackingFallbackWarning(TrackingWarning):
    """The tracking server could not be reached; runs are logged to a local store instead."""


_warned_fallback: set[str] = set()


def local_tracking_uri(output_dir: str | os.PathLike[str]) -> str:
    """``sqlite:///<output_dir>/mlruns.db`` (absolute), the default and fallback store."""
    path = Path(output_dir).expanduser().resolve() / STORE_FILE
    return f"{SQLITE_PREFIX}{path.as_posix()}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, ``None`` for any other store."""
    return Path(tracking_uri[len(SQLITE_PREFIX) :]) if tracking_uri.startswith(SQLITE_PREFIX) else None


def is_remote(uri: str) -> bool:
    """Whether the store is an ``http(s)`` tracking server."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def redact(uri: str) -> str:
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
    if not is_remote(tracking_uri):
        return True
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for new experiments in a SQLite store: ``mlartifacts/`` beside the database.

    (MLflow's own default for a database store is ``./mlruns`` under the current directory.)
    """
    db_path = sqlite_path(tracking_uri)
    return None if db_path is None else (db_path.parent / ARTIFACT_DIR).resolve().as_uri()


def warn_fallback(tracking_uri: str, local_uri: str, reason: str) -> None:
    """Say once per server and process that runs go to ``local_uri`` instead (later times: a log line)."""
    key = redact(tracking_uri)
    if key in _warned_fallback:
        logger.info("MLflow server %s still unavailable; logging to %s", key, local_uri)
        return
    _warned_fallback.add(key)
    where = local_uri[len(SQLITE_PREFIX) :]
    warnings.warn(
        f"MLflow tracking store {key} is unavailable ({reason}); logging this run and later ones "
        f"locally to {where} (artifacts beside it in {ARTIFACT_DIR}/). "
        f"View them with: mlflow ui --backend-store-uri {local_uri}",
        TrackingFallbackWarning,
        stacklevel=3,
    )


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.lock`` beside a SQLite store (other stores: no lock).

    The lock file is created (with the database's folder) if missing and left in place: deleting it
    while another process waits on it would let a third one lock a new file.
    """
    db_path = sqlite_path(tracking_uri)
    if db_path is None:
        yield
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + LOCK_SUFFIX), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(tracking_uri: str) -> Any:
    """An ``mlflow.MlflowClient`` on ``tracking_uri`` whose store is open (tables created) on return.

    A SQLite store is opened under :func:`store_lock`, so processes opening a fresh store together do
    not race in MLflow's table creation.
    """
    import mlflow  # heavy: MLflow takes seconds to import, and only the processes that log need it

    _bound_http_retries()
    with store_lock(tracking_uri):
        return mlflow.MlflowClient(tracking_uri=tracking_uri)  # opens the store: creates or upgrades its tables


def get_experiment_id(mlflow_client: Any, tracking_uri: str, experiment_name: str, create: bool = True) -> str | None:
    """Id of ``experiment_name`` (restored if deleted, created if missing and ``create``).

    New experiments of a SQLite store keep their artifacts beside the database; creation happens under
    :func:`store_lock`, and an experiment created meanwhile by another process is used.
    """
    from mlflow.exceptions import MlflowException  # heavy, as in open_client()

    experiment = mlflow_client.get_experiment_by_name(experiment_name)
    if experiment is None:
        if not create:
            return None
        with store_lock(tracking_uri):
            experiment = mlflow_client.get_experiment_by_name(experiment_name)
            if experiment is None:
                try:
                    return mlflow_client.create_experiment(experiment_name, artifact_location=artifact_location(tracking_uri))
                except MlflowException:  # created meanwhile by a process on another store lock (a server)
                    experiment = mlflow_client.get_experiment_by_name(experiment_name)
                    if experiment is None:
                        raise
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def reading_uri(tracking_uri: str, output_dir: str | os.PathLike[str] | None) -> str:
    """The store to read: ``tracking_uri``; empty: the local store of ``output_dir``; an unreachable server:
    the local fallback store of ``output_dir`` (``ConnectionError`` without one)."""
    if not tracking_uri:
        if output_dir is None:
            raise ValueError("an empty tracking_uri needs output_dir (the default store is <output_dir>/mlruns.db)")
        return local_tracking_uri(output_dir)
    if is_remote(tracking_uri) and not server_reachable(tracking_uri):
        if output_dir is None:
            raise ConnectionError(f"MLflow tracking server {redact(tracking_uri)} does not answer")
        local = local_tracking_uri(output_dir)
        warn_fallback(tracking_uri, local, "no answer to GET /health")
        return local
    return tracking_uri


def snapshot_store(tracking_uri: str, out_file: str | os.PathLike[str]) -> Path | None:
    """Write ``out_file`` (``.xz``): a consistent copy of the SQLite store at ``tracking_uri``, compressed.

    Runs only (params, metrics with their histories, tags); the artifacts, which hold weights, stay where they are.
    Restore with ``xz -dk <out_file>`` and open the result as ``sqlite:///<path>``.  Returns ``None`` (writing
    nothing) for a store that is not a SQLite file.
    """
    database = sqlite_path(tracking_uri)
    if database is None or not database.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / STORE_FILE
        source, target = sqlite3.connect(f"file:{database}?mode=ro", uri=True), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        with atomic_write(out_file, "wb") as handle, lzma.open(handle, "wb", preset=6) as packed, copy.open("rb") as raw:
            shutil.copyfileobj(raw, packed)
    return Path(out_file)
