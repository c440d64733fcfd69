"""GLCL's global and local contrastive losses (Chaitanya et al., NeurIPS 2020).

Global loss (Sec. 3.1-3.2, Eqs. 1-2) on the pooled projection ``g_1(e(x))`` of every image of a batch,
with three contrasting strategies that differ only in which pairs are positives (``Lambda^+``) and which
images are negatives (``Lambda^-``):

* ``GR`` -- SimCLR: the two transformed views of an image are positives, every other image is a
  negative.  Batch: two views of ``N`` images (rows ``[x~; x^]``).
* ``GD-`` -- the untransformed image joins the batch (rows ``[x; x~; x^]``); the three versions of an
  image are pairwise positives; negatives are only the images of *other* partitions:
  ``Lambda^- = {x_k^l, x~_k^l, x^_k^l | k != s, all l}``.  Same-partition images of other volumes are
  therefore neither positives nor negatives.
* ``GD`` -- ``GD-`` plus, across volumes ``i != j`` of the same partition ``s``, the pairs
  ``(x_s^i, x_s^j)`` and ``(x~_s^i, x^_s^j)``; negatives as ``GD-``.

Local loss (Sec. 3.3, Eqs. 3-4) on ``f = g_2(d_l(e(x)))`` for two intensity-transformed views
(rows ``[x~; x^]``): ``A`` local regions of ``K x K`` feature vectors at fixed places (:func:`region_corners`)
become one vector each (:func:`local_regions`), and

* ``LR`` -- the same region of the other view is the positive; the other regions of both views of the
  same image are the negatives;
* ``LD`` -- ``LR`` plus the same region of the images of the same partition in other volumes
  (``(f~_s^i(u, v), f~_s^j(u, v))``, view by view); negatives: the other regions of all these images.

Every strategy is a pair of boolean masks handed to the shared kernel
:func:`~metacontrast.losses.contrastive.multi_positive_info_nce` (with its ``negatives`` argument: each
positive pair's denominator is the pair itself plus the anchor's negatives, as in Eqs. 1 and 3), so one
batch is one matrix product; there is no loop over images, regions or pixels.  The kernel averages over
each anchor's positives, then over anchors: Eq. 4 exactly, and Eq. 2 divided by 2 (Eq. 2 sums both
orders of a pair but normalises by the number of unordered pairs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..nets.heads import pooled_embedding
from .contrastive import multi_positive_info_nce
from .yardsticks import yardstick_terms

GLOBAL_STRATEGIES = ("GR", "GD-", "GD")
LOCAL_STRATEGIES = ("LR", "LD")
#: views per image in the global batch: [x~; x^] for GR, [x; x~; x^] for GD- and GD (view 0 untransformed)
GLOBAL_VIEWS = {"GR": 2, "GD-": 3, "GD": 3}


def _check(strategy: str, known: tuple[str, ...]) -> str:
    if strategy not in known:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {known}")
    return strategy


def _pairs(ids: torch.Tensor) -> torch.Tensor:
    """(R,) ids -> (R, R) bool: rows with equal ids."""
    return ids[:, None] == ids[None, :]


def global_masks(strategy: str, volume: torch.Tensor, partition: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives of the global loss for a batch of ``num_views`` stacked views of ``N`` images.

    Args:
        strategy: ``"GR"``, ``"GD-"`` or ``"GD"``.
        volume: (N,) volume of each image (``volume_index``).
        partition: (N,) partition ``s`` of each image (``slice_quantile``, S groups of consecutive slices).
        num_views: 2 for ``GR`` (rows ``[x~; x^]``), 3 for ``GD-`` / ``GD`` (rows ``[x; x~; x^]``).
    Returns:
        ``(positives, negatives)``, each (V N, V N) bool; row ``v * N + k`` is view ``v`` of image ``k``.
    """
    _check(strategy, GLOBAL_STRATEGIES)
    if num_views != GLOBAL_VIEWS[strategy]:
        raise ValueError(f"strategy {strategy} needs {GLOBAL_VIEWS[strategy]} views per image, got {num_views}")
    n = len(volume)
    rows = torch.arange(num_views * n, device=volume.device)
    image, view = rows % n, rows // n
    same_image = _pairs(image)
    positives = same_image & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    if strategy == "GR":
        return positives, ~same_image
    same_partition = _pairs(partition[image])
    negatives = ~same_partition
    if strategy == "GD":
        other_volume = ~_pairs(volume[image])
        untransformed = (view[:, None] == 0) & (view[None, :] == 0)  # (x_s^i, x_s^j)
        transformed = (view[:, None] > 0) & (view[None, :] > 0) & (view[:, None] != view[None, :])  # (x~_s^i, x^_s^j)
        positives = positives | (same_partition & other_volume & (untransformed | transformed))
    return positives, negatives


def region_corners(height: int, width: int, region_size: int = 3, num_regions: int = 13) -> torch.Tensor:
    """Top-left corners ``(A, 2)`` (row, column) of the ``A`` local regions of an ``height x width`` map.

    ``A = 9``: a 3 x 3 grid -- corners, edge midpoints and centre of the map; ``A = 13`` adds the centres
    of the four quadrants (the layout of the authors' public code; the paper gives only ``A = 13``).
    """
    if num_regions not in (9, 13):
        raise ValueError(f"num_regions must be 9 or 13, got {num_regions}")
    span_h, span_w = height - region_size, width - region_size
    if min(span_h, span_w) < 4:
        raise ValueError(f"a {height}x{width} map is too small for {num_regions} distinct {region_size}x{region_size} regions")
    grid = [(r, c) for r in (0, span_h // 2, span_h) for c in (0, span_w // 2, span_w)]
    if num_regions == 13:
        grid += [(r, c) for r in (span_h // 4, 3 * span_h // 4) for c in (span_w // 4, 3 * span_w // 4)]
    return torch.tensor(grid, dtype=torch.long)


def local_regions(feature_map: torch.Tensor, corners: torch.Tensor, region_size: int = 3, reduction: str = "flatten") -> torch.Tensor:
    """The local regions of every map as vectors: (B, C, H, W) -> (B, A, C K K) (``"flatten"``) or (B, A, C) (``"mean"``)."""
    offsets = torch.arange(region_size, device=feature_map.device)
    corners = corners.to(feature_map.device)
    rows = (corners[:, 0, None] + offsets)[:, :, None]  # (A, K, 1)
    cols = (corners[:, 1, None] + offsets)[:, None, :]  # (A, 1, K)
    patches = feature_map[:, :, rows, cols]  # (B, C, A, K, K)
    if reduction == "mean":
        return patches.mean(dim=(3, 4)).transpose(1, 2)
    if reduction == "flatten":
        return patches.permute(0, 2, 1, 3, 4).flatten(2)
    raise ValueError(f"reduction must be 'flatten' or 'mean', got {reduction!r}")


def local_masks(strategy: str, volume: torch.Tensor, partition: torch.Tensor, num_views: int, num_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and negatives of the local loss over regions.

    Row ``(v * N + k) * A + a`` is region ``a`` of view ``v`` of image ``k``.  Returns two
    (V N A, V N A) bool masks (see the module docstring for the two strategies).
    """
    _check(strategy, LOCAL_STRATEGIES)
    n = len(volume)
    rows = torch.arange(num_views * n * num_regions, device=volume.device)
    region, image, view = rows % num_regions, (rows // num_regions) % n, rows // (num_regions * n)
    same_region, same_image, same_view = _pairs(region), _pairs(image), _pairs(view)
    positives = same_region & same_image & ~same_view
    if strategy == "LR":
        return positives, ~same_region & same_image
    same_partition = _pairs(partition[image])
    other_volume = ~_pairs(volume[image])
    positives = positives | (same_region & same_partition & other_volume & same_view)
    return positives, ~same_region & same_partition


def _num_views(rows: int, num_images: int) -> int:
    if num_images < 1 or rows % num_images:
        raise ValueError(f"{rows} network outputs are not whole views of {num_images} images")
    return rows // num_images


class GlobalContrastiveLoss(nn.Module):
    """GLCL's global loss ``L_g`` (Eqs. 1-2) under strategy ``GR``, ``GD-`` or ``GD``.

    Args:
        strategy: the contrasting strategy.
        temperature: tau (0.1 in the paper).
        key: name of the ``g_1`` output of the network, (V N, D, h, w); pooled and normalised here.
        volume_key / partition_key: meta labels holding each image's volume and partition.
    """

    def __init__(self, strategy: str = "GD", temperature: float = 0.1, key: str = "g1",
                 volume_key: str = "volume_index", partition_key: str = "slice_quantile") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.strategy = _check(strategy, GLOBAL_STRATEGIES)
        self.temperature = temperature
        self.key, self.volume_key, self.partition_key = key, volume_key, partition_key
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = pooled_embedding(outputs[self.key])
        volume, partition = meta[self.volume_key].to(z.device), meta[self.partition_key].to(z.device)
        positives, negatives = global_masks(self.strategy, volume, partition, _num_views(len(z), len(volume)))
        self.last_terms = {"global/positives_per_anchor": float(positives.sum(1).float().mean()), **yardstick_terms("loss/global", positives, negatives)}
        return {"global": multi_positive_info_nce(z, positives, self.temperature, negatives=negatives)}


class LocalContrastiveLoss(nn.Module):
    """GLCL's local loss ``L_l`` (Eqs. 3-4) under strategy ``LR`` or ``LD``.

    Args:
        strategy: the contrasting strategy.
        temperature: tau (0.1 in the paper).
        num_regions: A, regions per feature map (13 in the paper; 9 or 13, see :func:`region_corners`).
        region_size: K (3 in the paper).
        reduction: a region's vector: its K x K x C values (``"flatten"``, as the authors' code, which then
            maps it by a learned dense layer: the bundle puts that layer in the network as a K x K convolution
            and calls this loss with K = 1) or their mean over the K x K places (``"mean"``, the C-vector
            the paper's ``f(u, v)`` suggests).
        key: name of the ``g_2`` output of the network, (V N, C, H, W) for V = 2 views.
        volume_key / partition_key: as :class:`GlobalContrastiveLoss` (used by ``LD``).
    """

    def __init__(self, strategy: str = "LR", temperature: float = 0.1, num_regions: int = 13, region_size: int = 3,
                 reduction: str = "flatten", key: str = "g2", volume_key: str = "volume_index",
                 partition_key: str = "slice_quantile") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.strategy = _check(strategy, LOCAL_STRATEGIES)
        self.temperature, self.num_regions, self.region_size, self.reduction = temperature, num_regions, region_size, reduction
        self.key, self.volume_key, self.partition_key = key, volume_key, partition_key
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = outputs[self.key]
        volume, partition = meta[self.volume_key].to(f.device), meta[self.partition_key].to(f.device)
        corners = region_corners(f.shape[2], f.shape[3], self.region_size, self.num_regions)
        z = local_regions(f, corners, self.region_size, self.reduction).flatten(0, 1)  # (V N A, D)
        positives, negatives = local_masks(self.strategy, volume, partition, _num_views(len(f), len(volume)), self.num_regions)
        self.last_terms = {"local/positives_per_anchor": float(positives.sum(1).float().mean()), **yardstick_terms("loss/local", positives, negatives)}
        return {"local": multi_positive_info_nce(z, positives, self.temperature, negatives=negatives)}
