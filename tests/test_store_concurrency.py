"""Two processes that start together on a fresh SQLite store both succeed (issue 20 item 6).

Before the store lock, two grid processes started at the same moment crashed one of them inside MLflow's
table creation ("table ... already exists").  Here two real processes (real MLflow, no mocks) import
everything first, wait at a shared start line, then open a run in the same fresh store at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from metacontrast.tracking import local_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time
from pathlib import Path
from metacontrast.tracking import start_run
import mlflow, mlflow.store.tracking.sqlalchemy_store  # loaded before the start line: only opening the store races

store_dir, out_dir, name, go = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
(out_dir / "ready").touch()
while not go.exists():
    time.sleep(0.001)
with start_run("", "concurrent", name, {"workflow": "pretrain", "worker": name}, store_dir) as run:
    ok = run.log_metrics({"loss": 1.0}, step=1)
assert run.run_id is not None and run.tracking_uri.endswith("mlruns.db"), run.tracking_uri
assert ok, "the metric was not logged"
"""


def test_two_processes_open_a_fresh_store_together(tmp_path):
    store_dir = tmp_path / "store"  # does not exist yet: both workers find no database
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs, outs = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(store_dir), str(out), name, str(go)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 300
    while not all((out / "ready").exists() for out in outs):
        assert time.monotonic() < deadline, "the workers did not get ready"
        assert all(p.poll() is None for p in procs), "a worker died before the start line: " + "".join(p.communicate()[0] for p in procs)
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    failed = [f"worker {name} exited {p.returncode}:\n{out}" for name, p, (out, _) in zip("ab", procs, results) if p.returncode]
    assert not failed, "\n".join(failed)
    client = MlflowClient(tracking_uri=local_tracking_uri(store_dir))
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["worker"] for r in runs) == ["a", "b"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["loss"] == 1.0 for r in runs)
    assert (store_dir / "mlruns.db.lock").is_file(), "the lock file lies beside the database"
