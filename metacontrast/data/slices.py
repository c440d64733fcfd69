"""Preprocessed 2D slices with their meta labels, built once and cached on disk.

:class:`SliceCache` is the in-memory slice set every workflow trains on (contract in
``docs/architecture.md``). :func:`build_slice_cache` preprocesses each 3D volume of a datalist once
with :func:`metacontrast.data.transforms.volume_preprocessing` (a ``monai.data.Dataset`` read by a
``DataLoader`` with worker processes), stacks the slices, and, given ``cache_dir``, saves the result
in a disk cache keyed by the inputs, so every run of a grid shares one preprocessing pass.

Why not ``monai.data.PersistentDataset``/``CacheDataset`` for the cache itself: they cache per-volume
dicts and are re-collated sample by sample each step; training here wants every slice stacked in one
tensor that can live on the GPU and be batched with one ``index_select`` (DESIGN.md section 6), and one
file per split keyed by the whole datalist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import torch
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, EnsureTyped
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metacontrast.io import atomic_torch_save
from metacontrast.data.pack import is_slice_pack, packed_volumes
from metacontrast.data.transforms import (
    DEFAULT_NUM_PARTITIONS,
    slice_positions,
    slice_quantiles,
    volume_preprocessing,
)

__all__ = [
    "CACHE_VERSION",
    "META_KEYS",
    "SliceCache",
    "build_slice_cache",
    "slice_cache_key",
]

CACHE_VERSION = 1
"""Bump when preprocessing or the cache layout changes: old cache files then miss instead of being reused."""

META_KEYS = ("volume_index", "patient_id", "slice_index", "slice_position", "slice_quantile", "organ_state")
"""The per-slice meta tensors of a :class:`SliceCache`, each ``(N,)``."""

PathLike = str | os.PathLike


@dataclass
class SliceCache:
    """Every preprocessed 2D slice of a split, with its meta labels.

    Attributes:
        images: float32 ``(N, 1, H, W)``, intensities in ``[0, 1]``.
        labels: uint8 ``(N, 1, H, W)`` class maps, or ``None`` when built without labels.
        meta: dict of ``(N,)`` tensors: ``volume_index`` (int64, position in ``volumes``),
            ``patient_id`` (int64 code into ``patient_names``), ``slice_index`` (int64, ``k``),
            ``slice_position`` (float32, ``k / (D - 1)``), ``slice_quantile`` (int64, ``floor(k S / D)``),
            ``organ_state`` (int64 code into ``organ_state_names``).
        volumes: the datalist entries, in ``volume_index`` order.
        patient_names: ``patient_names[code]`` is the ``patient_id`` string of a code (sorted unique values).
        organ_state_names: ``organ_state_names[code]`` likewise (``"none"`` where a dataset has no phase).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    meta: dict[str, torch.Tensor]
    volumes: list[dict[str, Any]]
    patient_names: list[str] = field(default_factory=list)
    organ_state_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_volumes(self) -> int:
        return len(self.volumes)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (images, labels, meta)."""
        tensors = [self.images, *self.meta.values()] + ([self.labels] if self.labels is not None else [])
        return sum(t.element_size() * t.numel() for t in tensors)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SliceCache:
        return SliceCache(
            images=fn(self.images),
            labels=None if self.labels is None else fn(self.labels),
            meta={k: fn(v) for k, v in self.meta.items()},
            volumes=self.volumes,
            patient_names=self.patient_names,
            organ_state_names=self.organ_state_names,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SliceCache:
        """A copy with every tensor on ``device`` (e.g. keep the whole set on the GPU when it fits)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, slice_indices: torch.Tensor) -> SliceCache:
        """The slices at ``slice_indices`` (``(M,)`` int64), volumes and codes unchanged."""
        idx = torch.as_tensor(slice_indices, dtype=torch.long, device=self.images.device)
        return self._map(lambda t: t.index_select(0, idx))

    def subset(self, volume_indices: Sequence[int]) -> SliceCache:
        """Only the slices of the given volumes (e.g. the L labelled volumes of a fine-tune).

        The result lists ``volumes`` in the order given and renumbers ``volume_index`` to match
        (``volume_indices[j]`` becomes volume ``j``); slices keep their order within a volume.
        Patient and organ-state codes are unchanged, so they still index the same names.
        """
        order = [int(v) for v in volume_indices]
        if len(set(order)) != len(order):
            raise ValueError(f"volume_indices has repeats: {order}")
        bad = [v for v in order if not 0 <= v < self.num_volumes]
        if bad:
            raise IndexError(f"volume indices {bad} out of range for {self.num_volumes} volumes")
        vol = self.meta["volume_index"]
        remap = torch.full((self.num_volumes,), -1, dtype=torch.long, device=vol.device)
        remap[torch.as_tensor(order, dtype=torch.long, device=vol.device)] = torch.arange(len(order), device=vol.device)
        new_vol = remap[vol]
        keep = torch.nonzero(new_vol >= 0).squeeze(1)
        # stable sort by new volume position keeps the slice order inside each volume
        keep = keep[torch.sort(new_vol[keep], stable=True).indices]
        out = self.select(keep)
        out.meta["volume_index"] = new_vol[keep]
        out.volumes = [self.volumes[v] for v in order]
        return out

    def state(self) -> dict[str, Any]:
        """Plain containers of tensors and primitives, loadable with ``torch.load(weights_only=True)``."""
        out: dict[str, Any] = {
            "images": self.images,
            "meta": dict(self.meta),
            "volumes": self.volumes,
            "patient_names": self.patient_names,
            "organ_state_names": self.organ_state_names,
        }
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SliceCache:
        """Inverse of :meth:`state`; checks that the pieces fit together."""
        cache = cls(
            images=state["images"],
            labels=state.get("labels"),
            meta=dict(state["meta"]),
            volumes=list(state["volumes"]),
            patient_names=list(state["patient_names"]),
            organ_state_names=list(state["organ_state_names"]),
        )
        cache.validate()
        return cache

    def validate(self) -> None:
        """Raise ``ValueError`` if shapes, dtypes or meta keys are inconsistent."""
        n = len(self)
        if self.images.ndim != 4 or self.images.shape[1] != 1 or self.images.dtype != torch.float32:
            raise ValueError(f"images must be float32 (N, 1, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.shape != self.images.shape or self.labels.dtype != torch.uint8):
            raise ValueError(f"labels must be uint8 {tuple(self.images.shape)}, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if set(self.meta) != set(META_KEYS):
            raise ValueError(f"meta keys {sorted(self.meta)} != {sorted(META_KEYS)}")
        for k, v in self.meta.items():
            if v.shape != (n,):
                raise ValueError(f"meta['{k}'] has shape {tuple(v.shape)}, expected ({n},)")
        if n and int(self.meta["volume_index"].max()) >= len(self.volumes):
            raise ValueError("volume_index points past the volumes list")


def _file_stamp(path: Path) -> list[Any]:
    """Size and mtime of a file, or of every file under a folder (a DICOM series)."""
    if path.is_dir():
        return [[str(p.relative_to(path)), *_file_stamp(p)] for p in sorted(path.rglob("*")) if p.is_file()]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _resolve(dataset_dir: Path, rel: str) -> Path:
    return dataset_dir / rel  # an absolute rel stays absolute


def slice_cache_key(
    datalist: Sequence[dict[str, Any]],
    dataset_dir: PathLike,
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    num_partitions: int = DEFAULT_NUM_PARTITIONS,
    with_labels: bool = True,
) -> str:
    """SHA-256 over everything the cached slices depend on.

    That is: each entry (its paths relative to ``dataset_dir`` and its meta fields), each input
    file's size and modification time, the preprocessing parameters, :data:`CACHE_VERSION` and the
    MONAI version. Moving ``dataset_dir`` as a whole keeps the key; touching an input file changes it.
    """
    root = Path(dataset_dir)
    keys = ("image", "label") if with_labels else ("image",)
    entries = []
    for entry in datalist:
        files = {}
        for key in keys:
            path = _resolve(root, str(entry[key]))
            rel = os.path.relpath(path, root)
            files[key] = [rel, _file_stamp(path)]
        meta = {k: entry.get(k) for k in ("volume_id", "patient_id", "organ_state")}
        entries.append({"files": files, "meta": meta})
    payload = {
        "entries": entries,
        "pixel_size": [float(p) for p in pixel_size],
        "spatial_size": [int(s) for s in spatial_size],
        "num_partitions": int(num_partitions),
        "with_labels": bool(with_labels),
        "version": CACHE_VERSION,
        "monai": monai.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _codes(values: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    names = sorted(set(values))
    return names, {name: i for i, name in enumerate(names)}


def _identity(x: Any) -> Any:
    return x


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, then restore the caller's setting.

    Per-volume resampling is too small for intra-op threading to pay: on 2 cores one thread is twice
    as fast as two, and two worker processes beat both.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _default_workers(num_volumes: int) -> int:
    return 0 if num_volumes < 16 else min(4, os.cpu_count() or 1)


def _preprocessed_volumes(
    datalist: Sequence[dict[str, Any]],
    dataset_dir: Path,
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    with_labels: bool,
    num_workers: int,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """Yield ``{"image": (1, H, W, D) float32, "label": (1, H, W, D)?}`` per entry, in datalist order."""
    keys = ["image", "label"] if with_labels else ["image"]
    data = [{k: str(_resolve(dataset_dir, str(e[k]))) for k in keys} for e in datalist]
    transform = Compose(
        [
            volume_preprocessing(pixel_size, spatial_size),
            EnsureTyped(keys, track_meta=False),  # plain tensors: cheap to pass between processes
        ]
    )
    loader = DataLoader(MonaiDataset(data, transform), batch_size=None, collate_fn=_identity, num_workers=num_workers)
    with _torch_threads(1) if num_workers == 0 else contextlib.nullcontext():
        yield from tqdm(loader, total=len(data), desc="preprocessing volumes", disable=not progress, leave=False)


def _build(
    datalist: Sequence[dict[str, Any]],
    items: Iterable[dict[str, Any]],
    num_partitions: int,
    with_labels: bool,
) -> SliceCache:
    """Stack preprocessed volumes (``items``, one per entry, as :func:`_preprocessed_volumes` yields them)."""
    patient_names, patient_code = _codes([str(e["patient_id"]) for e in datalist])
    state_names, state_code = _codes([str(e.get("organ_state", "none")) for e in datalist])
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    meta: dict[str, list[torch.Tensor]] = {k: [] for k in META_KEYS}
    volumes = [dict(e) for e in datalist]
    for v, (entry, item) in enumerate(zip(datalist, items, strict=True)):
        image = item["image"]
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"{entry['image']}: expected a single-channel 3D volume, got shape {tuple(image.shape)}")
        d = int(image.shape[-1])
        images.append(image.permute(3, 0, 1, 2).float())  # (1, H, W, D) -> (D, 1, H, W)
        if with_labels:
            label = item["label"]
            if label.shape != image.shape:
                raise ValueError(f"{entry['label']}: label shape {tuple(label.shape)} != image shape {tuple(image.shape)}")
            if label.numel() and (label.min() < 0 or label.max() > 255):
                raise ValueError(f"{entry['label']}: label values outside 0..255")
            labels.append(label.permute(3, 0, 1, 2).round().to(torch.uint8))
        meta["volume_index"].append(torch.full((d,), v, dtype=torch.long))
        meta["patient_id"].append(torch.full((d,), patient_code[str(entry["patient_id"])], dtype=torch.long))
        meta["organ_state"].append(torch.full((d,), state_code[str(entry.get("organ_state", "none"))], dtype=torch.long))
        meta["slice_index"].append(torch.arange(d, dtype=torch.long))
        meta["slice_position"].append(slice_positions(d))
        meta["slice_quantile"].append(slice_quantiles(d, num_partitions))
    cache = SliceCache(
        images=torch.cat(images),
        labels=torch.cat(labels) if with_labels else None,
        meta={k: torch.cat(v) for k, v in meta.items()},
        volumes=volumes,
        patient_names=patient_names,
        organ_state_names=state_names,
    )
    cache.validate()
    return cache



def _try_load(path: Path, key: str) -> SliceCache | None:
    """The cache at ``path`` if it is there and sound; a damaged file is reported and ``None`` returned."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("key") != key:
            raise ValueError("key mismatch")
        return SliceCache.from_state(state)
    except Exception as err:  # any unreadable or inconsistent file is rebuilt, never trusted
        warnings.warn(f"slice cache {path} is unreadable ({type(err).__name__}: {err}); rebuilding it", RuntimeWarning, stacklevel=3)
        return None


def build_slice_cache(
    datalist: Sequence[dict[str, Any]],
    dataset_dir: PathLike,
    pixel_size: Sequence[float],
    spatial_size: Sequence[int],
    num_partitions: int = DEFAULT_NUM_PARTITIONS,
    with_labels: bool = True,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> SliceCache:
    """Preprocess every volume of ``datalist`` once and stack its slices into a :class:`SliceCache`.

    Args:
        datalist: manifest entries (``image``, ``label``, ``volume_id``, ``patient_id``, ``organ_state``);
            paths relative to ``dataset_dir`` (absolute paths also work).
        dataset_dir: root of the raw data, or a slice pack (:mod:`metacontrast.data.pack`), whose
            volumes are read as they were packed (no disk cache; its preprocessing must match).
        pixel_size: in-plane spacing ``(px, py)`` in mm.
        spatial_size: in-plane size ``(H, W)``.
        num_partitions: S for ``slice_quantile``.
        with_labels: load labels (every entry must have one); ``False`` for pre-training.
        cache_dir: if given, the result is stored as ``slices-<key>.pt`` there and reused while the
            key (:func:`slice_cache_key`) matches; a damaged file is reported with a ``RuntimeWarning``
            and rebuilt. Writes are atomic.
        progress: show a progress bar while preprocessing.
        num_workers: ``DataLoader`` worker processes for preprocessing; ``None`` picks 0 for fewer than
            16 volumes, else ``min(4, cpu_count)``.

    Returns:
        The slice cache on the CPU, ``N = sum of the volumes' slice counts`` slices of ``(1, H, W)``.
    """
    if not datalist:
        raise ValueError("empty datalist: no volumes to slice")
    if is_slice_pack(dataset_dir):  # already preprocessed: read, never cached again
        items = packed_volumes(dataset_dir, datalist, pixel_size, spatial_size, with_labels)
        return _build(datalist, items, num_partitions, with_labels)
    if with_labels:
        missing = [e.get("volume_id", e["image"]) for e in datalist if not e.get("label")]
        if missing:
            raise ValueError(f"with_labels=True but these volumes have no label: {missing}")
    root = Path(dataset_dir)
    for entry in datalist:
        for k in ("image", "label") if with_labels else ("image",):
            if not _resolve(root, str(entry[k])).exists():
                raise FileNotFoundError(f"{_resolve(root, str(entry[k]))} (the '{k}' of {entry.get('volume_id', '?')}) does not exist")
    path = key = None
    if cache_dir is not None:
        key = slice_cache_key(datalist, root, pixel_size, spatial_size, num_partitions, with_labels)
        path = Path(cache_dir) / f"slices-{key[:32]}.pt"
        cached = _try_load(path, key)
        if cached is not None:
            return cached
    workers = _default_workers(len(datalist)) if num_workers is None else num_workers
    items = _preprocessed_volumes(datalist, root, pixel_size, spatial_size, with_labels, workers, progress)
    cache = _build(datalist, items, num_partitions, with_labels)
    if path is not None:
        atomic_torch_save({**cache.state(), "key": key}, path)
    return cache
