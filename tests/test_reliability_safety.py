"""Numerical faults, untrusted checkpoints, bad configs and tracking outages (issue 8, items 2, 3, 5, 6).

* Item 2: a fine-tune whose loss turns NaN stops naming the iteration and the term, or -- with
  ``skip_nonfinite`` -- skips those steps and never saves a NaN model as best (nor as final), failing
  clearly at the end; the best-model saver refuses non-finite weights, predictions and metrics.
* Item 3: a checkpoint whose unpickling would create a file is refused by every loader (plain load,
  evaluate ``ckpt``, fine-tune ``pretrained_ckpt``, resume) and the file is never created.  The test
  first shows, with a second copy of the payload loaded unsafely, that the payload does create a file.
* Item 5: each bad setting is a clear error before any training step (checked by message and by the
  absence of any training checkpoint or MLflow run).
* Item 6: with ``tracking_uri`` on a closed port the fine-tune workflow completes, warns once naming
  the local store, logs there, and a rerun continues that local run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from mlflow import MlflowClient
from monai.bundle import run as run_bundle
from torch import nn

from metacontrast.engines import MultiLossTrainer, NonFiniteLossError
from metacontrast.nets import SegmentationUNet
from metacontrast.nets.unet import PretrainedWeightsMismatch, encoder_state_dict
from metacontrast.errors import ConfigError
from metacontrast.workflows import UnsafeCheckpointError, load_checkpoint
from metacontrast.workflows.checkpoints import OutputDirConflict, state_file
from metacontrast.workflows.handlers import FiniteCheckpointSaver, TrainingCheckpointer, UnusableCheckpoint
from metacontrast.tracking import TrackingFallbackWarning, local_tracking_uri

FEATURES = [8, 16, 32, 64, 128]
GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
EVALUATE = "bundles/common/configs/evaluate.json"


@contextlib.contextmanager
def in_repo(repo_root: Path) -> Iterator[None]:
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo_root)
        mp.delenv("METACONTRAST_OVERWRITE_OUTPUT", raising=False)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def cause(error: BaseException, kind: type[BaseException], text: str = "") -> BaseException:
    """The exception of type ``kind`` (saying ``text``) behind ``error`` (MONAI wraps config errors in RuntimeError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind) and text in str(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no {kind.__name__} behind {error!r}")


def no_training_happened(output_dir: Path) -> None:
    assert not list(output_dir.glob("training_checkpoint_*")), "a training checkpoint was written"
    assert not (output_dir / "mlruns.db").exists(), "an MLflow run was started"
    assert not (output_dir / "model.pt").exists() and not (output_dir / "encoder.pt").exists()


def finetune_overrides(root: Path, cache_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"features": FEATURES, "max_iterations": 2, "batch_size": 16, "val_interval": 1, "num_threads": 1,
            "cache_dir": str(cache_dir), "runs_dir": str(root / "runs"), "output_dir": str(root / "out"), **extra}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# item 3: a crafted checkpoint runs nothing
# ------------------------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def crafted_checkpoint(path: Path, creates: Path) -> Path:
    state = SegmentationUNet(in_channels=1, out_channels=3, features=FEATURES).state_dict()
    torch.save({"state_dict": state, "network": {"features": FEATURES}, "method": "gcl", "extra": CreatesFile(creates)}, path)
    return path


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_and_creates_nothing(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    # the payload is live: loaded the unsafe way, a copy of it creates its file
    proof = tmp_path / "proof_created"
    torch.load(crafted_checkpoint(tmp_path / "proof.pt", proof), weights_only=False).get("extra").close()
    assert proof.exists()

    target = tmp_path / "must_not_exist"
    evil = crafted_checkpoint(tmp_path / "evil.pt", target)

    with pytest.raises(UnsafeCheckpointError, match="not a weights-only file") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value) and "Unsupported global: GLOBAL io.open" in str(info.value)
    assert not target.exists()

    with in_repo(repo_root):
        # as the pre-trained encoder of a fine-tune: refused before training
        with pytest.raises(RuntimeError) as info:
            run_bundle(config_file=FINETUNE, **finetune_overrides(tmp_path / "ft", cache_dir, method="gcl", pretrained_ckpt=str(evil)))
        assert str(evil) in str(cause(info.value, UnsafeCheckpointError))
        no_training_happened(tmp_path / "ft" / "out")
        # as the checkpoint to evaluate
        with pytest.raises(RuntimeError) as info:
            run_bundle(config_file=EVALUATE, **finetune_overrides(tmp_path / "ev", cache_dir, ckpt=str(evil)))
        assert str(evil) in str(cause(info.value, UnsafeCheckpointError))
    assert not target.exists()


def tiny_trainer(checkpointer: TrainingCheckpointer, network: nn.Module, epochs: int = 3) -> MultiLossTrainer:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(4, 2), "y": torch.randn(4, 1)} for _ in range(2)]
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    return MultiLossTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=batches, network=network, optimizer=optimizer,
        loss_function=lambda pred, y: ((pred - y) ** 2).mean(), prepare_batch=lambda b, *a, **k: (b["x"], b["y"]),
        train_handlers=[checkpointer], decollate=False,
    )  # fmt: skip


def make_checkpointer(folder: Path, network: nn.Module) -> TrainingCheckpointer:
    return TrainingCheckpointer(str(folder), {"network": network}, interval=1, n_saved=3)


def test_crafted_or_truncated_training_checkpoints_are_skipped_on_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    torch.manual_seed(1)
    network = nn.Linear(2, 1)
    tiny_trainer(make_checkpointer(folder, network), network, epochs=2).run()  # checkpoints at iterations 2, 4
    reference = {k: v.clone() for k, v in network.state_dict().items()}
    target = tmp_path / "must_not_exist"
    crafted_checkpoint(folder / "training_checkpoint_iteration=00000009.pt", target)  # newest, but crafted
    (folder / "training_checkpoint_iteration=00000004.pt").write_bytes(b"PK\x03\x04 truncated")  # then a damaged one

    resumed_network = nn.Linear(2, 1)
    checkpointer = make_checkpointer(folder, resumed_network)
    with pytest.warns(RuntimeWarning) as caught:
        tiny_trainer(checkpointer, resumed_network, epochs=1).run()  # 1 epoch = 2 iterations: resumes at the end
    messages = [str(w.message) for w in caught if "unusable" in str(w.message)]
    assert "iteration=00000009.pt is unusable (was refused and nothing in it was run: it is not a weights-only file" in messages[0]
    assert "GLOBAL io.open" in messages[0], messages[0]
    assert "iteration=00000004.pt is unusable (is truncated or corrupt" in messages[1]
    assert checkpointer.resumed_from == folder / "training_checkpoint_iteration=00000002.pt"
    assert not target.exists()
    assert not torch.equal(resumed_network.weight, reference["weight"])  # iteration 2's weights, not the final ones
    assert sorted(p.name for p in folder.glob("*.corrupt")) == [
        "training_checkpoint_iteration=00000004.pt.corrupt", "training_checkpoint_iteration=00000009.pt.corrupt"]

    # nothing usable left: a clear error, not a silent restart from scratch
    for path in folder.glob("training_checkpoint_iteration=*.pt"):
        path.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(UnusableCheckpoint, match="no training checkpoint in .* could be loaded"):
        tiny_trainer(make_checkpointer(folder, nn.Linear(2, 1)), nn.Linear(2, 1), epochs=1).run()


# ------------------------------------------------------------------------------------------------
# item 2: NaN losses and NaN models
# ------------------------------------------------------------------------------------------------


def test_best_model_saver_refuses_nonfinite_weights_and_metrics(tmp_path: Path) -> None:
    network = nn.Linear(2, 2)
    saver = FiniteCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": network}, save_key_metric=True,
                                  key_metric_filename="model.pt")  # fmt: skip
    # per epoch: (validation Dice, whether the weights are NaN at that point)
    plan = {1: (0.5, False), 2: (0.9, True), 3: (0.3, False), 4: (float("nan"), False)}
    good = {}

    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        dice, poisoned = plan[engine.state.epoch]
        with torch.no_grad():
            network.weight.fill_(float("nan") if poisoned else float(engine.state.epoch))
        if engine.state.epoch == 1:
            good.update({k: v.clone() for k, v in network.state_dict().items()})
        engine.state.key_metric_name = "val_mean_dice"
        engine.state.metrics = {"val_mean_dice": dice}

    saver.attach(engine)  # after `validate`, as a validator's handler runs after its metrics
    engine.run([0], max_epochs=4)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for key, value in good.items():
        assert torch.equal(saved[key], value), "the best model is epoch 1's: epoch 2 was NaN, 3 worse, 4 a NaN metric"


@pytest.mark.slow
def test_finetune_nan_loss_stops_naming_iteration_and_term(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    # an absurd learning rate: the first step sends the weights to ~1e30, so the next loss overflows to NaN
    overrides = finetune_overrides(tmp_path, cache_dir, learning_rate=1e30, max_iterations=6)
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=FINETUNE, **overrides)
    error = str(cause(info.value, NonFiniteLossError))
    assert "iteration 2: loss term 'loss' is nan" in error and "skip_nonfinite" in error, error
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_finetune_skipping_nan_steps_never_saves_a_nan_model(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    overrides = finetune_overrides(tmp_path, cache_dir, learning_rate=1e30, max_iterations=6, skip_nonfinite=True)
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=FINETUNE, **overrides)
    error = str(cause(info.value, RuntimeError, "produced no usable model"))
    assert "weights or predictions were not finite" in error, error
    out = tmp_path / "out"
    assert not (out / "model.pt").exists(), "a model with NaN predictions was saved as best"
    assert not (out / "model_final.pt").exists()
    client = MlflowClient(local_tracking_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("metacontrast-sample").experiment_id])
    assert run.info.status == "FAILED"


# ------------------------------------------------------------------------------------------------
# item 5: bad configs, each a clear error before training
# ------------------------------------------------------------------------------------------------

PRETRAIN_ERRORS = [
    ({"meta_labels": ["patient_id", "heart_rate"]}, r"unknown meta label\(s\) \['heart_rate'\]"),
    ({"num_partitions": 0}, r"num_partitions \(S\) must be >= 1, got 0"),
    ({"temperature": 0.0}, r"temperature \(tau\) must be > 0, got 0\.0"),
    ({"temperature": -0.1}, r"temperature \(tau\) must be > 0, got -0\.1"),
    ({"top_k": 0.0}, r"top_k \(K\) must be in \(0, 1\], got 0\.0"),
    ({"top_k": 1.5}, r"top_k \(K\) must be in \(0, 1\], got 1\.5"),
    ({"beta": 0.0}, r"beta must be in \(0, 1\], got 0\.0"),
    ({"beta": 1.01}, r"beta must be in \(0, 1\], got 1\.01"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "message"), PRETRAIN_ERRORS, ids=["meta_label", "S0", "tau0", "tau_negative", "K0", "K_above_1", "beta0", "beta_above_1"])
def test_bad_pretrain_setting_is_refused_up_front(setting: dict[str, Any], message: str, repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=GCL_PRETRAIN, features=FEATURES, max_iterations=2, cache_dir=str(cache_dir), output_dir=str(tmp_path), **setting)
    error = cause(info.value, ConfigError)
    assert re.search(message, str(error)), str(error)
    no_training_happened(tmp_path)
    assert not state_file(tmp_path, "pretrain").exists()


@pytest.mark.slow
def test_l_larger_than_the_pool_is_refused(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=FINETUNE, **finetune_overrides(tmp_path, cache_dir, num_labeled=3))
    assert "num_labeled must be in 1..2 (the size of the train pool), got 3" in str(cause(info.value, ConfigError))
    no_training_happened(tmp_path / "out")


@pytest.mark.slow
def test_encoder_that_does_not_fit_is_refused(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    wider = [2 * f for f in FEATURES]
    encoder = tmp_path / "wide_encoder.pt"
    torch.save({"state_dict": encoder_state_dict(SegmentationUNet(in_channels=1, out_channels=3, features=wider)), "network": {"features": wider}, "method": "gcl"}, encoder)
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=FINETUNE, **finetune_overrides(tmp_path, cache_dir, method="gcl", pretrained_ckpt=str(encoder)))
    error = str(cause(info.value, PretrainedWeightsMismatch))
    assert str(encoder) in error and "(16, 1, 3, 3) vs (8, 1, 3, 3)" in error, error  # the first conv's widths
    no_training_happened(tmp_path / "out")


@pytest.mark.slow
def test_output_folder_of_another_config_is_refused_unless_overwrite(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    overrides = finetune_overrides(tmp_path, cache_dir)
    out = tmp_path / "out"
    with in_repo(repo_root):
        run_bundle(config_file=FINETUNE, **overrides)
        first = json.loads(state_file(out, "finetune").read_text())
        with pytest.raises(RuntimeError) as info:
            run_bundle(config_file=FINETUNE, **{**overrides, "learning_rate": 0.01})
        error = str(cause(info.value, OutputDirConflict))
        assert f"output folder {out} holds a finetune run of a different config" in error
        assert "learning_rate: 0.0001 -> 0.01" in error and "--overwrite True" in error
        assert json.loads(state_file(out, "finetune").read_text()) == first, "the refused run changed nothing"
        run_bundle(config_file=FINETUNE, **{**overrides, "learning_rate": 0.01, "overwrite": True})
    second = json.loads(state_file(out, "finetune").read_text())
    assert second["config"]["learning_rate"] == 0.01 and second["mlflow_run_id"] != first["mlflow_run_id"]


# ------------------------------------------------------------------------------------------------
# item 6: the tracking server is down
# ------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
def test_workflow_completes_with_tracking_server_down(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    overrides = finetune_overrides(tmp_path, cache_dir, tracking_uri=uri)
    out = tmp_path / "out"
    with in_repo(repo_root), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle(config_file=FINETUNE, **overrides)
        run_bundle(config_file=FINETUNE, **overrides)  # the same command again: continues the local run
    fallbacks = [w for w in caught if issubclass(w.category, TrackingFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]  # once per server and process
    message = str(fallbacks[0].message)
    assert uri in message and str(out.resolve() / "mlruns.db") in message and "mlflow ui --backend-store-uri" in message
    assert (out / "model.pt").is_file()
    client = MlflowClient(local_tracking_uri(out))
    (run,) = client.search_runs([client.get_experiment_by_name("metacontrast-sample").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["metacontrast.tracking_fallback_from"] == uri
    assert run.info.run_id == json.loads(state_file(out, "finetune").read_text())["mlflow_run_id"]
    assert math.isfinite(client.get_metric_history(run.info.run_id, "val_mean_dice")[0].value)
