"""SPCL: self-paced contrastive learning with meta labels (Peng et al., NeurIPS 2021).

Only the supplement is at hand; the main paper's equations it cites are reconstructed from it (the
reasoning is in ``bundles/spcl/docs/README.md``).  For ``2N`` embeddings ``z`` (two views of N slices),
the temperature ``tau`` and meta label ``k``:

* Eq. 2, pair loss:  ``l_ij = -log( exp(z_i.z_j/tau) / sum_{a != i} exp(z_i.z_a/tau) )``;
* Eq. 6, self-paced weight:  ``w_ij = argmin_{w in [0,1]} w l_ij + R_gamma(w) = max(0, 1 - l_ij/gamma)``
  for the linear regulariser ``R_gamma(w) = gamma (w^2/2 - w)``, from the detached ``l_ij``;
* Eq. 3:  ``L_sp^k = 1/2N sum_i 1/|P^k(i)| sum_{j in P^k(i)} [w_ij l_ij + R_gamma(w_ij)]``, where
  ``P^k(i)`` holds every other image sharing meta label ``k`` with ``i`` (its other view included);
* Eq. 14:  ``L = sum_k lambda_k L_sp^k``.

``w`` is computed without gradient, so ``R_gamma(w)`` is a constant: the objective returned (and
differentiated) is the ``w l`` part, which :func:`~metacontrast.losses.contrastive.multi_positive_info_nce`
evaluates with its ``weights`` argument; the regulariser is logged.  ``gamma`` comes from a
:class:`~metacontrast.engines.self_paced.SelfPacedSchedule` (Eq. 16), which the trainer moves once per epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..engines.self_paced import SelfPacedSchedule
from ..nets.heads import pooled_embedding
from .contrastive import mean_over_positives, meta_label_positive_mask, multi_positive_info_nce, pair_log_prob
from .yardsticks import yardstick_terms


def self_paced_weights(pair_losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 6 (linear strategy): ``max(0, 1 - l_ij / gamma)``, in ``[0, 1]`` since ``l_ij >= 0``."""
    return (1.0 - pair_losses / gamma).clamp(min=0.0, max=1.0)


def self_paced_regulariser(weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_gamma(w) = gamma (w^2 / 2 - w)``: the regulariser whose minimiser with ``w l`` is Eq. 6."""
    return gamma * (0.5 * weights.square() - weights)


class SPCLLoss(nn.Module):
    """Self-paced meta-label contrast, one term per meta label, weighted and summed (Eq. 14).

    Args:
        meta_labels: the meta labels ``k`` (``slice_quantile``, ``patient_id``, ``organ_state``).
        label_weights: ``{meta label: lambda_k}``; every label of ``meta_labels`` needs one.
        schedule: the source of ``gamma``; ``None`` uses a fixed ``SelfPacedSchedule()`` (gamma_start).
        temperature: tau (0.07 in the supplement, Sec. 3.2).
        key: name of the projection-head output of the network.
        objective_name: key of the single objective returned to the trainer.
    """

    def __init__(
        self,
        meta_labels: Sequence[str],
        label_weights: Mapping[str, float],
        schedule: SelfPacedSchedule | None = None,
        temperature: float = 0.07,
        key: str = "proj",
        objective_name: str = "sp_con",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.meta_labels = list(meta_labels)
        if not self.meta_labels:
            raise ValueError("SPCL needs at least one meta label")
        missing = [m for m in self.meta_labels if m not in label_weights]
        if missing:
            raise ValueError(f"no lambda in label_weights {dict(label_weights)} for meta label(s) {missing}")
        self.label_weights = {m: float(label_weights[m]) for m in self.meta_labels}
        self.schedule = schedule if schedule is not None else SelfPacedSchedule()
        self.temperature = temperature
        self.key, self.objective_name = key, objective_name
        self.last_terms: dict[str, float] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: ``{key: (2N, D, h, w)}`` for the two views stacked (``h = w = 1`` after pooling).
            meta: ``{label: (N,) int tensor}`` per slice.
        Returns:
            ``{objective_name: sum_k lambda_k L_sp^k}`` (the ``w l`` part of Eq. 3; see the module docstring).
        """
        z = pooled_embedding(outputs[self.key])
        gamma = self.schedule.gamma
        with torch.no_grad():
            # Eq. 2 for every pair, without gradient; at least float32 (the embeddings may be half precision under AMP)
            pair_losses = -pair_log_prob(z.detach().to(torch.promote_types(z.dtype, torch.float32)), self.temperature)
        total = z.new_zeros(())
        terms: dict[str, float] = {"gamma": gamma}
        for name in self.meta_labels:
            positives = meta_label_positive_mask(meta[name].to(z.device))
            weights = self_paced_weights(pair_losses, gamma).masked_fill(~positives, 0.0)
            term = multi_positive_info_nce(z, positives, self.temperature, weights=weights.to(z.dtype))
            total = total + self.label_weights[name] * term
            counts = positives.sum(dim=1).clamp(min=1)
            regulariser = (self_paced_regulariser(weights, gamma) * positives).sum(dim=1) / counts
            terms[f"sp/{name}"] = float(term.detach())
            terms[f"reg/{name}"] = float(regulariser.mean())
            terms[f"mean_weight/{name}"] = float(weights[positives].mean()) if positives.any() else 0.0
            terms[f"img/{name}"] = float(mean_over_positives(-pair_losses, positives))  # unweighted Eq. 2 mean: comparable to its yardsticks
            terms.update(yardstick_terms(f"img/{name}", positives))
        self.last_terms = terms
        return {self.objective_name: total}
