"""Volume preprocessing and slicing (metacontrast.data.transforms) on real ACDC / hippocampus volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Invertd, LoadImage, ResizeWithPadOrCropd, Spacingd

from metacontrast.data.transforms import SliceVolumed, slice_positions, slice_quantiles, volume_preprocessing

ACDC_PIXEL = (1.367, 1.367)
ACDC_SIZE = (192, 192)


@pytest.fixture(scope="module")
def acdc_pair(acdc_dir: Path) -> dict[str, str]:
    """patient001 ED: 216 x 256 x 10 at 1.5625 mm, so it is resampled and then cropped."""
    folder = acdc_dir / "patient001"
    return {"image": str(folder / "patient001_frame01.nii.gz"), "label": str(folder / "patient001_frame01_gt.nii.gz")}


def _without(transform: Compose, *types: type) -> Compose:
    return Compose([t for t in transform.transforms if not isinstance(t, types)])


@pytest.mark.parametrize("num_slices", range(6, 19))
def test_slice_quantile_edges(num_slices: int) -> None:
    s = 4
    q = slice_quantiles(num_slices, s)
    assert q.dtype == torch.int64 and q.shape == (num_slices,)
    assert q[0] == 0 and q[-1] == s - 1
    assert bool((q[1:] >= q[:-1]).all()), "quantiles must be non-decreasing"
    counts = torch.bincount(q, minlength=s)
    assert len(counts) == s and bool((counts > 0).all()), f"empty quantile for D={num_slices}: {counts}"
    assert int(counts.max() - counts.min()) <= 1
    assert q.tolist() == [k * s // num_slices for k in range(num_slices)]  # the documented formula


def test_slice_quantile_and_position_small_volumes() -> None:
    assert slice_quantiles(1).tolist() == [0]
    assert slice_quantiles(3, 4).tolist() == [0, 1, 2]  # D < S: one quantile stays empty
    assert slice_positions(1).tolist() == [0.0]
    pos = slice_positions(11)
    assert pos[0] == 0 and pos[-1] == 1 and torch.allclose(pos, torch.linspace(0, 1, 11))
    with pytest.raises(ValueError):
        slice_quantiles(0)


def test_percentile_normalisation_matches_numpy(acdc_pair: dict[str, str]) -> None:
    t = _without(volume_preprocessing(ACDC_PIXEL, ACDC_SIZE), Spacingd, ResizeWithPadOrCropd)
    out = t({"image": acdc_pair["image"]})["image"][0].numpy()
    raw = nib.load(acdc_pair["image"]).get_fdata().astype(np.float64)
    lo, hi = np.percentile(raw, [1, 99])
    expected = np.clip((raw - lo) / (hi - lo), 0, 1)
    assert out.shape == raw.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert 0.005 < (out == 0).mean() < 0.2 and 0.005 < (out == 1).mean() < 0.2  # clipping happened at both ends


def test_resampled_spacing_and_shape(acdc_pair: dict[str, str]) -> None:
    full = volume_preprocessing(ACDC_PIXEL, ACDC_SIZE)
    shape = nib.load(acdc_pair["image"]).shape
    spacing = LoadImage(image_only=True)(acdc_pair["image"]).pixdim.numpy()
    assert not np.allclose(spacing[:2], ACDC_PIXEL, atol=0.01), "pick a volume that needs resampling"

    resampled = _without(full, ResizeWithPadOrCropd)(dict(acdc_pair))
    for key in ("image", "label"):
        x = resampled[key]
        np.testing.assert_allclose(x.pixdim.numpy(), [*ACDC_PIXEL, spacing[2]], rtol=1e-5)
        # MONAI keeps corner voxel centres: n voxels at s -> round((n - 1) s / s') + 1 at s'
        expected = [round((n - 1) * s / p) + 1 for n, s, p in zip(shape[:2], spacing[:2], ACDC_PIXEL)]
        assert list(x.shape[1:3]) == expected
        extent = [round(n * s / p) for n, s, p in zip(shape[:2], spacing[:2], ACDC_PIXEL)]
        assert np.abs(np.subtract(expected, extent)).max() <= 1  # the same field of view
        assert x.shape[3] == shape[2], "the slice axis must not be resampled"

    out = full(dict(acdc_pair))
    assert out["image"].shape == (1, *ACDC_SIZE, shape[2]) and out["label"].shape == out["image"].shape
    assert out["image"].dtype == torch.float32
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    raw_classes = set(np.unique(nib.load(acdc_pair["label"]).get_fdata()).tolist())
    assert set(torch.unique(out["label"]).tolist()) == raw_classes == {0.0, 1.0, 2.0, 3.0}


def test_hippocampus_is_padded(hippocampus_dir: Path) -> None:
    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    entry = {"image": str(image), "label": str(hippocampus_dir / "labelsTr" / image.name)}
    shape = nib.load(entry["image"]).shape
    out = volume_preprocessing((1.0, 1.0), (64, 64))(entry)
    assert out["image"].shape == (1, 64, 64, shape[2])
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert float(out["label"].sum()) == pytest.approx(float(nib.load(entry["label"]).get_fdata().sum()))


def test_label_is_optional(acdc_pair: dict[str, str]) -> None:
    out = volume_preprocessing(ACDC_PIXEL, ACDC_SIZE)({"image": acdc_pair["image"], "patient_id": "patient001"})
    assert "label" not in out and out["image"].shape[1:3] == ACDC_SIZE


def test_invertd_round_trip_of_a_label(acdc_pair: dict[str, str]) -> None:
    transform = volume_preprocessing(ACDC_PIXEL, ACDC_SIZE)
    data = transform(dict(acdc_pair))
    data["pred"] = data["label"].clone()  # a perfect "prediction" on the preprocessed grid
    inverted = Invertd("pred", transform=transform, orig_keys="label", nearest_interp=True)(data)["pred"]
    original = LoadImage(image_only=True)(acdc_pair["label"])
    assert inverted.shape == (1, *original.shape)
    np.testing.assert_allclose(inverted.affine.numpy(), original.affine.numpy(), atol=1e-4)
    agree = (inverted[0] == original).float()
    assert float(agree.mean()) > 0.99
    assert float(agree[original > 0].mean()) > 0.9, "foreground must come back where it was"


def test_slice_volumed_tags_every_slice(acdc_pair: dict[str, str]) -> None:
    volume = volume_preprocessing(ACDC_PIXEL, ACDC_SIZE)(dict(acdc_pair))
    volume.update(patient_id="patient001", volume_id="patient001_ED", organ_state="ED")
    samples = SliceVolumed(("image", "label"), num_partitions=4)(volume)
    d = volume["image"].shape[-1]
    assert len(samples) == d
    for k, s in enumerate(samples):
        assert s["image"].shape == (1, *ACDC_SIZE) and s["label"].shape == (1, *ACDC_SIZE)
        assert torch.equal(s["image"], volume["image"][..., k])
        assert (s["patient_id"], s["volume_id"], s["organ_state"]) == ("patient001", "patient001_ED", "ED")
        assert s["slice_index"] == k
        assert s["slice_position"] == pytest.approx(k / (d - 1))
        assert s["slice_quantile"] == k * 4 // d
