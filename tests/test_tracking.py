"""The MLflow layer against real stores: the default SQLite store, a real ``mlflow server`` on
localhost, a closed port (fallback) and a server that dies in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from mlflow import MlflowClient

from metacontrast.tracking import (
    MAX_PARAM_VALUE,
    MLflowEpochHandler,
    TrackingFallbackWarning,
    TrackingWarning,
    completed_runs,
    config_hash,
    find_run,
    local_tracking_uri,
    start_run,
)

CONFIG = {
    "dataset": "acdc",
    "network": {"channels": [16, 32, 64], "strides": [2, 2]},
    "optimizer": {"lr": 1e-4, "#comment": "kept"},
    "notes": "x" * (MAX_PARAM_VALUE + 100),
    "dicom": {"PatientName": "DOE^JANE", "StudyDate": "20010101"},
}
TAGS = {"workflow": "finetune", "method": "gcl", "dataset": "acdc", "num_labeled": 1, "seed": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` subprocess (own process group, so it and its workers stop together)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class ServerSlot:
    """Holds the module's server; :meth:`get` (re)starts it, so a test may stop it on purpose."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server: MlflowServer | None = None
        self.starts = 0

    def get(self) -> MlflowServer:
        if self.server is None or self.server.proc.poll() is not None:
            if self.server is not None:
                self.server.stop()
            self.starts += 1
            self.server = MlflowServer(self.root / f"start{self.starts}")
            self.server.wait_ready()
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="module")
def server_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerSlot]:
    """One real server for the module (starting one takes tens of seconds on two cores)."""
    slot = ServerSlot(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield slot
    finally:
        slot.close()


@pytest.fixture()
def mlflow_server(server_slot: ServerSlot) -> MlflowServer:
    return server_slot.get()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder (so one SQLite store; creating one costs seconds) shared by the local tests."""
    return tmp_path_factory.mktemp("workflow_output")


def _fallback_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The fallback warnings; fails if any logging call was dropped (a plain TrackingWarning)."""
    dropped = [str(w.message) for w in record if w.category is TrackingWarning]
    assert not dropped, dropped
    return [w for w in record if issubclass(w.category, TrackingFallbackWarning)]


def test_default_store_logs_params_metrics_artifacts(out_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    with start_run("", "local", "finetune-gcl", TAGS, out_dir, config=CONFIG) as run:
        for epoch, loss in enumerate([0.9, 0.5, 0.3], start=1):
            run.log_metrics({"loss": loss, "val_dice": torch.tensor(loss / 2)}, step=epoch)
        run.log_artifact(checkpoint, "checkpoints")
    assert run.tracking_uri == local_tracking_uri(out_dir) and not run.is_fallback
    assert (out_dir / "mlruns.db").is_file()

    client = MlflowClient(local_tracking_uri(out_dir))
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "finetune-gcl"
    assert {k: logged.data.tags[k] for k in TAGS} == {k: str(v) for k, v in TAGS.items()}
    assert logged.data.tags["config_hash"] == config_hash(CONFIG)
    params = logged.data.params
    assert params["network.channels"] == "[16, 32, 64]" and params["optimizer.lr"] == "0.0001"
    assert params["optimizer._comment"] == "kept"  # '#' is not allowed in MLflow keys
    assert len(params["notes"]) == MAX_PARAM_VALUE and params["notes"].endswith("...[truncated]")
    assert not any("Patient" in k or "StudyDate" in k for k in params)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 0.9), (2, 0.5), (3, 0.3)]
    assert client.get_metric_history(run.run_id, "val_dice")[-1].value == pytest.approx(0.15)

    artifacts = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "dl")))
    assert (artifacts / "checkpoints" / "model.pt").read_bytes() == b"weights"
    saved = json.loads((artifacts / "config.json").read_text())
    assert saved["network"] == CONFIG["network"]
    assert str(artifacts).startswith(str(tmp_path))
    assert (out_dir / "mlartifacts").is_dir()  # artifacts live under the output folder, not the cwd


def test_failed_run_is_marked_and_can_be_resumed(out_dir: Path) -> None:
    tags = dict(TAGS, seed=7)
    with pytest.raises(RuntimeError, match="boom"), start_run("", "resume", "r", tags, out_dir) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        raise RuntimeError("boom")
    client = MlflowClient(local_tracking_uri(out_dir))
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert completed_runs("", "resume", tags, output_dir=out_dir) == []

    with start_run("", "resume", "r", tags, out_dir, resume_run_id=run.run_id) as again:
        assert again.run_id == run.run_id
        again.log_metrics({"loss": 0.5}, step=2)
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.0, 0.5]
    done = completed_runs("", "resume", tags, output_dir=out_dir)
    assert [r.info.run_id for r in done] == [run.run_id]
    assert find_run("", "resume", dict(tags, seed=8), output_dir=out_dir) is None


def test_epoch_handler_logs_losses_and_metrics(out_dir: Path) -> None:
    losses = iter([1.0, 3.0, 0.5, 1.5])
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses)), "pred": torch.zeros(2, 2)})

    @trainer.on(Events.EPOCH_COMPLETED)
    def _metric(engine: Engine) -> None:
        engine.state.metrics["train_dice"] = 0.1 * engine.state.epoch

    with start_run("", "handler", "h", TAGS, out_dir) as run:
        MLflowEpochHandler(run, prefix="train_").attach(trainer)
        trainer.run([0, 1], max_epochs=2)
    client = MlflowClient(local_tracking_uri(out_dir))
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train_loss")] == [(1, 2.0), (2, 1.0)]
    history = client.get_metric_history(run.run_id, "train_train_dice")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]


def test_epoch_handler_on_a_monai_trainer_uses_the_active_run(out_dir: Path) -> None:
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 1)
    data = [{"image": torch.randn(2, 1, 4, 4), "label": torch.randn(2, 1, 4, 4)} for _ in range(3)]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=2, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), 0.01), loss_function=torch.nn.MSELoss(),
    )  # fmt: skip
    seen: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(e.state.output[0]["loss"])))
    MLflowEpochHandler().attach(trainer)  # no run given: logs into the active one
    with start_run("", "monai", "m", TAGS, out_dir) as run:
        trainer.run()
    history = MlflowClient(local_tracking_uri(out_dir)).get_metric_history(run.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([sum(seen[:3]) / 3, sum(seen[3:]) / 3])


def test_real_server_receives_the_run(mlflow_server: MlflowServer, out_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "metrics.csv"
    report.write_text("volume_id,dice\nv1,0.8\n")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tags = dict(TAGS, workflow="evaluate")
        with start_run(mlflow_server.uri, "served", "evaluate-gcl", tags, out_dir, config=CONFIG) as run:
            run.log_metrics({"test_dice_mean": 0.8}, step=0)
            run.log_artifact(report)
    assert not _fallback_warnings(record) and not run.is_fallback and run.tracking_uri == mlflow_server.uri

    client = MlflowClient(mlflow_server.uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.metrics["test_dice_mean"] == 0.8
    assert logged.data.params["dataset"] == "acdc"
    files = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "dl")))
    assert (files / "metrics.csv").read_text() == report.read_text()
    found = find_run(mlflow_server.uri, "served", {"workflow": "evaluate", "method": "gcl"})
    assert found is not None and found.info.run_id == run.run_id


def test_closed_port_falls_back_locally_with_one_warning(out_dir: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runs = []
        for seed in (0, 1):
            with start_run(closed, "offline", f"run{seed}", dict(TAGS, seed=seed), out_dir, config=CONFIG) as run:
                run.log_metrics({"loss": 0.25}, step=1)
            runs.append(run)
    fallback = _fallback_warnings(record)
    assert len(fallback) == 1, [str(w.message) for w in record]
    message = str(fallback[0].message)
    assert closed in message and str(out_dir / "mlruns.db") in message
    client = MlflowClient(local_tracking_uri(out_dir))
    for run in runs:
        assert run.is_fallback and run.tracking_uri == local_tracking_uri(out_dir)
        logged = client.get_run(run.run_id)
        assert logged.info.status == "FINISHED" and logged.data.metrics["loss"] == 0.25
        assert logged.data.tags["metacontrast.tracking_fallback_from"] == closed
    # reading through the same (dead) URI finds the locally logged runs
    assert len(completed_runs(closed, "offline", {"method": "gcl"}, output_dir=out_dir)) == 2


def test_store_that_cannot_be_opened_falls_back(out_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    broken = f"sqlite:///{tmp_path / 'a_file' / 'x.db'}"  # a database inside a file: cannot exist
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with start_run(broken, "broken", "b", TAGS, out_dir) as run:
            run.log_metrics({"loss": 2.0}, step=1)
    assert len(_fallback_warnings(record)) == 1 and run.is_fallback
    assert MlflowClient(local_tracking_uri(out_dir)).get_run(run.run_id).data.metrics["loss"] == 2.0


def test_server_dying_mid_run_moves_the_run_local(mlflow_server: MlflowServer, out_dir: Path) -> None:
    """The server answers at the start, then goes away: the next call fails over to the local store,
    replays tags and params there, warns once, and the run still ends FINISHED.
    (Last in the module: it stops the shared server; a later user of the slot would restart it.)"""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with start_run(mlflow_server.uri, "dying", "d", TAGS, out_dir, config=CONFIG) as run:
            run.log_metrics({"loss": 1.0}, step=1)
            remote_id = run.run_id
            assert not run.is_fallback
            mlflow_server.stop()
            run.log_metrics({"loss": 0.5}, step=2)  # must not raise
            run.log_metrics({"loss": 0.25}, step=3)
    assert len(_fallback_warnings(record)) == 1
    assert run.is_fallback and run.run_id != remote_id
    logged = MlflowClient(local_tracking_uri(out_dir)).get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["metacontrast.remote_run_id"] == remote_id
    assert logged.data.tags["seed"] == "0" and logged.data.params["network.strides"] == "[2, 2]"
    history = MlflowClient(local_tracking_uri(out_dir)).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (3, 0.25)]


def test_run_names_come_from_the_tags() -> None:
    """The configs name no run: each is named from its tags, as the grid's stores have always named them."""
    from metacontrast.tracking import workflow_run_name

    assert workflow_run_name({"workflow": "pretrain", "method": "gcl", "dataset": "acdc", "seed": 0}) == "gcl-pretrain"
    assert workflow_run_name({"workflow": "finetune", "method": "gcl@improved", "num_labeled": 1, "seed": 3}) == "gcl@improved-finetune-L1-seed3"
    assert workflow_run_name({"workflow": "evaluate", "method": "random", "num_labeled": 8, "seed": 0}) == "random-evaluate-L8-seed0"
    assert workflow_run_name({"workflow": "probe", "method": "random/batch_norm", "seed": 2}) == "random/batch_norm-probe-seed2"
