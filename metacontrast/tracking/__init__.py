"""The MLflow layer every workflow logs through, built so that tracking can never stop a training run.

* :mod:`.store` -- which store (an empty ``tracking_uri``: SQLite at ``<output_dir>/mlruns.db``), failing
  over to that local store when a server does not answer, and opening a store safely when several
  processes start on it at once (a lock file beside a SQLite database);
* :mod:`.params` -- what of a config is logged (flattened, MLflow-safe, identifying DICOM keys dropped) and
  the package's one config hash;
* :mod:`.run` -- :func:`start_run` and the run object :class:`TrackingRun`, whose logging never raises;
* :mod:`.search` -- reading runs back by tags, the one search-filter quoting and the one reader of stored
  numbers (MLflow's infinity as NaN), and :class:`RunStore`, the read side of a store;
* :mod:`.handler` -- :class:`MLflowEpochHandler`, an engine's per-epoch metrics and losses into a run.

A workflow that owns an output folder starts its run with
:func:`metacontrast.workflows.checkpoints.start_workflow_run` (resumable, one run per folder).
"""

from .handler import MLflowEpochHandler, scalar_losses
from .params import MAX_PARAM_VALUE, config_hash, flatten_config
from .run import TrackingRun, active_run, start_run, workflow_run_name
from .search import (
    RunStore,
    completed_runs,
    download_artifact,
    filter_string,
    find_run,
    finite_metrics,
    get_run,
    metric_value,
    runs_as_records,
    search_runs,
)
from .store import (
    TrackingFallbackWarning,
    TrackingWarning,
    get_experiment_id,
    local_tracking_uri,
    open_client,
    server_reachable,
    store_lock,
)

__all__ = [
    "MAX_PARAM_VALUE",
    "MLflowEpochHandler",
    "RunStore",
    "TrackingFallbackWarning",
    "TrackingRun",
    "TrackingWarning",
    "active_run",
    "completed_runs",
    "config_hash",
    "download_artifact",
    "filter_string",
    "find_run",
    "finite_metrics",
    "get_run",
    "flatten_config",
    "get_experiment_id",
    "local_tracking_uri",
    "metric_value",
    "open_client",
    "runs_as_records",
    "scalar_losses",
    "search_runs",
    "server_reachable",
    "start_run",
    "workflow_run_name",
    "store_lock",
]
