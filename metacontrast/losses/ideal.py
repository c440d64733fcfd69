"""IDEAL's pre-training objective (Basak et al., ICASSP 2023): global InfoNCE (Eq. 1) + dense local InfoNCE (Eq. 2).

Two augmented views ``x_q`` and ``x_k`` of every slice go through the shared encoder ``E``; a pooled MLP head
gives one vector per view for the global term, and the dense head ``G`` (1x1 convolutions, no pooling) one
vector per location of the ``D_h x D_w`` feature map for the local term.  All vectors are L2-normalised.

* Eq. 1 (global):  ``L_g = -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_{k-} exp(q.k-/tau)) )`` -- the query ``q``
  is one view of an image, ``k+`` the other view of the same image, ``k-`` the other view of every other image of
  the batch (the keys of the dictionary look-up).  Averaged over both roles of the two views.
* Eq. 2 (local):  ``L_loc = -1/(D_h D_w) sum_i log( exp(q_i.k_i+/tau) / (exp(q_i.k_i+/tau) + sum_{k_i-} exp(q_i.k_i-/tau)) )``
  -- ``q_i`` is location ``i`` of the query view, ``k_i+`` the location of the key view that sees the same
  place of the slice, ``k_i-`` every location of the key view of every other image.  Locations of the same
  image other than ``k_i+`` are neither positives nor negatives ("the negative key k- is assigned from features
  from a view of different images").  Averaged over the images and both roles of the views.

**Corresponding locations.**  The views come from :class:`~metacontrast.data.augment.BatchAugmentation`, whose
spatial part is one sampling grid per sample (flip, rotation, scaling, translation, optional elastic field):
``grid[b, y, x]`` is the place of the original slice that output pixel ``(y, x)`` shows.  So the geometry is
known: :class:`CorrespondingViewsPrepareBatch` makes the two views exactly as ``two_views`` does and hands
their grids to the loss, and :func:`view_correspondence` maps every feature cell of one view to the cell of the
other view whose centre lies nearest to the same place of the slice (a nearest-neighbour search, so elastic
fields are handled too).  A cell whose place lies outside the other view's field of view (farther than
``match_radius`` cell spacings from every cell centre) has no positive and is left out of Eq. 2's mean.

Everything is batched: one matrix product gives every location-to-location similarity of a direction,
``(N, L, N, L)``, and the positives are gathered from it; no loop over pixels, locations or images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from torch import nn

from ..data.augment import BatchAugmentation, warp
from ..nets.heads import pooled_embedding
from .contrastive import multi_positive_info_nce, positive_mask, view_ids
from .yardsticks import yardstick_terms


# -- geometry: which location of one view sees the same place as a location of the other --------------------


def cell_centres(grid: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Where the centre of each feature cell lies in the original slice, in pixels.

    Args:
        grid: (B, H, W, 2) sampling grid of a view (normalised ``(x, y)``, ``align_corners=False``, as
            :meth:`BatchAugmentation.spatial_grid`).
        size: ``(h, w)`` of the feature map; each cell covers an ``H/h x W/w`` block of the view.
    Returns:
        (B, h w, 2) ``(x, y)`` in pixel units of the original slice, cells in row-major order.  The block's
        mean of the grid: exactly the place of the block centre for an affine grid.
    """
    height, width = grid.shape[1], grid.shape[2]
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), tuple(size))  # (B, 2, h, w)
    half = torch.tensor([width / 2.0, height / 2.0], dtype=grid.dtype, device=grid.device)
    return pooled.flatten(2).transpose(1, 2) * half


def cell_spacing(centres: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, h w, 2) cell centres -> (B,) mean distance between neighbouring cells (pixels of the original slice)."""
    h, w = int(size[0]), int(size[1])
    grid = centres.view(-1, h, w, 2)
    steps = [d.norm(dim=-1).flatten(1) for d in (grid[:, :, 1:] - grid[:, :, :-1], grid[:, 1:] - grid[:, :-1]) if d.numel()]
    if not steps:
        raise ValueError(f"a {h}x{w} feature map has no neighbouring cells; the dense loss needs at least 2 locations")
    return torch.cat(steps, dim=1).mean(dim=1)


def view_correspondence(
    grid_q: torch.Tensor, grid_k: torch.Tensor, size: Sequence[int], match_radius: float = 0.75
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The corresponding location in the other view for every feature cell of both views.

    Args:
        grid_q, grid_k: (B, H, W, 2) sampling grids of the two views of the same B slices.
        size: ``(h, w)`` of the feature maps.
        match_radius: a cell has a match when the nearest cell centre of the other view lies within this many
            cell spacings of the other view (0.75 > sqrt(2)/2: every place inside the other view's field of
            view has its match; places more than about a quarter cell outside it have none).
    Returns:
        ``((match_qk, valid_qk), (match_kq, valid_kq))``: ``match_qk`` (B, h w) long, the location of view k
        nearest to each location of view q, ``valid_qk`` (B, h w) bool; the same from view k to view q.
    """
    with torch.no_grad():
        centres_q, centres_k = cell_centres(grid_q.double(), size), cell_centres(grid_k.double(), size)
        distance = torch.cdist(centres_q, centres_k, compute_mode="donot_use_mm_for_euclid_dist")  # (B, Lq, Lk)
        dist_qk, match_qk = distance.min(dim=2)
        dist_kq, match_kq = distance.min(dim=1)
        valid_qk = dist_qk <= match_radius * cell_spacing(centres_k, size)[:, None]
        valid_kq = dist_kq <= match_radius * cell_spacing(centres_q, size)[:, None]
    return (match_qk, valid_qk), (match_kq, valid_kq)


# -- the two terms ---------------------------------------------------------------------------------------------


def global_info_nce(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """IDEAL Eq. 1 averaged over the ``2N`` queries: (2N, D) embeddings, rows ``k`` and ``k + N`` the views of image ``k``.

    The positive of a query is the other view of its image; its negatives are the other view of every other
    image (the keys), so the denominator holds ``N`` terms -- unlike SimCLR's NT-Xent, which also contrasts
    the query's own view of the other images.
    """
    positives, negatives = global_info_nce_masks(len(z) // 2, z.device)
    return multi_positive_info_nce(z, positives, temperature, negatives=negatives)


def global_info_nce_masks(n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1's (2N, 2N) positives (the other view) and negatives (the other view of every other image)."""
    image = view_ids(n, device)
    view = torch.arange(2 * n, device=device) // n
    return positive_mask(image), (image[:, None] != image[None, :]) & (view[:, None] != view[None, :])


def dense_info_nce(queries: torch.Tensor, keys: torch.Tensor, match: torch.Tensor, valid: torch.Tensor,
                   temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """IDEAL Eq. 2 for every image of a batch, one direction (query view -> key view).

    Args:
        queries: (N, L, D) unit vectors ``q_i`` of the query view, ``L = D_h D_w`` locations.
        keys: (N, L, D) unit vectors of the key view.
        match: (N, L) long, index of ``k_i+`` among the key view's locations of the same image.
        valid: (N, L) bool, locations that have a ``k_i+`` (the others are left out of the mean).
        temperature: tau.
    Returns:
        ``(loss, has_valid)``: (N,) the mean over the valid locations of
        ``-log( exp(q_i.k_i+/tau) / (exp(q_i.k_i+/tau) + sum_{k_i-} exp(q_i.k_i-/tau)) )`` with ``k_i-`` every
        location of the key view of every other image, and (N,) bool, images with at least one valid location.
        A batch of one image has no negatives: its terms are 0 (finite gradients).
    """
    n, length, dim = queries.shape
    logits = (queries.reshape(n * length, dim) @ keys.reshape(n * length, dim).T / temperature).view(n, length, n, length)
    image = torch.arange(n, device=queries.device)
    positive = logits[image[:, None], torch.arange(length, device=queries.device)[None, :], image[:, None], match]  # (N, L)
    per_key_image = logits.logsumexp(dim=3)  # (N, L, N): log sum_j exp(q_i.k_{m,j}/tau) for each key image m
    other_image = (image[:, None] != image[None, :])[:, None, :]
    negative_lse = per_key_image.masked_fill(~other_image, torch.finfo(logits.dtype).min).logsumexp(dim=2)
    per_location = F.softplus(negative_lse - positive)  # -log(e^p / (e^p + sum_neg e^n))
    counts = valid.sum(dim=1)
    loss = (per_location * valid).sum(dim=1) / counts.clamp_min(1)
    return loss, counts > 0


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (AMP) outputs in float32; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _locations(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h w, D) unit vectors, locations in row-major order."""
    return F.normalize(_full_precision(feature_map).flatten(2).transpose(1, 2), dim=-1)


class IDEALLoss(nn.Module):
    """IDEAL's pre-training objective: ``{"global": w_g L_g (Eq. 1), "local": w_l L_loc (Eq. 2)}``.

    :class:`~metacontrast.engines.MultiLossTrainer` minimises the mean of the returned terms, so the default
    weights (1, 1) give ``(L_g + L_loc) / 2``, DenseCL's [15] ``(1 - lambda) L_g + lambda L_loc`` at its
    ``lambda = 0.5``.  A term with weight 0 is left out (then the other one alone is minimised).

    Args:
        temperature: tau of both terms.
        global_weight, local_weight: ``w_g``, ``w_l``.
        match_radius: see :func:`view_correspondence`.
        global_key: network output for Eq. 1, (2N, D, h, w) (pooled here); the dense key pools the dense projection.
        dense_key: network output of the dense head ``G``, (2N, D, h, w), rows ``[x_q; x_k]``.
        grid_key: key of the views' sampling grids in the targets, (2, N, H, W, 2)
            (:class:`CorrespondingViewsPrepareBatch`).
    """

    def __init__(self, temperature: float = 0.1, global_weight: float = 1.0, local_weight: float = 1.0,
                 match_radius: float = 0.75, global_key: str = "img", dense_key: str = "dense", grid_key: str = "grid") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if global_weight < 0 or local_weight < 0 or global_weight == local_weight == 0:
            raise ValueError(f"global_weight and local_weight must be >= 0 and not both 0, got {global_weight}, {local_weight}")
        if match_radius <= 0:
            raise ValueError(f"match_radius must be > 0, got {match_radius}")
        self.temperature, self.global_weight, self.local_weight, self.match_radius = temperature, global_weight, local_weight, match_radius
        self.global_key, self.dense_key, self.grid_key = global_key, dense_key, grid_key
        self.last_terms: dict[str, float] = {}

    def local_loss(self, dense: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Eq. 2 averaged over the images (with a valid location) and both roles of the views.

        Args:
            dense: (2N, D, h, w) dense projections of ``[x_q; x_k]``.
            grids: (2, N, H, W, 2) sampling grids of ``x_q`` and ``x_k``.
        """
        n = len(dense) // 2
        if grids.ndim != 5 or grids.shape[:2] != (2, n) or grids.shape[-1] != 2:
            raise ValueError(f"grids must be (2, {n}, H, W, 2) for {len(dense)} dense maps, got {tuple(grids.shape)}")
        size = dense.shape[2:]
        (match_qk, valid_qk), (match_kq, valid_kq) = view_correspondence(grids[0], grids[1], size, self.match_radius)
        z = _locations(dense)
        loss_q, has_q = dense_info_nce(z[:n], z[n:], match_qk, valid_qk, self.temperature)
        loss_k, has_k = dense_info_nce(z[n:], z[:n], match_kq, valid_kq, self.temperature)
        losses, has = torch.cat([loss_q, loss_k]), torch.cat([has_q, has_k])
        self.last_terms["local/matched_fraction"] = float(torch.cat([valid_qk, valid_kq]).float().mean())
        return losses[has].mean() if bool(has.any()) else losses.sum() * 0.0

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``outputs``: the heads' outputs for ``cat(x_q, x_k)``; ``targets``: must hold the views' grids."""
        self.last_terms = {}
        terms: dict[str, torch.Tensor] = {}
        if self.global_weight > 0:
            terms["global"] = self.global_weight * global_info_nce(pooled_embedding(_full_precision(outputs[self.global_key])), self.temperature)
            yardsticks = yardstick_terms("loss/global", *global_info_nce_masks(len(outputs[self.global_key]) // 2))
            self.last_terms.update({k: self.global_weight * v for k, v in yardsticks.items()})  # of the weighted term
        if self.local_weight > 0:
            if self.grid_key not in targets:
                raise KeyError(f"IDEALLoss needs the views' sampling grids as targets[{self.grid_key!r}] to find corresponding "
                               "locations; make the views with metacontrast.losses.CorrespondingViewsPrepareBatch")
            terms["local"] = self.local_weight * self.local_loss(outputs[self.dense_key], targets[self.grid_key])
        return terms


# -- the views and their grids ------------------------------------------------------------------------------


def two_views_with_grids(augment: BatchAugmentation, images: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``augment.two_views(images)`` (the same random draws in the same order) plus the views' sampling grids.

    Returns ``((view_q, view_k), grids)`` with views (B, C, H, W) and grids (2, B, H, W, 2).
    """
    b, _, h, w = images.shape
    grid_dtype = images.dtype if images.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    views, grids = [], []
    for _ in range(2):  # two views, each: spatial grid, then intensity (BatchAugmentation.forward's order of draws)
        grid = augment.spatial_grid(b, h, w, images.device, grid_dtype, generator)
        views.append(augment.intensity(warp(images, grid, "bilinear"), generator))
        grids.append(grid)
    return (views[0], views[1]), torch.stack(grids)


class CorrespondingViewsPrepareBatch(PrepareBatch):
    """``{"image": (N, 1, H, W), <meta>: (N,)}`` -> ``(cat(x_q, x_k) (2N, 1, H, W), {meta..., grid_key: (2, N, H, W, 2)})``.

    :class:`~metacontrast.engines.TwoViewPrepareBatch` for losses that relate locations of the two views: the
    targets also carry the sampling grids the views were made with.

    Args:
        augment: the shared :class:`BatchAugmentation` (its own generator draws the views, so resuming restores it).
        meta_keys: meta labels handed to the loss too.
        image_key, grid_key: batch key of the images; target key of the grids.
    """

    def __init__(self, augment: BatchAugmentation, meta_keys: Sequence[str] = (), image_key: str = "image", grid_key: str = "grid") -> None:
        self.augment, self.meta_keys, self.image_key, self.grid_key = augment, list(meta_keys), image_key, grid_key

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        images = batchdata[self.image_key].to(device, non_blocking=non_blocking)
        views, grids = two_views_with_grids(self.augment, images)
        meta = {key: batchdata[key].to(device, non_blocking=non_blocking) for key in self.meta_keys}
        return torch.cat(views), {**meta, self.grid_key: grids}
