"""What each workflow reads: a manifest split, cached as slices, batched for its engine.

* :class:`PretrainData` -- unlabelled slices of the ``pretrain`` split with meta labels, batched by the
  meta-label-aware sampler (or plainly at random);
* :class:`FinetuneData` -- the ``L`` labelled volumes drawn from ``train`` by the seed, slice batches for
  training, whole ``val`` volumes (1, 1, H, W, D) for 3D validation, and (for semi-supervised
  fine-tuning) batches of unlabelled slices of the other ``train`` volumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.samplers import MetaLabelBatchSampler, RandomBatchSampler
from ..data.slice_loader import make_slice_loader
from ..data.slices import SliceCache, build_slice_cache
from ..errors import ConfigError

SPLITS = ("pretrain", "train", "val", "test")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load a manifest JSON and check its top level; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist (build it with scripts/make_manifest.py)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"manifest {path} is not valid JSON: {err}") from err
    missing = [k for k in ("labels", "meta_labels", "preprocessing", *SPLITS) if k not in manifest]
    if missing:
        raise ConfigError(f"manifest {path} lacks the keys {missing}")
    return manifest


def preprocessing_settings(manifest: dict, overrides: dict | None, dataset: str) -> dict[str, Any]:
    """The manifest's preprocessing, updated by ``overrides[dataset]`` (the CPU-scale preset uses this)."""
    settings = dict(manifest["preprocessing"])
    settings.update((overrides or {}).get(dataset, {}))
    return settings


def cap(entries: list[dict], max_volumes: int) -> list[dict]:
    """The first ``max_volumes`` entries (all when 0): for smoke runs."""
    return entries[:max_volumes] if max_volumes and max_volumes > 0 else entries


def meta_labels_in(datalist: str | Path, wanted: Sequence[str]) -> list[str]:
    """The meta labels of ``wanted`` (in its order) that the manifest ``datalist`` provides: SPCL's labels with
    a weight, the probes' labels, on a dataset that may lack some of them (hippocampus has no ``organ_state``)."""
    provided = read_manifest(datalist)["meta_labels"]
    return [m for m in wanted if m in provided]


def check_meta_labels(meta_labels: Sequence[str], manifest: dict, manifest_path: str | Path) -> list[str]:
    unknown = [m for m in meta_labels if m not in manifest["meta_labels"]]
    if unknown:
        raise ConfigError(f"unknown meta label(s) {unknown} for {manifest_path}; it provides {manifest['meta_labels']}")
    return list(meta_labels)


def select_labeled(entries: Sequence[dict], num_labeled: int, seed: int) -> list[int]:
    """Indices of the ``L`` labelled volumes drawn from the ``train`` pool by ``seed``.

    A seeded permutation of the pool sorted by ``volume_id``; the first ``L`` are taken, so for one seed
    the L = 1 volume is among the L = 2 volumes, and so on (nested draws make L comparable).
    """
    if num_labeled < 1 or num_labeled > len(entries):
        raise ConfigError(f"num_labeled must be in 1..{len(entries)} (the size of the train pool), got {num_labeled}")
    order = sorted(range(len(entries)), key=lambda k: entries[k]["volume_id"])
    permutation = np.random.default_rng(seed).permutation(len(order))
    return sorted(order[k] for k in permutation[:num_labeled])


class PretrainData:
    """Unlabelled slices and their batches for pre-training.

    Args:
        datalist: manifest path.  dataset_dir: root the manifest's paths are relative to.
        dataset: manifest name (selects ``preprocessing_overrides``).
        split: the manifest split to pre-train on.  max_volumes: cap (0 = all).
        meta_labels: meta labels the method uses (checked against the manifest).
        batch_size: slices per batch (views are drawn by the trainer, so 2x images per step).
        sampler: ``"meta_label"`` (volumes x one slice per quantile, GLCL's batches) or ``"random"``.
        num_partitions: S for ``slice_quantile``.
        cache_dir: disk cache shared by every run ("" = none).  device: where the slices live.
    """

    def __init__(
        self,
        datalist: str,
        dataset_dir: str,
        dataset: str,
        split: str = "pretrain",
        max_volumes: int = 0,
        meta_labels: Sequence[str] = (),
        batch_size: int = 48,
        sampler: str = "meta_label",
        num_partitions: int = 4,
        preprocessing_overrides: dict | None = None,
        cache_dir: str = "",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if num_partitions < 1:
            raise ConfigError(f"num_partitions (S) must be >= 1, got {num_partitions!r}")
        manifest = read_manifest(datalist)
        self.meta_labels = check_meta_labels(meta_labels, manifest, datalist)
        self.settings = preprocessing_settings(manifest, preprocessing_overrides, dataset)
        entries = cap(manifest[split], max_volumes)
        if not entries:
            raise ConfigError(f"split {split!r} of {datalist} is empty")
        self.cache: SliceCache = build_slice_cache(
            entries, dataset_dir, self.settings["pixel_size"], self.settings["spatial_size"],
            num_partitions=num_partitions, with_labels=False, cache_dir=cache_dir or None,
        ).to(device)
        if sampler == "meta_label":
            volumes_per_batch = max(1, min(batch_size // num_partitions, self.cache.num_volumes))
            self.sampler = MetaLabelBatchSampler(
                self.cache.meta["volume_index"], self.cache.meta["slice_quantile"], volumes_per_batch,
                num_partitions=num_partitions, seed=seed,
            )
        elif sampler == "random":
            self.sampler = RandomBatchSampler(len(self.cache), min(batch_size, len(self.cache)), seed=seed)
        else:
            raise ConfigError(f"sampler must be 'meta_label' or 'random', got {sampler!r}")
        self.epoch_length = len(self.sampler)
        self.loader = make_slice_loader(self.cache, self.sampler)


class VolumeDataset(torch.utils.data.Dataset):
    """Whole preprocessed volumes of a labelled :class:`SliceCache`: item ``v`` is
    ``{"image": (1, H, W, D), "label": (1, H, W, D)}`` -- the layout ``monai.inferers.SliceInferer`` and
    ``monai.metrics`` expect for 3D scoring of a 2D network."""

    def __init__(self, cache: SliceCache) -> None:
        self.cache = cache
        self.volume_slices = [torch.nonzero(cache.meta["volume_index"] == v).flatten() for v in range(cache.num_volumes)]

    def __len__(self) -> int:
        return len(self.volume_slices)

    def __getitem__(self, v: int) -> dict[str, torch.Tensor]:
        idx = self.volume_slices[v]
        order = idx[torch.argsort(self.cache.meta["slice_index"][idx])]
        as_volume = lambda t: t.index_select(0, order).permute(1, 2, 3, 0)  # (D, 1, H, W) -> (1, H, W, D)
        return {"image": as_volume(self.cache.images), "label": as_volume(self.cache.labels).float()}


class FinetuneData:
    """Labelled data of one fine-tuning run: ``L`` volumes drawn from ``train`` by ``seed``, and ``val``.

    Args:
        num_labeled: L, labelled volumes.  seed: selects them (see :func:`select_labeled`).
        batch_size: labelled slices per step.  max_volumes: caps the train pool and ``val`` (0 = all).
        unlabeled_batch_size: unlabelled slices per step (0 = no unlabelled loader; semi-supervised modes
            set it, see :func:`metacontrast.semi.unlabeled_batch_size`).
        Others as :class:`PretrainData`.
    Attributes:
        train_loader: random batches of labelled slices (dicts with ``image``, ``label``), one epoch =
            one pass over the L volumes' slices.
        val_loader: whole ``val`` volumes, batch size 1.
        labeled_volume_ids: ``volume_id`` of the L volumes (logged, so a run can be traced).
        unlabeled_loader: random batches (dicts with ``image`` only: the labels are dropped) of the slices
            of the (capped) ``train`` pool's other volumes, ``unlabeled_sampler`` its resumable sampler,
            ``unlabeled_volume_ids`` those volumes; ``None`` / ``[]`` when ``unlabeled_batch_size`` is 0.
    """

    def __init__(
        self,
        datalist: str,
        dataset_dir: str,
        dataset: str,
        num_labeled: int,
        seed: int = 0,
        batch_size: int = 5,
        max_volumes: int = 0,
        preprocessing_overrides: dict | None = None,
        cache_dir: str = "",
        device: str | torch.device = "cpu",
        unlabeled_batch_size: int = 0,
    ) -> None:
        manifest = read_manifest(datalist)
        self.labels: dict[str, str] = manifest["labels"]
        self.settings = preprocessing_settings(manifest, preprocessing_overrides, dataset)
        pool = manifest["train"]
        pool = cap(pool, max(max_volumes, num_labeled)) if max_volumes else pool
        chosen = select_labeled(pool, num_labeled, seed)
        self.labeled_volume_ids = [pool[k]["volume_id"] for k in chosen]
        build = lambda entries: build_slice_cache(
            entries, dataset_dir, self.settings["pixel_size"], self.settings["spatial_size"], with_labels=True,
            cache_dir=cache_dir or None,
        ).to(device)
        pool_cache = build(pool)
        self.train_cache = pool_cache.subset(chosen)
        self.sampler = RandomBatchSampler(len(self.train_cache), min(batch_size, len(self.train_cache)), seed=seed, drop_last=False)
        self.train_loader = make_slice_loader(self.train_cache, self.sampler)
        self.epoch_length = len(self.sampler)
        self.unlabeled_loader, self.unlabeled_sampler, self.unlabeled_volume_ids = None, None, []
        if unlabeled_batch_size > 0:
            others = [k for k in range(len(pool)) if k not in chosen]
            if not others:
                raise ConfigError(f"semi-supervised fine-tuning needs unlabelled train volumes, but all {len(pool)} of the "
                                  f"train pool of {datalist} are labelled (num_labeled={num_labeled}, max_volumes={max_volumes})")
            self.unlabeled_volume_ids = [pool[k]["volume_id"] for k in others]
            unlabeled = dataclasses.replace(pool_cache.subset(others), labels=None)
            self.unlabeled_sampler = RandomBatchSampler(len(unlabeled), min(unlabeled_batch_size, len(unlabeled)), seed=seed)
            self.unlabeled_loader = make_slice_loader(unlabeled, self.unlabeled_sampler)
        val_entries = cap(manifest["val"], max_volumes)
        self.val_loader = (
            torch.utils.data.DataLoader(VolumeDataset(build(val_entries)), batch_size=1) if val_entries else None
        )


def epochs_for(max_epochs: int, max_iterations: int, epoch_length: int) -> int:
    """Training length in epochs: ``max_epochs``, or enough epochs for ``max_iterations`` steps when that is > 0."""
    if max_iterations and max_iterations > 0:
        return max(1, -(-int(max_iterations) // max(int(epoch_length), 1)))
    if max_epochs < 1:
        raise ConfigError(f"max_epochs must be >= 1, got {max_epochs}")
    return int(max_epochs)


#: (keys that may hold the setting, symbol in the papers, check, what it must be)
_SETTING_RULES: tuple[tuple[tuple[str, ...], str, Any, str], ...] = (
    (("num_partitions",), "S", lambda v: v >= 1, ">= 1"),
    (("temperature", "tau"), "tau", lambda v: v > 0, "> 0"),
    (("top_k",), "K", lambda v: 0 < v <= 1, "in (0, 1]"),
    (("beta",), "beta", lambda v: 0 < v <= 1, "in (0, 1]"),
    (("num_labeled",), "L", lambda v: v >= 1, ">= 1"),
    (("batch_size",), "batch size", lambda v: v >= 1, ">= 1"),
    (("learning_rate",), "learning rate", lambda v: v > 0, "> 0"),
    (("encoder_lr_scale",), "encoder learning-rate scale", lambda v: v > 0, "> 0 (freeze_encoder True freezes the encoder)"),
)


def hyper_parameters(run: Mapping[str, Any], method: Mapping[str, Any]) -> dict[str, Any]:
    """A pre-training's hyper-parameters as one flat dict: the ``run`` keys every pre-training shares
    (``pretrain_common.json``'s ``hyper_parameters#run``) and the ``method``'s own (its config's
    ``method_hyper_parameters``).

    One flat dict, so that MLflow logs the params under their own names (``seed``, ``pixel_weight``, not
    ``run.seed``), :func:`check_settings` finds them, and the output folder's config hash is that of the
    hand-kept lists this replaces.  A key in both parts is refused: a fact belongs to one of them.
    """
    both = sorted(set(run) & set(method))
    if both:
        raise ConfigError(f"hyper-parameters {both} are listed both as run keys (pretrain_common.json) and as the method's own")
    return {**run, **method}


def check_settings(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check a workflow's hyper-parameters before anything is trained; a bad value is a :class:`ConfigError`.

    Checks (where the key is present): S (``num_partitions``) >= 1, tau (``temperature``) > 0,
    K (``top_k``) in (0, 1], beta in (0, 1], L (``num_labeled``) >= 1, batch size >= 1, learning rate > 0,
    ``encoder_lr_scale`` > 0.
    The checks that need the data -- meta labels known to the manifest, L no larger than the labelled
    pool -- are made when the data are set up (:class:`PretrainData`, :class:`FinetuneData`), and the
    pre-trained encoder's fit when it is loaded (``PretrainedWeightsMismatch``).  All of them run before
    the first training step.  Returns ``settings``.
    """
    problems = []
    for keys, symbol, ok, expected in _SETTING_RULES:
        for key in keys:
            if key not in settings or settings[key] is None:
                continue
            value = settings[key]
            try:
                good = not isinstance(value, bool) and math.isfinite(float(value)) and ok(float(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                name = key if symbol == key else f"{key} ({symbol})"
                problems.append(f"{name} must be {expected}, got {value!r}")
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings
