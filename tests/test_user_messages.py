"""Small things a user meets (issue 20, item 7).

* The pre-training and fine-tune progress bars show the current loss (``LossProgressBar``): checked on the
  progress output of real two-iteration runs of both workflows, and on a real trainer's output.
* A training checkpoint given where a model file is expected (evaluate's ``ckpt``, the fine-tune's
  ``pretrained_ckpt``, the exporter's weights) is refused naming the model file of its folder; the checkpoints are
  the ones the short runs' ``TrainingCheckpointer`` wrote.
* A bad input's named error is the last line a failed ``python -m monai.bundle run`` prints (a real subprocess on
  the README quick start's config with a missing ``dataset_dir``), and the hook adds nothing to other errors.
* The CPU preset's thread count is the cores the process may use (``usable_cores``, checked under a real
  narrower affinity mask in a subprocess).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import run as run_bundle

from metacontrast.engines import LossProgressBar, MultiLossTrainer, current_loss
from metacontrast.excepthook import cause_chain, install, package_error
from metacontrast.export.source import load_weights
from metacontrast.workflows import TrainingCheckpointGiven, load_checkpoint, read_model_settings, usable_cores
from tests.helpers import in_repo

FEATURES = [8, 16, 32, 64, 128]
GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
EVALUATE = "bundles/common/configs/evaluate.json"
#: tqdm's postfix after the bar: ``loss=0.693`` (tqdm prints 3 significant digits)
LOSS_SHOWN = re.compile(r"loss=(\d+\.?\d*(?:e[-+]?\d+)?)")


def behind(error: BaseException, kind: type[BaseException]) -> BaseException:
    """The exception of type ``kind`` in ``error``'s cause chain (MONAI wraps config errors in RuntimeError)."""
    found = [e for e in cause_chain(error) if isinstance(e, kind)]
    assert found, f"no {kind.__name__} behind {error!r}"
    return found[0]


@pytest.fixture(scope="module")
def short_runs(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A two-iteration GCL pre-training and a two-iteration fine-tune of its encoder on the embedded sample, with a
    training checkpoint every epoch; what each printed to stderr (where the progress bar writes)."""
    root = tmp_path_factory.mktemp("user_messages")
    common = {"features": FEATURES, "max_iterations": 2, "checkpoint_interval": 1, "num_threads": 1,
              "cache_dir": str(root / "cache"), "runs_dir": str(root / "runs")}  # fmt: skip
    pretrain_out, finetune_out = root / "pretrain", root / "finetune"
    printed = {}
    with in_repo(repo_root):
        for name, config, overrides in (
            ("pretrain", GCL_PRETRAIN, {"batch_size": 8, "output_dir": str(pretrain_out)}),
            ("finetune", FINETUNE, {"batch_size": 16, "val_interval": 1, "output_dir": str(finetune_out), "method": "gcl",
                                    "pretrained_ckpt": str(pretrain_out / "encoder.pt")}),
        ):  # fmt: skip
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                run_bundle(config_file=config, **common, **overrides)
            printed[name] = stderr.getvalue()
    return {"root": root, "common": common, "pretrain": pretrain_out, "finetune": finetune_out, "printed": printed}


def training_checkpoint(folder: Path) -> Path:
    found = sorted(folder.glob("training_checkpoint_iteration=*.pt"))
    assert found, f"the run wrote no training checkpoint in {folder}"
    return found[-1]


# ------------------------------------------------------------------------------------------------
# the progress bars show the current loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workflow", ["pretrain", "finetune"])
def test_progress_bar_of_a_real_run_shows_the_loss(short_runs: dict[str, Any], workflow: str) -> None:
    printed = short_runs["printed"][workflow]
    shown = LOSS_SHOWN.findall(printed)
    assert shown, f"no loss on the {workflow} progress bar:\n{printed[-2000:]}"
    assert all(float(value) > 0 for value in shown)


def test_progress_bar_shows_the_trainers_total_loss(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 1)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    terms = lambda pred, y: {"mse": ((pred - y) ** 2).mean(), "l1": (pred - y).abs().mean()}  # noqa: E731
    trainer = MultiLossTrainer(
        device="cpu", max_epochs=1, train_data_loader=batches, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0), loss_function=terms,
        prepare_batch=lambda b, *a, **k: (b["x"], b["y"]), train_handlers=[LossProgressBar(persist=True)], decollate=False,
    )  # fmt: skip
    trainer.run()
    output = trainer.state.output
    assert current_loss(output) == {"loss": pytest.approx(float(output["loss"]))}
    assert float(output["loss"]) == pytest.approx(float(torch.stack(list(output["losses"].values())).mean()))
    shown = LOSS_SHOWN.findall(capsys.readouterr().err)
    assert shown and float(shown[-1]) == pytest.approx(float(output["loss"]), rel=5e-3)
    assert current_loss({"pred": torch.zeros(1)}) == {}  # an output with no loss shows nothing


# ------------------------------------------------------------------------------------------------
# a training checkpoint where a model file is expected
# ------------------------------------------------------------------------------------------------


def test_evaluating_a_training_checkpoint_names_the_model_file(short_runs: dict[str, Any], repo_root: Path) -> None:
    folder = short_runs["finetune"]
    given = training_checkpoint(folder)
    assert "network" in load_checkpoint(given), "a real training checkpoint holds the network's weights"
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=EVALUATE, **short_runs["common"], output_dir=str(folder), ckpt=str(given))
    message = str(behind(info.value, TrainingCheckpointGiven))
    assert f"checkpoint {given} is a training checkpoint" in message
    assert f"{folder / 'model.pt'} (best by validation)" in message and f"{folder / 'model_final.pt'} (last weights)" in message
    assert "holds no state dict" not in message
    assert not (folder / "evaluation").exists(), "nothing was evaluated"


def test_a_training_checkpoint_as_the_pretrained_encoder_names_encoder_pt(short_runs: dict[str, Any], repo_root: Path) -> None:
    given = training_checkpoint(short_runs["pretrain"])
    out = short_runs["root"] / "finetune_from_training_checkpoint"
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(config_file=FINETUNE, **short_runs["common"], output_dir=str(out), method="gcl", pretrained_ckpt=str(given))
    message = str(behind(info.value, TrainingCheckpointGiven))
    assert f"checkpoint {given} is a training checkpoint" in message
    assert f"{short_runs['pretrain'] / 'encoder.pt'} (the pre-trained encoder)" in message
    assert not list(out.glob("training_checkpoint_*")), "no training happened"


def test_every_model_loader_refuses_a_training_checkpoint(short_runs: dict[str, Any], tmp_path: Path) -> None:
    given = training_checkpoint(short_runs["finetune"])
    for load in (read_model_settings, lambda p: load_weights(Path(p))):  # evaluate's and the exporter's readers
        with pytest.raises(TrainingCheckpointGiven, match=re.escape(str(short_runs["finetune"] / "model.pt"))):
            load(given)
    # a run that has not written its model yet: the files its workflow will write are named, and said to be missing
    alone = tmp_path / "unfinished"
    alone.mkdir()
    (alone / "finetune_run.json").write_text("{}")
    copy = alone / given.name
    copy.write_bytes(given.read_bytes())
    with pytest.raises(TrainingCheckpointGiven) as info:
        read_model_settings(copy)
    assert "not written yet" in str(info.value) and str(alone / "model_final.pt") in str(info.value)
    assert "encoder.pt" not in str(info.value)
    assert read_model_settings(short_runs["finetune"] / "model.pt") is not None, "the model file itself still loads"


# ------------------------------------------------------------------------------------------------
# the package's error is the last line
# ------------------------------------------------------------------------------------------------


def test_missing_data_folder_is_the_last_line_of_a_failed_bundle_run(repo_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", GCL_PRETRAIN, "--dataset_dir", str(missing),
               "--runs_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(line.startswith("RuntimeError: Failed to instantiate component") for line in lines), done.stderr[-3000:]
    assert lines[-1].startswith(f"error: FileNotFoundError: {missing}/") and lines[-1].endswith("does not exist"), done.stderr[-3000:]


def _raise(error: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:  # noqa: BLE001
        return raised


def test_the_hook_repeats_only_a_package_error_behind_another(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # the hook in front of Python's own (another test's library may have put its hook in front of ours, e.g.
    # torch.distributed prefixing every line with the rank)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install()
    try:
        load_checkpoint(tmp_path / "absent.pt")  # raised in a package module: the package's
    except FileNotFoundError as err:
        ours = err
    wrapped = _raise(RuntimeError("Failed to instantiate component 'x'"), ours)
    assert package_error(wrapped) is ours
    sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == f"error: FileNotFoundError: checkpoint {tmp_path / 'absent.pt'} does not exist"
    assert "RuntimeError: Failed to instantiate component 'x'" in lines, "the traceback is printed as before"

    # nothing is added to the package's own error, to an error with none behind it, or to Ctrl-C
    foreign = _raise(RuntimeError("outer"), _raise(ValueError("not ours")))
    for error in (ours, foreign, _raise(KeyboardInterrupt(), ours)):
        assert package_error(error) is None
        sys.excepthook(type(error), error, error.__traceback__)
        assert not any(line.startswith("error: ") for line in capsys.readouterr().err.splitlines())

    # a chain that loops ends
    looped = _raise(RuntimeError("a"), _raise(ValueError("b")))
    looped.__cause__.__cause__ = looped
    assert len(cause_chain(looped)) == 2 and package_error(looped) is None


# ------------------------------------------------------------------------------------------------
# the CPU preset's threads
# ------------------------------------------------------------------------------------------------


def test_usable_cores_follows_the_affinity_mask(repo_root: Path) -> None:
    if not hasattr(os, "sched_getaffinity"):
        assert usable_cores() == (os.cpu_count() or 1)
        return
    assert usable_cores() == len(os.sched_getaffinity(0))
    one = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{one}}}); from metacontrast.workflows import usable_cores; print(usable_cores())"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_usable_cores_without_affinity_is_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == (os.cpu_count() or 1)
