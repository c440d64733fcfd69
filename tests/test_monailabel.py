"""MONAI Label serves the exported bundle (issue 9, item 3), asked over HTTP like a real client.

A tiny U-Net is fine-tuned for 4 iterations on one ACDC volume and evaluated (through ``monai.bundle.run``,
as a user would), then exported with the exporter.  MONAI Label's own ``monaibundle`` sample app, copied
with its CLI (``monailabel apps --download``), gets the bundle in its ``model/`` folder; the server
(``monailabel.main start_server``, as the ``monailabel`` script runs it) is started on localhost with a
studies folder holding the ACDC test volume and a DICOM series of the PGBM data converted to NIfTI by
``metacontrast.data.dicom.load_volume``.  The test asks ``/info/`` and ``/infer/<model>?image=<id>`` with
``requests`` and checks each returned label map against the evaluate workflow's prediction for that volume
(Dice >= 0.99 per class): for ACDC the evaluate run's own NIfTI, for the DICOM series the evaluate
workflow's per-volume steps (``predict_volume`` + ``to_source_grid``).  The server is always stopped.

MONAI Label comes from ``requirements-monailabel.txt`` (``pip install --no-deps``); its server runs with
``metacontrast/export/monailabel_standins`` on its PYTHONPATH (why: that folder's README).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import dice_per_class, finetune_and_evaluate

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("monailabel") is None,
    reason="monailabel is not installed (pip install --no-deps -r requirements-monailabel.txt)",
)

MODEL = "random_acdc_mri_segmentation"
TINY = [8, 16, 32, 64, 128]
ACDC_CPU = {"acdc": {"pixel_size": [2.734, 2.734], "spatial_size": [96, 96]}}
STANDINS = Path(__file__).resolve().parents[1] / "metacontrast" / "export" / "monailabel_standins"
START_TIMEOUT_S = 180
INFER_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported(repo_root: Path, acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from metacontrast.export.bundle import export_bundle

    run = finetune_and_evaluate(
        repo_root, tmp_path_factory.mktemp("monailabel_run"), dataset="acdc", dataset_dir=str(acdc_dir), features=TINY,
        max_iterations=4, val_interval=1, batch_size=16, seed=0, num_labeled=1, max_volumes=1, preprocessing_overrides=ACDC_CPU,
    )  # fmt: skip
    bundle = export_bundle(dest=str(run["root"] / "dist" / MODEL), run_id=run["run_id"], tracking_uri=str(run["output_dir"]), results_dir=None)
    return {**run, "bundle": Path(bundle)}


@pytest.fixture(scope="module")
def studies(exported: dict[str, Any], repo_root: Path, acdc_dir: Path, dicom_dir: Path) -> dict[str, Any]:
    """The studies folder: the ACDC test volume and a DICOM series written as NIfTI (image id = file stem)."""
    from metacontrast.data.dicom import load_volume
    from metacontrast.workflows import read_manifest

    folder = exported["root"] / "studies"
    folder.mkdir()
    acdc = read_manifest(repo_root / "data_manifests" / "acdc.json")["test"][0]
    (folder / "acdc_test.nii.gz").write_bytes((acdc_dir / acdc["image"]).read_bytes())
    series = read_manifest(repo_root / "data_manifests" / "dicom_pgbm.json")["test"][0]
    volume = load_volume(dicom_dir / series["image"])  # (X, Y, Z) with its RAS affine
    nib.save(nib.Nifti1Image(np.asarray(volume[0] if volume.ndim == 4 else volume, dtype=np.float32), np.asarray(volume.affine, dtype=np.float64)), folder / "dicom_series.nii.gz")
    return {"folder": folder, "acdc": acdc}


@pytest.fixture(scope="module")
def server(exported: dict[str, Any], studies: dict[str, Any]) -> Iterator[str]:
    """MONAI Label's monaibundle app serving the bundle from its model/ folder; stopped however the tests end."""
    root = exported["root"]
    subprocess.run([sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(root / "apps")],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    app = root / "apps" / "monaibundle"
    (app / "model").mkdir(exist_ok=True)
    (app / "model" / MODEL).symlink_to(exported["bundle"], target_is_directory=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(STANDINS)}  # stand-ins for the server process only
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies["folder"]),
             "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "preload", "false",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"MONAI Label server exited ({proc.returncode}):\n{log.read_text()[-6000:]}"
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"MONAI Label server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def infer(url: str, image_id: str, dest: Path) -> np.ndarray:
    import requests

    reply = requests.post(f"{url}/infer/{MODEL}", params={"image": image_id, "output": "image"},
                          files={"params": (None, json.dumps({}))}, timeout=INFER_TIMEOUT_S)  # fmt: skip
    assert reply.status_code == 200, f"/infer/{MODEL}?image={image_id}: {reply.status_code} {reply.text[:2000]}"
    dest.write_bytes(reply.content)
    return np.asarray(nib.load(dest).dataobj)


@pytest.mark.slow
def test_info_lists_the_bundle_with_its_classes(server: str, exported: dict[str, Any]) -> None:
    import requests

    info = requests.get(f"{server}/info/", timeout=30).json()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"rv": 1, "myo": 2, "lv": 3}  # from the bundle's channel_def
    assert model["version"] == json.loads((exported["bundle"] / "configs" / "metadata.json").read_text())["version"]
    assert MODEL in info["trainers"]  # MONAI Label found the bundle's train.json
    assert info["datastore"]["total"] == 2


@pytest.mark.slow
def test_served_label_of_the_acdc_volume_is_the_evaluate_prediction(server: str, exported: dict[str, Any], studies: dict[str, Any]) -> None:
    served = infer(server, "acdc_test", exported["root"] / "served_acdc.nii.gz")
    reference = np.asarray(nib.load(exported["output_dir"] / "evaluation" / "predictions" / f"{studies['acdc']['volume_id']}.nii.gz").dataobj)
    assert served.shape == reference.shape == tuple(studies["acdc"]["shape"])
    assert set(np.unique(served).tolist()) <= {0, 1, 2, 3}
    dice = dice_per_class(served, reference)
    assert dice and min(dice.values()) >= 0.99, dice


@pytest.mark.slow
def test_served_label_of_the_dicom_series_is_the_evaluate_prediction(server: str, exported: dict[str, Any], studies: dict[str, Any], repo_root: Path) -> None:
    from metacontrast.data.transforms import volume_preprocessing
    from metacontrast.nets import SegmentationUNet
    from metacontrast.workflows import read_manifest
    from metacontrast.workflows.checkpoints import load_checkpoint, state_dict_of
    from metacontrast.workflows.data import preprocessing_settings
    from metacontrast.workflows.evaluate import predict_volume, to_source_grid

    image = studies["folder"] / "dicom_series.nii.gz"
    served = infer(server, "dicom_series", exported["root"] / "served_dicom.nii.gz")
    # the evaluate workflow's steps for one volume, with the fine-tuned weights
    settings = preprocessing_settings(read_manifest(repo_root / "data_manifests" / "acdc.json"), ACDC_CPU, "acdc")
    network = SegmentationUNet(in_channels=1, out_channels=4, features=TINY).eval()
    ckpt = exported["output_dir"] / "model.pt"
    network.load_state_dict(state_dict_of(load_checkpoint(ckpt), ckpt))
    preprocessing = volume_preprocessing(settings["pixel_size"], settings["spatial_size"])
    data = preprocessing({"image": str(image)})
    reference = to_source_grid(predict_volume(network, data["image"], settings["spatial_size"], torch.device("cpu")), data["image"], preprocessing).numpy()
    assert served.shape == reference.shape == nib.load(image).shape
    dice = dice_per_class(served, reference)
    assert dice and min(dice.values()) >= 0.99, dice
