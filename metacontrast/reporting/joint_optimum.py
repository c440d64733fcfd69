"""Attainable values of the meta-label image terms for a dataset and sampler: each alone, and jointly.

:func:`~metacontrast.losses.yardsticks.single_label_minimum` bounds one term on one batch.  The terms
are optimised together, though, through one embedding per slice: collapsing each patient to one point
contradicts collapsing each slice quantile to one point, so their mean has a higher floor.  This module
measures it without any network: **free embeddings**, one learnable vector per slice of the split
(``E`` (S, D), normalised before use), optimised with Adam on the sampler's real batches to minimise

    ``1/M sum_m L^m(normalize(E[batch]))``    (GCL Eq. 2 with ``L^m`` the image term of Eq. 1, both
                                               views of a slice sharing its vector),

and, for comparison, each ``L^m`` alone.  The embedding of a network can do no better than these on the
same batches (it is a constrained choice of ``E``), so they are the yardsticks the pre-training curves
are read against (:func:`~metacontrast.reporting.curves.plot_pretrain_curves` draws them).

:func:`joint_optimum` takes the pre-training bundle's own settings (manifest split, preprocessing,
sampler, batch size, S, temperature, meta labels, head width) from its config, so the batches are the
ones a pre-training draws.  :func:`write_joint_optimum` writes ``results/<dataset>/joint_optimum.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from ..io import atomic_write_text
from ..losses.contrastive import meta_label_positive_mask, multi_positive_info_nce
from ..losses.yardsticks import chance_level, single_label_minimum

__all__ = ["evaluate_terms", "joint_optimum", "optimise_free_embeddings", "write_joint_optimum"]


def _terms(embeddings: torch.Tensor, batch: torch.Tensor, meta: Mapping[str, torch.Tensor], labels: Sequence[str],
           temperature: float) -> dict[str, torch.Tensor]:
    """``{m: L^m}`` for one batch of slice indices; both views of a slice are its own normalised vector."""
    z = F.normalize(embeddings[batch], dim=1).repeat(2, 1)  # (2N, D): rows k and k + N are the views of slice k
    return {m: multi_positive_info_nce(z, meta_label_positive_mask(meta[m][batch]), temperature) for m in labels}


def optimise_free_embeddings(meta: Mapping[str, torch.Tensor], batches: Sequence[Sequence[int]], labels: Sequence[str],
                             temperature: float, dim: int, steps: int, lr: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Adam on ``E`` (S, D) for ``steps`` steps, cycling over ``batches``, minimising the mean of the ``labels`` terms.

    Returns the (S, D) embeddings (not normalised).
    """
    generator = torch.Generator().manual_seed(seed)
    num_slices = len(next(iter(meta.values())))
    embeddings = torch.randn(num_slices, dim, generator=generator, dtype=torch.float64).requires_grad_(True)
    optimiser = torch.optim.Adam([embeddings], lr=lr)
    batch_tensors = [torch.as_tensor(b, dtype=torch.long) for b in batches]
    for step in range(steps):
        terms = _terms(embeddings, batch_tensors[step % len(batch_tensors)], meta, labels, temperature)
        optimiser.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).mean().backward()
        optimiser.step()
    return embeddings.detach()


@torch.no_grad()
def evaluate_terms(embeddings: torch.Tensor, meta: Mapping[str, torch.Tensor], batches: Sequence[Sequence[int]],
                   labels: Sequence[str], temperature: float) -> dict[str, float]:
    """Mean over ``batches`` of each term ``L^m`` at ``embeddings``."""
    sums = dict.fromkeys(labels, 0.0)
    for batch in batches:
        for m, value in _terms(embeddings, torch.as_tensor(batch, dtype=torch.long), meta, labels, temperature).items():
            sums[m] += float(value)
    return {m: s / len(batches) for m, s in sums.items()}


def _yardsticks(meta: Mapping[str, torch.Tensor], batches: Sequence[Sequence[int]], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for m in labels:
        masks = [meta_label_positive_mask(meta[m][torch.as_tensor(b, dtype=torch.long)]) for b in batches]
        out[m] = {"chance": float(np.mean([chance_level(p) for p in masks])), "min": float(np.mean([single_label_minimum(p) for p in masks]))}
    return out


def _sampler_batches(sampler: Any, epochs: Sequence[int]) -> list[list[int]]:
    batches = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        batches += [list(map(int, b)) for b in sampler]
    return batches


def joint_optimum(config_file: str | Sequence[str], steps: int = 3000, lr: float = 0.05, train_epochs: int = 50,
                  eval_epochs: int = 20, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Each meta-label image term's chance level, single-label minimum, value optimised alone and at the joint optimum.

    Args:
        config_file: the pre-training bundle config(s), e.g. ``[bundles/gcl/configs/pretrain.json,
            bundles/common/configs/presets/cpu.json]``; its ``data`` (split, preprocessing, sampler, batch size,
            S), ``temperature``, ``meta_labels`` and ``head_out`` (the embedding width) are used.
        steps: Adam steps per optimisation.  lr: Adam's learning rate.
        train_epochs: sampler epochs ``0..train_epochs-1`` whose batches the optimisation cycles over.
        eval_epochs: the next ``eval_epochs`` sampler epochs, whose batches every value is averaged over
            (batches the optimisation has not seen: the values are those of the sampler, not of a fit).
        seed: of the initial embeddings.
        overrides: bundle keys (``dataset``, ``dataset_dir``, ``max_volumes``, ``cache_dir`` ...).
    Returns:
        a JSON-ready dict: the settings, and ``terms[f"img/{m}"] = {chance, min, alone, joint}``.
    """
    parser = ConfigParser()
    parser.read_config(list(config_file) if not isinstance(config_file, str) else config_file)
    parser.update({"device": "cpu", **overrides})
    data = parser.get_parsed_content("data")
    labels = list(parser.get_parsed_content("meta_labels"))
    temperature = float(parser.get_parsed_content("temperature"))
    dim = int(parser.get_parsed_content("head_out"))
    meta = {m: data.cache.meta[m].cpu() for m in labels}
    train = _sampler_batches(data.sampler, range(train_epochs))
    held_out = _sampler_batches(data.sampler, range(train_epochs, train_epochs + eval_epochs))
    terms = {f"img/{m}": values for m, values in _yardsticks(meta, held_out, labels).items()}
    for m in labels:
        alone = optimise_free_embeddings(meta, train, [m], temperature, dim, steps, lr, seed)
        terms[f"img/{m}"]["alone"] = evaluate_terms(alone, meta, held_out, [m], temperature)[m]
    joint = evaluate_terms(optimise_free_embeddings(meta, train, labels, temperature, dim, steps, lr, seed), meta, held_out, labels, temperature)
    for m in labels:
        terms[f"img/{m}"]["joint"] = joint[m]
    return {
        "dataset": parser.get_parsed_content("dataset"),
        "config_file": [str(c) for c in ([config_file] if isinstance(config_file, str) else config_file)],
        "split": parser.get_parsed_content("pretrain_split"),
        "num_volumes": int(data.cache.num_volumes),
        "num_slices": len(data.cache),
        "sampler": parser.get_parsed_content("sampler"),
        "batch_size": int(parser.get_parsed_content("batch_size")),
        "num_partitions": int(parser.get_parsed_content("num_partitions")),
        "temperature": temperature,
        "meta_labels": labels,
        "dim": dim,
        "optimiser": {"name": "Adam", "lr": lr, "steps": steps, "train_epochs": train_epochs, "eval_epochs": eval_epochs, "seed": seed},
        "joint_mean": float(np.mean([joint[m] for m in labels])),
        "terms": terms,
    }


def write_joint_optimum(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``result`` as sorted, indented JSON (reruns are byte-identical when the values are)."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return Path(path)
