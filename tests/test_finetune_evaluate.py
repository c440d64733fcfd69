"""The shared fine-tune and evaluate workflows, end to end on the embedded sample (real data, real MLflow).

Tiny networks and a few iterations keep this cheap; what is checked is the contract of issue 5:
deterministic, nested draws of the L labelled volumes; ``model.pt`` loadable as weights only; one CSV
row per test volume; predictions with the source volume's affine and shape; metrics recomputed from
the saved predictions equal to the CSV and to what MLflow holds; a background-only model reported
(Dice 0, HD95 NaN, counted), not crashed on; and fine-tuning that starts from a GCL encoder.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from monai.bundle import create_workflow
from monai.bundle import run as run_bundle

from metacontrast.nets import SegmentationUNet
from metacontrast.nets.unet import PretrainedWeightsMismatch, encoder_state_dict
from metacontrast.errors import ConfigError
from metacontrast.workflows import FinetuneData, initialise_encoder, read_manifest, select_labeled
from metacontrast.data.transforms import volume_preprocessing
from metacontrast.workflows.evaluate import evaluate_split, run_evaluation, score_saved_predictions, to_source_grid
from metacontrast.workflows.metrics import flatten_summary
from metacontrast.tracking import local_tracking_uri, start_run
from tests.helpers import in_repo

FINETUNE = "bundles/common/configs/finetune.json"
EVALUATE = "bundles/common/configs/evaluate.json"
GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
SAMPLE_MANIFEST = "data_manifests/sample.json"
SAMPLE_DIR = "sample_data/hippocampus"


def same(a: float, b: float, rel: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def default_features() -> list[int]:
    """The U-Net widths the fine-tune workflow uses by default (paper scale)."""
    config = json.loads((Path(__file__).resolve().parents[1] / FINETUNE).read_text())
    return [int(f) for f in config["features"]]


#: the default network with every width divided by 4 (paper scale 32..512 -> 8..128): seconds on a CPU
TINY = [max(4, f // 4) for f in default_features()]


# ------------------------------------------------------------------------------------------------
# which L volumes a seed labels
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acdc_train_pool(repo_root: Path) -> list[dict[str, Any]]:
    """The real ACDC ``train`` pool (the manifest is committed; no image is read)."""
    pool = read_manifest(repo_root / "data_manifests" / "acdc.json")["train"]
    assert len(pool) > 8
    return pool


def _ids(pool: list[dict[str, Any]], num_labeled: int, seed: int) -> list[str]:
    return [pool[k]["volume_id"] for k in select_labeled(pool, num_labeled, seed)]


def test_select_labeled_same_seed_same_volumes(acdc_train_pool: list[dict[str, Any]]) -> None:
    first = _ids(acdc_train_pool, 2, seed=3)
    assert len(first) == len(set(first)) == 2
    assert _ids(acdc_train_pool, 2, seed=3) == first
    # the draw depends on the volumes, not on the order the manifest lists them in
    shuffled = list(acdc_train_pool)
    random.Random(0).shuffle(shuffled)
    assert sorted(_ids(shuffled, 2, seed=3)) == sorted(first)


def test_select_labeled_other_seed_other_volumes(acdc_train_pool: list[dict[str, Any]]) -> None:
    draws = {seed: frozenset(_ids(acdc_train_pool, 2, seed)) for seed in range(5)}
    assert draws[0] != draws[1]
    assert len(set(draws.values())) >= 4, draws  # seeds spread over the pool, not one fixed pair


def test_select_labeled_draws_are_nested(acdc_train_pool: list[dict[str, Any]]) -> None:
    for seed in range(3):
        l1, l2, l8 = (set(_ids(acdc_train_pool, n, seed)) for n in (1, 2, 8))
        assert (len(l1), len(l2), len(l8)) == (1, 2, 8)
        assert l1 <= l2 <= l8, (seed, l1, l2, l8)


def test_select_labeled_more_than_pool_raises(acdc_train_pool: list[dict[str, Any]]) -> None:
    n = len(acdc_train_pool)
    with pytest.raises(ConfigError, match=rf"\b{n}\b"):
        select_labeled(acdc_train_pool, n + 1, seed=0)
    with pytest.raises(ConfigError):
        select_labeled(acdc_train_pool, 0, seed=0)
    assert len(select_labeled(acdc_train_pool, n, seed=0)) == n


def test_finetune_data_rejects_l_above_pool(repo_root: Path) -> None:
    pool = read_manifest(repo_root / SAMPLE_MANIFEST)["train"]
    with in_repo(repo_root), pytest.raises(ConfigError, match=rf"1\.\.{len(pool)}\b"):
        FinetuneData(SAMPLE_MANIFEST, SAMPLE_DIR, "sample", num_labeled=len(pool) + 1)


# ------------------------------------------------------------------------------------------------
# one tiny fine-tune + evaluate through monai.bundle.run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("finetune")
    output_dir = root / "out"
    # batch 16 over one sample volume's ~35 slices: 3 steps an epoch, so 4 iterations = 2 epochs
    overrides = {
        "features": TINY, "max_iterations": 4, "val_interval": 1, "batch_size": 16, "seed": 0, "num_labeled": 1,
        "runs_dir": str(root / "runs"), "output_dir": str(output_dir), "cache_dir": str(cache_dir),
    }  # fmt: skip
    with in_repo(repo_root):
        run_bundle(config_file=FINETUNE, **overrides)
        run_bundle(config_file=EVALUATE, **overrides)
    manifest = read_manifest(repo_root / SAMPLE_MANIFEST)
    return {"output_dir": output_dir, "manifest": manifest, "root": root}


@pytest.fixture(scope="module")
def store(finetuned: dict[str, Any]) -> tuple[MlflowClient, dict[str, Any]]:
    """The default store the workflows used (SQLite under output_dir) and its runs by workflow tag."""
    client = MlflowClient(tracking_uri=local_tracking_uri(finetuned["output_dir"]))
    experiment = client.get_experiment_by_name("metacontrast-sample")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_workflow: dict[str, Any] = {}
    for run in runs:
        assert run.data.tags["workflow"] not in by_workflow, "one run per workflow expected"
        by_workflow[run.data.tags["workflow"]] = run
    assert set(by_workflow) == {"finetune", "evaluate"}
    return client, by_workflow


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_model_checkpoint_loads_weights_only(finetuned: dict[str, Any]) -> None:
    path = finetuned["output_dir"] / "model.pt"
    assert path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    network = SegmentationUNet(in_channels=1, out_channels=len(finetuned["manifest"]["labels"]), features=TINY)
    network.load_state_dict(state, strict=True)  # every key, every shape
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_metrics_csv_has_one_row_per_test_volume(finetuned: dict[str, Any]) -> None:
    rows = _read_csv(finetuned["output_dir"] / "evaluation" / "metrics.csv")
    test_ids = [e["volume_id"] for e in finetuned["manifest"]["test"]]
    assert [r["volume_id"] for r in rows] == test_ids
    for row in rows:
        for key in ("anterior", "posterior"):
            assert {f"dice_{key}", f"hd95_{key}", f"asd_{key}", f"status_{key}"} <= set(row)
            assert 0.0 <= float(row[f"dice_{key}"]) <= 1.0
    summary = json.loads((finetuned["output_dir"] / "evaluation" / "summary.json").read_text())
    assert summary["n_volumes"] == len(test_ids)


@pytest.mark.slow
def test_predictions_have_source_affine_and_shape(finetuned: dict[str, Any], repo_root: Path) -> None:
    for entry in finetuned["manifest"]["test"]:
        pred = nib.load(finetuned["output_dir"] / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz")
        source = nib.load(repo_root / SAMPLE_DIR / entry["image"])
        assert pred.shape == source.shape == tuple(entry["shape"])
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)
        values = np.unique(np.asarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1, 2}, values


def test_label_mapped_back_to_source_grid_is_the_source_label(repo_root: Path) -> None:
    """What evaluation does to a prediction (undo crop/pad and resampling), done to the preprocessed label:
    at the sample's native 1 mm the round trip is exact."""
    manifest = read_manifest(repo_root / SAMPLE_MANIFEST)
    entry = manifest["test"][0]
    settings = manifest["preprocessing"]
    preprocessing = volume_preprocessing(settings["pixel_size"], settings["spatial_size"])
    data = preprocessing({k: str(repo_root / SAMPLE_DIR / entry[k]) for k in ("image", "label")})
    assert tuple(data["label"].shape[1:3]) == tuple(settings["spatial_size"])
    restored = to_source_grid(torch.as_tensor(data["label"]).round().to(torch.uint8), data["image"], preprocessing)
    source = np.asarray(nib.load(repo_root / SAMPLE_DIR / entry["label"]).dataobj)
    assert tuple(restored.shape) == source.shape
    np.testing.assert_array_equal(restored.numpy(), source.round().astype(np.uint8))


@pytest.mark.slow
def test_metrics_recomputed_from_predictions_equal_csv_and_mlflow(
    finetuned: dict[str, Any], store: tuple[MlflowClient, dict[str, Any]], repo_root: Path
) -> None:
    manifest = finetuned["manifest"]
    recomputed = score_saved_predictions(
        manifest["test"], repo_root / SAMPLE_DIR, manifest["labels"], finetuned["output_dir"] / "evaluation" / "predictions"
    )
    rows = _read_csv(finetuned["output_dir"] / "evaluation" / "metrics.csv")
    assert len(recomputed) == len(rows)
    for new, old in zip(recomputed, rows):
        assert new["volume_id"] == old["volume_id"]
        for column, value in new.items():
            if column == "volume_id" or column.startswith("status_"):
                assert str(value) == old[column], column
            else:
                assert same(float(value), float(old[column])), (column, value, old[column])

    _, runs = store
    logged = runs["evaluate"].data.metrics
    dice_means = [float(r["dice_mean"]) for r in recomputed]
    assert same(logged["test_dice_mean"], float(np.mean(dice_means)))
    assert same(logged["test_hd95_mean"], float(np.nanmean([float(r["hd95_mean"]) for r in recomputed])))
    for key in ("anterior", "posterior"):
        assert same(logged[f"test_dice_{key}"], float(np.mean([float(r[f"dice_{key}"]) for r in recomputed])))
    assert logged["test_n_volumes"] == len(manifest["test"])


@pytest.mark.slow
def test_last_checkpoint_scored_beside_the_best(
    finetuned: dict[str, Any], store: tuple[MlflowClient, dict[str, Any]], repo_root: Path
) -> None:
    """evaluate scores model_final.pt (the last weights) as test_last_*, from its own predictions."""
    manifest, out = finetuned["manifest"], finetuned["output_dir"]
    assert (out / "model_final.pt").is_file()
    recomputed = score_saved_predictions(
        manifest["test"], repo_root / SAMPLE_DIR, manifest["labels"], out / "evaluation_last" / "predictions"
    )
    logged = store[1]["evaluate"].data.metrics
    assert same(logged["test_last_dice_mean"], float(np.mean([float(r["dice_mean"]) for r in recomputed])))
    assert logged["test_last_n_volumes"] == len(manifest["test"])
    best, last = (torch.load(out / name, weights_only=True) for name in ("model.pt", "model_final.pt"))
    if any(not torch.equal(best[k], last[k]) for k in best):  # different models: scored apart
        assert _read_csv(out / "evaluation" / "metrics.csv") != _read_csv(out / "evaluation_last" / "metrics.csv")


@pytest.mark.slow
def test_evaluate_run_tags_and_status(store: tuple[MlflowClient, dict[str, Any]], finetuned: dict[str, Any]) -> None:
    client, runs = store
    for workflow in ("finetune", "evaluate"):
        run = runs[workflow]
        tags = run.data.tags
        assert run.info.status == "FINISHED", workflow
        assert tags["workflow"] == workflow
        assert (tags["method"], tags["dataset"], tags["num_labeled"], tags["seed"]) == ("random", "sample", "1", "0")
    artifacts = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
    assert {"metrics.csv", "summary.json", "evaluation_last"} <= artifacts
    assert "model.pt" in {a.path for a in client.list_artifacts(runs["finetune"].info.run_id)}


@pytest.mark.slow
def test_finetune_logged_per_epoch_validation_dice(store: tuple[MlflowClient, dict[str, Any]], finetuned: dict[str, Any]) -> None:
    client, runs = store
    run = runs["finetune"]
    history = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert sorted(m.step for m in history) == [1, 2]  # validated after each of the two epochs
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]
    # the labelled volumes are logged, and they are the seed's draw
    pool = finetuned["manifest"]["train"]
    assert json.loads(run.data.params["labeled_volumes"]) == _ids(pool, 1, seed=0)
    assert run.data.params["pretrained_ckpt"] == ""


# ------------------------------------------------------------------------------------------------
# a model that predicts background only
# ------------------------------------------------------------------------------------------------


class BackgroundOnlyUNet(SegmentationUNet):
    """The project's U-Net whose logits always favour class 0 by a wide margin: it predicts background only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        margin = torch.full_like(logits, -10.0)
        margin[:, 0] = 10.0
        return logits * 0.0 + margin


def background_only_network(num_classes: int) -> SegmentationUNet:
    return BackgroundOnlyUNet(in_channels=1, out_channels=num_classes, features=TINY)


def test_background_only_model_is_reported_not_crashed_on(repo_root: Path, tmp_path: Path) -> None:
    manifest = read_manifest(repo_root / SAMPLE_MANIFEST)
    entries = manifest["test"][:1]
    network = background_only_network(len(manifest["labels"]))
    rows, summary = evaluate_split(
        network, entries, repo_root / SAMPLE_DIR, manifest["preprocessing"], manifest["labels"], tmp_path, device="cpu"
    )
    (row,) = rows
    for key in ("anterior", "posterior"):
        assert row[f"dice_{key}"] == 0.0
        assert math.isnan(row[f"hd95_{key}"]) and math.isnan(row[f"asd_{key}"])
        assert row[f"status_{key}"] == "empty_pred"
        assert summary["classes"][key]["n_empty_pred"] == 1
        assert summary["classes"][key]["dice"] == {"mean": 0.0, "std": 0.0, "n": 1}  # counted in the Dice mean
    assert row["dice_mean"] == 0.0 and row["n_empty_pred"] == 2
    assert summary["n_empty_pred"] == 2
    assert summary["volumes_with_empty_pred"] == [entries[0]["volume_id"]]
    assert summary["mean"]["hd95"]["n"] == 0 and math.isnan(summary["mean"]["hd95"]["mean"])

    pred = np.asarray(nib.load(tmp_path / "predictions" / f"{entries[0]['volume_id']}.nii.gz").dataobj)
    assert pred.shape == tuple(entries[0]["shape"]) and not pred.any()
    (csv_row,) = _read_csv(tmp_path / "metrics.csv")
    assert csv_row["hd95_anterior"] == "nan" and csv_row["n_empty_pred"] == "2"
    on_disk = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: NaN as null
    assert on_disk["mean"]["hd95"]["mean"] is None and on_disk["n_empty_pred"] == 2


def test_background_only_model_logged_to_mlflow(repo_root: Path, tmp_path: Path) -> None:
    """The evaluate workflow's run logs the miss: Dice 0, HD95 NaN, the count of empty predictions."""
    manifest = read_manifest(repo_root / SAMPLE_MANIFEST)
    ckpt = tmp_path / "background.pt"
    torch.save(SegmentationUNet(in_channels=1, out_channels=len(manifest["labels"]), features=TINY).state_dict(), ckpt)
    tags = {"workflow": "evaluate", "method": "background", "dataset": "sample", "num_labeled": 1, "seed": 0}
    tracking = start_run("", "background-only", "background-evaluate", tags, tmp_path)
    with in_repo(repo_root):
        summary = run_evaluation(
            background_only_network(len(manifest["labels"])), str(ckpt),
            SAMPLE_MANIFEST, SAMPLE_DIR, "sample", str(tmp_path), tracking, max_volumes=1,
        )  # fmt: skip
    assert summary["n_empty_pred"] == 2
    run = MlflowClient(local_tracking_uri(tmp_path)).get_run(tracking.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["test_dice_mean"] == 0.0
    assert math.isnan(metrics["test_hd95_mean"]) and math.isnan(metrics["test_asd_mean"])
    assert metrics["test_n_empty_pred"] == 2.0 and metrics["test_n_empty_pred_anterior"] == 1.0
    assert set(flatten_summary(summary)) <= set(metrics)


# ------------------------------------------------------------------------------------------------
# fine-tuning from a GCL encoder
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcl_encoder(repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("gcl_pretrain")
    with in_repo(repo_root):
        run_bundle(config_file=GCL_PRETRAIN, features=TINY, max_iterations=2, output_dir=str(out), cache_dir=str(cache_dir))
    encoder = out / "encoder.pt"
    assert encoder.is_file()
    return encoder


@pytest.mark.slow
def test_finetune_starts_from_gcl_encoder(
    gcl_encoder: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> None:
    checkpoint = torch.load(gcl_encoder, map_location="cpu", weights_only=True)
    assert checkpoint["method"] == "gcl" and list(checkpoint["network"]["features"]) == TINY
    pretrained = checkpoint["state_dict"]

    # a fresh U-Net initialised the way the workflow does it
    fresh = SegmentationUNet(in_channels=1, out_channels=3, features=TINY)
    assert set(pretrained) == set(encoder_state_dict(fresh)), "the whole encoder is pre-trained"
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert set(pretrained) < set(before), "the checkpoint is a strict subset (no decoder head)"
    assert any(not torch.equal(before[k], v) for k, v in pretrained.items()), "else loading would prove nothing"
    loaded = initialise_encoder(fresh, str(gcl_encoder))
    assert loaded == sorted(pretrained)
    after = fresh.state_dict()
    for key, value in before.items():
        expected = pretrained.get(key, value)  # encoder from the checkpoint, the rest (decoder) stays random
        assert torch.equal(after[key], expected), key

    # the fine-tune workflow's own network, after its initialize step and before any training step
    root = tmp_path_factory.mktemp("finetune_gcl")
    overrides = {
        "method": "gcl", "features": TINY, "max_iterations": 1, "val_interval": 1, "batch_size": 16,
        "pretrained_ckpt": str(gcl_encoder), "runs_dir": str(root / "runs"), "output_dir": str(root / "out"),
        "cache_dir": str(cache_dir),
    }  # fmt: skip
    with in_repo(repo_root):
        workflow = create_workflow(config_file=FINETUNE, **overrides)
        network = workflow.parser.get_parsed_content("network")
        at_start = network.state_dict()
        for key, value in pretrained.items():
            assert torch.equal(at_start[key].cpu(), value), key
        workflow.run()
        workflow.finalize()

    trained = torch.load(root / "out" / "model.pt", map_location="cpu", weights_only=True)
    assert any(not torch.equal(trained[k], v) for k, v in pretrained.items()), "the encoder is fine-tuned, not frozen"
    client = MlflowClient(local_tracking_uri(root / "out"))
    (run,) = client.search_runs([client.get_experiment_by_name("metacontrast-sample").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrained_ckpt"] == str(gcl_encoder) and run.data.tags["method"] == "gcl"


def test_encoder_lr_scale_slows_only_the_encoder() -> None:
    """One Adam step moves every weight by about its group's learning rate: encoder blocks by
    learning_rate * encoder_lr_scale, the decoder by learning_rate; scale 1.0 is today's single group."""
    from metacontrast.workflows import parameter_groups

    torch.manual_seed(0)
    network = SegmentationUNet(in_channels=1, out_channels=3, features=TINY)
    assert isinstance(parameter_groups(network, 1e-3, 1.0)[0], torch.nn.Parameter)
    groups = parameter_groups(network, 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), 1e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    encoder = {id(p) for block in network.encoder_blocks() for p in block.parameters()}
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    network(torch.randn(2, 1, 32, 32)).square().mean().backward()
    optimizer.step()
    steps = {True: [], False: []}
    for name, p in network.named_parameters():
        steps[id(p) in encoder].append(float((p.detach() - before[name]).abs().max()))
    assert max(steps[True]) <= 1.0001e-4 < max(steps[False]) <= 1.0001e-3
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        from metacontrast.workflows.data import check_settings

        check_settings({"encoder_lr_scale": 0.0})


@pytest.mark.slow
def test_frozen_encoder_option(gcl_encoder: Path) -> None:
    pretrained = torch.load(gcl_encoder, map_location="cpu", weights_only=True)["state_dict"]
    network = SegmentationUNet(in_channels=1, out_channels=3, features=TINY)
    initialise_encoder(network, str(gcl_encoder), freeze_encoder=True)
    frozen = {name for name, param in network.named_parameters() if not param.requires_grad}
    assert frozen == {name for name, _ in network.named_parameters() if name in pretrained}
    assert any(param.requires_grad for param in network.parameters()), "the decoder still trains"


@pytest.mark.slow
def test_encoder_with_wrong_widths_is_refused(
    gcl_encoder: Path, repo_root: Path, tmp_path: Path, cache_dir: Path
) -> None:
    wider = [2 * f for f in TINY]
    pretrained = torch.load(gcl_encoder, map_location="cpu", weights_only=True)["state_dict"]
    own = SegmentationUNet(in_channels=1, out_channels=3, features=wider).state_dict()
    key = next(k for k, v in pretrained.items() if own[k].shape != v.shape)  # the first key that cannot fit
    expected = f"{key}: {tuple(pretrained[key].shape)} vs {tuple(own[key].shape)}"
    with pytest.raises(PretrainedWeightsMismatch) as info:
        initialise_encoder(SegmentationUNet(in_channels=1, out_channels=3, features=wider), str(gcl_encoder))
    assert expected in str(info.value) and str(gcl_encoder) in str(info.value)

    # the same mistake made through the workflow stops it before any training, naming the key
    with in_repo(repo_root), pytest.raises(RuntimeError) as info:
        run_bundle(
            config_file=FINETUNE, method="gcl", features=wider, max_iterations=1, pretrained_ckpt=str(gcl_encoder),
            runs_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"), cache_dir=str(cache_dir),
        )  # fmt: skip
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, PretrainedWeightsMismatch):
        cause = cause.__cause__
    assert cause is not None, f"no PretrainedWeightsMismatch behind {info.value!r}"
    assert expected in str(cause) and str(gcl_encoder) in str(cause)
    assert not (tmp_path / "out" / "model.pt").exists()
