"""SimCLR and SPCL (issue 6, items 1 and 3): losses against direct evaluations, the SPCL schedules, and
both bundles' pre-training end to end (embedded sample and ACDC) into the fine-tune network."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle

from metacontrast.engines import SelfPacedSchedule, power_pace
from metacontrast.losses import SimCLRLoss, SPCLLoss, self_paced_regulariser, self_paced_weights
from metacontrast.nets import SegmentationUNet
from metacontrast.workflows import initialise_encoder
from metacontrast.reporting.grid import parse_method

SIMCLR = "bundles/simclr/configs/pretrain.json"
SPCL = "bundles/spcl/configs/pretrain.json"
TINY = [8, 16, 32, 64, 128]
DTYPE = torch.float64


def _pooled(fmap: torch.Tensor) -> torch.Tensor:
    return F.normalize(fmap.mean(dim=(2, 3)), dim=1)


def _pair_loss(z: torch.Tensor, i: int, j: int, tau: float) -> torch.Tensor:
    """SPCL Eq. 2 / NT-Xent's term written out: -log exp(z_i.z_j/tau) / sum_{a != i} exp(z_i.z_a/tau)."""
    denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
    return -torch.log(torch.exp(z[i] @ z[j] / tau) / denominator)


# -- SimCLR --------------------------------------------------------------------------------------

def test_simclr_loss_is_nt_xent_written_out():
    """NT-Xent (Chen et al. Eq. 1): for each of the 2N anchors, its other view is the only positive."""
    torch.manual_seed(0)
    n, tau = 4, 0.1
    fmap = torch.randn(2 * n, 6, 3, 3, dtype=DTYPE)
    z = _pooled(fmap)
    direct = sum(_pair_loss(z, k, (k + n) % (2 * n), tau) for k in range(2 * n)) / (2 * n)
    (name, loss), = SimCLRLoss(temperature=tau, key="img")({"img": fmap}).items()
    assert name == "views"
    assert float(loss) == pytest.approx(float(direct), rel=1e-10)


def test_simclr_loss_pairs_views_not_neighbours():
    """Swapping the second view of two slices changes the loss (the positive is row k + N, not any row)."""
    torch.manual_seed(1)
    fmap = torch.randn(6, 5, 1, 1, dtype=DTYPE)
    loss = SimCLRLoss()({"img": fmap})["views"]
    swapped = fmap[[0, 1, 2, 4, 3, 5]]
    assert float(SimCLRLoss()({"img": swapped})["views"]) != pytest.approx(float(loss), rel=1e-6)


# -- SPCL self-paced weights and gamma -----------------------------------------------------------

def test_self_paced_weights_are_the_linear_closed_form():
    """Eq. 6: w = max(0, 1 - l/gamma), which is argmin_{w in [0,1]} w l + R_gamma(w)."""
    losses = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0], dtype=DTYPE)
    torch.testing.assert_close(self_paced_weights(losses, 2.0), torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0], dtype=DTYPE))
    torch.testing.assert_close(self_paced_weights(losses, 50.0), 1 - losses / 50)
    grid = torch.linspace(0, 1, 10001, dtype=DTYPE)
    for gamma in (2.0, 7.5):
        for loss in losses:
            objective = grid * loss + self_paced_regulariser(grid, gamma)
            assert float(grid[objective.argmin()]) == pytest.approx(float(self_paced_weights(loss, gamma)), abs=1e-4)


def test_gamma_schedule_at_chosen_epochs():
    """Supplement Sec. 4.5 / Eq. 16 with p = 1/2: gamma(t) = 2 + 48 (t/T)^(1/2) over T = 120 epochs, so
    gamma is 6.4 / 11.8 / 26.0 / 35.9 at t = 1 / 5 / 30 / 60 (a ramp linear in t gives 2.4 / 4.0 / 14.1 / 26.2)."""
    for t, expected in [(1, 6.38), (5, 11.80), (30, 26.0), (60, 35.94)]:
        assert power_pace(t, 120, 2.0, 50.0) == pytest.approx(2.0 + 48.0 * (t / 120) ** 0.5)
        assert power_pace(t, 120, 2.0, 50.0) == pytest.approx(expected, abs=0.01)
    assert power_pace(0, 120, 2.0, 50.0) == 2.0
    assert power_pace(120, 120, 2.0, 50.0) == 50.0
    assert power_pace(30, 120, 2.0, 50.0, power=1.0) == pytest.approx(2.0 + 48.0 * 30 / 120)  # p = 1: linear
    assert power_pace(0, 1, 2.0, 50.0) == 2.0


def test_the_spcl_bundle_ramps_gamma_with_p_one_half(repo_root: Path):
    """The bundle's schedule is the authors' (p: 0.5), and p is one override away."""
    config = ConfigParser.load_config_file(str(repo_root / SPCL))
    assert config["gamma_power"] == 0.5 and config["self_paced"]["power"] == "@gamma_power"
    parser = ConfigParser()
    parser.read_config(str(repo_root / SPCL))
    parser["gamma_power"] = 1.0
    assert parser.get_parsed_content("self_paced").power == 1.0


def test_gamma_moves_once_per_epoch_on_an_engine_and_resumes():
    schedule = SelfPacedSchedule(gamma_start=2.0, gamma_end=50.0)
    seen: list[tuple[int, float]] = []
    engine = Engine(lambda e, b: None)
    schedule.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.epoch, schedule.gamma)))
    engine.run([0, 1, 2], max_epochs=5)
    gammas = [2.0 + 48.0 * (e / 5) ** 0.5 for e in range(5)]
    assert seen == [(e + 1, gammas[e]) for e in range(5) for _ in range(3)]
    restored = SelfPacedSchedule(gamma_start=9.0, gamma_end=9.0, power=1.0)
    restored.load_state_dict(schedule.state_dict())
    assert restored.gamma == gammas[-1] and restored.total_epochs == 5 and restored.power == 0.5


# -- SPCL loss -------------------------------------------------------------------------------------

def _spcl_direct(z: torch.Tensor, meta: dict[str, list[int]], lambdas: dict[str, float], gamma: float, tau: float):
    """Eqs. 2, 3, 6, 14 with loops; rows k and k + N are the two views of slice k. Returns (w l part, R part)."""
    n2 = len(z)
    n = n2 // 2
    objective, regulariser = 0.0, {}
    for name, values in meta.items():
        sp_sum, reg_sum = 0.0, 0.0
        for i in range(n2):
            positives = [j for j in range(n2) if j != i and values[j % n] == values[i % n]]
            terms, regs = [], []
            for j in positives:
                l_ij = _pair_loss(z, i, j, tau)
                w_ij = max(0.0, 1.0 - float(l_ij.detach()) / gamma)  # a number: no gradient through the weight
                terms.append(w_ij * l_ij)
                regs.append(gamma * (w_ij**2 / 2 - w_ij))
            sp_sum = sp_sum + sum(terms) / len(positives)
            reg_sum += sum(regs) / len(positives)
        objective = objective + lambdas[name] * sp_sum / n2
        regulariser[name] = reg_sum / n2
    return objective, regulariser


def test_spcl_loss_equals_direct_loop_and_its_gradient_treats_w_as_constant():
    torch.manual_seed(3)
    n, tau, gamma = 6, 0.07, 20.0
    meta = {"slice_quantile": [0, 1, 2, 0, 1, 2], "patient_id": [0, 0, 0, 1, 1, 2]}
    lambdas = {"slice_quantile": 1.0, "patient_id": 1e-3}
    schedule = SelfPacedSchedule(gamma_start=gamma, gamma_end=gamma)
    loss_fn = SPCLLoss(list(meta), lambdas, schedule, temperature=tau, key="proj")
    fmap = torch.randn(2 * n, 8, 1, 1, dtype=DTYPE, requires_grad=True)
    out = loss_fn({"proj": fmap}, {k: torch.tensor(v) for k, v in meta.items()})
    assert list(out) == ["sp_con"]
    fmap_direct = fmap.detach().clone().requires_grad_(True)
    direct, regulariser = _spcl_direct(_pooled(fmap_direct), meta, lambdas, gamma, tau)
    assert float(out["sp_con"].detach()) == pytest.approx(float(direct.detach()), rel=1e-9)
    (grad,) = torch.autograd.grad(out["sp_con"], fmap)
    (grad_direct,) = torch.autograd.grad(direct, fmap_direct)
    torch.testing.assert_close(grad, grad_direct)
    for name in meta:
        assert loss_fn.last_terms[f"reg/{name}"] == pytest.approx(regulariser[name], rel=1e-9)
    # some positive pairs are cut (w = 0) and some are kept at this gamma: the test exercises both branches
    assert 0.0 < loss_fn.last_terms["mean_weight/slice_quantile"] < 1.0
    assert loss_fn.last_terms["gamma"] == gamma


def test_spcl_with_large_gamma_tends_to_the_plain_contrastive_loss():
    """gamma -> inf gives w = 1: Eq. 3 becomes the (unweighted) meta-label contrast of Eq. 2."""
    torch.manual_seed(4)
    fmap = torch.randn(8, 5, 1, 1, dtype=DTYPE)
    meta = {"slice_quantile": torch.tensor([0, 1, 0, 1])}
    huge = SPCLLoss(["slice_quantile"], {"slice_quantile": 1.0}, SelfPacedSchedule(1e12, 1e12))
    plain, _ = _spcl_direct(_pooled(fmap), {"slice_quantile": [0, 1, 0, 1]}, {"slice_quantile": 1.0}, 1e300, 0.07)
    assert float(huge({"proj": fmap}, meta)["sp_con"]) == pytest.approx(float(plain), rel=1e-6)


def test_spcl_refuses_a_meta_label_without_lambda():
    with pytest.raises(ValueError, match="lambda"):
        SPCLLoss(["slice_quantile", "organ_state"], {"slice_quantile": 1.0})


# -- SPCL configuration: lambdas, learning-rate schedule ------------------------------------------

def _parser(repo_root: Path, **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(repo_root / SPCL))
    parser.update(overrides)
    return parser


def test_spcl_lambdas_and_meta_labels_per_dataset(repo_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(repo_root)
    acdc = _parser(repo_root, dataset="acdc")
    assert acdc.get_parsed_content("label_weights") == {"slice_quantile": 1.0, "patient_id": 0.001, "organ_state": 0.01}
    assert acdc.get_parsed_content("meta_labels") == ["slice_quantile", "patient_id", "organ_state"]
    assert acdc.get_parsed_content("num_partitions") == 3 and acdc.get_parsed_content("max_epochs") == 120
    for dataset in ("hippocampus", "sample"):
        parser = _parser(repo_root, dataset=dataset)
        assert parser.get_parsed_content("meta_labels") == ["slice_quantile"]
        assert parser.get_parsed_content("max_epochs") == 80
    table5 = _parser(repo_root, dataset="acdc", **parse_method("spcl/table5_lambdas").pretrain_overrides)
    assert table5.get_parsed_content("label_weights") == {"slice_quantile": 1.0, "patient_id": 0.01, "organ_state": 0.001}
    assert _parser(repo_root, dataset="acdc", label_weights={"organ_state": 1.0}).get_parsed_content("meta_labels") == ["organ_state"]


def test_spcl_under_the_cpu_preset(repo_root: Path, monkeypatch: pytest.MonkeyPatch):
    """The preset cuts training to a fixed number of iterations and halves the widths; the rest stays SPCL's."""
    monkeypatch.chdir(repo_root)
    parser = ConfigParser()
    parser.read_config([str(repo_root / SPCL), str(repo_root / "bundles/common/configs/presets/cpu.json")])
    assert parser.get_parsed_content("max_iterations") == 240
    assert parser.get_parsed_content("features")[-1] == 256 and parser.get_parsed_content("head_out") == 256
    assert parser.get_parsed_content("temperature") == 0.07 and parser.get_parsed_content("batch_size") == 30


def test_spcl_learning_rate_warms_up_then_follows_a_cosine(repo_root: Path, monkeypatch: pytest.MonkeyPatch):
    """lr_int = 5e-5 rises x400 over the first 10 of 120 epochs, then a cosine to 0 (supplement Fig. 5)."""
    monkeypatch.chdir(repo_root)
    per_epoch = 10
    parser = _parser(repo_root, dataset="acdc", features=TINY, device="cpu", total_iterations=120 * per_epoch)
    scheduler = parser.get_parsed_content("lr_scheduler")
    optimizer = parser.get_parsed_content("optimizer")
    assert parser.get_parsed_content("warmup_iterations") == 10 * per_epoch
    lrs = []
    for _ in range(120 * per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak, warm = 5e-5 * 400, 10 * per_epoch
    assert lrs[0] == pytest.approx(5e-5)
    assert lrs[warm // 2] == pytest.approx(5e-5 + (peak - 5e-5) / 2)
    assert lrs[warm] == pytest.approx(peak)
    cosine = 110 * per_epoch
    assert lrs[warm + cosine // 2] == pytest.approx(peak / 2, abs=1e-9)
    assert lrs[-1] == pytest.approx(peak * (1 + math.cos(math.pi * (cosine - 1) / cosine)) / 2, abs=1e-9)
    assert max(lrs) == pytest.approx(peak)


# -- the bundles end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["simclr", "spcl"])
def test_results_runner_accepts_the_method(method: str):
    spec = parse_method(method)
    assert spec.bundle == method and spec.pretrain_config.is_file()


def _pretrain(repo_root: Path, config: str, out: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> dict[str, Any]:
    monkeypatch.chdir(repo_root)
    run_bundle(config_file=config, features=TINY, output_dir=str(out), cache_dir=str(out / "cache"),
               tracking_uri=f"sqlite:///{(out / 'mlruns.db').resolve()}", **overrides)
    checkpoint = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)
    network = SegmentationUNet(out_channels=4, features=TINY)
    loaded = initialise_encoder(network, str(out / "encoder.pt"))
    assert loaded and set(loaded) == set(checkpoint["state_dict"])
    own = network.state_dict()
    assert all(torch.equal(own[k], v) for k, v in checkpoint["state_dict"].items())
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "spcl"])
def test_pretrain_on_the_embedded_sample(method: str, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpoint = _pretrain(repo_root, f"bundles/{method}/configs/pretrain.json", tmp_path, monkeypatch, max_iterations=2)
    assert checkpoint["method"] == method and list(checkpoint["network"]["features"]) == TINY
    if method == "spcl":  # the schedule's state is in the last training checkpoint, at its last epoch
        last = sorted(tmp_path.glob("training*.pt"))[-1]
        restored = SelfPacedSchedule()
        restored.load_state_dict(torch.load(last, map_location="cpu", weights_only=True)["self_paced"])
        assert restored.total_epochs == 2 and restored.epoch == 1 and restored.gamma == pytest.approx(2.0 + 48.0 * 0.5**0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "spcl"])
def test_pretrain_on_acdc(method: str, repo_root: Path, acdc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpoint = _pretrain(repo_root, f"bundles/{method}/configs/pretrain.json", tmp_path, monkeypatch,
                           dataset="acdc", dataset_dir=str(acdc_dir), max_epochs=1, max_volumes=8)
    assert checkpoint["method"] == method and checkpoint["epoch"] == 1
    if method == "spcl":  # slice position with S = 3 partitions
        parser = _parser(repo_root, dataset="acdc", dataset_dir=str(acdc_dir), max_volumes=8, features=TINY,
                         device="cpu", cache_dir=str(tmp_path / "cache"))
        quantiles = parser.get_parsed_content("data").cache.meta["slice_quantile"]
        assert sorted(quantiles.unique().tolist()) == [0, 1, 2]
