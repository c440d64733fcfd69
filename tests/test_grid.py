"""The results grid end to end (issue 5) and the CPU-scale preset end to end (issue 10).

* One call of :func:`metacontrast.reporting.grid.run_grid` on the embedded sample -- random init and
  GCL, L = 1, two seeds, tiny networks -- pre-trains GCL once, fine-tunes and evaluates all four
  combinations, and writes the CSV, the Markdown table (values = mean ± std of the MLflow runs) and
  the plot; the same call again starts no new run.
* The CPU preset (``bundles/common/configs/presets/cpu.json``, merged as a second config file) runs
  GCL pre-training, fine-tuning and evaluation on two ACDC volumes for two iterations, and its
  settings (2.734 mm / 96x96 slices, deepest width 256, GCL heads 256->256->128) take effect.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from monai.bundle import ConfigParser
from monai.bundle import run as run_bundle

from metacontrast.data.dicom import load_volume
from metacontrast.data.slices import slice_cache_key
from metacontrast.nets import SegmentationUNet
from metacontrast.nets.unet import encoder_state_dict
from metacontrast.workflows import read_manifest, usable_cores
from metacontrast.reporting.grid import run_grid
from tests.helpers import in_repo

pytestmark = pytest.mark.slow

CONFIGS = "bundles/common/configs"
PRESET = f"{CONFIGS}/presets/cpu.json"
GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def default_features() -> list[int]:
    """The U-Net widths of the workflows at paper scale (no preset)."""
    config = json.loads((Path(__file__).resolve().parents[1] / CONFIGS / "finetune.json").read_text())
    return [int(f) for f in config["features"]]


#: paper-scale widths / 4 (32..512 -> 8..128): seconds on a CPU
TINY = [max(4, f // 4) for f in default_features()]
#: the preset's promise: widths halved, so the deepest features are 256
CPU_FEATURES = [f // 2 for f in default_features()]


def conv_widths(state_dict: dict[str, torch.Tensor]) -> set[int]:
    """Output widths of the 2D convolutions in a state dict (independent of how the blocks are named)."""
    return {int(v.shape[0]) for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 4}


def all_runs(tracking_uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, max_results=10_000) if experiment_ids else []


# ------------------------------------------------------------------------------------------------
# issue 5: random init and GCL, L = 1, two seeds, from one call; rerun does nothing new
# ------------------------------------------------------------------------------------------------

METHODS = ["random", "gcl"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def grid(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("grid")
    kwargs = {
        "dataset": "sample",
        "dataset_dir": str(repo_root / "sample_data" / "hippocampus"),
        "methods": METHODS,
        "labeled": [1],
        "seeds": SEEDS,
        "runs_dir": str(root / "runs"),
        "results_dir": str(root / "results"),
        "overrides": {"features": TINY, "cache_dir": str(root / "cache")},
        "pretrain_overrides": {"max_iterations": 2},
        "finetune_overrides": {"max_iterations": 2, "val_interval": 1, "batch_size": 16},
    }
    tracking_uri = f"sqlite:///{(root / 'runs' / 'sample' / 'mlruns.db').resolve()}"
    first_log, second_log = io.StringIO(), io.StringIO()
    with in_repo(repo_root):
        with contextlib.redirect_stdout(first_log):
            paths = run_grid(**kwargs)
        runs_after_first = all_runs(tracking_uri)
        files_after_first = {name: path.read_bytes() for name, path in paths.items()}
        with contextlib.redirect_stdout(second_log):
            paths_again = run_grid(**kwargs)
        runs_after_second = all_runs(tracking_uri)
    print(first_log.getvalue(), second_log.getvalue())  # shown by pytest when a test fails
    return {
        "root": root, "paths": paths, "paths_again": paths_again, "tracking_uri": tracking_uri,
        "first_log": first_log.getvalue(), "second_log": second_log.getvalue(),
        "runs_after_first": runs_after_first, "runs_after_second": runs_after_second,
        "files_after_first": files_after_first,
    }  # fmt: skip


def _by_workflow(runs: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("workflow", "?"), []).append(run)
    return out


def test_grid_runs_every_combination_once(grid: dict[str, Any]) -> None:
    log = grid["first_log"]
    assert "FAILED" not in log and "[grid] all runs finished" in log, log
    runs = _by_workflow(grid["runs_after_first"])
    assert sorted(runs) == ["evaluate", "finetune", "pretrain"]
    assert [r.data.tags["method"] for r in runs["pretrain"]] == ["gcl"]  # once per method; random has none
    for workflow in ("finetune", "evaluate"):
        combos = sorted((r.data.tags["method"], r.data.tags["num_labeled"], r.data.tags["seed"]) for r in runs[workflow])
        assert combos == sorted((m, "1", str(s)) for m in METHODS for s in SEEDS), workflow
    assert all(r.info.status == "FINISHED" for r in grid["runs_after_first"])
    # the GCL rows were fine-tuned from the grid's GCL encoder, the random rows from nothing
    encoder = Path(grid["root"]) / "runs" / "sample" / "gcl" / "pretrain" / "encoder.pt"
    assert encoder.is_file()
    for run in runs["finetune"]:
        expected = str(encoder) if run.data.tags["method"] == "gcl" else ""
        assert run.data.params["pretrained_ckpt"] == expected


def test_grid_writes_csv_table_and_plot(grid: dict[str, Any]) -> None:
    paths = grid["paths"]
    out = Path(grid["root"]) / "results" / "sample"
    assert paths == {"csv": out / "evaluate_runs.csv", "table": out / "table.md", "plot": out / "dice_vs_L.png",
                     "comparison": out / "paper_comparison.md", "ablations": out / "ablations.md",
                     "validation": out / "validation.md", "runs": out / "runs.json", "store": out / "mlruns.db.xz"}
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    # the decision table: every fine-tuned row with its best validation Dice, gcl against random init
    validation = paths["validation"].read_text()
    assert "| random | 1 | " in validation and "| gcl | 1 | " in validation and "| random | " in validation.split("| gcl | 1 | ")[1]
    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000

    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    evaluate_ids = {r.info.run_id for r in _by_workflow(grid["runs_after_first"])["evaluate"]}
    assert {r["run_id"] for r in rows} == evaluate_ids
    assert all(r["used"] == "True" and r["dataset"] == "sample" for r in rows)


def _expected_cell(values: list[float], decimals: int) -> str:
    defined = np.asarray([v for v in values if not math.isnan(v)])
    if defined.size == 0:
        return "–"
    mark = "†" if defined.size < len(values) else ""
    return f"{defined.mean():.{decimals}f} ± {defined.std():.{decimals}f}{mark}"


def test_table_values_are_mean_and_std_of_the_mlflow_runs(grid: dict[str, Any]) -> None:
    table = grid["paths"]["table"].read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Method", "Dice L=1", "HD95 (mm) L=1", "ASD (mm) L=1", "Seeds"]
    evaluate_runs = _by_workflow(grid["runs_after_first"])["evaluate"]
    for method in METHODS:
        lines = [line for line in table.splitlines() if f'id="method-{method}"' in line]
        assert len(lines) == 1, (method, table)
        cells = [c.strip() for c in lines[0].strip("|").split("|")]
        assert cells[0].endswith(method)
        runs = [r for r in evaluate_runs if r.data.tags["method"] == method]
        assert len(runs) == len(SEEDS)
        for cell, (metric, decimals) in zip(cells[1:4], [("test_dice_mean", 3), ("test_hd95_mean", 2), ("test_asd_mean", 2)]):
            values = [float(r.data.metrics[metric]) for r in runs]
            assert cell == _expected_cell(values, decimals), (method, metric, values)
        assert cells[4] == str(len(SEEDS))
        dice = [float(r.data.metrics["test_dice_mean"]) for r in runs]
        assert all(0.0 <= d <= 1.0 for d in dice)


def test_rerun_starts_no_new_run(grid: dict[str, Any]) -> None:
    before = {r.info.run_id for r in grid["runs_after_first"]}
    after = {r.info.run_id for r in grid["runs_after_second"]}
    assert after == before and len(before) == 1 + 2 * len(METHODS) * len(SEEDS)
    log = grid["second_log"]
    assert "[grid] skip pretrain gcl" in log
    for method in METHODS:
        for seed in SEEDS:
            assert f"[grid] skip {method} L=1 seed={seed}" in log
    assert "[grid] finetune" not in log and "[grid] evaluate" not in log and "[grid] pretrain" not in log
    # the same runs give the same files
    assert grid["paths_again"] == grid["paths"]
    for name in ("csv", "table"):
        assert grid["paths"][name].read_bytes() == grid["files_after_first"][name], name



def test_overrides_the_command_line_left_as_text_are_refused(repo_root: Path) -> None:
    """``fire`` hands over ``{cache_dir: /tmp/x}`` (an unquoted path) as text, not a mapping: named, not a TypeError."""
    import fire

    argv = ["--dataset", "sample", "--dataset_dir", str(repo_root / "sample_data" / "hippocampus"),
            "--finetune_overrides", "{cache_dir: /tmp/x}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--finetune_overrides must be a mapping, got the text '\{cache_dir: /tmp/x\}'"):
        fire.Fire(run_grid, command=argv, name="run_grid.py")

# ------------------------------------------------------------------------------------------------
# issue 10: the CPU-scale preset end to end on two ACDC volumes for two iterations
# ------------------------------------------------------------------------------------------------

CPU_ACDC = {"pixel_size": [2.734, 2.734], "spatial_size": [96, 96]}


@pytest.mark.parametrize(
    ("config", "workflow", "iterations"),
    [(GCL_PRETRAIN, "pretrain", 240), (f"{CONFIGS}/finetune.json", "finetune", 600), (f"{CONFIGS}/evaluate.json", "evaluate", None)],
)
def test_preset_merges_over_every_workflow(repo_root: Path, config: str, workflow: str, iterations: int | None) -> None:
    with in_repo(repo_root):
        parser = ConfigParser()
        parser.read_config([config, PRESET])
        parser.update({"dataset": "acdc"})
        parser.parse()
        assert parser.get_parsed_content("workflow") == workflow
        features = list(parser.get_parsed_content("features"))
        assert features == CPU_FEATURES and max(features) == 256
        assert parser.get_parsed_content("preprocessing_overrides")["acdc"] == CPU_ACDC
        assert parser.get_parsed_content("num_threads") == usable_cores()
        if iterations is not None:
            assert parser.get_parsed_content("max_iterations") == iterations
        if workflow == "pretrain":
            assert (parser.get_parsed_content("head_hidden"), parser.get_parsed_content("head_out")) == (256, 128)
            # every other hyper-parameter as at full scale
            assert parser.get_parsed_content("batch_size") == 48 and parser.get_parsed_content("learning_rate") == 0.1
        if workflow == "finetune":
            assert parser.get_parsed_content("batch_size") == 5 and parser.get_parsed_content("learning_rate") == 1e-4


@pytest.fixture(scope="module")
def preset_run(repo_root: Path, acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cpu_preset")
    tracking_uri = f"sqlite:///{(root / 'mlruns.db').resolve()}"
    common = {
        "dataset": "acdc", "dataset_dir": str(acdc_dir), "max_volumes": 2, "cache_dir": str(root / "cache"),
        "tracking_uri": tracking_uri, "runs_dir": str(root / "runs"),
    }  # fmt: skip
    finetune = {
        **common, "method": "gcl", "num_labeled": 1, "seed": 0, "max_iterations": 2, "val_interval": 1,
        "pretrained_ckpt": str(root / "pretrain" / "encoder.pt"), "output_dir": str(root / "finetune"),
    }  # fmt: skip
    with in_repo(repo_root):
        run_bundle(config_file=[GCL_PRETRAIN, PRESET], **common, max_iterations=2, output_dir=str(root / "pretrain"))
        run_bundle(config_file=[f"{CONFIGS}/finetune.json", PRESET], **finetune)
        run_bundle(config_file=[f"{CONFIGS}/evaluate.json", PRESET], **finetune)
    runs = _by_workflow(all_runs(tracking_uri))
    manifest = read_manifest(repo_root / "data_manifests" / "acdc.json")
    return {"root": root, "runs": runs, "manifest": manifest, "tracking_uri": tracking_uri}


def test_preset_pretrain_is_half_width(preset_run: dict[str, Any]) -> None:
    checkpoint = torch.load(preset_run["root"] / "pretrain" / "encoder.pt", map_location="cpu", weights_only=True)
    assert checkpoint["method"] == "gcl" and list(checkpoint["network"]["features"]) == CPU_FEATURES
    assert conv_widths(checkpoint["state_dict"]) == set(CPU_FEATURES)  # 16 .. 256: deepest features 256
    (run,) = preset_run["runs"]["pretrain"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["head_hidden"], params["head_out"]) == ("256", "128")
    assert json.loads(params["preprocessing_overrides.acdc.pixel_size"]) == [2.734, 2.734]
    assert checkpoint["iteration"] >= 2 and int(params["max_iterations"]) == 2


def test_preset_slices_are_2734mm_96x96(preset_run: dict[str, Any], acdc_dir: Path) -> None:
    """Every slice cache the three workflows built is keyed by (2.734 mm, 96x96) and holds 96x96 slices."""
    manifest, cache_dir = preset_run["manifest"], preset_run["root"] / "cache"
    expected = {
        slice_cache_key(manifest["pretrain"][:2], acdc_dir, **CPU_ACDC, with_labels=False),
        slice_cache_key(manifest["train"][:2], acdc_dir, **CPU_ACDC, with_labels=True),
        slice_cache_key(manifest["val"][:2], acdc_dir, **CPU_ACDC, with_labels=True),
    }
    assert {p.name for p in cache_dir.glob("slices-*.pt")} == {f"slices-{key[:32]}.pt" for key in expected}
    for path in cache_dir.glob("slices-*.pt"):
        images = torch.load(path, map_location="cpu", weights_only=True)["images"]
        assert tuple(images.shape[1:]) == (1, 96, 96), path


def test_preset_finetune_and_evaluate(preset_run: dict[str, Any], acdc_dir: Path) -> None:
    root, runs, manifest = preset_run["root"], preset_run["runs"], preset_run["manifest"]
    state = torch.load(root / "finetune" / "model.pt", map_location="cpu", weights_only=True)
    network = SegmentationUNet(in_channels=1, out_channels=4, features=CPU_FEATURES)
    network.load_state_dict(state, strict=True)
    assert conv_widths(encoder_state_dict(network)) == set(CPU_FEATURES)

    (finetune,) = runs["finetune"]
    (evaluate,) = runs["evaluate"]
    assert finetune.info.status == evaluate.info.status == "FINISHED"
    assert json.loads(finetune.data.params["features"]) == CPU_FEATURES
    assert json.loads(finetune.data.params["preprocessing_overrides.acdc.spatial_size"]) == [96, 96]
    assert finetune.data.params["pretrained_ckpt"] == str(root / "pretrain" / "encoder.pt")
    history = MlflowClient(preset_run["tracking_uri"]).get_metric_history(finetune.info.run_id, "val_mean_dice")
    assert [m.step for m in history] == [1]  # validated on the 96x96 val volumes

    with open(root / "finetune" / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_entries = manifest["test"][:2]
    assert [r["volume_id"] for r in rows] == [e["volume_id"] for e in test_entries]
    assert evaluate.data.metrics["test_n_volumes"] == 2.0
    assert 0.0 <= evaluate.data.metrics["test_dice_mean"] <= 1.0
    # predictions from 96x96 slices at 2.734 mm land on the source grid (1.5625 mm x 10 mm, flipped axes)
    for entry in test_entries:
        path = root / "finetune" / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz"
        pred, source = load_volume(path), load_volume(acdc_dir / entry["image"])
        assert tuple(pred.shape) == tuple(source.shape) == tuple(entry["shape"])
        np.testing.assert_allclose(pred.affine.numpy(), source.affine.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.abs(np.diag(pred.affine.numpy()))[:3], entry["spacing"], rtol=1e-5)


def test_preset_predictions_keep_the_source_nifti_affine(preset_run: dict[str, Any], acdc_dir: Path) -> None:
    """The prediction file has the same affine as its source file, read the same way (nibabel, 1e-5)."""
    for entry in preset_run["manifest"]["test"][:2]:
        path = preset_run["root"] / "finetune" / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz"
        pred, source = nib.load(path), nib.load(acdc_dir / entry["image"])
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)


def test_unimplemented_semi_supervised_add_on_is_refused() -> None:
    """'gcl+mean_teacher' fine-tunes with Mean Teacher (semi_supervised is passed on); an unknown add-on is
    refused rather than run as plain fine-tuning under its label."""
    from metacontrast.reporting.grid import parse_method

    with pytest.raises(ValueError, match=r"unknown semi-supervised add-on 'fixmatch'; known: mean_teacher, mixup, cross_pseudo"):
        parse_method("gcl+fixmatch")
    assert parse_method("gcl+mean_teacher").finetune_overrides == {"semi_supervised": "mean_teacher"}
    assert parse_method("random+mixup").finetune_overrides == {"semi_supervised": "mixup"}
    assert parse_method("gcl+cross_pseudo@improved").finetune_overrides == {"semi_supervised": "cross_pseudo", "learning_rate": 0.001, "batch_size": 8, "max_iterations": 2000}
    assert parse_method("gcl@improved").finetune_overrides == {"learning_rate": 0.001, "batch_size": 8, "max_iterations": 2000}
    assert parse_method("gcl+mixup").bundle == "gcl"  # the pre-training is GCL's


def test_row_names_split_once_and_name_their_pre_training() -> None:
    """One grammar, ``<bundle>[/<variant>][+<add-on>][@<recipe>]``: a pre-training ablation runs under its
    own name, a fine-tune-only variant and an add-on reuse the bundle's pre-training, random init has none."""
    from metacontrast.reporting.grid import parse_method
    from metacontrast.method_name import MethodName, split_method_name, with_recipe

    parts = split_method_name("gcl/naive_sum+mean_teacher@improved")
    assert parts == MethodName("gcl", "naive_sum", "mean_teacher", "improved")
    assert parts.without_recipe == "gcl/naive_sum+mean_teacher"
    assert split_method_name("random") == MethodName("random", "", "", "")
    assert (with_recipe("random", "improved"), with_recipe("random", "")) == ("random@improved", "random")
    assert parse_method("gcl/no_filter@improved").pretraining == "gcl/no_filter"
    assert parse_method("gcl/frozen_encoder").pretraining == "gcl"
    assert parse_method("gcl+mean_teacher@improved").pretraining == "gcl"
    assert parse_method("random@improved").pretraining is None


def test_an_ablation_of_a_variant_applies_its_overrides_over_the_variants() -> None:
    """``gcl/warmup_clip.no_filter`` is the variant ``warmup_clip`` without GradFilter: both rows' overrides,
    the ablation's last; it is pre-trained under its own name, a fine-tune-only ablation reuses the variant's
    encoder, and it is compared with the variant; an unknown part is refused by name."""
    from metacontrast.reporting.grid import parse_method
    from metacontrast.reporting.tables import full_method

    spec = parse_method("gcl/warmup_clip.no_filter@improved")
    assert spec.pretrain_overrides == {"warmup_iterations": 10, "grad_clip_norm": 1.0, "use_grad_filter": False}
    assert spec.pretraining == "gcl/warmup_clip.no_filter"
    assert parse_method("gcl/warmup_clip.frozen_encoder").pretraining == "gcl/warmup_clip"
    assert parse_method("gcl/warmup_clip.frozen_encoder").finetune_overrides == {"freeze_encoder": True}
    assert full_method("gcl/warmup_clip.no_filter@improved") == "gcl/warmup_clip@improved"
    assert full_method("gcl/no_filter@improved") == "gcl@improved"
    with pytest.raises(ValueError, match=r"ablations.json defines no variant 'no_such'"):
        parse_method("gcl/warmup_clip.no_such")


def test_method_names_from_the_command_line() -> None:
    """fire passes '[random@improved,gcl+mixup]' as one string: it becomes two rows, not one per character."""
    from metacontrast.reporting.grid import method_names

    assert method_names("[random@improved, gcl+mixup]") == ["random@improved", "gcl+mixup"]
    assert method_names("['random@improved','gcl']") == ["random@improved", "gcl"]
    assert method_names(("random", "gcl/naive_sum")) == ["random", "gcl/naive_sum"]


def test_bundle_finetune_defaults_are_merged_over_the_common_configs(repo_root: Path) -> None:
    """A bundle with configs/finetune.json (IDEAL: cross pseudo supervision) gets it merged over the common
    fine-tune and evaluate configs; a bundle without one runs the common configs alone."""
    from metacontrast.reporting.grid import parse_method

    own = repo_root / "bundles" / "ideal" / "configs" / "finetune.json"
    if not (repo_root / "bundles" / "ideal" / "configs" / "pretrain.json").is_file():
        pytest.skip("the IDEAL bundle has no pretrain.json yet")
    for workflow in ("finetune", "evaluate"):
        files = parse_method("ideal").workflow_configs(workflow)
        assert files == [str(repo_root / CONFIGS / f"{workflow}.json"), str(own)]
        parser = ConfigParser()
        parser.read_config(files)
        assert parser["semi_supervised"] == "cross_pseudo"
        assert parse_method("gcl").workflow_configs(workflow) == [str(repo_root / CONFIGS / f"{workflow}.json")]
    with in_repo(repo_root):
        parser = ConfigParser()
        parser.read_config(parse_method("ideal").workflow_configs("evaluate"))
        parser.parse()
        assert parser.get_parsed_content("network").__class__.__name__ == "DualDecoderUNet"


def test_random_init_variants_build_the_network_of_the_encoder_they_are_compared_with() -> None:
    """'random/batch_norm@improved' is random init of the batch-norm U-Net (no pre-training) under the recipe;
    an unknown variant is refused naming the file and the known variants; the probe grid's random rows agree."""
    from metacontrast.reporting.grid import parse_method
    from metacontrast.reporting.probe_grid import encoder_entry

    spec = parse_method("random/batch_norm@improved")
    assert spec.pretraining is None
    assert spec.finetune_overrides == {"norm": "batch", "learning_rate": 0.001, "batch_size": 8, "max_iterations": 2000}
    assert parse_method("random").finetune_overrides == {}
    with pytest.raises(ValueError, match=r"random_init\.json defines no random-init variant 'group_norm' \(has \['batch_norm'\]\)"):
        parse_method("random/group_norm")
    assert encoder_entry("random/batch_norm", "runs", "acdc") == ("random/batch_norm", "")
    assert encoder_entry("random", "runs", "acdc") == ("random", "")
