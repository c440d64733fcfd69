"""Batched, on-device data augmentation for 2D slices, shared by pre-training and fine-tuning.

Why not MONAI's random transforms (``RandAffined``, ``Rand2DElasticd``, ``RandAdjustContrastd`` ...):
they draw parameters and resample one sample at a time in Python, on whatever device the sample is
on. Training here batches slices straight out of a cache that lives on the GPU (DESIGN.md section 6),
so a per-sample loop would make the loader, not the GPU, the bottleneck. This module draws every
parameter for the whole batch at once and warps the batch with a single ``affine_grid`` +
``grid_sample``; it runs unchanged on CPU and CUDA.

Spatial transforms (one sampling grid per sample, composed): flip, rotation, scaling, translation
(a random crop is scaling > 1 plus translation) and elastic deformation (a smooth random
displacement field: Gaussian noise on a coarse control grid, upsampled bicubically). Images are
resampled bilinearly, labels with nearest neighbour on the same grid, so they stay aligned and keep
their class set. Intensity transforms (images only): gamma, contrast, brightness.

Randomness comes from a ``torch.Generator`` (the ``generator`` argument, else the module's own one
made from ``seed``, else torch's global RNG). Parameters are drawn on the generator's device (CPU by
default) and then moved, so a seed gives the same augmentation on CPU and GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchAugmentation", "warp"]


def warp(x: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` ``(B, C, H, W)`` at ``grid`` ``(B, H, W, 2)`` (normalised ``(x, y)``, ``align_corners=False``).

    ``mode="nearest"`` is for label maps; any dtype is accepted and returned (computed in the grid's dtype).
    """
    out = F.grid_sample(x.to(grid.dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


class BatchAugmentation(torch.nn.Module):
    """Random spatial and intensity augmentation of a batch ``(B, C, H, W)``, labels optional.

    Each transform is applied to a sample with its own probability (``*_prob``), independently per
    sample; a sample not picked gets the identity for that transform (an identity grid reproduces
    pixels exactly).

    Args:
        flip_prob: probability of flipping, drawn separately for each in-plane axis.
        rotate_prob, rotate_range: rotation by an angle uniform in ``[-rotate_range, rotate_range]`` degrees.
        scale_prob, scale_range: zoom by a factor uniform in ``scale_range`` (> 1 enlarges the content).
        translate_prob, translate_range: shift by up to ``translate_range`` of the image size per axis.
        elastic_prob, elastic_alpha, elastic_spacing: displacement of standard deviation ``elastic_alpha``
            pixels at control points every ``elastic_spacing`` pixels, interpolated bicubically.
        gamma_prob, gamma_range: ``x <- max(x, 0) ** g``, ``g`` log-uniform in ``gamma_range``
            (images are normalised to ``[0, 1]``).
        contrast_prob, contrast_range: ``x <- (x - mean) * c + mean`` per sample, ``c`` uniform in the range.
        brightness_prob, brightness_range: ``x <- x + b``, ``b`` uniform in ``[-brightness_range, brightness_range]``.
        seed: seeds the module's own generator (used when ``forward`` gets none); ``None`` uses torch's global RNG.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        rotate_prob: float = 0.5,
        rotate_range: float = 15.0,
        scale_prob: float = 0.5,
        scale_range: Sequence[float] = (0.85, 1.15),
        translate_prob: float = 0.5,
        translate_range: float = 0.1,
        elastic_prob: float = 0.0,
        elastic_alpha: float = 2.0,
        elastic_spacing: int = 16,
        gamma_prob: float = 0.3,
        gamma_range: Sequence[float] = (0.7, 1.5),
        contrast_prob: float = 0.3,
        contrast_range: Sequence[float] = (0.8, 1.2),
        brightness_prob: float = 0.3,
        brightness_range: float = 0.1,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, p in (
            ("flip_prob", flip_prob), ("rotate_prob", rotate_prob), ("scale_prob", scale_prob),
            ("translate_prob", translate_prob), ("elastic_prob", elastic_prob), ("gamma_prob", gamma_prob),
            ("contrast_prob", contrast_prob), ("brightness_prob", brightness_prob),
        ):  # fmt: skip
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.flip_prob = flip_prob
        self.rotate_prob, self.rotate_range = rotate_prob, rotate_range
        self.scale_prob, self.scale_range = scale_prob, tuple(scale_range)
        self.translate_prob, self.translate_range = translate_prob, translate_range
        self.elastic_prob, self.elastic_alpha, self.elastic_spacing = elastic_prob, elastic_alpha, elastic_spacing
        self.gamma_prob, self.gamma_range = gamma_prob, tuple(gamma_range)
        self.contrast_prob, self.contrast_range = contrast_prob, tuple(contrast_range)
        self.brightness_prob, self.brightness_range = brightness_prob, brightness_range
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    # -- random draws (on the generator's device, one tensor per parameter for the whole batch) --

    def _gen(self, generator: torch.Generator | None) -> torch.Generator | None:
        return generator if generator is not None else self.generator

    @staticmethod
    def _rand(shape: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=gen.device if gen is not None else "cpu", dtype=torch.float64)

    def _param(
        self, n: int, prob: float, low: float, high: float, identity: float, gen: torch.Generator | None
    ) -> torch.Tensor:
        """``(n,)`` float64: uniform in ``[low, high]`` where picked with ``prob``, else ``identity``."""
        picked = self._rand((n,), gen) < prob
        value = low + (high - low) * self._rand((n,), gen)
        return torch.where(picked, value, torch.full_like(value, identity))

    # -- spatial --

    def spatial_grid(
        self,
        batch_size: int,
        height: int,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A random sampling grid ``(B, H, W, 2)`` for :func:`warp`: output pixel -> input location.

        Exposed so that a pixel-level loss can relate two views (warp a coordinate map with the same grid).
        """
        gen, n = self._gen(generator), batch_size
        angle = self._param(n, self.rotate_prob, -self.rotate_range, self.rotate_range, 0.0, gen) * (math.pi / 180)
        log_zoom = self._param(n, self.scale_prob, math.log(self.scale_range[0]), math.log(self.scale_range[1]), 0.0, gen)
        shift = torch.stack(
            [self._param(n, self.translate_prob, -self.translate_range, self.translate_range, 0.0, gen) for _ in range(2)], 1
        )
        flip = torch.where(self._rand((n, 2), gen) < self.flip_prob, -1.0, 1.0).double()
        # In pixel units (so rotations stay rigid on non-square images): input = F R out / zoom + shift.
        cos, sin, inv_zoom = angle.cos(), angle.sin(), torch.exp(-log_zoom)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
        a_pix = flip[:, :, None] * rot * inv_zoom[:, None, None]
        half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=a_pix.device)  # (x, y)
        a_norm = a_pix * half[None, None, :] / half[None, :, None]  # D^-1 A D, D = diag(half)
        theta = torch.cat([a_norm, (2.0 * shift)[:, :, None]], 2)  # shift as a fraction of the size
        theta = theta.to(device=device, dtype=dtype)
        grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)  # (B, H, W, 2)
        coarse = self._elastic(n, height, width, gen) if self.elastic_prob > 0 else None
        if coarse is not None and bool(coarse.any()):  # coarse lives on the generator's device: no GPU sync
            coarse = coarse.to(device=device, dtype=dtype)
            field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1)
        return grid

    def _elastic(self, n: int, height: int, width: int, gen: torch.Generator | None) -> torch.Tensor:
        """Control-point displacements ``(B, 2, gh, gw)`` in normalised ``(x, y)`` units, zero where not picked.

        Upsampled to ``(H, W)`` by bicubic interpolation (on the batch's device) in :meth:`spatial_grid`.
        """
        picked = (self._rand((n,), gen) < self.elastic_prob).double()
        gh = max(2, math.ceil(height / self.elastic_spacing) + 1)
        gw = max(2, math.ceil(width / self.elastic_spacing) + 1)
        noise = torch.randn(n, 2, gh, gw, generator=gen, device=picked.device, dtype=torch.float64)
        pixels_to_norm = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64, device=noise.device)
        return noise * (self.elastic_alpha * pixels_to_norm)[None, :, None, None] * picked[:, None, None, None]

    # -- intensity --

    def intensity(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gamma, then contrast, then brightness jitter of ``images`` ``(B, C, H, W)``."""
        gen, n = self._gen(generator), images.shape[0]
        if self.gamma_prob == self.contrast_prob == self.brightness_prob == 0:
            return images

        def per_sample(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=images.device, dtype=images.dtype).view(n, *([1] * (images.ndim - 1)))

        lg = (math.log(self.gamma_range[0]), math.log(self.gamma_range[1]))
        gamma = per_sample(torch.exp(self._param(n, self.gamma_prob, lg[0], lg[1], 0.0, gen)))
        contrast = per_sample(self._param(n, self.contrast_prob, *self.contrast_range, 1.0, gen))
        brightness = per_sample(self._param(n, self.brightness_prob, -self.brightness_range, self.brightness_range, 0.0, gen))
        x = images.clamp_min(0).pow(gamma)
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        return (x - mean) * contrast + mean + brightness

    # -- whole pipeline --

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch.

        Args:
            images: ``(B, C, H, W)`` floating point.
            labels: ``(B, 1, H, W)`` (any dtype, e.g. uint8 class maps) warped with the same grid, nearest.
            generator: overrides the module's generator for this call.

        Returns:
            ``(images, labels)`` with the input shapes and dtypes (``labels`` is ``None`` if not given).
        """
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
        if labels is not None and (labels.shape[0] != images.shape[0] or labels.shape[2:] != images.shape[2:]):
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        b, _, h, w = images.shape
        grid_dtype = images.dtype if images.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        grid = self.spatial_grid(b, h, w, images.device, grid_dtype, generator)
        out = self.intensity(warp(images, grid, "bilinear"), generator)
        out_labels = None if labels is None else warp(labels, grid, "nearest")
        return out, out_labels

    def two_views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent augmentations of ``images`` ``(B, C, H, W)``, for contrastive pre-training."""
        return self(images, generator=generator)[0], self(images, generator=generator)[0]

    def shared_geometry_views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of ``images`` ``(B, C, H, W)`` warped by one spatial draw and jittered by two independent
        intensity draws: pixel (u, v) of both views shows the same anatomy, for dense losses that pair
        locations of the two views (MACL's Eq. 11)."""
        b, _, h, w = images.shape
        grid_dtype = images.dtype if images.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        warped = warp(images, self.spatial_grid(b, h, w, images.device, grid_dtype, generator), "bilinear")
        return self.intensity(warped, generator), self.intensity(warped, generator)
