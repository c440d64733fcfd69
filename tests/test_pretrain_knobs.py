"""The pre-training knobs of issue 18 item 3: learning-rate warm-up, gradient clipping of the final update,
GCL's pixel-term weight, the U-Net's normalisation layer (carried from encoder.pt into fine-tune and
evaluate), and GCL on a subset of the meta labels.  Every default is the paper's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle
from torch import nn

from tests.helpers import TwoHeads, in_repo, logged_hyper_parameters
from metacontrast.engines import GradMitigator, MultiLossEvents, MultiLossTrainer, WarmupCosine, cosine_schedule
from metacontrast.losses import GCLLoss, PixelContrastiveLoss
from metacontrast.nets import PretrainedWeightsMismatch, SegmentationUNet, UNetEncoder, encoder_state_dict, load_pretrained
from metacontrast.workflows import checkpoint_norm, initialise_encoder

TINY = [4, 8, 16, 32, 64]
BUNDLES = ("gcl", "simclr", "glcl", "spcl", "macl", "ideal")
COMMON_SCHEDULE = ("gcl", "simclr", "macl", "ideal")  # the bundles whose lr_scheduler is pretrain_common.json's


# ------------------------------------------------------------------------------------------------
# warm-up
# ------------------------------------------------------------------------------------------------


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_is_linear_then_cosine_to_zero():
    rates = _rates(cosine_schedule(_optimizer(0.1), total_iterations=10, warmup_iterations=4), 11)
    expected = [0.1 * (t + 1) / 4 for t in range(4)] + [0.1 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(7)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[3] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_is_the_papers_cosine_bit_for_bit():
    scheduler = cosine_schedule(_optimizer(), total_iterations=12, warmup_iterations=0)
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=12)
    assert _rates(scheduler, 13) == _rates(reference, 13)


def test_warmup_schedule_resumes_from_its_state_dict():
    first = cosine_schedule(_optimizer(), total_iterations=20, warmup_iterations=5)
    _rates(first, 3)
    state = first.state_dict()
    assert state["lr_lambdas"][0] == {"warmup_iterations": 5, "total_iterations": 20}
    resumed = cosine_schedule(_optimizer(), total_iterations=20, warmup_iterations=5)
    resumed.load_state_dict(state)
    resumed.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # the optimiser's own state
    assert _rates(resumed, 17) == _rates(first, 17)


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match="warm-up"):
        WarmupCosine(10, 10)
    with pytest.raises(ValueError, match="warmup_iterations"):
        cosine_schedule(_optimizer(), 10, -1)


# ------------------------------------------------------------------------------------------------
# gradient clipping of the final update
# ------------------------------------------------------------------------------------------------


def conflicting(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a": 50 * ((pred - target) ** 2).mean(), "b": 50 * ((pred + 2 * target) ** 2).mean()}


def _run_one_step(grad_clip_norm: float, handlers=(), scaler=None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One SGD step (lr 1, no momentum); returns (weights before, weights after, param.grad at GRADIENTS_READY)."""
    torch.manual_seed(1)
    batches = [(torch.randn(8, 4), torch.randn(8, 2))]
    network = TwoHeads()
    trainer = MultiLossTrainer(device="cpu", max_epochs=1, train_data_loader=batches, network=network,
                               optimizer=torch.optim.SGD(network.parameters(), lr=1.0), loss_function=conflicting,
                               train_handlers=list(handlers), decollate=False, grad_clip_norm=grad_clip_norm,
                               amp=scaler is not None)  # fmt: skip
    if scaler is not None:  # MONAI's Trainer.run makes a CUDA-only scaler, which is off on the CPU: swap it for a CPU one
        trainer.add_event_handler(Events.STARTED, lambda e: setattr(e, "scaler", scaler))
    ready: list[torch.Tensor] = []
    trainer.add_event_handler(MultiLossEvents.GRADIENTS_READY, lambda e: ready.extend(p.grad.detach().clone() for p in network.parameters()))
    before = [p.detach().clone() for p in network.parameters()]
    trainer.run()
    return before, [p.detach().clone() for p in network.parameters()], ready


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


@pytest.mark.parametrize("handlers", [(), (GradMitigator(beta=0.5),)], ids=["mean", "mitigated"])
def test_clipping_scales_the_final_update_to_the_norm(handlers):
    before, after, ready = _run_one_step(0.5, handlers)
    norm = _global_norm(ready)
    assert norm > 1.0, "the test needs an update above the clip norm"
    steps = [b - a for b, a in zip(before, after)]
    assert float(_global_norm(steps)) == pytest.approx(0.5, rel=1e-5)
    for step, grad in zip(steps, ready):  # the direction is the combined (mitigated) update's
        torch.testing.assert_close(step, grad * (0.5 / norm), rtol=1e-5, atol=1e-7)


def test_clipping_off_or_above_the_norm_leaves_the_update():
    before, after, ready = _run_one_step(0.0)
    for b, a, g in zip(before, after, ready):
        torch.testing.assert_close(b - a, g)
    before, after, ready = _run_one_step(1e6)
    for b, a, g in zip(before, after, ready):
        torch.testing.assert_close(b - a, g)


def test_clipping_under_amp_acts_on_the_unscaled_gradient():
    """With a loss scale of 1024 the gradients at GRADIENTS_READY are scaled; the clip must unscale first."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before, after, ready = _run_one_step(0.5, scaler=scaler)
    assert float(_global_norm(ready)) > 1024 * 1.0
    assert float(_global_norm([b - a for b, a in zip(before, after)])) == pytest.approx(0.5, rel=1e-4)


def test_negative_clip_norm_is_refused():
    with pytest.raises(ValueError, match="grad_clip_norm"):
        _run_one_step(-1.0)


# ------------------------------------------------------------------------------------------------
# GCL's pixel-term weight
# ------------------------------------------------------------------------------------------------


def _gcl_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    outputs = {"img": torch.randn(8, 6, 3, 3, generator=generator), "pix": torch.randn(8, 6, 3, 3, generator=generator)}
    meta = {"patient_id": torch.tensor([0, 0, 1, 1]), "slice_quantile": torch.tensor([0, 1, 0, 1])}
    return outputs, meta


@pytest.mark.parametrize("weight", [1.0, 0.1, 0.0])
def test_pixel_weight_multiplies_the_pixel_term(weight):
    outputs, meta = _gcl_inputs()
    loss = GCLLoss(["patient_id", "slice_quantile"], pixel_loss=PixelContrastiveLoss(), pixel_weight=weight)
    objectives = loss(outputs, meta)
    for name, value in objectives.items():
        image, pixel = loss.last_terms[f"img/{name}"], loss.last_terms[f"pix/{name}"]
        assert pixel > 0.1
        assert float(value) == pytest.approx(image + weight * pixel, rel=1e-6)


def test_pixel_weight_one_is_the_paper_sum_exactly():
    outputs, meta = _gcl_inputs()
    default = GCLLoss(["patient_id"], pixel_loss=PixelContrastiveLoss())(outputs, meta)
    weighted = GCLLoss(["patient_id"], pixel_loss=PixelContrastiveLoss(), pixel_weight=1.0)(outputs, meta)
    assert torch.equal(default["patient_id"], weighted["patient_id"])
    with pytest.raises(ValueError, match="pixel_weight"):
        GCLLoss(["patient_id"], pixel_weight=-0.1)


def test_per_label_image_heads_keep_each_labels_term_on_its_own_head():
    """``image_heads="per_label"``: label m's image term reads ``img_<m>`` only; the pixel positives are ranked by
    the mean of the labels' image maps; the shared default is the paper's single ``h_img``."""
    outputs, meta = _gcl_inputs()
    heads = {m: outputs["img"].clone().requires_grad_(True) * (k + 1) for k, m in enumerate(meta)}
    per_label = {"pix": outputs["pix"], **{f"img_{m}": h for m, h in heads.items()}}
    loss = GCLLoss(list(meta), pixel_loss=PixelContrastiveLoss(), pixel_weight=0.0, image_heads="per_label")
    objectives = loss(per_label, meta)
    grads = torch.autograd.grad(objectives["patient_id"], [per_label["img_patient_id"], per_label["img_slice_quantile"]], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0
    shared = GCLLoss(list(meta), image_heads="shared")(outputs, meta)
    alone = GCLLoss(list(meta), image_heads="per_label")({"pix": outputs["pix"], **{f"img_{m}": outputs["img"] for m in meta}}, meta)
    for m in meta:  # the same map under every label's head is the shared head exactly
        assert torch.allclose(shared[m], alone[m])
    with pytest.raises(ValueError, match="image_heads"):
        GCLLoss(list(meta), image_heads="one_each")
    with pytest.raises(ValueError, match="needs meta labels"):
        GCLLoss([], image_heads="per_label")


def test_gcl_bundle_builds_one_image_head_per_meta_label_on_request(repo_root: Path):
    with in_repo(repo_root):
        paper = _parser(repo_root, "gcl", features=TINY, meta_labels=["patient_id", "slice_quantile"])
        per_label = _parser(repo_root, "gcl", features=TINY, meta_labels=["patient_id", "slice_quantile"], image_heads="per_label")
        assert sorted(paper.get_parsed_content("network").heads) == ["img", "pix"]
        assert sorted(per_label.get_parsed_content("network").heads) == ["img_patient_id", "img_slice_quantile", "pix"]
        assert per_label.get_parsed_content("loss").image_heads == "per_label"
    assert paper["method_hyper_parameters"]["image_heads"] == "@image_heads"


def test_gcl_pixel_head_moves_onto_a_decoder_block_that_only_the_pixel_term_trains(repo_root: Path):
    """``pretrained_decoder_blocks: 1``: ``h_pix`` reads the first up block on the encoder's features of a 0.5x copy of
    the view, on the grid of ``h_img``'s map; the image terms leave that block alone, the pixel term trains it, and it
    is part of the weights fine-tuning loads."""
    meta = {"patient_id": torch.tensor([0, 0, 1, 1]), "slice_quantile": torch.tensor([0, 1, 0, 1])}
    with in_repo(repo_root):
        parser = _parser(repo_root, "gcl", features=TINY, meta_labels=list(meta), image_heads="per_label", pretrained_decoder_blocks=1)
        network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        paper = _parser(repo_root, "gcl", features=TINY).get_parsed_content("network")
    outputs = network(torch.randn(8, 1, 64, 64))
    assert outputs["pix"].shape[-2:] == outputs["img_patient_id"].shape[-2:] == (4, 4)
    block = [p for b in network.encoder.decoder_blocks(1) for p in b.parameters()]
    assert block and network.encoder.decoder_blocks(1)[0][0].conv.in_channels == TINY[-1] + TINY[-2]
    loss.record_components = True
    loss(outputs, meta)
    terms = loss.last_components
    image = torch.autograd.grad(sum(v for k, v in terms.items() if k.startswith("img/")), block, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in image)
    pixel = torch.autograd.grad(sum(v for k, v in terms.items() if k.startswith("pix/")), block, allow_unused=True)
    assert all(g is not None for g in pixel) and sum(float(g.abs().sum()) for g in pixel) > 0
    weights = encoder_state_dict(network, 1)
    assert set(weights) - set(encoder_state_dict(paper)) and load_pretrained(SegmentationUNet(out_channels=4, features=TINY), weights)


# ------------------------------------------------------------------------------------------------
# the config keys of every bundle
# ------------------------------------------------------------------------------------------------


def _parser(repo_root: Path, bundle: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / bundle / "configs" / "pretrain.json"))
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_bundle_has_paper_defaults_logged_and_the_norm_reaches_its_encoder(repo_root: Path, bundle: str):
    parser = _parser(repo_root, bundle)
    keys = {"norm": "instance", "grad_clip_norm": 0.0, **({"warmup_iterations": 0} if bundle in COMMON_SCHEDULE else {})}
    with in_repo(repo_root):
        logged = logged_hyper_parameters(_parser(repo_root, bundle))
    for key, default in keys.items():
        assert parser[key] == default, key
        assert logged[key] == default, f"{key} is not logged"
    if bundle == "gcl":
        assert parser["pixel_weight"] == 1.0 and logged["pixel_weight"] == 1.0
    with in_repo(repo_root):
        parser = _parser(repo_root, bundle, norm="batch", features=TINY)
        network = parser.get_parsed_content("unet" if bundle == "glcl" else "network")
    encoder = network if isinstance(network, UNetEncoder) else network.encoder
    assert isinstance(encoder, UNetEncoder) and encoder.norm == "batch"
    assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm"):
        SegmentationUNet(features=TINY, norm="layer")


# ------------------------------------------------------------------------------------------------
# end to end: a batch-norm GCL encoder on two of ACDC's three meta labels, with warm-up and clipping,
# fine-tuned and evaluated as batch norm
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_norm_encoder(acdc_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("gcl_bn")
    with in_repo(repo_root):
        run_bundle(config_file="bundles/gcl/configs/pretrain.json", dataset="acdc", dataset_dir=str(acdc_dir), max_volumes=8,
                   batch_size=8, max_iterations=4, features=TINY, norm="batch", warmup_iterations=2, grad_clip_norm=1.0,
                   pixel_weight=0.1, meta_labels="$['patient_id', 'slice_quantile']", output_dir=str(out),
                   cache_dir=str(cache_dir), num_threads=1, checkpoint_interval=100)  # fmt: skip
    return out


@pytest.mark.slow
def test_gcl_runs_on_a_subset_of_the_meta_labels_with_every_knob(batch_norm_encoder: Path) -> None:
    (last,) = batch_norm_encoder.glob("training_checkpoint_iteration=*.pt")
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    # the warm-up's LambdaLR state, and the GradMitigator's targets over exactly the two labels
    assert state["lr_scheduler"]["lr_lambdas"][0] == {"warmup_iterations": 2, "total_iterations": 4}
    assert state["grad_mitigator"]["targets"].shape[-2:] == (2, 2)
    encoder = torch.load(batch_norm_encoder / "encoder.pt", map_location="cpu", weights_only=True)
    assert encoder["network"] == {"features": TINY, "norm": "batch"}
    assert any(k.endswith("running_mean") for k in encoder["state_dict"])


@pytest.mark.slow
def test_batch_norm_travels_from_encoder_to_finetune_and_evaluate(batch_norm_encoder: Path, repo_root: Path,
                                                                  tmp_path: Path, cache_dir: Path) -> None:
    encoder = str(batch_norm_encoder / "encoder.pt")
    assert checkpoint_norm(encoder) == "batch" and checkpoint_norm("") == "instance"
    with pytest.raises(PretrainedWeightsMismatch, match="batch norm"):
        initialise_encoder(SegmentationUNet(out_channels=4, features=TINY), encoder)  # an instance-norm U-Net refuses it
    settings = {"method": "gcl", "features": TINY, "pretrained_ckpt": encoder, "runs_dir": str(tmp_path / "runs"),
                "output_dir": str(tmp_path / "out"), "cache_dir": str(cache_dir)}
    finetune = ConfigParser()
    finetune.read_config(str(repo_root / "bundles/common/configs/finetune.json"))
    finetune.update(settings)
    assert finetune.get_parsed_content("norm") == "batch"
    assert finetune["hyper_parameters"]["norm"] == "@norm"  # logged
    # evaluate reads the norm off the fine-tuned weights it evaluates
    model = SegmentationUNet(out_channels=4, features=TINY, norm="batch")
    torch.save({"model": model.state_dict()}, tmp_path / "model.pt")
    torch.save({"model": SegmentationUNet(out_channels=4, features=TINY).state_dict()}, tmp_path / "model_in.pt")
    evaluate = ConfigParser()
    evaluate.read_config(str(repo_root / "bundles/common/configs/evaluate.json"))
    for ckpt, norm in ((tmp_path / "model.pt", "batch"), (tmp_path / "model_in.pt", "instance")):
        evaluate.update({**settings, "ckpt": str(ckpt)})
        with in_repo(repo_root):
            assert evaluate.get_parsed_content("norm", lazy=False) == norm
