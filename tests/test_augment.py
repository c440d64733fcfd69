"""Batched augmentation on real ACDC slices: label alignment, class set, shapes, seeding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metacontrast.data.augment import BatchAugmentation
from metacontrast.data.transforms import volume_preprocessing

SPATIAL_ONLY = dict(gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0)
NO_SPATIAL = dict(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0, elastic_prob=0.0)


@pytest.fixture(scope="module")
def batch(acdc_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ACDC volumes' slices at the CPU-scale preset: images (B, 1, 96, 96) float32, labels uint8."""
    t = volume_preprocessing((2.734, 2.734), (96, 96))
    images, labels = [], []
    for name in ("patient001/patient001_frame01", "patient050/patient050_frame01"):
        d = t({"image": str(acdc_dir / f"{name}.nii.gz"), "label": str(acdc_dir / f"{name}_gt.nii.gz")})
        images.append(d["image"].as_tensor().permute(3, 0, 1, 2))
        labels.append(d["label"].as_tensor().permute(3, 0, 1, 2).to(torch.uint8))
    return torch.cat(images), torch.cat(labels)


def test_label_stays_aligned_with_image(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, labels = batch
    aug = BatchAugmentation(
        flip_prob=0.5, rotate_prob=1.0, rotate_range=30, scale_prob=1.0, translate_prob=1.0,
        elastic_prob=1.0, elastic_alpha=3.0, seed=0, **SPATIAL_ONLY,
    )  # fmt: skip
    # an image that *is* the label map: warped bilinearly it must still match the nearest-warped label
    image = labels.float()
    out_image, out_labels = aug(image, labels)
    moved = (out_labels != labels).float().mean()
    assert moved > 0.02, "the transform must actually move the labels for this test to mean anything"
    agree = (out_image.round() == out_labels.float()).float()
    assert float(agree.mean()) > 0.98
    foreground = out_labels > 0
    assert float(agree[foreground].mean()) > 0.9
    # a control that this check can fail: labels warped with another draw disagree
    _, other = aug(image, labels)
    assert float((out_image.round() == other.float()).float()[foreground].mean()) < 0.8


def test_labels_keep_class_set_shape_and_dtype(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    out_images, out_labels = BatchAugmentation(elastic_prob=0.5, seed=1)(images, labels)
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert out_labels is not None and out_labels.shape == labels.shape and out_labels.dtype == torch.uint8
    assert set(torch.unique(out_labels).tolist()) <= set(torch.unique(labels).tolist())
    assert torch.isfinite(out_images).all()
    only_image, none = BatchAugmentation(seed=1)(images)
    assert none is None and only_image.shape == images.shape


def test_flip_is_exact(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    aug = BatchAugmentation(flip_prob=1.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0, **SPATIAL_ONLY)
    out_images, out_labels = aug(images, labels)
    assert torch.allclose(out_images, images.flip(-1, -2), atol=1e-4)
    assert torch.equal(out_labels, labels.flip(-1, -2))


def test_intensity_only_leaves_geometry(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    aug = BatchAugmentation(gamma_prob=1.0, contrast_prob=1.0, brightness_prob=1.0, seed=2, **NO_SPATIAL)
    out_images, out_labels = aug(images, labels)
    assert torch.equal(out_labels, labels)
    assert not torch.allclose(out_images, images, atol=1e-3)
    # monotone intensity maps keep each slice's pixel ordering (up to ties)
    flat_in, flat_out = images.flatten(1), out_images.flatten(1)
    order = flat_in.argsort(dim=1)
    assert bool((flat_out.gather(1, order).diff(dim=1) >= -1e-5).all())


def test_seeded_and_two_views(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    a, _ = BatchAugmentation(elastic_prob=0.5, seed=7)(images, labels)
    b, _ = BatchAugmentation(elastic_prob=0.5, seed=7)(images, labels)
    c, _ = BatchAugmentation(elastic_prob=0.5, seed=8)(images, labels)
    assert torch.equal(a, b) and not torch.equal(a, c)
    aug = BatchAugmentation()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(aug(images, generator=g1)[0], aug(images, generator=g2)[0])
    v1, v2 = BatchAugmentation(seed=4).two_views(images)
    assert v1.shape == v2.shape == images.shape and not torch.allclose(v1, v2)


def test_shared_geometry_views_differ_in_intensity_only(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One spatial draw for both views: without intensity jitter they are equal (and moved); with it, each view
    is a monotone per-sample remap of the other, so the pixels keep their order: the geometry is identical."""
    images, _ = batch
    v1, v2 = BatchAugmentation(rotate_prob=1.0, scale_prob=1.0, translate_prob=1.0, seed=2, **SPATIAL_ONLY).shared_geometry_views(images)
    assert torch.equal(v1, v2) and (v1 - images).abs().mean() > 0.01
    jitter = dict(gamma_prob=1.0, contrast_prob=1.0, brightness_prob=1.0)
    v1, v2 = BatchAugmentation(rotate_prob=1.0, scale_prob=1.0, translate_prob=1.0, seed=2, **jitter).shared_geometry_views(images)
    assert (v1 - v2).abs().mean() > 0.01
    order = v1.flatten(1).argsort(dim=1)
    assert bool((v2.flatten(1).gather(1, order).diff(dim=1) >= -1e-5).all())
    w1, w2 = BatchAugmentation(rotate_prob=1.0, scale_prob=1.0, translate_prob=1.0, seed=2, **jitter).two_views(images)
    assert not bool((w2.flatten(1).gather(1, w1.flatten(1).argsort(dim=1)).diff(dim=1) >= -1e-5).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_draws_on_cuda(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    cpu_images, cpu_labels = BatchAugmentation(elastic_prob=0.5, seed=5)(images, labels)
    gpu_images, gpu_labels = BatchAugmentation(elastic_prob=0.5, seed=5)(images.cuda(), labels.cuda())
    assert gpu_images.is_cuda and torch.allclose(gpu_images.cpu(), cpu_images, atol=1e-3)
    assert float((gpu_labels.cpu() == cpu_labels).float().mean()) > 0.999
