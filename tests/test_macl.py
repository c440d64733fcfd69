"""MACL (Zeng et al.; JCL in the paper's equations): the two branches' shapes at 192 x 192, L_ER (Eq. 12) on a
hand-made pair, L_g and L_d against Eqs. 10-11 evaluated term by term, the bundle end to end (sample and ACDC),
its checkpoint loading into the fine-tune network with the two decoder blocks filled, and the results runner
accepting the method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import create_workflow
from monai.bundle import run as run_bundle

from metacontrast.losses import MACLLoss, dense_contrastive, equivariant_regularisation, global_contrastive, position_positive_mask
from metacontrast.nets import DEFAULT_CHANNELS, MACLNetwork, PixelProjector, PooledProjectionHead, SegmentationUNet, UNetEncoder, encoder_state_dict
from metacontrast.workflows import initialise_encoder
from metacontrast.reporting.grid import parse_method
from tests.helpers import in_repo, parsed_config, pretrained_decoder_checkpoint

PRETRAIN = "bundles/macl/configs/pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
CPU_PRESET = "bundles/common/configs/presets/cpu.json"
TINY = [8, 16, 32, 64, 128]
BLOCKS = 2


def macl_network(features, projection_dim: int = 16) -> MACLNetwork:
    encoder = UNetEncoder(features=features, keep_decoder_blocks=BLOCKS)
    def heads(channels: int) -> dict[str, torch.nn.Module]:
        return {"instance": PooledProjectionHead(channels, projection_dim, projection_dim),
                "pixel": PixelProjector(channels, projection_dim, projection_dim)}

    return MACLNetwork(encoder, heads(features[-1]), heads(features[-2 - BLOCKS]), num_decoder_blocks=BLOCKS)


# -- the network -----------------------------------------------------------------------------------


def test_shapes_through_both_branches_at_192() -> None:
    torch.manual_seed(0)
    net = macl_network(DEFAULT_CHANNELS, projection_dim=128)
    seen = []
    net.encoder.encoder_blocks()[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    decoded = []
    net.encoder.decoder_blocks(BLOCKS)[-1].register_forward_hook(lambda m, args, out: decoded.append(tuple(out.shape)))
    out = net.train()(torch.randn(2, 1, 192, 192))
    assert seen == [(2, 1, 192, 192), (2, 1, 48, 48)]  # auxiliary: the augmented image; dominant: its 0.25x copy
    assert decoded == [(2, 64, 12, 12)]  # d(Y): two up blocks of the dominant branch, at the auxiliary features' size
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "features_aux": (2, 512, 12, 12), "features": (2, 512, 3, 3),  # Y~ (Eq. 5), Y (Eq. 7)
        "instance_aux": (2, 128, 1, 1), "pixel_aux": (2, 128, 12, 12),  # Eq. 6
        "instance": (2, 128, 1, 1), "pixel": (2, 128, 12, 12),  # Eq. 8
    }
    sum(v.square().mean() for v in out.values()).backward()
    trained = [net.encoder.encoder_blocks(), net.encoder.decoder_blocks(BLOCKS), [net.auxiliary_heads, net.dominant_heads]]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for group in trained for m in group for p in m.parameters())
    # only the two decoder blocks exist: the others are not in the state dict (and not trained)
    full = SegmentationUNet(features=DEFAULT_CHANNELS)
    later = set(full.module_keys(full.decoder_blocks()[BLOCKS:]))
    assert later and not later & set(net.encoder.state_dict())


def test_other_sizes_are_zero_padded_to_a_multiple_of_64() -> None:
    net = macl_network(TINY)
    seen = []
    net.encoder.encoder_blocks()[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[2:])))
    out = net(torch.randn(2, 1, 96, 80))  # CPU-preset ACDC is 96 x 96, the hippocampus 64 x 64
    assert seen == [(128, 128), (32, 32)] and out["pixel"].shape[2:] == out["pixel_aux"].shape[2:] == (8, 8)
    with pytest.raises(ValueError, match="scale_factor"):
        MACLNetwork(UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS), {}, {}, num_decoder_blocks=BLOCKS, scale_factor=0.5)
    with pytest.raises(ValueError, match="num_decoder_blocks"):
        MACLNetwork(UNetEncoder(features=TINY, keep_decoder_blocks=1), {}, {}, num_decoder_blocks=BLOCKS)


# -- the loss terms against the paper's equations --------------------------------------------------


def test_equivariant_regularisation_on_a_hand_made_pair() -> None:
    """Eq. 12 on Y~ (1, 2, 8, 8) = 0, 1, ..., 127 and a hand-written Y (1, 2, 2, 2): mean |Y - down(Y~)|."""
    y_aux = torch.arange(128, dtype=torch.float64).view(1, 2, 8, 8)
    y = torch.tensor([[[[10.0, 14.0], [40.0, 45.0]], [[90.0, 95.0], [100.0, 130.0]]]], dtype=torch.float64)
    total = 0.0
    for c in range(2):  # down(.) with s = 0.25: the mean of each 4 x 4 block
        for u in range(2):
            for v in range(2):
                block = [float(y_aux[0, c, 4 * u + a, 4 * v + b]) for a in range(4) for b in range(4)]
                total += abs(float(y[0, c, u, v]) - sum(block) / 16)
    # by hand: the block means are 13.5, 17.5, 45.5, 49.5 and 77.5, 81.5, 109.5, 113.5
    assert total / 8 == pytest.approx((3.5 + 3.5 + 5.5 + 4.5 + 12.5 + 13.5 + 9.5 + 16.5) / 8)
    assert float(equivariant_regularisation(y, y_aux)) == pytest.approx(total / 8, rel=1e-12)
    assert float(equivariant_regularisation(F.avg_pool2d(y_aux, 4), y_aux)) == 0.0
    with pytest.raises(ValueError, match="not aligned"):
        equivariant_regularisation(y[..., :1], y_aux)


POSITIONS = torch.tensor([0.0, 0.05, 0.5, 0.58, 1.0], dtype=torch.float64)  # N = 5 slices, rows [view 1; view 2]
T, TAU = 0.1, 0.1


def omega(i: int) -> list[int]:
    """Omega_i^+ written out: every other row whose slice lies within t of row i's slice."""
    p = POSITIONS.repeat(2).tolist()
    return [j for j in range(len(p)) if j != i and abs(p[i] - p[j]) < T]


def eq11_term(z: torch.Tensor, z_aux: torch.Tensor, i: int, j: int, s: int) -> float:
    """log( e^{sim(Z_{i,s}, Z~_{j,s})/tau} / sum_{k != i} e^{sim(Z_{i,s}, Z~_{k,s})/tau} ), z (2N, C, S^2)."""
    sim = lambda k: float(F.cosine_similarity(z[i, :, s], z_aux[k, :, s], dim=0)) / TAU  # noqa: E731
    return sim(j) - math.log(sum(math.exp(sim(k)) for k in range(len(z)) if k != i))


def test_position_positives_are_the_papers_sets() -> None:
    mask = position_positive_mask(POSITIONS, T)
    assert [sorted(mask[i].nonzero().flatten().tolist()) for i in range(10)] == [omega(i) for i in range(10)]
    assert omega(0) == [1, 5, 6] and omega(2) == [3, 7, 8] and omega(4) == [9]  # the other view, and close slices


def test_dense_loss_equals_eq11_evaluated_directly() -> None:
    torch.manual_seed(3)
    z, z_aux = torch.randn(10, 4, 3, 3, dtype=torch.float64), torch.randn(10, 4, 3, 3, dtype=torch.float64)
    flat, flat_aux = z.flatten(2), z_aux.flatten(2)
    per_anchor = []
    for i in range(10):
        positives = omega(i)
        per_anchor.append(-sum(sum(eq11_term(flat, flat_aux, i, j, s) for s in range(9)) / 9 for j in positives) / len(positives))
    expected = sum(per_anchor) / len(per_anchor)  # Eq. 11's sum over the 2N anchors, as a mean
    assert float(dense_contrastive(z, z_aux, position_positive_mask(POSITIONS, T), TAU)) == pytest.approx(expected, rel=1e-10)


def test_global_loss_equals_eq10_evaluated_directly() -> None:
    torch.manual_seed(4)
    z, z_aux = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    per_anchor = [-sum(eq11_term(z[..., None], z_aux[..., None], i, j, 0) for j in omega(i)) / len(omega(i)) for i in range(10)]
    loss = global_contrastive(z, z_aux, position_positive_mask(POSITIONS, T), TAU)
    assert float(loss) == pytest.approx(sum(per_anchor) / 10, rel=1e-10)
    # anchors are dominant projections, the contrast set auxiliary ones: swapping the branches changes the loss
    assert float(global_contrastive(z_aux, z, position_positive_mask(POSITIONS, T), TAU)) != pytest.approx(float(loss))


def test_mlc_loss_is_the_weighted_sum_of_eq9() -> None:
    torch.manual_seed(5)
    net = macl_network(TINY)
    positions = POSITIONS.float()
    out = net(torch.rand(10, 1, 128, 128))
    loss = MACLLoss()(out, {"slice_position": positions})["mlc"]
    positives = position_positive_mask(positions, 0.1)
    parts = (
        global_contrastive(out["instance"].flatten(1), out["instance_aux"].flatten(1), positives, 0.1),
        dense_contrastive(out["pixel"], out["pixel_aux"], positives, 0.1),
        equivariant_regularisation(out["features"], out["features_aux"]),
    )
    assert float(loss) == pytest.approx(float(1.0 * parts[0] + 0.5 * parts[1] + 1.0 * parts[2]), rel=1e-6)
    with pytest.raises(ValueError, match="two views"):
        MACLLoss()(out, {"slice_position": positions[:4]})


# -- the bundle ------------------------------------------------------------------------------------


def test_bundle_holds_the_paper_recipe_and_the_cpu_preset_caps_it(repo_root: Path) -> None:
    paper = parsed_config(repo_root, PRETRAIN)
    recipe = {k: paper.get_parsed_content(k) for k in ("max_epochs", "max_iterations", "learning_rate", "temperature", "threshold",
                                                       "global_weight", "dense_weight", "er_weight", "scale_factor", "pretrained_decoder_blocks")}
    assert recipe == {"max_epochs": 100, "max_iterations": 0, "learning_rate": 0.1, "temperature": 0.1, "threshold": 0.1,
                      "global_weight": 1.0, "dense_weight": 0.5, "er_weight": 1.0, "scale_factor": 0.25, "pretrained_decoder_blocks": 2}
    assert paper["optimizer"]["_target_"] == "torch.optim.SGD" and paper["lr_scheduler"]["_target_"] == "metacontrast.engines.cosine_schedule"
    assert paper.get_parsed_content("warmup_iterations") == 0  # cosine_schedule without warm-up is torch's CosineAnnealingLR
    cpu = parsed_config(repo_root, PRETRAIN, CPU_PRESET)
    assert cpu.get_parsed_content("max_iterations") == json.loads((repo_root / CPU_PRESET).read_text())["cpu_iterations"]["pretrain"]


def test_results_runner_accepts_macl() -> None:
    spec = parse_method("macl")
    assert spec.bundle == "macl" and spec.pretrain_config.is_file() and spec.pretrain_overrides == {}
    assert parse_method("macl/no_dense").pretrain_overrides == {"dense_weight": 0.0}
    assert parse_method("macl/blocks3").pretrain_overrides == {"pretrained_decoder_blocks": 3}


def _spatial_correlation(a: torch.Tensor, b: torch.Tensor, size: int = 12) -> torch.Tensor:
    """Per-sample Pearson correlation of two (B, 1, H, W) batches block-averaged to the dense maps' S x S."""
    a, b = (F.adaptive_avg_pool2d(t, size).flatten(1) for t in (a, b))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def test_the_views_of_a_slice_share_their_geometry_on_acdc(acdc_dir: Path, repo_root: Path) -> None:
    """Eq. 11 pairs location s of one view with location s of the other: on a real ACDC batch the bundle's two
    views must show the same anatomy cell by cell (same spatial transform, independent intensity jitter).
    Independently warped views (``shared_view_geometry: false``) agree on the 12 x 12 grid far less."""
    from metacontrast.data.transforms import volume_preprocessing

    t = volume_preprocessing((2.734, 2.734), (96, 96))
    images = torch.cat([t({"image": str(acdc_dir / f"{name}.nii.gz")})["image"].as_tensor().permute(3, 0, 1, 2)
                        for name in ("patient001/patient001_frame01", "patient050/patient050_frame01")])
    batch = {"image": images, "slice_position": torch.linspace(0, 1, len(images))}
    correlation = {}
    for shared in (True, False):
        views, _ = parsed_config(repo_root, PRETRAIN, shared_view_geometry=shared).get_parsed_content("prepare_batch")(batch)
        correlation[shared] = _spatial_correlation(*views.chunk(2))
    assert float(correlation[True].min()) > 0.95
    assert float(correlation[False].mean()) < 0.8


@pytest.mark.parametrize("blocks", [1, 3])
def test_other_decoder_depths_keep_the_branches_aligned(repo_root: Path, blocks: int) -> None:
    """Table 5's rows: the downsampling follows the number of blocks (0.5, 0.125), the branches stay aligned."""
    parser = parsed_config(repo_root, PRETRAIN, features=TINY, pretrained_decoder_blocks=blocks, projection_dim=8, projector_hidden=8)
    assert parser.get_parsed_content("scale_factor") == 2.0**-blocks
    out = parser.get_parsed_content("network")(torch.randn(2, 1, 64, 64))
    assert out["pixel"].shape == out["pixel_aux"].shape and out["features"].shape[2:] == (out["features_aux"].shape[2] * 2.0**-blocks,) * 2
    loss = parser.get_parsed_content("loss")(out, {"slice_position": torch.tensor([0.2])})["mlc"]
    assert torch.isfinite(loss)


@pytest.fixture(scope="module")
def sample_run(repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("macl_pretrain")
    with in_repo(repo_root):  # 2 of the sample's volumes hold 73 slices: 2 batches of 32
        run_bundle(config_file=PRETRAIN, features=TINY, max_iterations=2, max_volumes=2, batch_size=32, output_dir=str(out),
                   cache_dir=str(cache_dir), num_threads=1)
    return out


@pytest.mark.slow
def test_sample_pretrain_saves_encoder_and_two_decoder_blocks(sample_run: Path) -> None:
    (checkpoint_file,) = sample_run.glob("training_checkpoint_iteration=*.pt")
    assert checkpoint_file.name.endswith("=00000002.pt")
    checkpoint = torch.load(sample_run / "encoder.pt", map_location="cpu", weights_only=True)
    assert checkpoint["method"] == "macl" and list(checkpoint["network"]["features"]) == TINY
    assert set(checkpoint["state_dict"]) == set(encoder_state_dict(UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS), BLOCKS))
    # the MLflow run holds the three terms, and the objective is Eq. 9 with the paper's weights
    run_id = json.loads((sample_run / "pretrain_run.json").read_text())["mlflow_run_id"]
    metrics = mlflow.MlflowClient(f"sqlite:///{sample_run / 'mlruns.db'}").get_run(run_id).data.metrics
    expected = metrics["train_macl/global"] + 0.5 * metrics["train_macl/dense"] + metrics["train_macl/er"]
    assert metrics["train_loss/mlc"] == pytest.approx(expected, rel=1e-5) and metrics["train_macl/er"] > 0


@pytest.mark.slow
def test_checkpoint_loads_into_finetune_network_with_decoder_blocks(sample_run: Path, repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    encoder = sample_run / "encoder.pt"
    network, pretrained = pretrained_decoder_checkpoint(encoder, TINY, BLOCKS)
    overrides = {"method": "macl", "features": TINY, "max_iterations": 1, "pretrained_ckpt": str(encoder),
                 "runs_dir": str(tmp_path / "runs"), "output_dir": str(tmp_path / "out"), "cache_dir": str(cache_dir)}
    with in_repo(repo_root):  # the shared fine-tune workflow's own network, after its initialize step
        workflow = create_workflow(config_file=FINETUNE, **overrides)
        state = workflow.parser.get_parsed_content("network").state_dict()
    for key, value in pretrained.items():
        assert torch.equal(state[key].cpu(), value), key
    assert initialise_encoder(network, str(encoder)) == sorted(pretrained)


@pytest.mark.slow
def test_acdc_pretrain_one_epoch_eight_volumes(acdc_dir: Path, repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "acdc"
    with in_repo(repo_root):  # 192 x 192 slices; a batch of 40 caps the epoch at 2 iterations (80-95 slices)
        run_bundle(config_file=PRETRAIN, dataset="acdc", dataset_dir=str(acdc_dir), max_epochs=1, max_volumes=8, batch_size=40,
                   features=TINY, output_dir=str(out), cache_dir=str(cache_dir), num_threads=1)
    (checkpoint_file,) = out.glob("training_checkpoint_iteration=*.pt")
    assert checkpoint_file.name.endswith("=00000002.pt")
    state = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(encoder_state_dict(UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS), BLOCKS))
    assert all(torch.isfinite(v).all() for v in state.values())
