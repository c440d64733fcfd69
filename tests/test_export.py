"""Export to the MONAI Model Zoo format (issue 9, items 1-2), checked as the Zoo checks a bundle.

A tiny U-Net (widths 8..128) is fine-tuned for a few iterations on the embedded sample and evaluated,
through ``monai.bundle.run`` from the repository root, exactly as a user would; the run is exported from
its MLflow run id with ``scripts/export_bundle.py``'s function.  Then:

* ``metadata.json`` validates against ``tests/schemas/mb_metadata.schema.json`` (a JSON schema of the
  MONAI Bundle specification's metadata fields: the Zoo's own schema cannot be downloaded here, so
  ``monai.bundle.verify_metadata`` cannot run), and names the manifest's classes and the preprocessing;
* ``monai.bundle.verify_net_in_out`` and ``monai.bundle.ckpt_export`` pass on the bundle, and the
  TorchScript model gives the eager network's output;
* the bundle is copied to a temporary folder outside the repository and its inference runs there, as
  ``python -m monai.bundle run --config_file configs/inference.json`` in a subprocess whose Python cannot
  import this repository: the label map has the source image's shape and affine and equals the evaluate
  workflow's prediction for that volume (Dice >= 0.99 per class); its evaluate and train configs run
  there too;
* a checkpoint with its settings exports an ACDC bundle (classes RV / Myo / LV, ACDC citation);
* the image writer the inference uses keeps an ACDC file's own header (where MONAI's writer would not).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import dice_per_class, finetune_and_evaluate
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from metacontrast.export import vendor
from metacontrast.export import ExportError
from metacontrast.export.bundle import export_bundle
from metacontrast.export.source import source_from_mlflow
from metacontrast.export.verify import check_metadata
from metacontrast.nets import SegmentationUNet
from metacontrast.nets.unet import encoder_state_dict
from metacontrast.workflows import initialise_encoder, read_manifest
from metacontrast.export.card import results_rows
from metacontrast.reporting.results import CSV_COLUMNS, collect_evaluate_runs, format_table
from metacontrast.reporting.tables import aggregate
from metacontrast.tracking import find_run

FINETUNE = "bundles/common/configs/finetune.json"
SAMPLE_MANIFEST = "data_manifests/sample.json"
SAMPLE_DIR = "sample_data/hippocampus"
TINY = [8, 16, 32, 64, 128]
SCHEMA = Path(__file__).resolve().parent / "schemas" / "mb_metadata.schema.json"
SUBPROCESS_TIMEOUT_S = 600




def outside_repo_path(repo_root: Path) -> list[str]:
    """The module search path a user's Python has (its site-packages, after ``.pth`` files were processed, so a
    venv's linked package folders are kept), less the repository itself and every folder holding ``metacontrast``.

    An install of the package with ``pip install -e .`` reaches it through site-packages: a ``.pth`` file that
    puts the repository on the path, or one that installs an import hook (setuptools' editable finder).  A
    Python started with ``-S`` processes no ``.pth`` file, and the path given here no longer names the
    repository, so neither route is left; torch, MONAI and nibabel stay importable.
    """
    neutral = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    done = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"], cwd=Path("/"),
                          env={**neutral, "PYTHONNOUSERSITE": "1"}, capture_output=True, text=True, check=True)
    kept = []
    for entry in json.loads(done.stdout):
        folder = Path(entry).resolve()
        if not folder.is_dir() or folder == repo_root.resolve():  # a venv inside the repository stays: it holds no package
            continue
        if (folder / "metacontrast").exists() or (folder / "metacontrast.py").exists():
            continue
        kept.append(str(folder))
    return kept


def outside_repo_env(repo_root: Path) -> dict[str, str]:
    """The environment of :func:`outside_python`: nothing that would let Python find this repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(outside_repo_path(repo_root))
    return env


#: what a Python run "outside the repository" does first: fail unless ``import metacontrast`` fails
NOT_IMPORTABLE = (
    "import sys\n"
    "try:\n    import metacontrast\n"
    "except ModuleNotFoundError:\n    pass\n"
    "else:\n    sys.exit(f'metacontrast is importable from {metacontrast.__file__}: not outside the repository')\n"
)


def outside_python(code: str) -> list[str]:
    """A command that runs ``code`` outside the repository: Python without ``site`` (no ``.pth`` file is
    processed, so no editable install of the package is seen; :func:`outside_repo_env` gives its path), which
    first checks that ``import metacontrast`` fails.  The working directory is first on ``sys.path``."""
    return [sys.executable, "-S", "-c", NOT_IMPORTABLE + "import os; sys.path.insert(0, os.getcwd())\n" + code]


#: ``python -m <module> <args>`` run outside the repository: ``[*OUTSIDE_MODULE, module, *args]``
OUTSIDE_MODULE = outside_python("import runpy\nmodule, sys.argv = sys.argv[1], sys.argv[1:]\n"
                                "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done


# ------------------------------------------------------------------------------------------------
# one tiny fine-tune + evaluate, exported from its MLflow run id
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # batch 16 over one sample volume's ~35 slices: 3 steps an epoch, so 4 iterations = 2 epochs
    run = finetune_and_evaluate(repo_root, tmp_path_factory.mktemp("export_run"), features=TINY, max_iterations=4,
                                val_interval=1, batch_size=16, seed=0, num_labeled=1)  # fmt: skip
    root, output_dir, uri = run["root"], run["output_dir"], run["uri"]
    # the results table the runner writes, made from the logged evaluate run (never typed numbers)
    table = format_table(aggregate(collect_evaluate_runs(uri, "sample")), "sample")
    (root / "results" / "sample").mkdir(parents=True)
    (root / "results" / "sample" / "table.md").write_text(table)
    return {"root": root, "output_dir": output_dir, "run_id": run["run_id"], "uri": uri,
            "manifest": read_manifest(repo_root / SAMPLE_MANIFEST), "table": table}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(trained: dict[str, Any]) -> Path:
    dest = trained["root"] / "dist" / "random_sample_mri_segmentation"
    written = export_bundle(
        dest=str(dest), run_id=trained["run_id"], tracking_uri=str(trained["output_dir"]),
        results_dir=str(trained["root"] / "results"),
    )  # fmt: skip
    assert Path(written) == dest
    return dest


@pytest.fixture(scope="module")
def outside_copy(bundle: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory, trained: dict[str, Any]) -> dict[str, Path]:
    """The bundle and one test image copied to a temporary folder outside the repository."""
    root = tmp_path_factory.mktemp("outside")
    assert repo_root.resolve() not in root.resolve().parents
    copy = Path(shutil.copytree(bundle, root / bundle.name))
    entry = trained["manifest"]["test"][0]
    data = root / "data"
    (data / "imagesTs").mkdir(parents=True)
    image = Path(shutil.copyfile(repo_root / SAMPLE_DIR / entry["image"], data / "imagesTs" / Path(entry["image"]).name))
    return {"root": root, "copy": copy, "data": data, "image": image}


# ------------------------------------------------------------------------------------------------
# the bundle and its metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundle_has_the_zoo_layout(bundle: Path) -> None:
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/logging.conf", "configs/datalist.json", "models/model.pt", "models/model.ts",
                "scripts/__init__.py", "scripts/export/writer.py", "docs/README.md", "docs/data_license.txt", "LICENSE"):  # fmt: skip
        assert (bundle / rel).is_file(), rel
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("bundle_root", "device", "network_def", "preprocessing", "inferer", "postprocessing", "output_dir",
                "dataset_dir", "datalist", "dataset", "evaluator"):  # fmt: skip
        assert key in inference, key
    # nothing in the bundle imports or points into this repository
    vendor.check_no_package_imports(bundle / "scripts")
    for name in ("inference.json", "train.json", "evaluate.json"):
        text = json.dumps({k: v for k, v in json.loads((bundle / "configs" / name).read_text()).items() if k != "_doc_"})
        assert "metacontrast." not in text and "import metacontrast" not in text, name
        assert "bundles/" not in text and "data_manifests/" not in text and "sample_data" not in text, name


@pytest.mark.slow
def test_metadata_follows_the_specification_schema(bundle: Path, trained: dict[str, Any]) -> None:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(metadata, schema)
    check_metadata(metadata, SCHEMA)
    assert metadata["version"] in metadata["changelog"]
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    settings = trained["manifest"]["preprocessing"]
    assert image["spatial_shape"] == settings["spatial_size"] and image["pixdim"] == settings["pixel_size"]
    assert pred["channel_def"] == trained["manifest"]["labels"] and pred["num_channels"] == len(trained["manifest"]["labels"])
    assert {"mlflow", "nibabel", "pytorch-ignite", "pydicom"} <= set(metadata["required_packages_version"])
    assert "optional_packages_version" not in metadata  # MONAI would let it replace required_packages_version
    # every package the vendored code imports is named (besides the three with their own version keys)
    imported = set()
    for file in (bundle / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name not in ("__future__", "scripts")}
    named = set(metadata["required_packages_version"]) | {"torch", "monai", "numpy"}
    assert set(vendor.distributions(third_party)) <= named
    # logged numbers only: the evaluate run's test Dice
    evaluate = find_run(trained["uri"], "metacontrast-sample", {"workflow": "evaluate"}, status="FINISHED")
    assert metadata["eval_metrics"]["mean_dice"] == pytest.approx(evaluate.data.metrics["test_dice_mean"], abs=1e-4)


def test_schema_rejects_what_the_specification_forbids() -> None:
    schema = json.loads(SCHEMA.read_text())
    tensor = {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1, "spatial_shape": [64, 64],
              "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"}}  # fmt: skip
    good = {
        "version": "0.1.0", "changelog": {"0.1.0": "first"}, "monai_version": "1.6.1", "pytorch_version": "2.13.0",
        "numpy_version": "2.4.6", "required_packages_version": {"nibabel": "5.4.2"}, "task": "t", "description": "d",
        "authors": "a", "copyright": "c", "network_data_format": {"inputs": {"image": tensor}, "outputs": {"pred": tensor}},
    }  # fmt: skip
    jsonschema.validate(good, schema)
    broken = [
        {k: v for k, v in good.items() if k != "network_data_format"},
        {k: v for k, v in good.items() if k != "required_packages_version"},  # no package versions under either name
        {**good, "version": "latest"},
        {**good, "network_data_format": {"inputs": {"image": {**tensor, "channel_def": {"zero": "image"}}}, "outputs": {"pred": tensor}}},
        {**good, "network_data_format": {"inputs": {"image": {k: v for k, v in tensor.items() if k != "is_patch_data"}}, "outputs": {"pred": tensor}}},
        {**good, "network_data_format": {"inputs": {"image": {**tensor, "value_range": [0, 1, 2]}}, "outputs": {"pred": tensor}}},
    ]  # fmt: skip
    for metadata in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(metadata, schema)
    with pytest.raises(ExportError, match="changelog"):
        check_metadata({**good, "version": "0.2.0"}, SCHEMA)


# ------------------------------------------------------------------------------------------------
# the checks the Zoo runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_net_in_out_and_ckpt_export_pass(bundle: Path, tmp_path: Path) -> None:
    meta, inference = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, device="cpu", bundle_root=str(bundle))
    exported = tmp_path / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=inference, bundle_root=str(bundle))  # fmt: skip
    parser = ConfigParser()
    parser.read_config(inference)
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True), strict=True)
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = network(x)
        for path in (exported, bundle / "models" / "model.ts"):
            torch.testing.assert_close(torch.jit.load(str(path), map_location="cpu")(x), eager, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the bundle runs from a copy outside the repository
# ------------------------------------------------------------------------------------------------


def test_outside_python_cannot_import_the_package(repo_root: Path, tmp_path: Path) -> None:
    """The interpreter the bundle runs under outside the repository cannot see the package, and says so when
    it can (here: the repository put back on its path, as an editable install's ``.pth`` file would)."""
    env = outside_repo_env(repo_root)
    assert not any(Path(p).resolve() == repo_root.resolve() for p in env["PYTHONPATH"].split(os.pathsep))
    done = run_checked(outside_python("import monai, nibabel, torch; print('imported', monai.__version__)"), tmp_path, env)
    assert "imported" in done.stdout
    seen = {**env, "PYTHONPATH": os.pathsep.join([str(repo_root), env["PYTHONPATH"]])}
    done = subprocess.run(outside_python("print('ran')"), cwd=tmp_path, env=seen, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ran" not in done.stdout
    assert "metacontrast is importable from" in done.stderr and "not outside the repository" in done.stderr


@pytest.mark.slow
def test_inference_runs_from_a_copy_outside_the_repo(outside_copy: dict[str, Path], trained: dict[str, Any], repo_root: Path) -> None:
    copy, env = outside_copy["copy"], outside_repo_env(repo_root)
    out = outside_copy["root"] / "predictions"
    # the Python that runs the bundle cannot import this repository's package, also under `pip install -e .`
    run_checked([*OUTSIDE_MODULE, "monai.bundle", "run", "--config_file", "configs/inference.json",
                 "--dataset_dir", str(outside_copy["data"]), "--output_dir", str(out)], copy, env)  # fmt: skip
    image = outside_copy["image"]
    written = sorted(out.rglob("*.nii.gz"))
    expected = out / "imagesTs" / image.name.replace(".nii.gz", "_seg.nii.gz")
    assert written == [expected]
    pred, source = nib.load(expected), nib.load(image)
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine, atol=1e-6)
    entry = trained["manifest"]["test"][0]
    reference = nib.load(trained["output_dir"] / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz")
    ours, theirs = np.asarray(pred.dataobj), np.asarray(reference.dataobj)
    assert set(np.unique(ours).tolist()) <= {0, 1, 2}
    dice = dice_per_class(ours, theirs)
    assert dice and min(dice.values()) >= 0.99, dice


@pytest.mark.slow
def test_evaluate_and_train_configs_run_from_the_copy(outside_copy: dict[str, Path], trained: dict[str, Any], repo_root: Path) -> None:
    """One interpreter runs the bundle's evaluate.json and a 2-iteration train.json (as `python -m` would: the
    bundle folder is the working directory and first on sys.path)."""
    copy, root = outside_copy["copy"], outside_copy["root"]
    data = str((repo_root / SAMPLE_DIR).resolve())  # the data the bundle's datalist describes
    script = (
        "from monai.bundle import run; "
        f"run(config_file='configs/evaluate.json', dataset_dir={data!r}, output_dir={str(root / 'evaluate')!r}); "
        f"run(config_file='configs/train.json', dataset_dir={data!r}, output_dir={str(root / 'train')!r}, "
        "max_iterations=2, val_interval=1)"
    )
    run_checked(outside_python(script), copy, outside_repo_env(repo_root))
    entry = trained["manifest"]["test"][0]
    ours = np.asarray(nib.load(root / "evaluate" / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz").dataobj)
    theirs = np.asarray(nib.load(trained["output_dir"] / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz").dataobj)
    dice = dice_per_class(ours, theirs)
    assert dice and min(dice.values()) >= 0.99, dice
    assert (root / "evaluate" / "evaluation" / "metrics.csv").is_file()
    # the newly trained weights fit the bundle's inference network
    parser = ConfigParser()
    parser.read_config(str(copy / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "train" / "model.pt", map_location="cpu", weights_only=True), strict=True)


@pytest.mark.slow
def test_a_grid_run_is_exported_from_its_folder(sample_grid: dict[str, Any], tmp_path: Path) -> None:
    """The README's export command names the run's folder (``--tracking_uri runs/acdc/gcl/L1_seed0``); a grid logs
    every run into its own store, which the folder's ``finetune_run.json`` names."""
    folder = sample_grid["runs_dir"] / "sample" / "gcl" / "L1_seed0"
    assert not (folder / "mlruns.db").exists()  # the folder has no store of its own
    run_id = json.loads((folder / "finetune_run.json").read_text())["mlflow_run_id"]
    source = source_from_mlflow(run_id, str(folder), tmp_path / "work")
    assert source.run_id == run_id and source.tracking_uri == sample_grid["tracking_uri"]
    assert source.settings["method"] == "gcl" and source.settings["num_labeled"] == 1
    assert 0.0 <= source.eval_metrics["test_dice_mean"] <= 1.0 and source.evaluate_run_id  # the grid's evaluate run
    # a run the folder does not record is looked for in the folder's own store, which is named as missing
    with pytest.raises(ExportError, match=r"no MLflow store at sqlite:///.*L1_seed0/mlruns\.db"):
        source_from_mlflow("0" * 32, str(folder), tmp_path / "other")


# ------------------------------------------------------------------------------------------------
# the model card
# ------------------------------------------------------------------------------------------------


def test_the_card_quotes_the_random_init_row_its_method_is_compared_with(tmp_path: Path) -> None:
    """A grid row fine-tuned under a recipe as a batch-norm U-Net is read against ``random/batch_norm@<recipe>``,
    the row the tables pair it with, not against another network's or recipe's random init."""
    rows = [{"run_id": f"{method}{seed}", "run_name": "", "method": method, "dataset": "acdc", "num_labeled": 1, "seed": seed,
             "config_hash": "", "norm": norm, "used": True, "test_dice_mean": dice, "test_hd95_mean": 9.0, "test_asd_mean": 3.0}
            for method, norm, dice in (("random@improved", "instance", 0.30), ("random/batch_norm@improved", "batch", 0.37),
                                       ("random/batch_norm", "batch", 0.20), ("gcl/recipe@improved", "batch", 0.40))
            for seed in (0, 1)]  # fmt: skip
    folder = tmp_path / "acdc"
    folder.mkdir()
    (folder / "table.md").write_text(format_table(aggregate(rows), "acdc"))
    (folder / "evaluate_runs.csv").write_text("\n".join([",".join(CSV_COLUMNS), *(",".join(str(r[c]) for c in CSV_COLUMNS) for r in rows)]) + "\n")
    quoted = [line for line in results_rows(tmp_path, "acdc", "gcl/recipe@improved").splitlines() if 'id="method-' in line]
    assert [line.split('id="method-')[1].split('"')[0] for line in quoted] == ["gcl/recipe@improved", "random/batch_norm@improved"]


@pytest.mark.slow
def test_model_card_copies_the_results_rows_and_cites_the_data(bundle: Path, trained: dict[str, Any]) -> None:
    card = (bundle / "docs" / "README.md").read_text()
    row = next(line for line in trained["table"].splitlines() if 'id="method-random"' in line)
    assert row in card  # verbatim from results/<dataset>/table.md
    assert trained["run_id"] in card
    assert "${" not in card and "Antonelli" in card
    assert "CC BY-SA 4.0" in (bundle / "docs" / "data_license.txt").read_text()
    assert "Apache License" in (bundle / "LICENSE").read_text()


# ------------------------------------------------------------------------------------------------
# a checkpoint with its settings -> an ACDC bundle; versions; the vendored code
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_from_a_checkpoint_for_acdc(tmp_path: Path) -> None:
    network = SegmentationUNet(in_channels=1, out_channels=4, features=TINY)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    encoder = {"state_dict": encoder_state_dict(network), "network": {"features": TINY}, "method": "gcl"}  # as pre-training saves it
    torch.save(encoder, tmp_path / "encoder.pt")
    overrides = {"acdc": {"pixel_size": [2.734, 2.734], "spatial_size": [96, 96]}}
    common = dict(ckpt=str(tmp_path / "model.pt"), dataset="acdc", features=TINY, preprocessing_overrides=overrides,
                  method="gcl", num_labeled=2, seed=1, pretrained_ckpt=str(tmp_path / "encoder.pt"), results_dir=None,
                  batch_size=8, max_iterations=600)  # fmt: skip
    dest = Path(export_bundle(dest=str(tmp_path / "gcl_acdc_mri_segmentation"), **common))
    metadata = json.loads((dest / "configs" / "metadata.json").read_text())
    check_metadata(metadata, SCHEMA)
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}
    assert metadata["network_data_format"]["inputs"]["image"]["pixdim"] == [2.734, 2.734]
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [96, 96]
    assert any("Bernard" in r for r in metadata["references"]) and any("GCL" in r or "Gradient-Guided" in r for r in metadata["references"])
    assert "10.1109/TMI.2018.2837502" in (dest / "docs" / "data_license.txt").read_text()
    inference = json.loads((dest / "configs" / "inference.json").read_text())
    assert inference["image_glob"] == "patient*/patient*_frame[0-9][0-9].nii.gz"
    train = json.loads((dest / "configs" / "train.json").read_text())
    assert (train["dataset"], train["features"], train["method"], train["num_labeled"], train["seed"]) == ("acdc", TINY, "gcl", 2, 1)
    assert (train["batch_size"], train["max_iterations"]) == (8, 600)  # the recipe given with the checkpoint
    assert train["preprocessing_overrides"]["acdc"] == overrides["acdc"]
    # train.json starts from the shipped encoder, which loads as the fine-tune workflow loads it
    assert train["pretrained_ckpt"] == "$@bundle_root + '/models/pretrained_encoder.pt'"
    fresh = SegmentationUNet(in_channels=1, out_channels=4, features=TINY)
    assert set(initialise_encoder(fresh, str(dest / "models" / "pretrained_encoder.pt"))) == set(encoder["state_dict"])
    # a second version keeps the first one's changelog; an existing bundle is not replaced by accident
    with pytest.raises(ExportError, match="exists"):
        export_bundle(dest=str(dest), **common)
    export_bundle(dest=str(dest), version="0.2.0", changelog="second export", overwrite=True, **common)
    changelog = json.loads((dest / "configs" / "metadata.json").read_text())["changelog"]
    assert list(changelog) == ["0.2.0", "0.1.0"] and changelog["0.2.0"] == "second export"


def test_export_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.save(SegmentationUNet(in_channels=1, out_channels=3, features=TINY).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ExportError, match="network_def"):
        export_bundle(dest=str(tmp_path / "b"), ckpt=str(tmp_path / "model.pt"), dataset="sample", features=[16, 32, 64, 128, 256], results_dir=None)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nothing half-written left behind
    with pytest.raises(ExportError, match="batch_sise"):
        export_bundle(dest=str(tmp_path / "b"), ckpt=str(tmp_path / "model.pt"), dataset="sample", features=TINY, batch_sise=8)


def test_export_names_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no MLflow store"):
        export_bundle(dest=str(tmp_path / "b"), run_id="0123abcd", tracking_uri=str(tmp_path))
    assert not (tmp_path / "mlruns.db").exists()  # reading does not create a store


def test_vendoring_follows_the_configs(repo_root: Path) -> None:
    finetune = json.loads((repo_root / FINETUNE).read_text())
    references = vendor.config_references([finetune])
    modules = vendor.import_closure({vendor.resolve_module(r) for r in references})
    assert {"metacontrast", "metacontrast.nets", "metacontrast.nets.unet", "metacontrast.workflows", "metacontrast.workflows.data"} <= set(modules)
    assert not any(m.startswith(("metacontrast.export", "metacontrast.losses")) for m in modules)  # not used by fine-tuning
    assert vendor.rewrite("$metacontrast.workflows.read_manifest(@datalist)") == "$scripts.workflows.read_manifest(@datalist)"
    assert vendor.rewrite("$import metacontrast") == "$import scripts"
    assert vendor.rewrite("$'metacontrast-' + @dataset") == "$'metacontrast-' + @dataset"  # names, not code
    tree = ast.parse(vendor.rewrite_source((repo_root / "metacontrast" / "data" / "dicom.py").read_text()))
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("metacontrast") for n in ast.walk(tree))
    assert vendor.rewrite_source('    from metacontrast.a import b\ntag = "metacontrast.x"\n') == '    from scripts.a import b\ntag = "metacontrast.x"\n'



# ------------------------------------------------------------------------------------------------
# the image writer of the exported inference
# ------------------------------------------------------------------------------------------------


def test_writer_keeps_the_source_header(acdc_dir: Path, tmp_path: Path) -> None:
    """ACDC's sform (1 mm) and pixdim (1.5625 mm) disagree: MONAI's writer would move the label map."""
    from monai.transforms import LoadImage, SaveImage

    from metacontrast.export.writer import SourceHeaderNiftiWriter

    source = acdc_dir / "patient001" / "patient001_frame01.nii.gz"
    image = LoadImage(image_only=True, ensure_channel_first=True)(source)
    label = (image > image.mean()).to(torch.uint8)
    for name, writer in (("ours", SourceHeaderNiftiWriter), ("monai", "NibabelWriter")):
        SaveImage(output_dir=tmp_path / name, output_postfix="seg", output_dtype=np.uint8, resample=False,
                  separate_folder=False, writer=writer, print_log=False)(label)  # fmt: skip
    ours, monai_written = (nib.load(tmp_path / n / "patient001_frame01_seg.nii.gz") for n in ("ours", "monai"))
    original = nib.load(source)
    np.testing.assert_allclose(ours.affine, original.affine)
    assert ours.shape == original.shape and ours.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(ours.dataobj), label[0].numpy())
    assert not np.allclose(monai_written.affine, original.affine)  # why the writer exists


def test_export_script_help_prints_its_usage(repo_root: Path) -> None:
    """``--help`` is not taken for an option of the exporter (it accepts any fine-tune key)."""
    done = subprocess.run([sys.executable, str(repo_root / "scripts" / "export_bundle.py"), "--help"], cwd=repo_root,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--run_id" in done.stdout and "ExportError" not in done.stderr


def test_the_inference_template_normalises_intensities_as_training_does(repo_root: Path) -> None:
    """The exported inference pipeline writes the intensity step out by hand: it must be the step the training
    pipeline records in every model (``model_settings.pipeline_intensity``), or exported models would see other inputs."""
    from metacontrast.workflows.model_settings import pipeline_intensity

    template = json.loads((repo_root / "metacontrast/export/templates/inference.json").read_text())
    steps = [t for t in template["preprocessing"]["transforms"] if t["_target_"].startswith("ScaleIntensity")]
    assert len(steps) == 1
    step, recorded = steps[0], pipeline_intensity([1.0, 1.0], [64, 64])
    assert step["_target_"].removesuffix("d") == recorded["transform"]
    assert {k: step.get(k, recorded[k]) for k in recorded if k != "transform"} == {k: v for k, v in recorded.items() if k != "transform"}
