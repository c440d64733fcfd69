"""The GCL objective per meta label (GCL paper Eq. 9): ``L^m = L_img^m + lambda L_pix^m``, lambda = 1 in the paper.

Returned as a dict ``{m: L^m}`` so that :class:`~metacontrast.engines.MultiLossTrainer` either averages
the objectives (Eq. 2, "mitigator off") or hands their gradients to GradMitigator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..nets.heads import pooled_embedding
from .contrastive import meta_label_positive_mask, multi_positive_info_nce, positive_mask, view_ids
from .pixel_contrastive import PixelContrastiveLoss, masked_pair_mean
from .yardsticks import yardstick_terms


class GCLLoss(nn.Module):
    """Image-wise (Eq. 1) plus optional pixel-wise (Eq. 5) contrast for each meta label.

    Args:
        meta_labels: which meta labels define positives (``patient_id``, ``slice_quantile``,
            ``organ_state``); an empty list gives the vanilla two-view loss (the ablation's base model).
        temperature: tau for Eq. 1.
        pixel_loss: Eq. 5 module, or ``None`` to switch pixel contrast off.
        pixel_weight: lambda on the pixel term; the paper sums the two terms (1.0).  A gap the paper left:
            at initialisation the pixel term's gradient on the encoder is ~28x the image term's (issue 18).
        image_key / pixel_key: names of the ``h_img`` and ``h_pix`` outputs of the network.
        image_heads: ``"shared"`` (the paper: one ``h_img`` for every meta label) or ``"per_label"``: label m's
            image term (Eq. 1) compares ``GAP(h_img^m(f))`` from the output ``<image_key>_<m>``
            (:func:`~metacontrast.nets.heads.gcl_heads`), and the pixel term's positives (Eq. 6) are ranked by the
            mean of the labels' image maps, which carries every label's semantics as the shared head does.

    ``last_terms`` holds each term's value and, per image term, its chance level and minimum for the batch
    (:mod:`~metacontrast.losses.yardsticks`).
    """

    def __init__(
        self,
        meta_labels: Sequence[str],
        temperature: float = 0.1,
        pixel_loss: PixelContrastiveLoss | None = None,
        pixel_weight: float = 1.0,
        image_key: str = "img",
        pixel_key: str = "pix",
        image_heads: str = "shared",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if pixel_weight < 0:
            raise ValueError(f"pixel_weight must be >= 0, got {pixel_weight}")
        if image_heads not in ("shared", "per_label"):
            raise ValueError(f"image_heads must be 'shared' or 'per_label', got {image_heads!r}")
        if image_heads == "per_label" and not meta_labels:
            raise ValueError("image_heads='per_label' needs meta labels (the two-view loss has a single term)")
        self.image_heads = image_heads
        self.meta_labels = list(meta_labels)
        self.temperature = temperature
        self.pixel_loss = pixel_loss
        self.pixel_weight = float(pixel_weight)
        self.image_key, self.pixel_key = image_key, pixel_key
        self.last_terms: dict[str, float] = {}
        self.record_components = False  # set by PretrainDiagnostics: keep each term as a tensor in last_components
        self.last_components: dict[str, torch.Tensor] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``{"img": (2N, D, h, w), "pix": (2N, D, h, w)}`` for the two views stacked (``"img_<m>"``
                per meta label instead of ``"img"`` with ``image_heads="per_label"``).
            meta: ``{label: (N,) int tensor}`` per slice.
        Returns:
            ``{label: L^m}`` (``{"views": L}`` when no meta label is used); the logged terms
            (``last_terms``) are unweighted.
        """
        if self.image_heads == "per_label":
            maps = {m: outputs[f"{self.image_key}_{m}"] for m in self.meta_labels}
            affinity = torch.stack(list(maps.values())).mean(dim=0)
        else:
            affinity = outputs[self.image_key]
            maps = {}
        shared = pooled_embedding(affinity) if not maps else None
        device = affinity.device
        masks = {m: meta_label_positive_mask(meta[m].to(device)) for m in self.meta_labels}
        if not masks:
            masks = {"views": positive_mask(view_ids(affinity.shape[0] // 2, device))}
        objectives, terms, components = {}, {}, {}
        if self.pixel_loss is not None:  # every pair's value is shared by the meta labels: evaluate the union once
            union = torch.stack(list(masks.values())).any(dim=0)
            pair_losses = self.pixel_loss.pair_losses(outputs[self.pixel_key], affinity, union)
        for name, positives in masks.items():
            z = pooled_embedding(maps[name]) if maps else shared
            image_term = multi_positive_info_nce(z, positives, self.temperature)
            objective = image_term
            terms[f"img/{name}"] = float(image_term.detach())
            terms.update(yardstick_terms(f"img/{name}", positives))
            components[f"img/{name}"] = image_term
            if self.pixel_loss is not None:
                pixel_term = masked_pair_mean(pair_losses, positives)
                objective = objective + self.pixel_weight * pixel_term
                terms[f"pix/{name}"] = float(pixel_term.detach())
                terms[f"kept_positives/{name}"] = self.pixel_loss.last_kept_fraction
                components[f"pix/{name}"] = pixel_term
            objectives[name] = objective
        self.last_terms = terms
        self.last_components = components if self.record_components else {}
        return objectives
