"""Resume after a crash (issue 8, item 1): SIGKILL a pre-training and a fine-tuning mid-run, run the same
command again, and get the weights of an uninterrupted run.

Each workflow runs as ``python -m monai.bundle run ...`` in a subprocess on the CPU (one thread, tiny
U-Net ``[8, 16, 32, 64, 128]``, the embedded sample, a training checkpoint every epoch).  The test waits
for the second training checkpoint, kills the process with SIGKILL, *truncates the newest checkpoint it
left* (as a kill during a write on a file system without atomic rename, or a full disk, would), and
runs the identical command again.  The rerun must report the damaged file, resume from the one before
it, and finish with weights -- and GradMitigator EMA targets, GradFilter step, sampler position,
optimiser state -- bit-for-bit equal to an uninterrupted run with the same seed.  Exact equality holds
here because everything a step depends on is restored (RNG states included) and CPU kernels with a
fixed thread count are deterministic; the uninterrupted reference runs in this process with the same
settings.  The MLflow run must continue: one run in the store, FINISHED, whose id is the one stored
in the output folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import in_repo
from mlflow import MlflowClient
from monai.bundle import run as run_bundle

from metacontrast.workflows.checkpoints import state_file
from metacontrast.tracking import local_tracking_uri

pytestmark = pytest.mark.slow

FEATURES = [8, 16, 32, 64, 128]
GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
KILL_TIMEOUT_S = 300




def checkpoint_name(iteration: int) -> str:
    return f"training_checkpoint_iteration={iteration:08d}.pt"


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("training_checkpoint_iteration=*.pt"))


def as_cli(overrides: dict[str, Any]) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", str(value).replace(" ", "") if isinstance(value, list) else str(value)]
    return out


def command(config: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, *as_cli(overrides)]


def environment(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo_root), env.get("PYTHONPATH", "")])
    env.pop("METACONTRAST_OVERWRITE_OUTPUT", None)
    return env


class KilledRun:
    """``cmd`` in a subprocess, SIGKILLed by a watcher thread as soon as ``wait_for`` exists."""

    def __init__(self, cmd: list[str], repo_root: Path, wait_for: Path, log: Path) -> None:
        self.handle = open(log, "wb")
        self.process = subprocess.Popen(cmd, cwd=repo_root, env=environment(repo_root), stdout=self.handle, stderr=subprocess.STDOUT)
        self.wait_for = wait_for
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while self.process.poll() is None and time.monotonic() < deadline:
            if self.wait_for.exists():
                self.process.send_signal(signal.SIGKILL)
                return
            time.sleep(0.005)
        if self.process.poll() is None:
            self.process.kill()

    def status(self) -> int:
        self.watcher.join()
        status = self.process.wait()
        self.handle.close()
        return status


def run_to_end(cmds: list[list[str]], repo_root: Path, logs: list[Path]) -> list[str]:
    """Run the commands side by side to the end; their combined output, each checked for success."""
    processes = [subprocess.Popen(cmd, cwd=repo_root, env=environment(repo_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for cmd in cmds]  # fmt: skip
    outputs = []
    for process, log in zip(processes, logs):
        output, _ = process.communicate(timeout=KILL_TIMEOUT_S)
        log.write_text(output)
        assert process.returncode == 0, output[-6000:]
        outputs.append(output)
    return outputs


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, sorted(a), sorted(b))
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{k}]")
    else:
        assert a == b, (where, a, b)


def single_mlflow_run(output_dir: Path, workflow: str) -> Any:
    client = MlflowClient(local_tracking_uri(output_dir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"the resumed {workflow} must continue its MLflow run, found {len(runs)} runs"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["workflow"] == workflow and run.data.tags.get("metacontrast.resumed") == "true"
    stored = json.loads(state_file(output_dir, workflow).read_text())
    assert stored["mlflow_run_id"] == run.info.run_id
    return run


PRETRAIN_OVERRIDES = {
    # 4 volumes, batch 8 = 2 volumes x 4 quantiles: 2 iterations an epoch, 5 epochs; checkpoint every epoch
    "features": FEATURES, "max_iterations": 10, "batch_size": 8, "checkpoint_interval": 1, "num_threads": 1, "seed": 3,
}  # fmt: skip
FINETUNE_OVERRIDES = {
    # one labelled sample volume (~35 slices), batch 12: 3 iterations an epoch, 4 epochs, validation every epoch
    "features": FEATURES, "max_iterations": 12, "batch_size": 12, "val_interval": 1, "checkpoint_interval": 1,
    "num_threads": 1, "seed": 1,
}  # fmt: skip
PRETRAIN_KILL_AT, FINETUNE_KILL_AT = 4, 6  # the second checkpoint of each


@pytest.fixture(scope="module")
def runs(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both workflows: killed + reference side by side, then the damaged-checkpoint reruns side by side."""
    root = tmp_path_factory.mktemp("resume")
    cache = str(root / "cache")
    setups = {
        "pretrain": (GCL_PRETRAIN, {**PRETRAIN_OVERRIDES, "cache_dir": cache}, PRETRAIN_KILL_AT),
        "finetune": (FINETUNE, {**FINETUNE_OVERRIDES, "cache_dir": cache, "runs_dir": str(root / "runs")}, FINETUNE_KILL_AT),
    }
    killed = {}
    for name, (config, overrides, kill_at) in setups.items():
        out = root / name / "interrupted"
        cmd = command(config, {**overrides, "output_dir": str(out)})
        killed[name] = (cmd, out, KilledRun(cmd, repo_root, out / checkpoint_name(kill_at), root / f"{name}_killed.log"))
    with in_repo(repo_root):  # the uninterrupted runs, in this process while the subprocesses start up
        for name, (config, overrides, _) in setups.items():
            run_bundle(config_file=config, **overrides, output_dir=str(root / name / "reference"))
    left = {}
    for name, (cmd, out, process) in killed.items():
        status = process.status()
        assert status == -signal.SIGKILL, f"the {name} ended by itself (status {status}) before it could be killed"
        left[name] = [p.name for p in checkpoints(out)]
        assert left[name] and left[name][-1] >= checkpoint_name(setups[name][2]), left[name]
        truncate(out / left[name][-1])  # the newest checkpoint the killed run left is damaged
    logs = run_to_end([killed[n][0] for n in setups], repo_root, [root / f"{n}_rerun.log" for n in setups])
    return {name: {"out": killed[name][1], "reference": root / name / "reference", "log": log, "left": left[name]}
            for name, log in zip(setups, logs)}  # fmt: skip


def check_resume_log(log: str, out: Path, left: list[str]) -> None:
    damaged, previous = out / left[-1], out / left[-2]
    assert f"training checkpoint {damaged} is unusable" in log, log[-4000:]
    assert f"resumed from {previous}" in log, log[-4000:]
    assert (out / (left[-1] + ".corrupt")).exists(), "the damaged file is set aside, not deleted"


def test_pretrain_killed_and_rerun_equals_uninterrupted(runs: dict[str, Any]) -> None:
    run = runs["pretrain"]
    out, reference_dir = run["out"], run["reference"]
    check_resume_log(run["log"], out, run["left"])
    reference, resumed = load(reference_dir / checkpoint_name(10)), load(out / checkpoint_name(10))
    assert resumed["trainer"]["iteration"] == reference["trainer"]["iteration"] == 10
    for key in ("network", "optimizer", "lr_scheduler", "sampler", "grad_filter", "grad_mitigator"):
        assert_same_tensors(resumed[key], reference[key], key)
    assert resumed["grad_mitigator"]["steps"] == 10 and resumed["grad_mitigator"]["targets"].abs().sum() > 0
    assert_same_tensors(resumed["rng"]["generators"], reference["rng"]["generators"], "augmentation generator")
    assert_same_tensors(load(out / "encoder.pt")["state_dict"], load(reference_dir / "encoder.pt")["state_dict"], "encoder.pt")
    single_mlflow_run(out, "pretrain")


def test_finetune_killed_and_rerun_equals_uninterrupted(runs: dict[str, Any]) -> None:
    run = runs["finetune"]
    out, reference_dir = run["out"], run["reference"]
    check_resume_log(run["log"], out, run["left"])
    reference, resumed = load(reference_dir / checkpoint_name(12)), load(out / checkpoint_name(12))
    assert reference["trainer"]["epoch_length"] == 3 and resumed["trainer"]["iteration"] == 12
    for key in ("network", "optimizer", "lr_scheduler", "sampler", "validator", "best_saver", "trainer"):
        assert_same_tensors(resumed[key], reference[key], key)
    # the augmentation's generator is where a step's randomness comes from; torch's global generator is
    # not compared: a resumed run opens one more DataLoader iterator, and each opening draws a seed from it
    assert_same_tensors(resumed["rng"]["generators"], reference["rng"]["generators"], "augmentation generator")
    # the best-by-validation model and the final one are the reference's: the best-so-far survived the crash
    for name in ("model.pt", "model_final.pt"):
        assert_same_tensors(load(out / name), load(reference_dir / name), name)
    single_mlflow_run(out, "finetune")
