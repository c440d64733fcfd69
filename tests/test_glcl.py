"""GLCL (Chaitanya et al., NeurIPS 2020): contrasting strategies against the paper's definitions, the
local loss against Eqs. 3-4 evaluated directly, the frozen-encoder local stage, and the two-stage
bundle end to end (sample and ACDC), its checkpoint loading into the fine-tune network with the
decoder blocks filled, and the results runner accepting the method."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import create_workflow
from monai.bundle import run as run_bundle

from metacontrast.losses import GlobalContrastiveLoss, LocalContrastiveLoss, global_masks, local_masks, nt_xent, region_corners
from metacontrast.losses.contrastive import multi_positive_info_nce, positive_mask, view_ids
from metacontrast.nets import DecoderWithHeads, ProjectionHead, UNetEncoder, encoder_state_dict
from metacontrast.workflows import initialise_encoder
from metacontrast.reporting.grid import parse_method
from tests.helpers import in_repo, parsed_config, pretrained_decoder_checkpoint

PRETRAIN = "bundles/glcl/configs/pretrain.json"
FINETUNE = "bundles/common/configs/finetune.json"
CPU_PRESET = "bundles/common/configs/presets/cpu.json"
TINY = [8, 16, 32, 64, 128]
BLOCKS = 2  # the bundle's pretrained_decoder_blocks (the paper's l = 3)


def eq1(z: torch.Tensor, i: int, j: int, negatives: list[int], tau: float) -> float:
    """-log( e^{sim(z_i, z_j)/tau} / (e^{sim(z_i, z_j)/tau} + sum_{a in negatives} e^{sim(z_i, z_a)/tau}) ), term by term."""
    sim = lambda a, b: float(F.cosine_similarity(z[a], z[b], dim=0)) / tau  # noqa: E731
    numerator = math.exp(sim(i, j))
    return -math.log(numerator / (numerator + sum(math.exp(sim(i, a)) for a in negatives)))


# -- the shared kernel's negatives argument ---------------------------------------------------------


def test_kernel_with_complementary_negatives_is_nt_xent() -> None:
    z = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    positives = positive_mask(view_ids(6))
    others = ~positives & ~torch.eye(12, dtype=torch.bool)
    torch.testing.assert_close(multi_positive_info_nce(z, positives, 0.1, negatives=others), nt_xent(z, 0.1))


def test_kernel_anchor_without_negatives_has_finite_gradient() -> None:
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    positives = positive_mask(view_ids(2))
    loss = multi_positive_info_nce(z, positives, 0.1, negatives=torch.zeros(4, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12) and torch.isfinite(z.grad).all()


# -- global strategies (Sec. 3.2) -----------------------------------------------------------------

# hand-built batch: 2 volumes x one image from each of S = 4 partitions; rows [x; x~; x^]
VOLUME = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
PARTITION = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
N = len(VOLUME)


def paper_sets(strategy: str) -> tuple[set[tuple[int, int]], dict[int, set[int]]]:
    """Lambda^+ (ordered pairs of rows) and Lambda^- per anchor, written out from the paper's text."""
    row = lambda version, image: version * N + image  # noqa: E731 - version 0 = x, 1 = x~, 2 = x^
    positives: set[tuple[int, int]] = set()
    for k in range(N):  # G^{D-}: (x, x~), (x, x^), (x~, x^) of every image, both orders
        for a, b in itertools.permutations(range(3), 2):
            positives.add((row(a, k), row(b, k)))
    if strategy == "GD":  # + (x_s^i, x_s^j) and (x~_s^i, x^_s^j) for volumes i != j, same partition s
        for k, m in itertools.permutations(range(N), 2):
            if PARTITION[k] == PARTITION[m] and VOLUME[k] != VOLUME[m]:
                positives |= {(row(0, k), row(0, m)), (row(1, k), row(2, m)), (row(2, m), row(1, k))}
    # Lambda^- = {x_k^l, x~_k^l, x^_k^l | k != s, all l}: every version of every image of another partition
    negatives = {row(v, k): {row(w, m) for w in range(3) for m in range(N) if PARTITION[m] != PARTITION[k]} for v in range(3) for k in range(N)}
    return positives, negatives


@pytest.mark.parametrize("strategy", ["GD", "GD-"])
def test_gd_masks_match_the_papers_sets(strategy: str) -> None:
    positives, negatives = global_masks(strategy, VOLUME, PARTITION, num_views=3)
    expected_pos, expected_neg = paper_sets(strategy)
    assert {tuple(p) for p in positives.nonzero().tolist()} == expected_pos
    for anchor, expected in expected_neg.items():
        assert set(negatives[anchor].nonzero().flatten().tolist()) == expected, anchor
    # same-partition images of other volumes, in any version, are never negatives
    part = PARTITION.repeat(3)
    vol = VOLUME.repeat(3)
    same_partition_other_volume = (part[:, None] == part[None, :]) & (vol[:, None] != vol[None, :])
    assert same_partition_other_volume.any() and not (negatives & same_partition_other_volume).any()
    assert not (positives & negatives).any() and not positives.diagonal().any()
    # G^D: 2 versions of the image itself + 1 image of the other volume per anchor
    assert positives.sum(1).tolist() == [3 if strategy == "GD" else 2] * (3 * N)


def test_gr_masks_are_simclr() -> None:
    positives, negatives = global_masks("GR", VOLUME, PARTITION, num_views=2)
    assert torch.equal(positives, positive_mask(view_ids(N)))
    assert torch.equal(negatives, ~positives & ~torch.eye(2 * N, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs 3 views"):
        global_masks("GD", VOLUME, PARTITION, num_views=2)


def test_global_loss_equals_eq1_over_the_gd_pairs() -> None:
    torch.manual_seed(1)
    tau = 0.1
    g1 = torch.randn(3 * N, 6, 1, 1, dtype=torch.float64)
    loss = GlobalContrastiveLoss("GD", temperature=tau)({"g1": g1}, {"volume_index": VOLUME, "slice_quantile": PARTITION})["global"]
    z = g1.flatten(1)
    expected_pos, expected_neg = paper_sets("GD")
    per_anchor = []
    for anchor in range(3 * N):
        partners = [j for i, j in expected_pos if i == anchor]
        per_anchor.append(sum(eq1(z, anchor, j, sorted(expected_neg[anchor]), tau) for j in partners) / len(partners))
    assert float(loss) == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-10)


# -- local loss (Sec. 3.3) ------------------------------------------------------------------------


def test_region_corners_13_distinct_3x3_inside_the_map() -> None:
    corners = region_corners(24, 20, region_size=3, num_regions=13)
    assert corners.shape == (13, 2) and len({tuple(c) for c in corners.tolist()}) == 13
    assert corners.min() >= 0 and (corners[:, 0] + 3 <= 24).all() and (corners[:, 1] + 3 <= 20).all()
    assert {(0, 0), (0, 17), (21, 0), (21, 17), (10, 8)} <= {tuple(c) for c in corners.tolist()}  # corners + centre
    with pytest.raises(ValueError, match="too small"):
        region_corners(6, 6)


def direct_local_loss(f: torch.Tensor, volume: torch.Tensor, partition: torch.Tensor, strategy: str, tau: float) -> float:
    """Eq. 4 as a sum of Eq. 3 terms over explicit regions ``f[b, :, r:r+3, c:c+3]`` (loops, no masks).

    ``f`` holds the two views stacked, (2 N, C, H, W).  Positives of region (u, v) of view ``t`` of
    image ``k``: the same region of the other view (L^R); for L^D also of the same view of every image
    of the same partition in another volume.  Negatives: the other regions of both views of image ``k``
    (L^R), of every image of its partition (L^D).
    """
    n = len(volume)
    corners = region_corners(f.shape[2], f.shape[3]).tolist()
    region = lambda t, k, a: f[t * n + k, :, corners[a][0] : corners[a][0] + 3, corners[a][1] : corners[a][1] + 3].flatten()  # noqa: E731
    sim = lambda p, q: float(F.cosine_similarity(p, q, dim=0)) / tau  # noqa: E731
    terms = []
    for t, k, a in itertools.product(range(2), range(n), range(len(corners))):
        anchor = region(t, k, a)
        images = [k] if strategy == "LR" else [m for m in range(n) if partition[m] == partition[k]]
        negatives = [region(w, m, b) for w in range(2) for m in images for b in range(len(corners)) if b != a]
        partners = [region(1 - t, k, a)]
        if strategy == "LD":
            partners += [region(t, m, a) for m in images if volume[m] != volume[k]]
        pair_terms = []
        for positive in partners:
            numerator = math.exp(sim(anchor, positive))
            pair_terms.append(-math.log(numerator / (numerator + sum(math.exp(sim(anchor, q)) for q in negatives))))
        terms.append(sum(pair_terms) / len(pair_terms))
    return sum(terms) / len(terms)  # 1/|X| sum_x 1/(2A) sum_(u,v) [l(x~, x^) + l(x^, x~)] for L^R


@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_local_loss_equals_eq3_evaluated_directly(strategy: str) -> None:
    torch.manual_seed(2)
    volume, partition = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    f = torch.randn(2 * 4, 3, 10, 9, dtype=torch.float64)  # hand-built g2 output: 2 views x 4 images
    loss = LocalContrastiveLoss(strategy, temperature=0.1)({"g2": f}, {"volume_index": volume, "slice_quantile": partition})["local"]
    assert float(loss) == pytest.approx(direct_local_loss(f, volume, partition, strategy, 0.1), rel=1e-10)


def test_local_masks_lr_pairs_only_within_an_image() -> None:
    positives, negatives = local_masks("LR", torch.tensor([0, 1]), torch.tensor([0, 0]), num_views=2, num_regions=13)
    image = (torch.arange(2 * 2 * 13) // 13) % 2
    across = image[:, None] != image[None, :]
    assert not (positives & across).any() and not (negatives & across).any()
    assert positives.sum(1).eq(1).all() and negatives.sum(1).eq(2 * 12).all()


# -- the local stage's network ---------------------------------------------------------------------


def test_local_stage_freezes_the_encoder_and_trains_the_decoder_blocks() -> None:
    unet = UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS)
    net = DecoderWithHeads(unet, {"g2": ProjectionHead(TINY[-2 - BLOCKS], TINY[-2 - BLOCKS], TINY[-2 - BLOCKS])}, BLOCKS)
    out = net.train()(torch.randn(2, 1, 32, 32))["g2"]
    assert out.shape == (2, TINY[-2 - BLOCKS], 8, 8)  # l = 2 up blocks: 1/4 resolution
    out.square().mean().backward()
    encoder_params = {id(p) for b in unet.encoder_blocks() for p in b.parameters()}
    assert all(p.grad is None for b in unet.encoder_blocks() for p in b.parameters())
    trainable = net.trainable_parameters()
    assert trainable and not any(id(p) in encoder_params for p in trainable)
    assert all(p.grad is not None for p in trainable)
    assert all(not b.training for b in unet.encoder_blocks())
    with pytest.raises(ValueError, match="num_decoder_blocks"):
        DecoderWithHeads(unet, {}, BLOCKS + 1)


def test_bundle_maps_each_flattened_region_through_a_learned_layer(repo_root: Path) -> None:
    """The authors' code (``wgt_en=1``, its default) maps each flattened 3 x 3 x C region by one bias-free dense
    layer to 128-d before the cosine; the bundle does it as a 3 x 3 valid convolution after g2, read at the
    regions' corners as 1 x 1 regions. ``region_projection: 0`` compares the raw flattened regions."""
    torch.manual_seed(4)
    parser = parsed_config(repo_root, PRETRAIN, features=TINY)
    net, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    mlp, layer = net.heads["g2"]
    assert isinstance(layer, torch.nn.Conv2d) and layer.bias is None and layer.out_channels == 128 and layer.kernel_size == (3, 3)
    assert layer.weight.requires_grad and any(p is layer.weight for p in net.trainable_parameters())
    decoded = torch.randn(4, TINY[-2 - BLOCKS], 12, 11)
    f, z = mlp(decoded), net.heads["g2"](decoded)
    corners, corners_out = region_corners(12, 11, 3), region_corners(*z.shape[2:], 1)
    assert torch.equal(corners, corners_out) and loss_fn.region_size == 1
    for r, c in corners.tolist():  # W . vec(region) for every region of every map
        region = f[:, :, r : r + 3, c : c + 3].flatten(1)
        torch.testing.assert_close(z[:, :, r, c], region @ layer.weight.flatten(1).T)
    raw = parsed_config(repo_root, PRETRAIN, features=TINY, region_projection=0)
    assert isinstance(raw.get_parsed_content("network").heads["g2"], ProjectionHead)
    assert raw.get_parsed_content("loss").region_size == 3


# -- the bundle ------------------------------------------------------------------------------------


def test_stage_lengths_paper_epochs_and_cpu_preset(repo_root: Path) -> None:
    """10^4 iterations per stage by default; --max_epochs switches to epochs; the CPU preset's max_iterations scales both."""
    with in_repo(repo_root):
        paper = parsed_config(repo_root, PRETRAIN)
        assert [paper.get_parsed_content(k) for k in ("global_iterations", "local_iterations")] == [10000, 10000]
        epochs = parsed_config(repo_root, PRETRAIN, max_epochs=1)
        assert [epochs.get_parsed_content(k) for k in ("global_iterations", "local_iterations")] == [0, 0]
        cpu = parsed_config(repo_root, PRETRAIN, CPU_PRESET)
        expected = json.loads((repo_root / CPU_PRESET).read_text())["cpu_iterations"]["pretrain"]
        assert [cpu.get_parsed_content(k) for k in ("global_iterations", "local_iterations")] == [expected, expected]


def test_results_runner_accepts_glcl() -> None:
    spec = parse_method("glcl")
    assert spec.bundle == "glcl" and spec.pretrain_config.is_file()
    variant = parse_method("glcl/gr_lr")
    assert variant.pretrain_overrides == {"global_strategy": "GR", "local_strategy": "LR"}


@pytest.fixture(scope="module")
def sample_run(repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("glcl_pretrain")
    with in_repo(repo_root):
        run_bundle(config_file=PRETRAIN, features=TINY, max_iterations=2, output_dir=str(out), cache_dir=str(cache_dir), num_threads=1)
    return out


def _network_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["network"]


@pytest.mark.slow
def test_sample_pretrain_trains_encoder_then_only_the_decoder_blocks(sample_run: Path) -> None:
    checkpoint = torch.load(sample_run / "encoder.pt", map_location="cpu", weights_only=True)
    assert checkpoint["method"] == "glcl" and list(checkpoint["network"]["features"]) == TINY
    reference = UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS)
    assert set(checkpoint["state_dict"]) == set(encoder_state_dict(reference, BLOCKS))
    stage1 = torch.load(sample_run / "encoder_global.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(stage1) == set(encoder_state_dict(reference)) < set(checkpoint["state_dict"])
    for key, value in stage1.items():  # stage 2 left the encoder exactly as stage 1 made it
        assert torch.equal(checkpoint["state_dict"][key], value), key
    # stage 1 did not touch the decoder blocks it carries, stage 2 changed them
    (global_ckpt,) = sample_run.glob("training_global_iteration=*.pt")
    (local_ckpt,) = sample_run.glob("training_checkpoint_iteration=*.pt")
    before, after = _network_state(global_ckpt), _network_state(local_ckpt)
    decoder_keys = [k for k in checkpoint["state_dict"] if k not in stage1]
    assert decoder_keys and all(torch.equal(after[f"encoder.{k}"], checkpoint["state_dict"][k]) for k in decoder_keys)
    assert any(not torch.equal(before[f"encoder.{k}"], after[f"encoder.{k}"]) for k in decoder_keys)


@pytest.mark.slow
def test_checkpoint_loads_into_finetune_network_with_decoder_blocks(sample_run: Path, repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    encoder = sample_run / "encoder.pt"
    network, pretrained = pretrained_decoder_checkpoint(encoder, TINY, BLOCKS)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert initialise_encoder(network, str(encoder)) == sorted(pretrained)
    for key, value in network.state_dict().items():
        assert torch.equal(value, pretrained.get(key, before[key])), key

    # the shared fine-tune workflow's own network, after its initialize step
    overrides = {"method": "glcl", "features": TINY, "max_iterations": 1, "pretrained_ckpt": str(encoder),
                 "runs_dir": str(tmp_path / "runs"), "output_dir": str(tmp_path / "out"), "cache_dir": str(cache_dir)}
    with in_repo(repo_root):
        workflow = create_workflow(config_file=FINETUNE, **overrides)
        state = workflow.parser.get_parsed_content("network").state_dict()
    for key in network.module_keys(network.decoder_blocks(BLOCKS)):
        assert torch.equal(state[key].cpu(), pretrained[key]), key


@pytest.mark.slow
def test_acdc_pretrain_one_epoch_eight_volumes(acdc_dir: Path, repo_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "acdc"
    with in_repo(repo_root):
        run_bundle(config_file=PRETRAIN, dataset="acdc", dataset_dir=str(acdc_dir), max_epochs=1, max_volumes=8,
                   features=TINY, output_dir=str(out), cache_dir=str(cache_dir), num_threads=1)
    (global_ckpt,) = out.glob("training_global_iteration=*.pt")
    (local_ckpt,) = out.glob("training_checkpoint_iteration=*.pt")
    assert global_ckpt.name.endswith("=00000001.pt") and local_ckpt.name.endswith("=00000001.pt")  # 8 volumes: one batch
    state = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == set(encoder_state_dict(UNetEncoder(features=TINY, keep_decoder_blocks=BLOCKS), BLOCKS))
