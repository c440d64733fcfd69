"""Volume preprocessing and slicing, in MONAI's dictionary-transform style.

The volume pipeline (:func:`volume_preprocessing`) is a composition of stock MONAI transforms:

``LoadImaged -> EnsureChannelFirstd -> ScaleIntensityRangePercentilesd -> Spacingd -> ResizeWithPadOrCropd``

* no reorientation: slices are taken along the last array axis of the volume *as stored*
  (``docs/architecture.md``), so neither ``Orientationd`` nor a canonical reader is used;
* per-volume intensity normalisation to ``[0, 1]`` between the 1st and 99th percentiles, clipped;
* in-plane resampling to ``pixel_size`` with the slice axis untouched (bilinear images, nearest labels);
* centre crop/pad in-plane to ``spatial_size``, keeping every slice.

MetaTensor tracking stays on, so a prediction made on the preprocessed grid maps back to the
original voxel grid with ``monai.transforms.Invertd`` (the evaluate workflow does that).

Slicing a preprocessed ``(C, H, W, D)`` volume into 2D samples is the one thing MONAI has no
transform for (its 2D-from-3D transforms crop patches; none tags a slice with meta labels), so
:class:`SliceVolumed` is written here. The per-slice meta labels come from the vectorised helpers
:func:`slice_positions` and :func:`slice_quantiles`, which :mod:`metacontrast.data.slices` uses to
tag a whole volume at once without a per-slice Python loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

__all__ = [
    "DEFAULT_NUM_PARTITIONS",
    "SLICE_META_KEYS",
    "SliceVolumed",
    "slice_positions",
    "slice_quantiles",
    "volume_preprocessing",
]

DEFAULT_NUM_PARTITIONS = 4
"""S, the number of equal parts a volume's slices are split into for the ``slice_quantile`` meta label."""

SLICE_META_KEYS = ("patient_id", "volume_id", "organ_state")
"""Volume-level keys that every slice sample inherits from its datalist entry."""


def volume_preprocessing(
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    image_key: str = "image",
    label_key: str = "label",
    reader: str | ImageReader | None = None,
) -> Compose:
    """The per-volume preprocessing every workflow shares.

    Args:
        pixel_size: target in-plane spacing ``(px, py)`` in mm (ACDC: ``(1.367, 1.367)``).
        spatial_size: in-plane size ``(H, W)`` after centre crop/pad (ACDC: ``(192, 192)``).
        image_key: datalist key of the image path.
        label_key: datalist key of the label path; the key may be absent from an entry
            (pre-training volumes loaded without labels), every label step allows that.
        reader: passed to ``LoadImaged``. ``None`` lets MONAI pick by file type (NiBabel for
            NIfTI; ITK for a folder, i.e. a DICOM series). This is the hook for a dedicated DICOM
            reader (``metacontrast.data.dicom``) should one be needed.

    Returns:
        A ``Compose`` mapping an entry ``{"image": path, "label": path?, ...}`` to the same dict
        with ``image`` a float32 MetaTensor ``(1, H, W, D)`` in ``[0, 1]`` and ``label`` a float32
        MetaTensor ``(1, H, W, D)`` of class values; ``D`` is the volume's slice count, unchanged.
        Before the crop/pad an in-plane axis of ``n`` voxels at spacing ``s`` has
        ``round((n - 1) * s / pixel_size) + 1`` voxels (MONAI keeps the corner voxel centres).
        Every spatial step is recorded, so ``Invertd(keys, transform=<this>, orig_keys=...)``
        maps an output back to the original grid.
    """
    if len(pixel_size) != 2 or len(spatial_size) != 2:
        raise ValueError(f"pixel_size and spatial_size are in-plane pairs, got {pixel_size!r}, {spatial_size!r}")
    keys = [image_key, label_key]
    return Compose(
        [
            LoadImaged(keys, reader=reader, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            ScaleIntensityRangePercentilesd(image_key, lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
            # A non-positive pixdim component keeps that axis' spacing: the slice axis is not resampled.
            # MONAI maps the corner voxel centres onto each other: an axis of n voxels at spacing s becomes
            # round((n - 1) * s / s') + 1 voxels at spacing s'.
            Spacingd(
                keys,
                pixdim=(float(pixel_size[0]), float(pixel_size[1]), 0.0),
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
                allow_missing_keys=True,
            ),
            ResizeWithPadOrCropd(keys, spatial_size=(int(spatial_size[0]), int(spatial_size[1]), -1), allow_missing_keys=True),
        ]
    )


def slice_positions(num_slices: int) -> torch.Tensor:
    """Relative position of each slice along the slice axis.

    ``slice_position[k] = k / (D - 1)`` for ``k = 0 .. D-1``, so the first slice is 0 and the last 1;
    a single-slice volume (``D == 1``) gets position 0.

    Returns:
        float32 tensor ``(D,)``.
    """
    if num_slices < 1:
        raise ValueError(f"a volume needs at least one slice, got {num_slices}")
    if num_slices == 1:
        return torch.zeros(1, dtype=torch.float32)
    return torch.arange(num_slices, dtype=torch.float64).div(num_slices - 1).float()


def slice_quantiles(num_slices: int, num_partitions: int = DEFAULT_NUM_PARTITIONS) -> torch.Tensor:
    """Which of S equal parts of the volume each slice falls in (the ``slice_quantile`` meta label).

    ``slice_quantile[k] = floor(k * S / D)`` for ``k = 0 .. D-1`` (integer arithmetic, no rounding error).

    Edge behaviour:

    * the values are non-decreasing in ``k`` and lie in ``0 .. S-1``; the first slice is 0;
    * if ``D >= S`` every part is non-empty, the last slice is ``S - 1`` and part sizes are
      ``floor(D / S)`` or ``ceil(D / S)`` (they differ by at most one);
    * if ``D < S`` some parts are empty (each slice still gets a distinct part);
      ``D == 1`` gives ``[0]``.

    Returns:
        int64 tensor ``(D,)``.
    """
    if num_slices < 1:
        raise ValueError(f"a volume needs at least one slice, got {num_slices}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    return torch.div(torch.arange(num_slices) * num_partitions, num_slices, rounding_mode="floor")


class SliceVolumed(MapTransform):
    """Cut a preprocessed ``(C, H, W, D)`` volume into ``D`` 2D samples tagged with meta labels.

    Written by hand because MONAI has no transform that turns a volume into all of its slices with
    per-slice meta labels. Like MONAI's cropping transforms that return several samples, it returns
    a list of dicts (one per slice, in slice order); each holds

    * every key in ``keys`` as its ``(C, H, W)`` slice (the last axis indexed),
    * ``patient_id``, ``volume_id``, ``organ_state`` copied from the volume's entry (absent keys skipped;
      ``organ_state`` defaults to ``"none"``),
    * ``slice_index`` (int ``k``), ``slice_position`` (float ``k / (D-1)``, see :func:`slice_positions`)
      and ``slice_quantile`` (int ``floor(k * S / D)``, see :func:`slice_quantiles`).

    Args:
        keys: the volume keys to slice (``("image", "label")``); missing keys are allowed.
        num_partitions: S, the number of slice quantiles.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        num_partitions: int = DEFAULT_NUM_PARTITIONS,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_partitions = num_partitions

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            raise KeyError(f"none of {self.keys} found in the data")
        num_slices = int(d[present[0]].shape[-1])
        for key in present:
            if d[key].shape[-1] != num_slices:
                raise ValueError(f"'{key}' has {d[key].shape[-1]} slices, '{present[0]}' has {num_slices}")
        positions = slice_positions(num_slices).tolist()
        quantiles = slice_quantiles(num_slices, self.num_partitions).tolist()
        shared = {k: d[k] for k in SLICE_META_KEYS if k in d}
        shared.setdefault("organ_state", "none")
        return [
            {
                **shared,
                **{key: d[key][..., k] for key in present},
                "slice_index": k,
                "slice_position": positions[k],
                "slice_quantile": quantiles[k],
            }
            for k in range(num_slices)
        ]
