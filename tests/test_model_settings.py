"""A fine-tuned model carries its preprocessing (issue 20, item 5), on real ACDC volumes and a real MLflow store.

A CPU-preset model (2.734 mm, 96x96) evaluated through a manifest of another name -- whose own preprocessing is
ACDC's full scale, 1.367 mm and 192x192, and which ``preprocessing_overrides`` (keyed by dataset name) does
not reach -- is run at its own preprocessing; a config that asks for something else is refused with
:class:`ModelSettingsConflict` naming the file, the key and both values; ``allow_preprocessing_override``
runs it anyway and warns; a checkpoint written before models recorded their settings is evaluated as before.
The exporter does the same: the bundle of that model, exported through the other manifest, states the model's
preprocessing and network, and its ``models/model.pt`` still records them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from monai.bundle import run as run_bundle

from metacontrast.export.bundle import export_bundle
from metacontrast.nets import SegmentationUNet
from metacontrast.workflows.model_settings import MODEL_SETTINGS_KEY, ModelSettingsConflict, read_model_settings, settings_equal
from metacontrast.workflows.data import read_manifest
from metacontrast.workflows.evaluate import settings_for_evaluation
from tests.helpers import in_repo

CONFIGS = "bundles/common/configs"
PRESET = f"{CONFIGS}/presets/cpu.json"
CPU_FEATURES = [16, 32, 64, 128, 256]  # the preset's widths
ACDC_LABELS = {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}


def _cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``err`` or the first exception of its ``__cause__``/``__context__`` chain that is a ``kind`` (MONAI wraps)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@pytest.fixture(scope="module")
def cpu_model(repo_root: Path, acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """A CPU-preset fine-tune on ACDC (its widths 16..256; 2 volumes, 2 iterations) and a manifest of other patients
    named ``acdc_other`` (ACDC's full-scale preprocessing block, no ``preprocessing_overrides`` entry)."""
    root = tmp_path_factory.mktemp("model_settings")
    tracking_uri = f"sqlite:///{(root / 'mlruns.db').resolve()}"
    finetune = {
        "dataset": "acdc", "dataset_dir": str(acdc_dir), "max_volumes": 2, "num_labeled": 1, "seed": 0,
        "max_iterations": 2, "val_interval": 1, "cache_dir": str(cache_dir), "tracking_uri": tracking_uri,
        "runs_dir": str(root / "runs"), "output_dir": str(root / "finetune"),
    }  # fmt: skip
    with in_repo(repo_root):
        run_bundle(config_file=[f"{CONFIGS}/finetune.json", PRESET], **finetune)
    manifest = read_manifest(repo_root / "data_manifests" / "acdc.json")
    other = {**manifest, "test": manifest["test"][2:3]}  # a patient the fine-tune never saw
    assert other["preprocessing"] == {"pixel_size": [1.367, 1.367], "spatial_size": [192, 192]}
    (root / "acdc_other.json").write_text(json.dumps(other))
    evaluate = {
        "dataset": "acdc_other", "datalist": str(root / "acdc_other.json"), "dataset_dir": str(acdc_dir),
        "ckpt": str(root / "finetune" / "model.pt"), "last_ckpt": "", "method": "random", "num_labeled": 1, "seed": 0,
    }  # fmt: skip
    return {"root": root, "tracking_uri": tracking_uri, "evaluate": evaluate, "ckpt": root / "finetune" / "model.pt"}


def _console(capsys: pytest.CaptureFixture) -> list[str]:
    captured = capsys.readouterr()
    return (captured.out + captured.err).splitlines()


def _evaluate(repo_root: Path, cpu_model: dict[str, Any], name: str, **overrides: Any) -> dict[str, str]:
    """Run evaluate.json + the CPU preset through the other manifest (its own store under ``name``); the run's params."""
    out = cpu_model["root"] / name
    tracking_uri = f"sqlite:///{(out / 'mlruns.db').resolve()}"
    out.mkdir()
    with in_repo(repo_root):
        run_bundle(config_file=[f"{CONFIGS}/evaluate.json", PRESET],
                   **{**cpu_model["evaluate"], "output_dir": str(out), "tracking_uri": tracking_uri, **overrides})  # fmt: skip
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("metacontrast-acdc_other").experiment_id])
    assert run.info.status == "FINISHED" and (out / "evaluation" / "metrics.csv").is_file()
    return run.data.params


def test_finetune_writes_its_settings_into_model_pt(cpu_model: dict[str, Any]) -> None:
    for name in ("model.pt", "model_final.pt"):
        path = cpu_model["root"] / "finetune" / name
        settings = read_model_settings(path)
        assert settings is not None, name
        assert settings["format"] == 1 and settings["dataset"] == "acdc" and settings["workflow"] == "finetune"
        assert settings["preprocessing"]["pixel_size"] == [2.734, 2.734] and settings["preprocessing"]["spatial_size"] == [96, 96]
        assert settings["preprocessing"]["intensity"] == {"transform": "ScaleIntensityRangePercentiles", "lower": 1, "upper": 99, "b_min": 0.0,
                                                          "b_max": 1.0, "clip": True, "relative": False, "channel_wise": False}  # fmt: skip
        assert settings["network"] == {"class": "SegmentationUNet", "in_channels": 1, "out_channels": 4, "features": CPU_FEATURES, "norm": "instance"}
        assert settings["labels"] == ACDC_LABELS
        # still a plain state dict: loads weights-only into the network as every earlier model.pt did
        state = torch.load(path, map_location="cpu", weights_only=True)
        SegmentationUNet(in_channels=1, out_channels=4, features=CPU_FEATURES).load_state_dict(state, strict=True)


def test_other_manifest_is_evaluated_at_the_models_preprocessing(repo_root: Path, cpu_model: dict[str, Any]) -> None:
    """The manifest says 1.367 mm / 192x192 and no override names ``acdc_other``: the model's 2.734 mm / 96x96 is used."""
    params = _evaluate(repo_root, cpu_model, "eval_other")
    assert json.loads(params["preprocessing.pixel_size"]) == [2.734, 2.734]
    assert json.loads(params["preprocessing.spatial_size"]) == [96, 96]
    assert params["preprocessing.source"] == "model"
    resolved = settings_for_evaluation(str(cpu_model["ckpt"]), cpu_model["evaluate"]["datalist"], "acdc_other", {})
    assert resolved["preprocessing"]["spatial_size"] == [96, 96] and resolved["network"]["features"] == CPU_FEATURES


def test_conflicting_explicit_setting_is_refused_by_name(repo_root: Path, cpu_model: dict[str, Any]) -> None:
    ckpt, datalist = str(cpu_model["ckpt"]), cpu_model["evaluate"]["datalist"]
    asked = {"acdc_other": {"pixel_size": [1.367, 1.367]}}
    with pytest.raises(ModelSettingsConflict) as info:
        settings_for_evaluation(ckpt, datalist, "acdc_other", asked)
    err = info.value
    assert (err.key, err.model_value, err.requested_value) == ("pixel_size", [2.734, 2.734], [1.367, 1.367])
    assert ckpt in str(err) and "pixel_size" in str(err) and "2.734" in str(err) and "1.367" in str(err)
    assert "allow_preprocessing_override" in str(err)
    with pytest.raises(ModelSettingsConflict, match=r"network\.features.*\[8, 16, 32, 64, 128\]"):
        settings_for_evaluation(ckpt, datalist, "acdc_other", {}, features=[8, 16, 32, 64, 128])
    # through the workflow: refused before any MLflow run or output is made
    out = cpu_model["root"] / "eval_refused"
    with in_repo(repo_root), pytest.raises(Exception) as info:
        run_bundle(config_file=[f"{CONFIGS}/evaluate.json", PRESET], **{**cpu_model["evaluate"], "output_dir": str(out)},
                   preprocessing_overrides=asked)  # fmt: skip
    assert _cause(info.value, ModelSettingsConflict) is not None
    assert not (out / "evaluation").exists()


def test_override_flag_runs_the_requested_preprocessing_and_warns(repo_root: Path, cpu_model: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    asked = {"acdc_other": {"spatial_size": [128, 128]}}
    params = _evaluate(repo_root, cpu_model, "eval_override", preprocessing_overrides=asked, allow_preprocessing_override=True)
    assert json.loads(params["preprocessing.spatial_size"]) == [128, 128]
    assert json.loads(params["preprocessing.pixel_size"]) == [2.734, 2.734]  # what was not asked for stays the model's
    assert params["preprocessing.source"] == "model+override"
    # the bundle's logging.conf sends the package's log records to the console
    warned = [line for line in _console(capsys) if "WARNING" in line and "allow_preprocessing_override" in line]
    assert warned and "spatial_size [128, 128]" in warned[0] and "[96, 96]" in warned[0] and str(cpu_model["ckpt"]) in warned[0]


def test_checkpoint_without_settings_is_evaluated_as_before(repo_root: Path, cpu_model: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    """A model.pt written before fine-tuning recorded its settings: the manifest's preprocessing, with a warning."""
    legacy = cpu_model["root"] / "legacy" / "model.pt"
    legacy.parent.mkdir()
    state = torch.load(cpu_model["ckpt"], map_location="cpu", weights_only=True)
    torch.save(dict(state), legacy)  # a plain dict: no _metadata, as every model.pt before
    assert read_model_settings(legacy) is None
    params = _evaluate(repo_root, cpu_model, "eval_legacy", ckpt=str(legacy))
    assert json.loads(params["preprocessing.pixel_size"]) == [1.367, 1.367]  # the manifest's, as before this change
    assert json.loads(params["preprocessing.spatial_size"]) == [192, 192]
    assert params["preprocessing.source"] == "config"
    assert any("WARNING" in line and "records no preprocessing" in line and str(legacy) in line for line in _console(capsys))


def test_settings_equal_and_metadata_key() -> None:
    assert settings_equal([2.734, 2.734], (2.7340000001, 2.734)) and not settings_equal([96, 96], [192, 192])
    assert settings_equal({"0": "a"}, {0: "a"}) and not settings_equal(True, 1)
    assert MODEL_SETTINGS_KEY.startswith(".")  # never a module prefix


# ------------------------------------------------------------------------------------------------
# the exporter takes the model's settings too
# ------------------------------------------------------------------------------------------------


def _export(cpu_model: dict[str, Any], name: str, **options: Any) -> Path:
    """Export the CPU-preset model from its checkpoint through the manifest named ``acdc_other``."""
    return Path(export_bundle(dest=str(cpu_model["root"] / "dist" / name), ckpt=str(cpu_model["ckpt"]), dataset="acdc_other",
                              datalist=cpu_model["evaluate"]["datalist"], results_dir=None, **options))  # fmt: skip


def _bundle_config(dest: Path, name: str) -> dict[str, Any]:
    return json.loads((dest / "configs" / name).read_text())


def test_export_through_another_manifest_states_the_models_settings(cpu_model: dict[str, Any]) -> None:
    dest = _export(cpu_model, "other")
    inference, train = _bundle_config(dest, "inference.json"), _bundle_config(dest, "train.json")
    assert (inference["pixel_size"], inference["spatial_size"], inference["features"]) == ([2.734, 2.734], [96, 96], CPU_FEATURES)
    assert train["preprocessing_overrides"]["acdc_other"] == {"pixel_size": [2.734, 2.734], "spatial_size": [96, 96]}
    assert train["features"] == CPU_FEATURES  # the model's, not finetune.json's default
    image = _bundle_config(dest, "metadata.json")["network_data_format"]["inputs"]["image"]
    assert (image["pixdim"], image["spatial_shape"]) == ([2.734, 2.734], [96, 96])
    # the shipped weights keep their record, so the bundle's evaluate runs them at their own preprocessing
    shipped = dest / "models" / "model.pt"
    assert settings_equal(read_model_settings(shipped), read_model_settings(cpu_model["ckpt"]))
    evaluate = _bundle_config(dest, "evaluate.json")
    assert evaluate["allow_preprocessing_override"] is False
    resolved = settings_for_evaluation(str(shipped), str(dest / "configs" / "datalist.json"), evaluate["dataset"], evaluate["preprocessing_overrides"])
    assert resolved["recorded"] and resolved["preprocessing"]["spatial_size"] == [96, 96] and resolved["network"]["features"] == CPU_FEATURES


def test_conflicting_export_option_is_refused_by_name(cpu_model: dict[str, Any]) -> None:
    with pytest.raises(ModelSettingsConflict) as info:
        _export(cpu_model, "refused", pixel_size=[1.367, 1.367])
    assert (info.value.key, info.value.model_value, info.value.requested_value) == ("pixel_size", [2.734, 2.734], [1.367, 1.367])
    assert "allow_preprocessing_override" in str(info.value) and str(cpu_model["ckpt"]) in str(info.value)
    with pytest.raises(ModelSettingsConflict, match=r"network\.features.*\[8, 16, 32, 64, 128\]"):
        _export(cpu_model, "refused", features=[8, 16, 32, 64, 128], allow_preprocessing_override=True)  # never for the network
    assert not (cpu_model["root"] / "dist" / "refused").exists()


def test_export_override_flag_exports_the_requested_preprocessing_and_warns(cpu_model: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dest = _export(cpu_model, "override", spatial_size=[128, 128], allow_preprocessing_override=True)
    inference = _bundle_config(dest, "inference.json")
    assert (inference["pixel_size"], inference["spatial_size"]) == ([2.734, 2.734], [128, 128])
    warned = [r.getMessage() for r in caplog.records if "allow_preprocessing_override" in r.getMessage()]
    assert warned and "spatial_size [128, 128]" in warned[0] and "[96, 96]" in warned[0]
    # the weights still say what they were fine-tuned with; the bundle's evaluate states the override
    assert read_model_settings(dest / "models" / "model.pt")["preprocessing"]["spatial_size"] == [96, 96]
    evaluate = _bundle_config(dest, "evaluate.json")
    assert evaluate["allow_preprocessing_override"] is True and evaluate["preprocessing_overrides"]["acdc_other"]["spatial_size"] == [128, 128]
