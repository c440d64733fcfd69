"""MACL's multi-level contrastive loss (Zeng et al., "Multi-level Asymmetric Contrastive Learning for
Medical Image Segmentation Pre-training"; JCL in the paper's equations), Eqs. 9-12:

``L_MLC = lambda_1 L_g + lambda_2 L_d + lambda_3 L_ER``   (Eq. 9; 1.0, 0.5, 1.0 in the paper)

The batch holds two augmentations of ``N`` slices, rows ``[view 1; view 2]`` (``2N``), each seen by both
branches of :class:`~metacontrast.nets.macl.MACLNetwork`: ``Z_i`` from the dominant branch, ``Z~_i`` from
the auxiliary one.  Positives are *position-based* (PCL's strategy): ``j in Omega_i^+`` when ``j != i`` and
the slices' normalised positions differ by less than ``t`` -- the other augmentation of the same slice
always is one.

* ``L_g`` (Eq. 10): ``-1/|Omega_i^+| sum_j log( e^{sim(Z_i^g, Z~_j^g)/tau} / sum_{k != i} e^{sim(Z_i^g, Z~_k^g)/tau} )``;
* ``L_d`` (Eq. 11): the same at every location ``s`` of the ``S x S`` pixel projections, averaged over ``s``;
* ``L_ER`` (Eq. 12): ``|| Y - down(Y~) ||_1`` between the two branches' encoder features.

The anchor is always a dominant projection and the contrast set the auxiliary ones, ``k != i`` (so the
same augmented image seen by the other branch is neither positive nor negative, as Eqs. 10-11 write it).
The dense loss is one batched similarity tensor (S^2, 2N, 2N): nothing loops over pixels or pairs.
Both contrastive terms are averaged over anchors (the equations sum them; the mean keeps the weights
lambda comparable across batch sizes, as the authors' code does), and ``L_ER`` is the mean absolute
difference (the authors' ``nn.L1Loss()``), not the sum the norm would give.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.macl import downsample
from .contrastive import mean_over_positives
from .yardsticks import yardstick_terms


def position_positive_mask(position: torch.Tensor, threshold: float) -> torch.Tensor:
    """``Omega^+`` for rows ``[view 1; view 2]``: (N,) slice positions in [0, 1] -> (2N, 2N) bool,
    ``|p_i - p_j| < threshold`` and ``i != j``."""
    p = position.repeat(2)
    close = (p[:, None] - p[None, :]).abs() < threshold
    return close & ~torch.eye(len(p), dtype=torch.bool, device=p.device)


def cross_log_prob(anchors: torch.Tensor, contrast: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log( e^{sim(a_i, c_j)/tau} / sum_{k != i} e^{sim(a_i, c_k)/tau} )`` for every pair, batched.

    Args:
        anchors, contrast: (..., R, D); cosine similarity over D.
    Returns:
        (..., R, R); the diagonal (``k = i``) is -inf.
    """
    logits = F.normalize(anchors, dim=-1) @ F.normalize(contrast, dim=-1).transpose(-1, -2) / temperature
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, float("-inf")).log_softmax(dim=-1)


def global_contrastive(z: torch.Tensor, z_aux: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Eq. 10: (2N, D) dominant and auxiliary image-level projections, (2N, 2N) positives -> scalar."""
    return mean_over_positives(cross_log_prob(z, z_aux, temperature), positives)


def dense_contrastive(z: torch.Tensor, z_aux: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Eq. 11: (2N, C, S, S) dominant and auxiliary pixel-level projections -> scalar.

    ``(1/S^2) sum_s`` of the per-location log-probabilities, then Eq. 10's reduction over positives.
    """
    if z.shape != z_aux.shape:
        raise ValueError(f"the branches' pixel projections differ in shape: dominant {tuple(z.shape)}, auxiliary {tuple(z_aux.shape)}")
    per_location = lambda t: t.flatten(2).permute(2, 0, 1)  # noqa: E731  (2N, C, S, S) -> (S^2, 2N, C)
    log_prob = cross_log_prob(per_location(z), per_location(z_aux), temperature).mean(dim=0)  # (2N, 2N)
    return mean_over_positives(log_prob, positives)


def equivariant_regularisation(y: torch.Tensor, y_aux: torch.Tensor, scale_factor: float = 0.25, mode: str = "area") -> torch.Tensor:
    """Eq. 12, ``mean | Y - down(Y~) |``: dominant (B, C, h, w) and auxiliary (B, C, h / s, w / s) encoder features."""
    target = downsample(y_aux, scale_factor, mode)
    if target.shape != y.shape:
        raise ValueError(f"down(Y~) {tuple(target.shape)} does not match Y {tuple(y.shape)}: the branches are not aligned")
    return (y - target).abs().mean()


class MACLLoss(nn.Module):
    """``L_MLC`` (Eq. 9) on the outputs of :class:`~metacontrast.nets.macl.MACLNetwork`.

    Args:
        global_weight, dense_weight, er_weight: lambda_1, lambda_2, lambda_3.
        temperature: tau.
        threshold: t, the largest (exclusive) difference of normalised slice positions of a positive pair.
        scale_factor, downsample_mode: the ``down(.)`` of Eq. 12 (the network's own).
        instance_key, pixel_key, feature_key: output names; the auxiliary branch's carry the suffix ``_aux``.
        position_key: the meta label holding each slice's normalised position (``slice_position``, k / (D - 1)).

    ``forward(outputs, meta)`` returns ``{"mlc": L_MLC}`` (one objective: the trainer would otherwise average
    the terms); the three terms are in ``last_terms`` for logging.
    """

    def __init__(self, global_weight: float = 1.0, dense_weight: float = 0.5, er_weight: float = 1.0, temperature: float = 0.1,
                 threshold: float = 0.1, scale_factor: float = 0.25, downsample_mode: str = "area", instance_key: str = "instance",
                 pixel_key: str = "pixel", feature_key: str = "features", position_key: str = "slice_position") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if threshold <= 0:
            raise ValueError(f"threshold t must be > 0 (the other view of a slice must be a positive), got {threshold}")
        self.weights = (float(global_weight), float(dense_weight), float(er_weight))
        self.temperature, self.threshold = temperature, threshold
        self.scale_factor, self.downsample_mode = scale_factor, downsample_mode
        self.instance_key, self.pixel_key, self.feature_key, self.position_key = instance_key, pixel_key, feature_key, position_key
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``instance`` / ``instance_aux`` (2N, D, 1, 1), ``pixel`` / ``pixel_aux`` (2N, C, S, S),
                ``features`` (2N, C', S/4, S/4) / ``features_aux`` (2N, C', S, S).
            meta: ``{position_key: (N,)}`` normalised slice positions.
        """
        z_g = outputs[self.instance_key].flatten(1)
        positives = position_positive_mask(meta[self.position_key].to(z_g.device), self.threshold)
        if len(positives) != len(z_g):
            raise ValueError(f"{len(z_g)} projections are not two views of the {len(positives) // 2} slices in the batch")
        terms = {
            "global": global_contrastive(z_g, outputs[self.instance_key + "_aux"].flatten(1), positives, self.temperature),
            "dense": dense_contrastive(outputs[self.pixel_key], outputs[self.pixel_key + "_aux"], positives, self.temperature),
            "er": equivariant_regularisation(outputs[self.feature_key], outputs[self.feature_key + "_aux"], self.scale_factor, self.downsample_mode),
        }
        total = sum(w * t for w, t in zip(self.weights, terms.values()))
        self.last_terms = {f"macl/{k}": float(v.detach()) for k, v in terms.items()}
        self.last_terms["macl/positives_per_anchor"] = float(positives.sum(1).float().mean())
        self.last_terms.update(yardstick_terms("macl/global", positives))  # Eq. 10 has the default InfoNCE form
        return {"mlc": total}
