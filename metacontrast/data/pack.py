"""Slice packs: a dataset's volumes preprocessed once, quantised and compressed, to travel where raw scans cannot.

A GPU host without network and with a small transfer limit (``docs/device.md``) cannot receive the raw scans,
and does not need them: every training workflow reads preprocessed slices (:class:`~metacontrast.data.slices.
SliceCache`).  A slice pack is a folder that stands in for ``dataset_dir``:

* ``slice_pack.json`` -- format, dataset name, the preprocessing (``pixel_size``, ``spatial_size``) the slices
  were made with, the quantisation, per volume its slice count and whether it has a label, and ``order``,
  the volumes in stream order;
* ``volumes.xz`` -- one LZMA stream (xz) of every volume's arrays in the order ``slice_pack.json`` lists them:
  the image, uint8 ``(D, H, W)`` = ``round(255 x)`` of the preprocessed intensities ``x`` in ``[0, 1]``
  (absolute error at most 1/510), then, if it has one, the label, uint8 ``(D, H, W)`` class maps.  LZMA
  keeps ACDC at 192x192 about a third smaller than zlib (``numpy.savez_compressed``) does: what decides
  whether a pack fits in a transfer.

:func:`~metacontrast.data.slices.build_slice_cache` given a pack as ``dataset_dir`` reads the requested
volumes from it (meta labels are recomputed from the datalist as for raw scans) instead of preprocessing,
and refuses a preprocessing other than the pack's by name.

Scoring on the source grid (``evaluate``) needs the source label and the geometry the preprocessing undoes.  A
pack made for it carries, per scored volume, the source label file itself (``source_labels/<volume_id>.nii.gz``,
listed under ``source_labels`` in ``slice_pack.json``; a label map compresses to a few kB): its header gives the
grid the prediction is mapped back to (the packer checks that the image shares it), its voxels the reference.
"""

from __future__ import annotations

import json
import lzma
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metacontrast.io import atomic_write, atomic_write_text

__all__ = ["PACK_FILE", "PACK_FORMAT", "SlicePackError", "is_slice_pack", "packed_volumes", "read_pack_info", "source_label",
           "write_slice_pack"]

PACK_FILE = "slice_pack.json"
ARRAYS_FILE = "volumes.xz"
PACK_FORMAT = 1
SOURCE_LABELS = "source_labels"
_LEVELS = 255


class SlicePackError(ValueError):
    """A slice pack that cannot serve a request (missing volume, other preprocessing, damaged file)."""


def is_slice_pack(dataset_dir: str | os.PathLike[str]) -> bool:
    """``True`` when ``dataset_dir`` is a slice pack folder (it holds ``slice_pack.json``)."""
    return (Path(dataset_dir) / PACK_FILE).is_file()


def read_pack_info(pack_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The pack's ``slice_pack.json``, checked; errors name the file."""
    path = Path(pack_dir) / PACK_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SlicePackError(f"{path}: not a readable slice pack description ({err})") from err
    if info.get("format") != PACK_FORMAT:
        raise SlicePackError(f"{path}: format {info.get('format')!r}, this version reads format {PACK_FORMAT}")
    for key in ("pixel_size", "spatial_size", "volumes", "order"):
        if key not in info:
            raise SlicePackError(f"{path}: lacks the key {key!r}")
    return info


def quantise(images: torch.Tensor) -> np.ndarray:
    """float ``(D, 1, H, W)`` in ``[0, 1]`` -> uint8 ``(D, H, W)``, ``round(255 x)``."""
    return (images[:, 0].clamp(0, 1) * _LEVELS).round().to(torch.uint8).numpy()


def dequantise(codes: np.ndarray) -> torch.Tensor:
    """uint8 ``(D, H, W)`` -> float32 ``(1, H, W, D)`` (the layout of a preprocessed volume)."""
    return (torch.from_numpy(np.ascontiguousarray(codes)).float() / _LEVELS).permute(1, 2, 0).unsqueeze(0)


def write_slice_pack(
    cache_volumes: Sequence[tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]],
    out_dir: str | os.PathLike[str],
    dataset: str,
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    source_labels: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a pack from preprocessed volumes.

    Args:
        cache_volumes: ``(entry, images, labels)`` per volume: the manifest entry (its ``volume_id`` keys the
            pack), images float32 ``(D, 1, H, W)`` in ``[0, 1]``, labels uint8 ``(D, 1, H, W)`` or ``None``.
            A volume listed twice (in two splits) is written once.
        out_dir: the pack folder (created; an existing pack there is replaced atomically file by file).
        dataset, pixel_size, spatial_size: recorded, and checked against every later request.
        source_labels: ``volume_id -> NIfTI label file`` of the volumes ``evaluate`` may score from the pack,
            copied byte for byte to ``source_labels/<volume_id>.nii[.gz]``.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    volumes: dict[str, dict[str, Any]] = {}
    with atomic_write(out / ARRAYS_FILE, "wb") as handle, lzma.LZMAFile(handle, "wb", preset=6) as stream:
        for entry, images, labels in cache_volumes:
            vid = str(entry["volume_id"])
            if vid in volumes:
                continue
            stream.write(quantise(images).tobytes())
            if labels is not None:
                stream.write(labels[:, 0].contiguous().numpy().tobytes())
            volumes[vid] = {"num_slices": int(images.shape[0]), "has_label": labels is not None}
    copied = {}
    for vid, path in (source_labels or {}).items():
        name = f"{SOURCE_LABELS}/{vid}{'.nii.gz' if str(path).endswith('.gz') else '.nii'}"
        with atomic_write(out / name, "wb") as handle:
            handle.write(Path(path).read_bytes())
        copied[str(vid)] = name
    info = {
        "format": PACK_FORMAT,
        "dataset": dataset,
        "pixel_size": [float(p) for p in pixel_size],
        "spatial_size": [int(s) for s in spatial_size],
        "quantisation": f"uint8 round({_LEVELS} x) of intensities in [0, 1]",
        "volumes": volumes,
        "order": list(volumes),  # the stream's order (the JSON's keys are sorted)
        **({SOURCE_LABELS: copied} if copied else {}),
    }
    atomic_write_text(out / PACK_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def packed_volumes(
    pack_dir: str | os.PathLike[str],
    datalist: Sequence[dict[str, Any]],
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    with_labels: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{"image": (1, H, W, D) float32, "label": (1, H, W, D) float32?}`` per entry, in datalist order.

    The same items :func:`~metacontrast.data.slices.build_slice_cache` gets from preprocessing raw scans.
    Raises :class:`SlicePackError` (naming the pack) for another preprocessing, a volume the pack lacks, or a
    label asked of a volume packed without one -- before anything is yielded.
    """
    pack = Path(pack_dir)
    info = read_pack_info(pack)
    want = {"pixel_size": [float(p) for p in pixel_size], "spatial_size": [int(s) for s in spatial_size]}
    got = {k: info[k] for k in want}
    if not all(np.allclose(want[k], got[k]) for k in want):
        raise SlicePackError(f"slice pack {pack} was made with {got}, this run asks for {want}; "
                             "repack with that preprocessing or drop the preprocessing override")
    ids = [str(e["volume_id"]) for e in datalist]
    missing = [v for v in ids if v not in info["volumes"]]
    if missing:
        raise SlicePackError(f"slice pack {pack} lacks the volumes {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if with_labels:
        unlabelled = [v for v in ids if not info["volumes"][v]["has_label"]]
        if unlabelled:
            raise SlicePackError(f"slice pack {pack} holds no label for {unlabelled[:5]}")
    arrays = _read_arrays(pack, info)
    for vid in ids:
        item = {"image": dequantise(arrays[vid][0])}
        if with_labels:
            item["label"] = torch.from_numpy(arrays[vid][1]).float().permute(1, 2, 0).unsqueeze(0)
        yield item


def source_label(pack_dir: str | os.PathLike[str], volume_id: str) -> Path:
    """The source label file the pack carries for ``volume_id`` (:func:`write_slice_pack`'s ``source_labels``);
    :class:`SlicePackError` names the pack when it carries none."""
    pack = Path(pack_dir)
    name = read_pack_info(pack).get(SOURCE_LABELS, {}).get(str(volume_id))
    if name is None or not (pack / name).is_file():
        raise SlicePackError(f"slice pack {pack} carries no source label for {volume_id!r}: it cannot score that volume "
                             "on its source grid; pack it with the split among the scored ones (pack_device.py --scored_splits)")
    return pack / name


def _read_arrays(pack: Path, info: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every volume's ``(image, label or None)`` uint8 ``(D, H, W)`` arrays; a short or damaged stream names the file."""
    path = pack / ARRAYS_FILE
    try:
        data = bytearray(lzma.decompress(path.read_bytes()))  # writable: torch refuses read-only buffers
    except (OSError, lzma.LZMAError) as err:
        raise SlicePackError(f"{path}: unreadable ({err})") from err
    h, w = info["spatial_size"]
    out, offset = {}, 0
    for vid in info["order"]:
        volume = info["volumes"][vid]
        shape = (int(volume["num_slices"]), h, w)
        size = shape[0] * h * w
        parts = []
        for _ in range(2 if volume["has_label"] else 1):
            if offset + size > len(data):
                raise SlicePackError(f"{path}: ends inside volume {vid} ({len(data)} bytes); repack")
            parts.append(np.frombuffer(data, np.uint8, size, offset).reshape(shape))
            offset += size
        out[vid] = (parts[0], parts[1] if len(parts) > 1 else None)
    if offset != len(data):
        raise SlicePackError(f"{path}: {len(data) - offset} bytes beyond the volumes {PACK_FILE} lists; repack")
    return out
