"""The device round trip on the CPU: slice packs, the entry script's dry run, and the import into a grid store.

The dry run is the same ``scripts/device_entry.py`` a GPU host runs, on a slice pack of the embedded sample, so the
package cannot rot between device sessions (``docs/device.md``).
"""

from __future__ import annotations

import ast
import json
import lzma
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from metacontrast.data.pack import SlicePackError, read_pack_info
from metacontrast.data.slices import build_slice_cache
from metacontrast.device.packer import pack_dataset
from metacontrast.tracking import completed_runs
from metacontrast.workflows.evaluate import evaluate_split

SAMPLE_DIR = "sample_data/hippocampus"
SIZE = ([1.0, 1.0], [64, 64])


@pytest.fixture(scope="module")
def sample_pack(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("device_data")
    pack_dataset(repo_root / "data_manifests/sample.json", repo_root / SAMPLE_DIR, out / "sample_pack", "sample", *SIZE, cache_dir=None)
    return out


def _manifest(repo_root: Path) -> dict:
    return json.loads((repo_root / "data_manifests/sample.json").read_text())


def test_pack_serves_the_slices_it_was_made_from(repo_root: Path, sample_pack: Path) -> None:
    entries = _manifest(repo_root)["train"]
    raw = build_slice_cache(entries, repo_root / SAMPLE_DIR, *SIZE, with_labels=True, progress=False)
    packed = build_slice_cache(entries, sample_pack / "sample_pack", *SIZE, with_labels=True, progress=False)
    assert packed.images.shape == raw.images.shape
    assert (packed.images - raw.images).abs().max() <= 1 / 510 + 1e-6  # uint8 quantisation, nothing else
    assert (packed.images - raw.images).abs().max() > 0  # it is the pack that was read
    assert torch.equal(packed.labels, raw.labels)
    for key, value in raw.meta.items():
        assert torch.equal(packed.meta[key], value), key
    assert packed.volumes == raw.volumes


def test_pack_refuses_what_it_cannot_serve(repo_root: Path, sample_pack: Path, tmp_path: Path) -> None:
    pack = sample_pack / "sample_pack"
    manifest = _manifest(repo_root)
    with pytest.raises(SlicePackError, match=r"sample_pack was made with .*spatial_size.*\[64, 64\]"):
        build_slice_cache(manifest["train"], pack, [1.0, 1.0], [96, 96], with_labels=True)
    with pytest.raises(SlicePackError, match="lacks the volumes"):
        build_slice_cache([{**manifest["test"][0], "volume_id": "not_packed"}], pack, *SIZE, with_labels=True)
    with pytest.raises(SlicePackError, match="holds no label"):
        build_slice_cache(manifest["pretrain"], pack, *SIZE, with_labels=True)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "slice_pack.json").write_text((pack / "slice_pack.json").read_text())
    data = lzma.decompress((pack / "volumes.xz").read_bytes())
    (damaged / "volumes.xz").write_bytes(lzma.compress(data[: len(data) // 2]))
    with pytest.raises(SlicePackError, match=r"damaged/volumes.xz: ends inside volume"):
        build_slice_cache(manifest["train"], damaged, *SIZE, with_labels=True)
    assert read_pack_info(pack)["order"][0] in read_pack_info(pack)["volumes"]


def test_evaluate_scores_a_pack_on_the_source_grid_as_it_scores_the_raw_scans(repo_root: Path, sample_pack: Path, tmp_path: Path) -> None:
    """The packed test volume, mapped back through the trace of its carried source label, is scored as the raw scan
    is: same grid, same metrics up to the pack's uint8 quantisation (a voxel at the decision boundary may flip)."""
    manifest = _manifest(repo_root)
    settings = {"pixel_size": SIZE[0], "spatial_size": SIZE[1]}
    network = torch.nn.Conv2d(1, 3, 1)  # class 1 where the normalised intensity exceeds 0.5, else background
    with torch.no_grad():
        network.weight.copy_(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1))
        network.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    raw_rows, _ = evaluate_split(network, manifest["test"], repo_root / SAMPLE_DIR, settings, manifest["labels"], tmp_path / "raw")
    pack_rows, _ = evaluate_split(network, manifest["test"], sample_pack / "sample_pack", settings, manifest["labels"], tmp_path / "pack")
    volume = manifest["test"][0]["volume_id"]
    raw = np.asarray(nib.load(tmp_path / "raw" / "predictions" / f"{volume}.nii.gz").dataobj)
    packed = np.asarray(nib.load(tmp_path / "pack" / "predictions" / f"{volume}.nii.gz").dataobj)
    assert raw.shape == packed.shape == tuple(manifest["test"][0]["shape"])
    assert raw.any() and (raw == packed).mean() > 0.999, (raw == packed).mean()
    assert abs(raw_rows[0]["dice_mean"] - pack_rows[0]["dice_mean"]) < 0.01

    unscored = tmp_path / "unscored_pack"
    pack_dataset(repo_root / "data_manifests/sample.json", repo_root / SAMPLE_DIR, unscored, "sample", *SIZE, cache_dir=None,
                 splits=("test",), scored_splits=())
    with pytest.raises(SlicePackError, match=f"unscored_pack carries no source label for '{volume}'"):
        evaluate_split(network, manifest["test"], unscored, settings, manifest["labels"], tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.csv").exists()


@pytest.mark.slow
def test_dry_run_returns_runs_that_import_into_the_grid_store(repo_root: Path, sample_pack: Path, tmp_path: Path) -> None:
    out, runs, home = tmp_path / "out", tmp_path / "device_runs", tmp_path / "home"
    done = subprocess.run(
        [sys.executable, "scripts/device_entry.py", "--plan", "scripts/device_plans/dry_run.json", "--data", str(sample_pack),
         "--out", str(out), "--runs", str(runs)],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
    )
    report = json.loads((out / "device_report.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s["status"] for s in report["stages"]] == ["ok", "ok", "ok"]
    assert {"runs.tar.gz", "logs.tar.gz"} <= set(report["files"])

    imported = subprocess.run(
        [sys.executable, "scripts/import_device_run.py", "--returned", str(out), "--runs_dir", str(home)],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    uri = f"sqlite:///{home / 'sample' / 'mlruns.db'}"
    pretrain = completed_runs(uri, "metacontrast-sample", {"workflow": "pretrain", "method": "gcl"})
    finetune = completed_runs(uri, "metacontrast-sample", {"workflow": "finetune", "method": "gcl", "num_labeled": 1, "seed": 0})
    evaluate = completed_runs(uri, "metacontrast-sample", {"workflow": "evaluate", "method": "gcl", "num_labeled": 1, "seed": 0})
    assert len(pretrain) == 1 and len(finetune) == 1 and len(evaluate) == 1
    assert 0.0 <= evaluate[0].data.metrics["test_dice_mean"] <= 1.0  # scored from the pack, on the source grid
    assert (home / "sample" / "gcl" / "L1_seed0" / "finetune_run.json").is_file()
    assert (home / "sample" / "device_mlruns.db").is_file()

    again = subprocess.run(
        [sys.executable, "scripts/import_device_run.py", "--returned", str(out), "--runs_dir", str(home)],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert '"copied": 0' in again.stdout and '"skipped": 3' in again.stdout
    assert len(completed_runs(uri, "metacontrast-sample", {"workflow": "pretrain", "method": "gcl"})) == 1


def test_stages_of_a_group_run_together_and_a_failure_does_not_stop_the_plan(repo_root: Path, tmp_path: Path) -> None:
    """Stage ``a`` waits for the file stage ``b`` writes: only concurrent runs let both finish; ``c`` fails alone;
    ``d``'s weights would pass the return bound, so its runs come back without them."""
    wait = "import pathlib, sys, time\nfor _ in range(200):\n    if pathlib.Path(sys.argv[1]).exists(): sys.exit(0)\n    time.sleep(0.1)\nsys.exit(3)"
    plan = {"stages": [
        {"name": "a", "group": "g", "timeout_s": 60, "argv": ["{python}", "-c", wait, "{out}/from_b"]},
        {"name": "b", "group": "g", "timeout_s": 60, "argv": ["{python}", "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()", "{out}/from_b"]},
        {"name": "c", "timeout_s": 60, "argv": ["{python}", "-c", "import sys; sys.exit(5)"]},
        {"name": "d", "timeout_s": 60, "argv": ["{python}", "-c", "import os, sys; os.makedirs(sys.argv[1]); open(sys.argv[1] + '/w.pt', 'wb').write(os.urandom(2**21)); open(sys.argv[1] + '/m.json', 'w').write('1')", "{runs}/x"]},
    ], "collect": [{"name": "runs", "path": "{runs}", "arcname": "runs", "exclude": []}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, "scripts/device_entry.py", "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--max_return_mib", "1"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "out" / "device_report.json").read_text())
    assert {s["name"]: s["status"] for s in report["stages"]} == {"a": "ok", "b": "ok", "c": "failed (rc 5)", "d": "ok"}
    assert done.returncode == 1  # some stage failed
    assert report["files"] == ["logs.tar.gz", "runs.tar.gz"]
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:  # 2 MiB of weights do not fit in 1 MiB: packed without them
        assert tar.getnames() == ["runs", "runs/x", "runs/x/m.json"]
    assert report["notes"] == ["runs: over the return bound, packed again without weights (*.pt)"]


def _bundle_runs(stage: dict) -> list[list[str]]:
    """The ``monai.bundle run`` command lines of a plan stage (direct, or chained in a ``bash -c`` string)."""
    argvs = [shlex.split(stage["argv"][2])] if stage["argv"][:2] == ["bash", "-c"] else [list(stage["argv"])]
    runs, current = [], []
    for argv in argvs:
        for token in [*argv, "&&"]:
            if token == "&&":
                if current[1:4] == ["-m", "monai.bundle", "run"]:
                    runs.append(current)
                current = []
            else:
                current.append(token)
    return runs


@pytest.mark.parametrize("plan", sorted(Path(__file__).resolve().parents[1].glob("scripts/device_plans/*.json")), ids=lambda p: p.name)
def test_device_plans_name_real_keys_and_the_rows_overrides(repo_root: Path, plan: Path) -> None:
    """Every ``monai.bundle run`` of a device plan overrides only keys its configs define (MONAI would silently add an
    unknown one), and a stage that names a grid row (``--method``) passes that row's variant and recipe overrides as
    the grid would, so a plan cannot drift from ``ablations.json``, ``recipes.json`` or the configs."""
    from monai.bundle import ConfigParser

    from metacontrast.reporting.grid import parse_method

    checked = 0
    for stage in json.loads(plan.read_text())["stages"]:
        for argv in _bundle_runs(stage):
            options = dict(zip(argv[4::2], argv[5::2]))
            files = options.pop("--config_file")
            files = ast.literal_eval(files) if files.startswith("[") else [files]
            parser = ConfigParser()
            parser.read_config([str(repo_root / f) for f in files])
            unknown = [k for k in options if k[2:] not in parser.config]
            assert not unknown, f"{plan.name} {stage['name']}: {files} define no {unknown}"
            if "--method" in options and "probe.json" not in files[0]:
                spec = parse_method(options["--method"])
                wanted = spec.pretrain_overrides if files[0].endswith("pretrain.json") else spec.finetune_overrides
                wanted = {k: v for k, v in wanted.items() if k in parser.config}  # evaluate takes the fine-tune's norm, not its recipe
                given = {k[2:]: v for k, v in options.items()}
                assert all(str(given.get(k)).lower() == (json.dumps(v) if not isinstance(v, str) else v).lower() for k, v in wanted.items()), \
                    f"{plan.name} {stage['name']}: {options['--method']} needs {wanted}, the stage gives {given}"
            checked += 1
    assert checked > 0
