"""Yardsticks of an image-wise contrastive term: its chance level and its attainable minimum for a batch.

Both are pure functions of the batch's positive (and negative) masks, i.e. of its meta labels, so they
cost nothing and need no gradient.  A term at its chance level has learned nothing; a term at its
minimum cannot go lower on this batch whatever the embeddings.  Chance alone is the wrong yardstick:
with several positives per anchor the minimum is far above 0 (e.g. ``log |P_i|`` with ``|P_i| = 23``
slice-quantile positives), and a term can only close the gap between the two.

**Default form** (GCL Eq. 1, SupCon's "out" form, SimCLR's NT-Xent, MACL Eq. 10): for anchor ``i`` with
positives ``P_i`` among the ``R - 1`` other rows,

    ``L_i = -1/|P_i| sum_{j in P_i} log p_ij``,   ``p_ij = exp(s_ij/tau) / sum_{a != i} exp(s_ia/tau)``.

* Chance (every embedding equal, ``p_ij = 1/(R - 1)``): ``L_i = log(R - 1)`` (``log(2N - 1)`` for two views).
* Lower bound: ``sum_{a != i} p_ia = 1`` gives ``sum_{j in P_i} p_ij <= 1``; log is concave, so (Jensen)
  ``1/|P_i| sum_j log p_ij <= log(1/|P_i| sum_j p_ij) <= log(1/|P_i|)``, hence ``L_i >= log |P_i|``, with
  equality iff every positive gets probability ``1/|P_i|`` and the negatives none.  For positives that
  are an equivalence relation (a meta label's groups, the two views) the bound is the infimum over
  embeddings: collapse each group to one unit vector and spread the groups apart (a regular simplex);
  the negatives then keep a mass of order ``exp(-(1 - c)/tau)`` per negative (``c`` the cosine
  between groups), exponentially small in ``1/tau``, so at ``tau = 0.1`` the bound is reached to well
  within the resolution of an epoch curve.  For a relation that is not transitive (MACL's slice-position
  threshold) it remains a lower bound.

**Pair-denominator form** (GLCL Eqs. 1 and 3, IDEAL Eq. 1: each positive pair has its own denominator,
itself plus the anchor's negatives ``N_i``):  ``l_ij = log(1 + sum_{a in N_i} exp((s_ia - s_ij)/tau)) > 0``.

* Chance: ``log(1 + |N_i|)``.  Lower bound: 0 (the infimum as the negatives move away from the positives).

The batch values are means over the anchors that have a positive, as the losses average.
"""

from __future__ import annotations

import math

import torch

__all__ = ["chance_level", "single_label_minimum", "yardstick_terms"]


def _anchors(positives: torch.Tensor) -> torch.Tensor:
    return positives.sum(dim=1) > 0


@torch.no_grad()
def chance_level(positives: torch.Tensor, negatives: torch.Tensor | None = None) -> float:
    """The term's value when every embedding is the same (all similarities equal).

    Args:
        positives: (R, R) bool mask of ``P_i`` (diagonal False).
        negatives: optional (R, R) bool mask of ``N_i`` (pair-denominator form); ``None`` = default form.
    Returns:
        ``log(R - 1)`` (default form), or the mean over anchors with a positive of ``log(1 + |N_i|)``.
    """
    anchors = _anchors(positives)
    if not bool(anchors.any()):
        return float("nan")
    if negatives is None:
        return math.log(positives.shape[1] - 1)
    eye = torch.eye(len(negatives), dtype=torch.bool, device=negatives.device)
    count = (negatives & ~eye).sum(dim=1)[anchors].double()
    return float(torch.log1p(count).mean())


@torch.no_grad()
def single_label_minimum(positives: torch.Tensor, negatives: torch.Tensor | None = None) -> float:
    """The lower bound of the term for this batch (see the module docstring for the derivation).

    Args:
        positives, negatives: as :func:`chance_level`.
    Returns:
        mean over anchors with a positive of ``log |P_i|`` (default form), or 0 (pair-denominator form).
    """
    anchors = _anchors(positives)
    if not bool(anchors.any()):
        return float("nan")
    if negatives is not None:
        return 0.0
    return float(positives.sum(dim=1)[anchors].double().log().mean())


def yardstick_terms(name: str, positives: torch.Tensor, negatives: torch.Tensor | None = None) -> dict[str, float]:
    """``{name + "/chance": chance_level, name + "/min": single_label_minimum}``, for a loss's ``last_terms``."""
    return {f"{name}/chance": chance_level(positives, negatives), f"{name}/min": single_label_minimum(positives, negatives)}
