"""Bring a device run home: unpack its returned archives and merge its MLflow runs into the grid's store.

The device writes its runs into its own stores (the grid's store of each dataset there, or one per run of a
parallel stage group).  Here :func:`import_device_run` unpacks the returned ``runs.tar.gz`` (parts joined) under
``runs_dir``, keeps each device store as ``device_mlruns.db`` where it was (carried back to the device next time,
so an interrupted pre-training resumes in the same run), and copies every run of it into the grid's store of
its top folder, the dataset (:meth:`~metacontrast.layout.RunLayout.store_uri`): tags, params, the full history
of every metric, artifacts, status and times.  A copied run carries the tag ``device_source_run`` (the device's run id); importing again skips runs already copied
and finished, and replaces a copy of a run that was still running, so the import is idempotent.
``run_grid.py`` and the results runner then see these runs like any other.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from metacontrast.layout import RunLayout
from metacontrast.tracking import filter_string, get_experiment_id, open_client
from metacontrast.tracking.store import SQLITE_PREFIX, STORE_FILE

__all__ = ["SOURCE_TAG", "import_device_run", "join_parts", "merge_store"]

SOURCE_TAG = "device_source_run"
#: what a device store is kept as beside the grid's store
DEVICE_STORE_FILE = f"device_{STORE_FILE}"
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics and 100 params per call


def join_parts(returned: Path, name: str) -> Path | None:
    """``<name>.tar.gz``, or its ``.partNN`` pieces joined into it; ``None`` when neither came back."""
    whole = returned / f"{name}.tar.gz"
    parts = sorted(returned.glob(f"{name}.tar.gz.part*"))
    if parts:
        joined = Path(tempfile.mkdtemp()) / whole.name
        with joined.open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        return joined
    return whole if whole.is_file() else None


def _chunks(items: list, size: int) -> Iterable[list]:
    for k in range(0, len(items), size):
        yield items[k:k + size]


def merge_store(source_uri: str, target_uri: str) -> dict[str, int]:
    """Copy every run of ``source_uri`` into ``target_uri`` (same experiment names); returns counts."""
    from mlflow.entities import Param, RunStatus  # heavy: MLflow takes seconds to import

    src, dst = open_client(source_uri), open_client(target_uri)
    counts = {"copied": 0, "skipped": 0, "replaced": 0}
    for experiment in src.search_experiments():
        exp_id = get_experiment_id(dst, target_uri, experiment.name)  # artifacts beside the target's database
        for run in src.search_runs([experiment.experiment_id], max_results=50000):
            source_id = run.info.run_id
            earlier = dst.search_runs([exp_id], filter_string=filter_string({SOURCE_TAG: source_id}))
            if any(r.info.status == "FINISHED" for r in earlier):
                counts["skipped"] += 1
                continue
            for stale in earlier:
                dst.delete_run(stale.info.run_id)
                counts["replaced"] += 1
            tags = {**run.data.tags, SOURCE_TAG: source_id}
            new = dst.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name)
            new_id = new.info.run_id
            for chunk in _chunks([Param(k, v) for k, v in run.data.params.items()], 100):
                dst.log_batch(new_id, params=chunk)
            history = [m for key in run.data.metrics for m in src.get_metric_history(source_id, key)]
            for chunk in _chunks(history, _BATCH):
                dst.log_batch(new_id, metrics=chunk)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = Path(src.download_artifacts(source_id, "", tmp))
                except Exception as err:  # noqa: BLE001 - artifacts left behind on the device (weights) are not fatal
                    warnings.warn(f"run {source_id}: artifacts not copied ({type(err).__name__}: {err})", stacklevel=2)
                else:
                    if any(local.iterdir()):
                        dst.log_artifacts(new_id, str(local))
            status = run.info.status
            if status == RunStatus.to_string(RunStatus.RUNNING):
                continue  # left running: a later import replaces it once the device has finished it
            dst.set_terminated(new_id, status=status, end_time=run.info.end_time)
            counts["copied"] += 1
    return counts


def import_device_run(returned: str | Path, runs_dir: str | Path) -> dict[str, Any]:
    """Unpack ``returned``'s ``runs`` archive under ``runs_dir`` and merge every device store into its grid store.

    A device store ``runs/<top>/.../mlruns.db`` in the archive (one per dataset, or one per run of a parallel
    stage group) is kept as ``<runs_dir>/<top>/.../device_mlruns.db`` and merged into the grid's store of
    dataset ``<top>`` (:meth:`~metacontrast.layout.RunLayout.store_uri`), the store ``run_grid.py --runs_dir
    <runs_dir> --dataset <top>`` reads.

    Args:
        returned: the folder the device's files came back in (``runs.tar.gz`` or its parts, ``logs.tar.gz``,
            ``device_report.json``).
        runs_dir: where the grid keeps this scale's runs (e.g. ``runs_paper_scale``).

    Returns:
        ``{"stores": {target URI: counts of merge_store}, "unpacked": [files]}``.
    """
    returned, runs_dir = Path(returned), Path(runs_dir)
    archive = join_parts(returned, "runs")
    if archive is None:
        raise FileNotFoundError(f"{returned} holds no runs.tar.gz (nor its parts): nothing to import")
    unpacked, stores = [], {}
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        root = Path(tmp) / "runs"
        found = sorted(root.rglob(STORE_FILE))
        if not found:
            raise FileNotFoundError(f"{archive} holds no runs/<name>/mlruns.db: not a device run")
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "mlartifacts" in path.parts:  # artifacts go through the store
                continue
            rel = path.relative_to(root)
            dest = runs_dir / (rel.with_name(DEVICE_STORE_FILE) if path.name == STORE_FILE else rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            unpacked.append(str(dest))
        for store in found:
            rel = store.relative_to(root)
            kept = runs_dir / rel.with_name(DEVICE_STORE_FILE)
            target = RunLayout(runs_dir, rel.parts[0]).store_uri()
            counts = merge_store(f"{SQLITE_PREFIX}{kept.resolve()}", target)
            total = stores.setdefault(target, {"copied": 0, "skipped": 0, "replaced": 0})
            for key, value in counts.items():
                total[key] += value
    return {"stores": stores, "unpacked": unpacked}
