"""Reading runs back: searching by tags, the numbers MLflow stored, and :class:`RunStore`, the read side of a store.

* :func:`search_runs`, :func:`find_run` and :func:`completed_runs` find runs by tags (the grid uses them to
  skip finished runs, the results runner to build tables); :func:`filter_string` is the one place a
  search filter is written, :func:`metric_value` the one place a stored number is read (MLflow stores
  +-inf as +-float max, read back as NaN).
* :class:`RunStore`: a store's FINISHED runs of one dataset, metric histories and artifacts, for the pictures
  and comparisons.  Nothing is written to the store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .store import get_experiment_id, open_client, reading_uri, redact, sqlite_path

__all__ = [
    "RunStore",
    "completed_runs",
    "download_artifact",
    "filter_string",
    "find_run",
    "finite_metrics",
    "get_run",
    "metric_value",
    "quote_value",
    "runs_as_records",
    "search_runs",
]


def quote_value(value: Any) -> str:
    """A value of a search filter, quoted as MLflow's parser reads it (it strips the quotes, no escapes):
    ``'value'``, or ``"value"`` when it holds a single quote; a value holding both kinds is refused."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"an MLflow search filter cannot match a value holding both kinds of quote: {text!r}")


def filter_string(tags: Mapping[str, Any] | None = None, status: str | None = None) -> str:
    """The search filter of runs whose tags equal ``tags`` (and whose status is ``status``, if given)."""
    clauses = [f"tags.`{k}` = {quote_value(v)}" for k, v in (tags or {}).items()]
    if status:
        clauses.append(f"attributes.status = {quote_value(status)}")
    return " and ".join(clauses)


def metric_value(value: Any) -> float:
    """A logged metric as a float; not a number, +-inf, or +-inf as MLflow stores it (+-float max): NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if math.isfinite(number) and abs(number) < 1e300 else float("nan")


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics whose :func:`metric_value` is a number (NaN and infinities left out)."""
    values = {key: metric_value(value) for key, value in metrics.items()}
    return {key: value for key, value in values.items() if not math.isnan(value)}


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
    uri = reading_uri(tracking_uri, output_dir)
    db_path = sqlite_path(uri)
    if db_path is not None and not db_path.exists():
        return []  # do not create an empty database just to read nothing
    client = open_client(uri)
    if experiment_name is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        experiment_id = get_experiment_id(client, uri, experiment_name, create=False)
        experiment_ids = [experiment_id] if experiment_id is not None else []
    if not experiment_ids:
        return []
    query = filter_string(tags, status)
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)
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
    """The run ``run_id`` (MLflow's ``Run``); ``LookupError`` when the store or the run does not exist (a
    missing SQLite file is not created)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow is imported only when a store is read

    path = sqlite_path(tracking_uri)
    if path is not None and not path.exists():
        raise LookupError(f"no MLflow store at {redact(tracking_uri)}")
    try:
        return open_client(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise LookupError(f"no MLflow run {run_id} in {redact(tracking_uri)}: {err}") from None


def download_artifact(tracking_uri: str, run_id: str, path: str, dest: str | os.PathLike[str]) -> Path:
    """The artifact ``path`` of run ``run_id`` copied into the folder ``dest``; ``LookupError`` when it cannot be had."""
    from mlflow.exceptions import MlflowException  # heavy: as above

    try:
        return Path(open_client(tracking_uri).download_artifacts(run_id, path, str(dest)))
    except (MlflowException, OSError) as err:
        raise LookupError(f"MLflow run {run_id} has no {path} artifact ({err})") from None


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


@dataclass
class RunStore:
    """The read side of a grid's MLflow store: FINISHED runs of one dataset, metric histories, artifacts.

    Nothing is written to the store; artifacts are copied into a folder the caller gives.
    """

    tracking_uri: str
    dataset: str
    experiment_name: str | None = None

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise ValueError("tracking_uri is required (e.g. sqlite:///runs/<dataset>/mlruns.db)")
        db_path = sqlite_path(self.tracking_uri)
        if db_path is not None and not db_path.is_file():
            raise FileNotFoundError(f"MLflow store {db_path} does not exist")
        self._client = open_client(self.tracking_uri)

    def runs(self, workflow: str, **tags: Any) -> list[Any]:
        """FINISHED runs tagged ``workflow``, ``dataset`` and ``tags``, newest first."""
        return completed_runs(self.tracking_uri, self.experiment_name, {"workflow": workflow, "dataset": self.dataset, **tags})

    def methods(self) -> list[str]:
        """Every ``method`` tag of the dataset's FINISHED runs, sorted (``random`` first)."""
        found = {r.data.tags.get("method", "") for r in completed_runs(self.tracking_uri, self.experiment_name, {"dataset": self.dataset})}
        return sorted(found - {""}, key=lambda m: (m != "random", m))

    def history(self, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a metric, ordered by step (the last value of a repeated step)."""
        points = {m.step: m.value for m in sorted(self._client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))}
        steps = np.asarray(sorted(points), dtype=float)
        return steps, np.asarray([points[s] for s in sorted(points)], dtype=float)

    def artifact(self, run: Any, name: str, dst: str | os.PathLike[str]) -> Path:
        """Copy artifact ``name`` of ``run`` into ``dst``; a missing one is named in a ``FileNotFoundError``."""
        names = {a.path for a in self._client.list_artifacts(run.info.run_id)}
        if name not in names:
            raise FileNotFoundError(
                f"run {run.info.run_id} ({run.info.run_name}) has no artifact {name!r} (it has {sorted(names)})"
            )
        return Path(self._client.download_artifacts(run.info.run_id, name, str(dst)))
