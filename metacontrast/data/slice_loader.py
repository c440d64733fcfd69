"""Batches of a :class:`~metacontrast.data.slices.SliceCache`: a map-style dataset whose batched fetch is one
``index_select`` per tensor, and the ``DataLoader`` over it in the order of a batch sampler."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from metacontrast.data.slices import SliceCache

__all__ = ["SliceDataset", "make_slice_loader"]


def _batch_as_is(batch: Any) -> Any:
    return batch  # the dataset's __getitems__ already gives the whole batch


class SliceDataset(Dataset):
    """A map-style dataset over a :class:`SliceCache` whose batched fetch is one ``index_select`` per tensor.

    ``dataset[i]`` gives one slice as a dict (``image`` ``(1, H, W)``, ``label`` ``(1, H, W)`` if any,
    each meta key a 0-d tensor). ``dataset.__getitems__(indices)`` (what ``DataLoader`` calls with a
    batch sampler) gives the whole batch at once: ``image`` ``(B, 1, H, W)``, ``label`` ``(B, 1, H, W)``,
    meta keys ``(B,)``, all on the cache's device, with no per-sample Python.
    """

    def __init__(self, cache: SliceCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def _tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        yield "image", self.cache.images
        if self.cache.labels is not None:
            yield "label", self.cache.labels
        yield from self.cache.meta.items()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: t[index] for k, t in self._tensors()}

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.cache.device)
        return {k: t.index_select(0, idx) for k, t in self._tensors()}


def make_slice_loader(
    cache: SliceCache,
    batch_sampler: Iterable[list[int]],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` yielding dict batches of ``cache`` in the order of ``batch_sampler``.

    With the cache on the GPU keep ``num_workers=0``: batches are then gathered on the device.
    """
    if cache.device.type != "cpu" and (num_workers or pin_memory):
        raise ValueError("a cache on an accelerator is batched in-process: use num_workers=0, pin_memory=False")
    return DataLoader(
        SliceDataset(cache),
        batch_sampler=batch_sampler,
        collate_fn=_batch_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
