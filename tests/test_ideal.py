"""IDEAL pre-training (issue 7, item 2): the dense loss (Eq. 2) and the global term (Eq. 1) against direct
evaluations on hand-built views, the correspondence of locations across views, and the bundle end to end
(embedded sample and ACDC) into the fine-tune network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser, create_workflow
from monai.bundle import run as run_bundle

from metacontrast.data.augment import BatchAugmentation
from metacontrast.losses import CorrespondingViewsPrepareBatch, IDEALLoss, two_views_with_grids, view_correspondence
from metacontrast.nets import SegmentationUNet
from metacontrast.workflows import initialise_encoder
from metacontrast.reporting.grid import parse_method

from tests.helpers import in_repo

PRETRAIN = "bundles/ideal/configs/pretrain.json"
CPU_PRESET = "bundles/common/configs/presets/cpu.json"
TINY = [8, 16, 32, 64, 128]
DTYPE = torch.float64
SIZE, CELLS = 16, 4  # hand-built views: 16 x 16 pixels, 4 x 4 feature cells of 4 x 4 pixels


def _grid(theta: list[list[float]]) -> torch.Tensor:
    """(H, W, 2) sampling grid of one view from a 2 x 3 affine matrix (output -> input, normalised)."""
    return F.affine_grid(torch.tensor([theta], dtype=DTYPE), [1, 1, SIZE, SIZE], align_corners=False)[0]


IDENTITY = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
FLIP_X = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
FLIP_Y = [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
SHIFT_ONE_CELL = [[1.0, 0.0, 2.0 * CELLS / SIZE], [0.0, 1.0, 0.0]]  # the view shows the slice one cell (4 px) to the right


def _hand_built_views() -> tuple[torch.Tensor, dict[tuple[int, int], dict]]:
    """Grids (2, 3, H, W, 2) of three slices (view q: identity; view k: x-flip, y-flip, shift by one cell) and, for
    each (slice, direction), the corresponding cell written out by hand: ``{(a, b): (a', b') or None}``."""
    grids = torch.stack([torch.stack([_grid(IDENTITY)] * 3), torch.stack([_grid(FLIP_X), _grid(FLIP_Y), _grid(SHIFT_ONE_CELL)])])
    last = CELLS - 1
    cells = [(a, b) for a in range(CELLS) for b in range(CELLS)]
    expected = {
        (0, "qk"): {(a, b): (a, last - b) for a, b in cells}, (0, "kq"): {(a, b): (a, last - b) for a, b in cells},
        (1, "qk"): {(a, b): (last - a, b) for a, b in cells}, (1, "kq"): {(a, b): (last - a, b) for a, b in cells},
        # view k's cell b shows view q's cell b + 1: q's first column and k's last column have no partner
        (2, "qk"): {(a, b): (a, b - 1) if b > 0 else None for a, b in cells},
        (2, "kq"): {(a, b): (a, b + 1) if b < last else None for a, b in cells},
    }
    return grids, expected


def test_correspondence_of_hand_built_views() -> None:
    grids, expected = _hand_built_views()
    (match_qk, valid_qk), (match_kq, valid_kq) = view_correspondence(grids[0], grids[1], (CELLS, CELLS))
    for image in range(3):
        for direction, match, valid in (("qk", match_qk, valid_qk), ("kq", match_kq, valid_kq)):
            for (a, b), partner in expected[(image, direction)].items():
                i = a * CELLS + b
                assert bool(valid[image, i]) == (partner is not None), (image, direction, a, b)
                if partner is not None:
                    assert int(match[image, i]) == partner[0] * CELLS + partner[1], (image, direction, a, b)


def _eq2_direct(dense: torch.Tensor, expected: dict, tau: float) -> torch.Tensor:
    """Eq. 2 with loops: rows [q views; k views], positive at the hand-written partner, negatives every location
    of the key view of the other images; mean over each image's locations with a partner, then over
    (image, direction)."""
    n = len(dense) // 2
    per_image = []
    for image in range(n):
        for direction in ("qk", "kq"):
            q_rows, k_rows = (range(n), range(n, 2 * n)) if direction == "qk" else (range(n, 2 * n), range(n))
            q_map, k_maps = F.normalize(dense[q_rows[image]], dim=0), [F.normalize(dense[r], dim=0) for r in k_rows]
            terms = []
            for (a, b), partner in expected[(image, direction)].items():
                if partner is None:
                    continue
                q = q_map[:, a, b]
                positive = torch.exp(q @ k_maps[image][:, partner[0], partner[1]] / tau)
                negatives = sum(torch.exp(q @ k_maps[m][:, x, y] / tau)
                                for m in range(n) if m != image for x in range(CELLS) for y in range(CELLS))
                terms.append(-torch.log(positive / (positive + negatives)))
            per_image.append(sum(terms) / len(terms))
    return sum(per_image) / len(per_image)


def test_dense_loss_equals_eq2_on_hand_built_views() -> None:
    torch.manual_seed(0)
    tau = 0.2
    grids, expected = _hand_built_views()
    dense = torch.randn(6, 5, CELLS, CELLS, dtype=DTYPE, requires_grad=True)
    loss_fn = IDEALLoss(temperature=tau, global_weight=0.0)
    out = loss_fn({"dense": dense}, {"grid": grids})
    assert list(out) == ["local"]
    direct = _eq2_direct(dense, expected, tau)
    assert float(out["local"].detach()) == pytest.approx(float(direct.detach()), rel=1e-10)
    (grad,) = torch.autograd.grad(out["local"], dense)
    (grad_direct,) = torch.autograd.grad(direct, dense)
    torch.testing.assert_close(grad, grad_direct)
    assert loss_fn.last_terms["local/matched_fraction"] == pytest.approx(1 - 8 / (6 * CELLS * CELLS))


def test_dense_loss_positive_is_the_corresponding_location_not_the_same_one() -> None:
    """Under a flip the positive of a location is its mirror: evaluating Eq. 2 with same-location positives differs."""
    torch.manual_seed(1)
    grids, expected = _hand_built_views()
    dense = torch.randn(6, 5, CELLS, CELLS, dtype=DTYPE)
    same_place = {key: {cell: cell for cell in pairs} for key, pairs in expected.items()}
    loss = float(IDEALLoss(global_weight=0.0)({"dense": dense}, {"grid": grids})["local"])
    assert loss == pytest.approx(float(_eq2_direct(dense, expected, 0.1)), rel=1e-10)
    assert loss != pytest.approx(float(_eq2_direct(dense, same_place, 0.1)), rel=1e-3)


def test_global_term_equals_eq1() -> None:
    """Eq. 1 with loops: query = one view, k+ = the other view of its image, k- = the other view of other images."""
    torch.manual_seed(2)
    n, tau = 4, 0.1
    fmap = torch.randn(2 * n, 6, 3, 3, dtype=DTYPE)
    z = F.normalize(fmap.mean(dim=(2, 3)), dim=1)
    terms = []
    for row in range(2 * n):
        image, key_view = row % n, 1 - row // n
        positive = torch.exp(z[row] @ z[key_view * n + image] / tau)
        negatives = sum(torch.exp(z[row] @ z[key_view * n + m] / tau) for m in range(n) if m != image)
        terms.append(-torch.log(positive / (positive + negatives)))
    direct = sum(terms) / len(terms)
    out = IDEALLoss(temperature=tau, local_weight=0.0)({"img": fmap}, {})
    assert list(out) == ["global"]
    assert float(out["global"]) == pytest.approx(float(direct), rel=1e-10)
    # SimCLR's NT-Xent also contrasts the query's own view of the other images: a different number
    nt_xent = sum(-torch.log(torch.exp(z[r] @ z[(r + n) % (2 * n)] / tau) / sum(torch.exp(z[r] @ z[a] / tau) for a in range(2 * n) if a != r))
                  for r in range(2 * n)) / (2 * n)
    assert float(out["global"]) != pytest.approx(float(nt_xent), rel=1e-3)


def test_weights_scale_the_terms_and_bad_input_is_refused() -> None:
    torch.manual_seed(3)
    grids, _ = _hand_built_views()
    outputs = {"img": torch.randn(6, 4, 1, 1, dtype=DTYPE), "dense": torch.randn(6, 4, CELLS, CELLS, dtype=DTYPE)}
    plain = IDEALLoss()(outputs, {"grid": grids})
    weighted = IDEALLoss(global_weight=2.0, local_weight=0.5)(outputs, {"grid": grids})
    assert set(plain) == {"global", "local"}
    assert float(weighted["global"]) == pytest.approx(2.0 * float(plain["global"]))
    assert float(weighted["local"]) == pytest.approx(0.5 * float(plain["local"]))
    with pytest.raises(KeyError, match="grid"):
        IDEALLoss()(outputs, {})
    with pytest.raises(ValueError, match=r"grids must be \(2, 3"):
        IDEALLoss()(outputs, {"grid": grids[:, :2]})
    with pytest.raises(ValueError, match="not both 0"):
        IDEALLoss(global_weight=0.0, local_weight=0.0)
    with pytest.raises(ValueError, match="temperature"):
        IDEALLoss(temperature=0.0)


def test_views_are_the_shared_augmentation_and_their_grids_relate_them() -> None:
    """The prepare-batch draws exactly ``augment.two_views``; with flips only, the matched cell of the other view
    shows the same pixels (a 180-degree turn maps cells exactly)."""
    images = torch.rand(3, 1, 32, 32)
    views, grids = two_views_with_grids(BatchAugmentation(seed=5), images)
    reference = BatchAugmentation(seed=5).two_views(images)
    for view, ref in zip(views, reference):
        torch.testing.assert_close(view, ref)
    assert grids.shape == (2, 3, 32, 32, 2)

    flips = BatchAugmentation(flip_prob=1.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0,
                              gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0, seed=0)
    batch = {"image": images, "slice_quantile": torch.tensor([0, 1, 2])}
    inputs, targets = CorrespondingViewsPrepareBatch(flips, meta_keys=["slice_quantile"])(batch, "cpu")
    assert inputs.shape == (6, 1, 32, 32) and torch.equal(targets["slice_quantile"], batch["slice_quantile"])
    (match, valid), _ = view_correspondence(targets["grid"][0], targets["grid"][1], (4, 4))
    assert bool(valid.all())
    cells = F.avg_pool2d(inputs, 8).flatten(1)  # (6, 16) mean intensity of each 8 x 8 cell
    # both views are flipped on both axes, so they are identical and each cell matches itself
    torch.testing.assert_close(cells[3:].gather(1, match), cells[:3])
    assert torch.equal(match, torch.arange(16).expand(3, 16))
    one_flip = torch.stack([targets["grid"][0], targets["grid"][1].flip(2)])  # view k mirrored once more in x
    (match, _), _ = view_correspondence(one_flip[0], one_flip[1], (4, 4))
    mirrored = inputs[3:].flip(3)
    torch.testing.assert_close(F.avg_pool2d(mirrored, 8).flatten(1).gather(1, match), cells[:3])


# -- the bundle ------------------------------------------------------------------------------------


def _parsed(repo_root: Path, *config_files: str, **overrides: Any) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(repo_root / f) for f in config_files])
    parser.update(overrides)
    return parser


def test_config_heads_recipe_and_cpu_preset(repo_root: Path) -> None:
    with in_repo(repo_root):
        paper = _parsed(repo_root, PRETRAIN, device="cpu")
        assert paper.get_parsed_content("max_iterations") == 10000 and paper.get_parsed_content("temperature") == 0.1
        heads = paper.get_parsed_content("network").heads
        assert set(heads) == {"img", "dense"}
        convs = [m for m in heads["dense"].modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(1, 1), (1, 1)] and convs[0].in_channels == 512
        assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in heads["dense"].modules())
        pooled = _parsed(repo_root, PRETRAIN, device="cpu", **parse_method("ideal/pooled_dense_global").pretrain_overrides)
        assert set(pooled.get_parsed_content("network").heads) == {"dense"}
        assert pooled.get_parsed_content("loss").global_key == "dense"
        assert _parsed(repo_root, PRETRAIN, max_epochs=1).get_parsed_content("max_iterations") == 0
        cpu = _parsed(repo_root, PRETRAIN, CPU_PRESET)
        expected = json.loads((repo_root / CPU_PRESET).read_text())["cpu_iterations"]["pretrain"]
        assert cpu.get_parsed_content("max_iterations") == expected and cpu.get_parsed_content("features")[-1] == 256


def test_results_runner_accepts_ideal() -> None:
    spec = parse_method("ideal")
    assert spec.bundle == "ideal" and spec.pretrain_config.is_file()
    assert spec.workflow_configs("finetune")[-1].endswith("bundles/ideal/configs/finetune.json")  # cross pseudo supervision
    assert parse_method("ideal/paper_lr").pretrain_overrides == {"learning_rate": 1e-05}
    plain = parse_method("ideal/plain_finetune")  # IDEAL's pre-training (shared: no pretrain overrides), plain fine-tuning
    assert plain.pretrain_overrides == {} and plain.finetune_overrides == {"semi_supervised": "none"}


def _pretrain(repo_root: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """Run the bundle; check that encoder.pt loads into the fine-tune network with its weights unchanged."""
    with in_repo(repo_root):
        run_bundle(config_file=PRETRAIN, features=TINY, output_dir=str(out), cache_dir=str(out / "cache"), num_threads=1,
                   tracking_uri=f"sqlite:///{(out / 'mlruns.db').resolve()}", **overrides)
    checkpoint = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)
    assert checkpoint["method"] == "ideal" and list(checkpoint["network"]["features"]) == TINY
    network = SegmentationUNet(out_channels=4, features=TINY)
    loaded = initialise_encoder(network, str(out / "encoder.pt"))
    assert loaded and set(loaded) == set(checkpoint["state_dict"])
    assert set(loaded) == set(network.module_keys(network.encoder_blocks())), "the encoder, and only the encoder"
    own = network.state_dict()
    assert all(torch.equal(own[k], v) for k, v in checkpoint["state_dict"].items())
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(out / 'mlruns.db').resolve()}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    assert {"train_loss/global", "train_loss/local"} <= set(metrics)
    assert 0.5 < metrics["train_local/matched_fraction"] <= 1.0
    return checkpoint


@pytest.mark.slow
def test_pretrain_on_the_embedded_sample(repo_root: Path, tmp_path: Path) -> None:
    _pretrain(repo_root, tmp_path, max_iterations=2)
    encoder = tmp_path / "encoder.pt"
    pretrained = torch.load(encoder, map_location="cpu", weights_only=True)["state_dict"]
    # IDEAL's own fine-tune network (the configs the results runner merges for 'ideal'): two decoders, one encoder
    overrides = {"method": "ideal", "features": TINY, "max_iterations": 1, "pretrained_ckpt": str(encoder), "device": "cpu",
                 "runs_dir": str(tmp_path / "runs"), "output_dir": str(tmp_path / "finetune"), "cache_dir": str(tmp_path / "cache")}
    with in_repo(repo_root):
        workflow = create_workflow(config_file=parse_method("ideal").workflow_configs("finetune"), **overrides)
        assert workflow.parser.get_parsed_content("semi_supervised") == "cross_pseudo"
        network = workflow.parser.get_parsed_content("network")
        assert workflow.parser.get_parsed_content("pretrained_keys") == sorted(pretrained)
    state = network.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in pretrained.items())


@pytest.mark.slow
def test_pretrain_on_acdc(repo_root: Path, acdc_dir: Path, tmp_path: Path) -> None:
    checkpoint = _pretrain(repo_root, tmp_path, dataset="acdc", dataset_dir=str(acdc_dir), max_epochs=1, max_volumes=8)
    assert checkpoint["epoch"] == 1


def test_ideal_finetune_supervises_with_dice_plus_ce(repo_root: Path) -> None:
    """The card's statement: IDEAL's fine-tune (cross pseudo supervision) uses Dice + CE on labelled slices, as
    the authors' code; ``loss#lambda_dice 0`` gives Eq. 3's plain cross-entropy."""
    parser = ConfigParser()
    parser.read_config([str(repo_root / "bundles/common/configs/finetune.json"), str(repo_root / "bundles/ideal/configs/finetune.json")])
    assert parser["semi_supervised"] == "cross_pseudo"
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == "DiceCELoss" and loss.lambda_dice > 0 and loss.lambda_ce > 0
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    parser["loss#lambda_dice"] = 0.0
    ce_only = parser.get_parsed_content("loss", lazy=False)
    assert float(ce_only(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target[:, 0])), rel=1e-5)
