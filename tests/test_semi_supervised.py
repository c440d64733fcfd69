"""Semi-supervised fine-tuning add-ons (issue 7): Mean Teacher, Mixup, cross pseudo supervision (IDEAL).

Unit checks with exact values: the EMA decay and update and the sigmoid ramp-up at chosen steps (run by
a real ignite engine), Mixup's label mass, cross pseudo supervision's gradient (none through the pseudo
labels), the two-decoder U-Net's shapes and checkpoint compatibility.  End to end on the embedded sample
with tiny widths and a few iterations: Mean Teacher fine-tune + evaluate, its teacher equal to the EMA
recursion of the saved students and a resumed run bit-identical to an uninterrupted one; cross pseudo
supervision fine-tune + validation + evaluate with the two-decoder network; Mixup through the results
grid (``random+mixup``: run folder, MLflow tags, table row).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from mlflow import MlflowClient
from monai.bundle import run as run_bundle
from torch import nn

from metacontrast.data.augment import BatchAugmentation
from metacontrast.nets import SegmentationUNet
from metacontrast.nets.dual_decoder import DualDecoderUNet
from metacontrast.nets.unet import encoder_state_dict, load_pretrained
from metacontrast.semi import (
    CrossPseudoSupervisionLoss,
    DualDecoderInferer,
    MeanTeacher,
    MixupPrepareBatch,
    check_mode,
    cross_pseudo_supervision,
    ema_decay,
    mixup,
    sample_lambda,
    sigmoid_rampup,
)
from metacontrast.errors import ConfigError
from metacontrast.workflows import FinetuneData
from metacontrast.reporting.grid import run_grid
from metacontrast.tracking import local_tracking_uri
from tests.helpers import in_repo

FINETUNE = "bundles/common/configs/finetune.json"
EVALUATE = "bundles/common/configs/evaluate.json"
SAMPLE_MANIFEST = "data_manifests/sample.json"
SAMPLE_DIR = "sample_data/hippocampus"
TINY = [8, 16, 32, 64, 128]


# ------------------------------------------------------------------------------------------------
# Mean Teacher: EMA decay, EMA update and ramp-up at chosen steps
# ------------------------------------------------------------------------------------------------


def test_sigmoid_rampup_at_chosen_steps() -> None:
    assert sigmoid_rampup(0, 200) == pytest.approx(math.exp(-5.0), rel=1e-12)  # 0.006738
    assert sigmoid_rampup(50, 200) == pytest.approx(math.exp(-5.0 * 0.75**2), rel=1e-12)  # 0.060054
    assert sigmoid_rampup(100, 200) == pytest.approx(math.exp(-1.25), rel=1e-12)  # 0.286505
    assert sigmoid_rampup(200, 200) == sigmoid_rampup(5000, 200) == 1.0
    assert sigmoid_rampup(7, 0) == 1.0  # no ramp


def test_ema_decay_warms_up_then_caps() -> None:
    assert [ema_decay(t, 0.999) for t in (1, 2, 3, 9)] == pytest.approx([0.5, 2 / 3, 0.75, 0.9], rel=1e-12)
    assert ema_decay(999, 0.999) == pytest.approx(0.999, rel=1e-12)
    assert ema_decay(10_000, 0.999) == 0.999


def _student_engine(student: nn.Linear) -> Engine:
    """A real ignite engine whose step t sets the student's weights to t and its biases to -t (an 'optimiser step')."""

    def step(engine: Engine, batch: Any) -> None:
        with torch.no_grad():
            student.weight.fill_(float(engine.state.iteration))
            student.bias.fill_(-float(engine.state.iteration))

    return Engine(step)


@pytest.mark.parametrize("decay, expected", [
    (0.999, [0.5, 1.0, 1.5, 2.0]),       # alpha_t = 1 - 1/(t+1): the teacher is the mean of students 1..t
    (0.6, [0.5, 1.1, 1.86, 2.716]),      # alpha_t capped at 0.6 from t = 2: 0.6 * 0.5 + 0.4 * 2 = 1.1, ...
])  # fmt: skip
def test_mean_teacher_ema_and_ramp_in_an_engine(decay: float, expected: list[float]) -> None:
    student = nn.Linear(3, 2)
    with torch.no_grad():
        student.weight.zero_()
        student.bias.zero_()
    mean_teacher = MeanTeacher(student, decay=decay, consistency_weight=2.0, rampup_iterations=2, noise_std=0.0)
    teacher_weights, ramp_weights = [], []
    engine = _student_engine(student)
    mean_teacher.attach(engine)
    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: ramp_weights.append(mean_teacher.weight))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: teacher_weights.append(mean_teacher.teacher.weight.clone()))
    engine.run(range(4), max_epochs=1)
    for got, value in zip(teacher_weights, expected):
        assert torch.allclose(got, torch.full_like(got, value), rtol=0, atol=1e-6), (got, value)
    assert torch.allclose(mean_teacher.teacher.bias, torch.full((2,), -expected[-1]), atol=1e-6)
    assert not mean_teacher.teacher.weight.requires_grad and student.weight.requires_grad
    # iteration t uses w(t - 1) = 2 exp(-5 (1 - (t - 1) / 2)^2): steps 0, 1, 2, 3 of a 2-iteration ramp
    assert ramp_weights == pytest.approx([2 * math.exp(-5.0), 2 * math.exp(-1.25), 2.0, 2.0], rel=1e-12)


def test_mean_teacher_targets_are_teacher_probabilities_of_a_noisy_input() -> None:
    student = SegmentationUNet(1, 3, TINY)
    generator = torch.Generator().manual_seed(0)
    mean_teacher = MeanTeacher(student, noise_std=0.1, generator=generator)
    images = torch.rand(2, 1, 32, 32)
    probs = mean_teacher.targets(images)
    assert probs.shape == (2, 3, 32, 32) and not probs.requires_grad
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 32, 32), atol=1e-5)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(probs, torch.softmax(student(images + 0.1 * noise), dim=1), atol=1e-6)
        assert not torch.allclose(probs, torch.softmax(student(images), dim=1), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Mixup keeps label mass
# ------------------------------------------------------------------------------------------------


def test_mixup_keeps_label_mass() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (6, 1, 16, 16), generator=generator)
    images = torch.rand(6, 1, 16, 16, generator=generator)
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).double()
    lam = sample_lambda(0.2, generator)
    permutation = torch.randperm(6, generator=generator)
    assert not torch.equal(permutation, torch.arange(6))
    mixed_images, mixed = mixup(images.double(), onehot, lam, permutation)
    assert 0.0 < lam < 1.0
    # a distribution over the classes at every pixel
    assert torch.allclose(mixed.sum(dim=1), torch.ones(6, 16, 16, dtype=torch.float64), atol=1e-12)
    # each sample's class mass is the lam-weighted mix of its own and its partner's; the batch's is unchanged
    mass = onehot.sum(dim=(2, 3))  # (B, C)
    assert torch.allclose(mixed.sum(dim=(2, 3)), lam * mass + (1 - lam) * mass[permutation], atol=1e-9)
    assert torch.allclose(mixed.sum(dim=(0, 2, 3)), mass.sum(dim=0), atol=1e-9)
    assert torch.allclose(mixed_images, lam * images.double() + (1 - lam) * images.double()[permutation])


def test_mixup_prepare_batch_mixes_augmented_real_shapes() -> None:
    augment = BatchAugmentation(seed=0)
    prepare = MixupPrepareBatch(num_classes=3, alpha=0.2, augment=augment, generator=augment.generator)
    batch = {"image": torch.rand(4, 1, 32, 32), "label": torch.randint(0, 3, (4, 1, 32, 32), dtype=torch.uint8)}
    images, soft = prepare(batch)
    assert images.shape == (4, 1, 32, 32) and soft.shape == (4, 3, 32, 32)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4, 32, 32), atol=1e-6)
    assert 0.0 < prepare.last_lambda < 1.0


def test_mixup_lambda_follows_beta_and_is_reproducible() -> None:
    draws = np.array([sample_lambda(0.2, torch.Generator().manual_seed(s)) for s in range(3000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.1786 for a = 0.2
    assert abs(draws.mean() - 0.5) < 0.03 and abs(draws.var() - 1 / (4 * 1.4)) < 0.015
    assert sample_lambda(0.2, torch.Generator().manual_seed(7)) == sample_lambda(0.2, torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_lambda(0.0)


# ------------------------------------------------------------------------------------------------
# cross pseudo supervision: no gradient through the pseudo labels
# ------------------------------------------------------------------------------------------------


def test_cross_pseudo_supervision_has_no_gradient_through_pseudo_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits_1 = torch.randn(3, 4, 8, 8, generator=generator, requires_grad=True)
    logits_2 = torch.randn(3, 4, 8, 8, generator=generator, requires_grad=True)
    grad_1, grad_2 = torch.autograd.grad(cross_pseudo_supervision(logits_1, logits_2), (logits_1, logits_2))
    # each branch gets only the gradient of being supervised by the other's hard label ...
    pseudo_1, pseudo_2 = logits_1.detach().argmax(1), logits_2.detach().argmax(1)
    (alone_1,) = torch.autograd.grad(F.cross_entropy(logits_1, pseudo_2), logits_1)
    (alone_2,) = torch.autograd.grad(F.cross_entropy(logits_2, pseudo_1), logits_2)
    assert torch.allclose(grad_1, alone_1, atol=1e-7) and torch.allclose(grad_2, alone_2, atol=1e-7)
    # ... and none as the producer: branch 2's logits get zero gradient from the term it supervises
    producer = torch.autograd.grad(cross_pseudo_supervision(logits_1, logits_2.detach()), logits_1)[0]
    assert torch.allclose(producer, alone_1, atol=1e-7)
    frozen_1 = logits_1.detach().requires_grad_(False)
    (only_2,) = torch.autograd.grad(cross_pseudo_supervision(frozen_1, logits_2), logits_2)
    assert torch.allclose(only_2, alone_2, atol=1e-7)  # the CE(p_1, y_2) part contributed nothing to logits_2
    soft = F.cross_entropy(logits_1, torch.softmax(logits_2, 1)) + F.cross_entropy(logits_2, torch.softmax(logits_1, 1))
    assert not torch.allclose(torch.autograd.grad(soft, logits_2)[0], alone_2, atol=1e-4)  # the test can tell


def test_cross_pseudo_loss_on_the_two_decoder_network() -> None:
    network = DualDecoderUNet(1, 3, TINY)
    images, labels = torch.rand(4, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32)).float()
    pred = DualDecoderInferer()(images, network)
    assert pred.shape == (4, 2, 3, 32, 32)
    supervised = lambda logits, y: F.cross_entropy(logits, y[:, 0].long())
    loss = CrossPseudoSupervisionLoss(supervised, cps_weight=0.5)
    total = loss(pred, {"label": labels})
    expected_sup = supervised(pred[:2, 0], labels) + supervised(pred[:2, 1], labels)
    expected = expected_sup + 0.5 * cross_pseudo_supervision(pred[2:, 0], pred[2:, 1])
    assert torch.allclose(total, expected) and loss.last_terms["cross_pseudo"] > 0
    total.backward()
    assert all(p.grad is not None for p in network.bilinear_decoder.parameters())


# ------------------------------------------------------------------------------------------------
# the two-decoder U-Net
# ------------------------------------------------------------------------------------------------


def test_dual_decoder_unet_shapes_and_pretrained_encoder() -> None:
    network = DualDecoderUNet(1, 4, TINY).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        logits_1, logits_2 = network.forward_both(x)
        pred = network(x)
    assert logits_1.shape == logits_2.shape == pred.shape == (2, 4, 96, 96)
    assert not torch.allclose(logits_1, logits_2)  # two decoders, initialised apart
    mean = (torch.softmax(logits_1, 1) + torch.softmax(logits_2, 1)) / 2
    assert torch.allclose(pred.exp(), mean, atol=1e-6)
    kinds = {type(m).__name__ for m in network.bilinear_decoder.modules()}
    assert "Upsample" in kinds and "ConvTranspose2d" not in kinds
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in network.decoder_blocks()[0].modules()) == 1
    # decoder 1 is the plain U-Net's: a pre-training checkpoint (encoder + first decoder block) loads as is
    pretrained = SegmentationUNet(1, 4, TINY)
    state = encoder_state_dict(pretrained, num_decoder_blocks=1)
    loaded = load_pretrained(network, state)
    assert loaded == sorted(state) and all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    assert any(k.startswith("bilinear_decoder.") for k in network.state_dict())


def test_modes_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"semi_supervised must be one of \['none', 'mean_teacher', 'mixup', 'cross_pseudo'\]"):
        check_mode("meanteacher")
    with pytest.raises(ConfigError, match="names the semi-supervised add-on 'mixup' but semi_supervised is 'none'"):
        check_mode("none", "gcl+mixup@improved")
    assert check_mode("cross_pseudo", "ideal") == "cross_pseudo"


# ------------------------------------------------------------------------------------------------
# end to end on the embedded sample
# ------------------------------------------------------------------------------------------------


def test_unlabeled_slices_are_the_other_train_volumes(repo_root: Path, cache_dir: Path) -> None:
    with in_repo(repo_root):
        data = FinetuneData(SAMPLE_MANIFEST, SAMPLE_DIR, "sample", num_labeled=1, batch_size=8, cache_dir=str(cache_dir),
                            unlabeled_batch_size=8)
        train_ids = [e["volume_id"] for e in json.loads(Path(SAMPLE_MANIFEST).read_text())["train"]]
        assert sorted(data.labeled_volume_ids + data.unlabeled_volume_ids) == sorted(train_ids)
        assert not set(data.labeled_volume_ids) & set(data.unlabeled_volume_ids)
        batch = next(iter(data.unlabeled_loader))
        assert "label" not in batch and batch["image"].shape == (8, 1, 64, 64)  # the labels are dropped
        assert FinetuneData(SAMPLE_MANIFEST, SAMPLE_DIR, "sample", num_labeled=1, cache_dir=str(cache_dir)).unlabeled_loader is None
        with pytest.raises(ConfigError, match="needs unlabelled train volumes, but all 2"):
            FinetuneData(SAMPLE_MANIFEST, SAMPLE_DIR, "sample", num_labeled=2, cache_dir=str(cache_dir), unlabeled_batch_size=8)


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return folder / f"training_checkpoint_iteration={iteration:08d}.pt"


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric_history(output_dir: Path, workflow: str, key: str) -> list[float]:
    client = MlflowClient(tracking_uri=local_tracking_uri(output_dir))
    experiment = client.get_experiment_by_name("metacontrast-sample")
    run = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["workflow"] == workflow)
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def read_dice(output_dir: Path) -> list[float]:
    with open(output_dir / "evaluation" / "metrics.csv", newline="") as handle:
        return [float(row["dice_mean"]) for row in csv.DictReader(handle)]


#: batch 48 holds every slice of one sample volume: one iteration an epoch, a checkpoint every iteration
MEAN_TEACHER = {
    "features": TINY, "semi_supervised": "mean_teacher", "method": "random+mean_teacher", "num_labeled": 1, "seed": 0,
    "batch_size": 48, "max_iterations": 4, "checkpoint_interval": 1, "val_interval": 100,
}  # fmt: skip
#: fine-tune only: keep every checkpoint, ramp the consistency weight over 3 iterations
MEAN_TEACHER_FINETUNE = {"checkpointer#n_saved": 10, "semi_supervised_settings#mean_teacher#rampup_iterations": 3}


@pytest.fixture(scope="module")
def mean_teacher_run(repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mean_teacher")
    reference, resumed = root / "reference", root / "resumed"
    overrides = {**MEAN_TEACHER, "cache_dir": str(cache_dir), "runs_dir": str(root / "runs")}
    with in_repo(repo_root):
        run_bundle(config_file=FINETUNE, **overrides, **MEAN_TEACHER_FINETUNE, output_dir=str(reference))
        run_bundle(config_file=EVALUATE, **overrides, output_dir=str(reference))
        # a run that stopped after iteration 2: its folder state and checkpoint, then the same command again
        resumed.mkdir()
        shutil.copy(reference / "finetune_run.json", resumed)
        shutil.copy(checkpoint_path(reference, 2), resumed)
        run_bundle(config_file=FINETUNE, **overrides, **MEAN_TEACHER_FINETUNE, output_dir=str(resumed))
    return {"reference": reference, "resumed": resumed}


@pytest.mark.slow
def test_mean_teacher_teacher_is_the_ema_of_the_students(mean_teacher_run: dict[str, Path]) -> None:
    saved = {t: load(checkpoint_path(mean_teacher_run["reference"], t)) for t in range(1, 5)}
    for t in range(2, 5):
        alpha = ema_decay(t, 0.999)  # 2/3, 3/4, 4/5: the warm-up
        student, teacher, previous = saved[t]["network"], saved[t]["teacher"], saved[t - 1]["teacher"]
        assert sorted(teacher) == sorted(student)
        for key, value in teacher.items():
            if value.is_floating_point():
                assert torch.allclose(value, alpha * previous[key] + (1 - alpha) * student[key], rtol=0, atol=1e-6), (t, key)
    final = saved[4]
    assert any(not torch.equal(final["teacher"][k], final["network"][k]) for k in final["network"])
    assert final["unlabeled_sampler"]["position"] >= 0 and "teacher" in final["format"]["objects"]


@pytest.mark.slow
def test_mean_teacher_consistency_weight_ramps_and_evaluation_scores(mean_teacher_run: dict[str, Path]) -> None:
    out = mean_teacher_run["reference"]
    # epoch k (= iteration k) uses w(k - 1) = 0.1 exp(-5 (1 - (k - 1) / 3)^2)
    weights = metric_history(out, "finetune", "train_consistency_weight")
    assert weights == pytest.approx([0.1 * math.exp(-5 * (1 - k / 3) ** 2) for k in range(4)], rel=1e-9)
    assert all(math.isfinite(v) and v >= 0 for v in metric_history(out, "finetune", "train_consistency"))
    dice = read_dice(out)
    assert len(dice) == 1 and all(math.isfinite(d) and 0.0 <= d <= 1.0 for d in dice)
    # the student is what is evaluated: model.pt is the final student (no validation ran)
    assert all(torch.equal(v, load(checkpoint_path(out, 4))["network"][k]) for k, v in load(out / "model.pt").items())


@pytest.mark.slow
def test_mean_teacher_resume_is_bit_identical(mean_teacher_run: dict[str, Path]) -> None:
    reference, resumed = load(checkpoint_path(mean_teacher_run["reference"], 4)), load(checkpoint_path(mean_teacher_run["resumed"], 4))
    for key in ("network", "teacher", "optimizer", "sampler", "unlabeled_sampler", "trainer"):
        assert _same(resumed[key], reference[key]), key
    assert _same(resumed["rng"]["generators"], reference["rng"]["generators"])
    assert not checkpoint_path(mean_teacher_run["resumed"], 1).exists()  # it did resume, from iteration 2


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_cross_pseudo_finetune_validate_and_evaluate(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    overrides = {"features": TINY, "semi_supervised": "cross_pseudo", "method": "random+cross_pseudo", "num_labeled": 1,
                 "batch_size": 48, "max_iterations": 2, "val_interval": 2, "cache_dir": str(cache_dir),
                 "runs_dir": str(tmp_path / "runs"), "output_dir": str(out)}  # fmt: skip
    with in_repo(repo_root):
        run_bundle(config_file=FINETUNE, **overrides)
        run_bundle(config_file=EVALUATE, **overrides)
    model = load(out / "model.pt")
    assert any(k.startswith("bilinear_decoder.") for k in model)  # the two-decoder network was trained and saved
    with pytest.raises(RuntimeError, match="Unexpected key"):
        SegmentationUNet(1, 3, TINY).load_state_dict(model)  # so evaluate must build the same network class
    cps = metric_history(out, "finetune", "train_cross_pseudo")
    assert len(cps) == 2 and all(math.isfinite(v) and v > 0 for v in cps)
    assert len(metric_history(out, "finetune", "val_mean_dice")) == 1  # validated through the mean of the decoders
    dice = read_dice(out)
    assert len(dice) == 1 and all(math.isfinite(d) and 0.0 <= d <= 1.0 for d in dice)


@pytest.mark.slow
def test_mixup_through_the_results_grid(repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    """``random+mixup`` in the grid: fine-tuned with Mixup, filed and tagged under its full name, tabulated."""
    log = io.StringIO()
    with in_repo(repo_root), contextlib.redirect_stdout(log):
        paths = run_grid(
            dataset="sample", dataset_dir=str(repo_root / SAMPLE_DIR), methods=["random+mixup"], labeled=[1], seeds=[0],
            preset=None, runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
            overrides={"features": TINY, "cache_dir": str(cache_dir)},
            finetune_overrides={"max_iterations": 2, "val_interval": 1, "batch_size": 16},
        )
    assert "[grid] all runs finished" in log.getvalue(), log.getvalue()
    out = tmp_path / "runs" / "sample" / "random+mixup" / "L1_seed0"
    dice = read_dice(out)
    assert len(dice) == 1 and all(math.isfinite(d) and 0.0 <= d <= 1.0 for d in dice)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'sample' / 'mlruns.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("metacontrast-sample").experiment_id])
    tags = sorted((r.data.tags["workflow"], r.data.tags["method"], r.data.tags["semi_supervised"]) for r in runs)
    assert tags == [("evaluate", "random+mixup", "mixup"), ("finetune", "random+mixup", "mixup")]
    finetune = next(r for r in runs if r.data.tags["workflow"] == "finetune")
    assert finetune.data.params["semi_supervised_settings.alpha"] == "0.2"
    assert 'id="method-random+mixup"' in paths["table"].read_text()
