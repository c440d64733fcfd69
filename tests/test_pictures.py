"""Pictures from logged runs (issue 9, item 5): one command draws every figure of a real tiny grid.

The grid (``sample_grid`` in ``conftest.py``) pre-trains GCL, fine-tunes and evaluates random init and GCL
on the embedded sample through the real workflows.  ``scripts/draw_pictures.py`` then reads its MLflow
store and the files its runs point to.  Checked: each expected file is a PNG of the size its layout
promises (so the number of panels is checked too: one t-SNE panel per meta label of the manifest, one
curve panel per logged metric family), the curves and t-SNE points are drawn in the colours they should
be, the overlays are taken from slices with ground truth and from the saved predictions, and absent
runs or files are named.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import fire
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.image import imread
from mlflow import MlflowClient

from metacontrast.reporting.curves import metric_families
from metacontrast.reporting.figures import PANEL_PX, TILE_PX
from metacontrast.reporting.overlays import choose_overlay_slices
from metacontrast.reporting.pictures import draw_pictures
from metacontrast.reporting.tsne import EncoderEmbedding, tsne

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TSNE_VOLUMES = 3
OVERLAY_ROWS = 3


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def pixels_near(image: np.ndarray, rgb: tuple[float, float, float], tol: float = 0.03) -> int:
    """Number of pixels of an (H, W, 3|4) float image within ``tol`` of colour ``rgb`` (0..1)."""
    return int((np.abs(image[..., :3] - np.asarray(rgb)) < tol).all(axis=-1).sum())


def tab10(k: int) -> tuple[float, float, float]:
    return colormaps["tab10"](k)[:3]


@pytest.fixture(scope="module")
def manifest(repo_root: Path) -> dict[str, Any]:
    return json.loads((repo_root / "data_manifests" / "sample.json").read_text())


@pytest.fixture(scope="module")
def drawn(sample_grid: dict[str, Any], repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one command, ``scripts/draw_pictures.py`` with a user's arguments, on the grid's store.

    It runs through ``fire`` in this process (a subprocess would spend ~12 s importing MLflow, MONAI and torch again).
    """
    out = tmp_path_factory.mktemp("figures")
    argv = [
        "--dataset", "sample", "--dataset_dir", str(sample_grid["dataset_dir"]), "--tracking_uri", sample_grid["tracking_uri"],
        "--runs_dir", str(sample_grid["runs_dir"]), "--out_dir", str(out),
        "--tsne_volumes", str(TSNE_VOLUMES), "--overlay_slices", str(OVERLAY_ROWS),
    ]  # fmt: skip
    spec = importlib.util.spec_from_file_location("draw_pictures_cli", repo_root / "scripts" / "draw_pictures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            fire.Fire(script.main, command=argv, name="draw_pictures.py")
    except SystemExit as exit_:  # the script exits with status 1 when a figure could not be drawn
        pytest.fail(f"draw_pictures.py exited with {exit_.code}:\n{log.getvalue()}")
    print(log.getvalue())
    return {"out": out, "log": log.getvalue()}


def test_every_figure_is_a_png_of_its_layout(drawn: dict[str, Any], sample_grid: dict[str, Any], manifest: dict[str, Any]) -> None:
    client = MlflowClient(sample_grid["tracking_uri"])
    pretrain = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.workflow = 'pretrain'")
    assert len(pretrain) == 1
    families = {k.split("/")[0] for k in pretrain[0].data.metrics if not k.endswith("_iter")}
    assert {"train_loss", "train_img", "train_pix"} <= families  # GCL's objective and its two terms were logged
    cols = min(len(families), 3)
    width, height = PANEL_PX
    expected = {
        "dice_vs_L.png": (660, 480),  # dice_plot.plot_dice: 5.5 x 4 inches at 120 dpi, and the keys' column to the right
        "curves_pretrain_gcl.png": (cols * width, math.ceil(len(families) / cols) * height),
        "tsne_gcl.png": (len(manifest["meta_labels"]) * width, height),  # one panel per meta label
        "curves_finetune_gcl.png": (2 * width, height),
        "curves_finetune_random.png": (2 * width, height),
        "overlays_gcl.png": (3 * TILE_PX, OVERLAY_ROWS * TILE_PX),
        "overlays_random.png": (3 * TILE_PX, OVERLAY_ROWS * TILE_PX),
    }
    assert sorted(p.name for p in drawn["out"].iterdir()) == sorted(expected)
    for name, size in expected.items():
        path = drawn["out"] / name
        assert path.stat().st_size > 2000, name
        if name == "dice_vs_L.png":  # two rows: the plot's height; as wide as the plot and its keys
            assert png_size(path)[1] == size[1] and size[0] + 60 < png_size(path)[0] < size[0] + 300, png_size(path)
        else:
            assert png_size(path) == size, name
    assert "7 figures written; 0 not drawn" in drawn["log"]


def test_curves_draw_the_logged_series(drawn: dict[str, Any]) -> None:
    for name in ("curves_pretrain_gcl.png", "curves_finetune_gcl.png", "curves_finetune_random.png"):
        image = imread(drawn["out"] / name)
        assert (image[..., :3] < 0.95).any(axis=-1).mean() > 0.02, f"{name} is almost blank"
        # the first series of every panel is drawn in matplotlib's first colour (a blank set of axes has none)
        assert pixels_near(image, tab10(0)) > 100, name
    finetune = imread(drawn["out"] / "curves_finetune_gcl.png")
    assert pixels_near(finetune, tab10(1)) < 10  # one L only: no second colour


def test_tsne_colours_each_meta_label(drawn: dict[str, Any], manifest: dict[str, Any]) -> None:
    image = imread(drawn["out"] / "tsne_gcl.png")
    width = PANEL_PX[0]
    patients = {e["patient_id"] for e in manifest["pretrain"][:TSNE_VOLUMES]}
    assert len(patients) == TSNE_VOLUMES
    panel = image[:, :width]  # patient_id panel: one qualitative colour per patient, no other
    for k in range(len(patients)):
        assert pixels_near(panel, tab10(k)) > 20, k
    assert pixels_near(panel, tab10(len(patients))) == 0
    quantiles = image[:, width : 2 * width]  # slice_quantile panel: the ordered colour map, ends included
    assert pixels_near(quantiles, colormaps["viridis"](0.0)[:3]) > 20
    assert pixels_near(quantiles, colormaps["viridis"](1.0)[:3]) > 20


def test_encoder_embedding_and_tsne(sample_grid: dict[str, Any], manifest: dict[str, Any]) -> None:
    encoder = EncoderEmbedding(sample_grid["runs_dir"] / "sample" / "gcl" / "pretrain" / "encoder.pt", batch_size=8)
    images = torch.rand(20, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    embedded = encoder(images)
    assert embedded.shape == (20, 128)  # the deepest width of the grid's tiny U-Net
    assert torch.allclose(embedded.norm(dim=1), torch.ones(20), atol=1e-5)
    assert torch.allclose(encoder(images[:3]), embedded[:3], atol=1e-6)  # batching changes nothing
    coords = tsne(embedded.numpy(), seed=0)
    assert coords.shape == (20, 2) and np.isfinite(coords).all()
    np.testing.assert_allclose(tsne(embedded.numpy(), seed=0), coords)
    with pytest.raises(ValueError, match="at least 4 points"):
        tsne(embedded[:3].numpy())


def test_overlay_slices_have_ground_truth() -> None:
    label = np.zeros((6, 6, 10), dtype=np.int16)
    label[2:4, 2:4, 3:8] = 1  # foreground on slices 3..7
    other = np.zeros((6, 6, 4), dtype=np.int16)
    other[0, 0, 1] = 2
    chosen = choose_overlay_slices({"a": label, "b": other, "empty": np.zeros((6, 6, 3))}, 4)
    assert chosen == [("a", 4), ("a", 6), ("b", 1)]  # 2 + 2 asked; "b" has one foreground slice; "empty" none
    assert choose_overlay_slices({"a": label}, 1) == [("a", 5)]
    with pytest.raises(LookupError, match="no ground-truth foreground"):
        choose_overlay_slices({"empty": np.zeros((4, 4, 2))}, 2)


def test_overlays_show_the_saved_prediction(drawn: dict[str, Any], sample_grid: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Labels are the only coloured pixels: the ground-truth column always has them, the prediction column
    exactly when the prediction the evaluate run saved has foreground on the chosen slices."""
    import nibabel as nib

    from metacontrast.data.dicom import load_volume

    entry = manifest["test"][0]
    label = np.asarray(load_volume(sample_grid["dataset_dir"] / entry["label"])).round().astype(np.int16)
    slices = [z for _, z in choose_overlay_slices({entry["volume_id"]: label}, OVERLAY_ROWS)]
    assert len(slices) == OVERLAY_ROWS and all(label[..., z].any() for z in slices)
    saved = sample_grid["runs_dir"] / "sample" / "random" / "L1_seed0" / "evaluation" / "predictions" / f"{entry['volume_id']}.nii.gz"
    predicted = bool(np.asarray(nib.load(saved).dataobj)[..., slices].any())
    image = imread(drawn["out"] / "overlays_random.png")[..., :3]
    body = image[int(0.05 * len(image)) : int(0.94 * len(image))]  # without the title and the legend
    saturation = body.max(axis=-1) - body.min(axis=-1)
    coloured = [int((saturation[:, c * TILE_PX : (c + 1) * TILE_PX] > 0.15).sum()) for c in range(3)]
    assert coloured[0] == 0  # the image column is grey
    assert coloured[1] > 20  # ground truth drawn
    assert (coloured[2] > 0) == predicted, (coloured, predicted)


def test_missing_pieces_are_named(sample_grid: dict[str, Any], tmp_path: Path) -> None:
    uri = sample_grid["tracking_uri"]
    with pytest.raises(LookupError, match="no FINISHED run of dataset 'acdc'"):
        draw_pictures(dataset="acdc", tracking_uri=uri, out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere.db"):
        draw_pictures(dataset="sample", tracking_uri=f"sqlite:///{tmp_path / 'nowhere.db'}", out_dir=str(tmp_path))
    with pytest.raises(LookupError, match=r"methods \['simclr'\]"):
        draw_pictures(dataset="sample", tracking_uri=uri, methods=["simclr"], out_dir=str(tmp_path))
    # no dataset_dir: the figures that read scans are named, the others drawn; an absent method is named
    pictures = draw_pictures(dataset="sample", tracking_uri=uri, runs_dir=str(sample_grid["runs_dir"]),
                             methods=["gcl", "simclr"], out_dir=str(tmp_path))  # fmt: skip
    assert sorted(pictures.figures) == ["curves_finetune_gcl", "curves_pretrain_gcl", "dice_vs_L"]
    assert all(png_size(p) for p in pictures.figures.values())
    missing = "\n".join(pictures.missing)
    assert "method 'simclr': no FINISHED run" in missing
    assert "tsne_gcl.png not drawn" in missing and "overlays_gcl.png not drawn" in missing
    assert missing.count("pass --dataset_dir") == 2


def test_absent_predictions_are_named(sample_grid: dict[str, Any], tmp_path: Path) -> None:
    folder = sample_grid["runs_dir"] / "sample" / "random" / "L1_seed0" / "evaluation" / "predictions"
    hidden = folder.with_name("predictions.hidden")
    folder.rename(hidden)
    try:
        pictures = draw_pictures(dataset="sample", dataset_dir=str(sample_grid["dataset_dir"]), tracking_uri=sample_grid["tracking_uri"],
                                 runs_dir=str(sample_grid["runs_dir"]), methods=["random"], out_dir=str(tmp_path))  # fmt: skip
    finally:
        hidden.rename(folder)
    assert "overlays_random" not in pictures.figures
    assert len(pictures.missing) == 1 and "predictions of evaluate run" in pictures.missing[0]
    assert str(folder) in pictures.missing[0]


def test_metric_families() -> None:
    keys = ["train_img/a", "train_loss", "train_loss/a", "train_cos/a-vs-b", "train_loss_iter", "global_train_loss"]
    assert metric_families(keys) == {
        "global_train_loss": ["global_train_loss"], "train_loss": ["train_loss", "train_loss/a"],
        "train_cos": ["train_cos/a-vs-b"], "train_img": ["train_img/a"],
    }  # fmt: skip


def test_the_probes_frozen_finetunes_are_not_drawn_as_the_grids(tmp_path: Path) -> None:
    """The probes log their frozen fine-tunes to ``metacontrast-<dataset>-probe-finetunes``: by default the pictures
    read the grid's experiment only, so a store whose only fine-tune is a probe's has nothing to draw."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("metacontrast-sample-probe-finetunes")
    run = client.create_run(experiment, tags={"workflow": "finetune", "dataset": "sample", "method": "gcl"})
    client.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(LookupError, match="no FINISHED run of dataset 'sample'"):
        draw_pictures(dataset="sample", tracking_uri=uri, out_dir=str(tmp_path / "figures"))
    with pytest.raises(LookupError, match=r"it has runs of \['gcl'\]"):  # every experiment when asked
        draw_pictures(dataset="sample", tracking_uri=uri, methods=["simclr"], experiment_name=None, out_dir=str(tmp_path / "figures"))
