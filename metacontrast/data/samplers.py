"""Batch samplers over a slice set: meta-label-aware (GLCL's G^D) and plain random.

Both yield lists of slice indices (for ``DataLoader(batch_sampler=...)`` or for indexing a
:class:`metacontrast.data.slices.SliceCache` directly), are deterministic given ``seed`` and the
epoch, and can be resumed mid-epoch from ``state_dict()``. Written by hand because neither torch nor
MONAI has a sampler that composes batches from meta labels or saves its position.

Epochs: each complete pass over the sampler advances ``epoch`` by one, so successive epochs differ
without any caller action; ``set_epoch(e)`` (as for ``DistributedSampler``) sets it explicitly.
The position in the epoch counts batches handed out; a ``DataLoader`` with workers prefetches a few
batches ahead of the ones consumed, so resume exactly with ``num_workers=0`` (the cached-slice case).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["MetaLabelBatchSampler", "RandomBatchSampler"]


class _ResumableBatchSampler(ABC):
    """Epoch bookkeeping shared by the samplers: ``set_epoch``, ``state_dict``, resume mid-epoch."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    @abstractmethod
    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        """The batches of one epoch, drawn from ``rng``."""

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self.position = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self._rng())
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "position"}``: enough to continue the same sequence after a restart."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class MetaLabelBatchSampler(_ResumableBatchSampler):
    """Batches of ``volumes_per_batch`` volumes x one random slice from each of the S slice quantiles.

    This is GLCL's G^D batch strategy: every batch holds, for each of its volumes, S slices of the same
    volume (positives for ``patient_id`` / volume) and, across volumes, slices of the same quantile
    (positives for ``slice_quantile``), so each meta label has positives in every batch.

    Per epoch the volumes are shuffled and cut into groups of ``volumes_per_batch``; for each volume of
    a group one slice is drawn uniformly from each of its quantiles. A volume with fewer slices than S
    has empty quantiles and contributes one slice per non-empty quantile. Batch order: volume by volume,
    quantiles ascending inside a volume. All indices in a batch are distinct.

    ``len(sampler)`` = batches per epoch = ``num_volumes // volumes_per_batch`` with ``drop_last``
    (default), else ``ceil(num_volumes / volumes_per_batch)`` (the last batch has fewer volumes).

    Args:
        volume_index: ``(N,)`` volume of each slice (``cache.meta["volume_index"]``).
        slice_quantile: ``(N,)`` quantile of each slice in ``0..S-1`` (``cache.meta["slice_quantile"]``).
        volumes_per_batch: volumes per batch; a batch holds up to ``volumes_per_batch * S`` slices.
        num_partitions: S.
        seed: base seed; epoch ``e`` draws from ``numpy.random.default_rng([seed, e])``.
        drop_last: drop the last incomplete group of volumes.
    """

    def __init__(
        self,
        volume_index: Sequence[int] | torch.Tensor,
        slice_quantile: Sequence[int] | torch.Tensor,
        volumes_per_batch: int,
        num_partitions: int = 4,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(seed)
        vol = np.asarray(torch.as_tensor(volume_index).cpu(), dtype=np.int64)
        quant = np.asarray(torch.as_tensor(slice_quantile).cpu(), dtype=np.int64)
        if vol.shape != quant.shape or vol.ndim != 1:
            raise ValueError(f"volume_index {vol.shape} and slice_quantile {quant.shape} must be equal (N,) arrays")
        if quant.size and (quant.min() < 0 or quant.max() >= num_partitions):
            raise ValueError(f"slice_quantile values must lie in 0..{num_partitions - 1}")
        if volumes_per_batch < 1:
            raise ValueError(f"volumes_per_batch must be >= 1, got {volumes_per_batch}")
        self.volumes_per_batch = int(volumes_per_batch)
        self.num_partitions = int(num_partitions)
        self.drop_last = bool(drop_last)
        self.volumes = np.unique(vol)
        if drop_last and len(self.volumes) < volumes_per_batch:
            raise ValueError(f"{len(self.volumes)} volumes cannot fill a batch of {volumes_per_batch} volumes with drop_last")
        # slices grouped by (volume, quantile), as CSR: cells in volume-major, quantile-minor order
        order = np.lexsort((quant, vol))
        cell = vol[order] * num_partitions + quant[order]
        self._slices = order
        cells, starts, counts = np.unique(cell, return_index=True, return_counts=True)
        self._cell_volume = cells // num_partitions
        self._cell_start = starts
        self._cell_count = counts
        first = np.searchsorted(self._cell_volume, self.volumes)
        self._volume_cells = np.split(np.arange(len(cells)), first[1:])

    def __len__(self) -> int:
        n, b = len(self.volumes), self.volumes_per_batch
        return n // b if self.drop_last else -(-n // b)

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        # one random slice per (volume, quantile) cell, drawn for every cell at once
        picks = self._slices[self._cell_start + (rng.random(len(self._cell_start)) * self._cell_count).astype(np.int64)]
        perm = rng.permutation(len(self.volumes))
        groups = [perm[i : i + self.volumes_per_batch] for i in range(0, len(perm), self.volumes_per_batch)]
        return [np.concatenate([picks[self._volume_cells[v]] for v in g]).tolist() for g in groups[: len(self)]]


class RandomBatchSampler(_ResumableBatchSampler):
    """Plain random batches of slices (a fresh permutation each epoch), same interface as the meta sampler.

    ``len(sampler)`` = ``num_samples // batch_size`` with ``drop_last`` (default), else the ceiling.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(seed)
        if batch_size < 1 or num_samples < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
        if drop_last and num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill a batch of {batch_size} with drop_last")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        perm = rng.permutation(self.num_samples)
        return [perm[i * self.batch_size : (i + 1) * self.batch_size].tolist() for i in range(len(self))]
