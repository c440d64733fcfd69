"""Image-wise contrastive losses over a batch of two-view embeddings.

One vectorised kernel, :func:`multi_positive_info_nce`, serves every image-level method:

* GCL's meta-label loss (GCL paper Eq. 1): positives are the other view and every view of a slice
  sharing meta label ``m``;
* SimCLR's NT-Xent (Chen et al. 2020): positives are the other view only;
* SPCL's self-paced variant, through per-pair ``weights``.

Convention for the batch: ``2N`` embeddings where row ``k`` and row ``k + N`` are the two views of
slice ``k`` (``torch.cat([view1, view2])``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def view_ids(num_slices: int, device: torch.device | None = None) -> torch.Tensor:
    """Slice index of each of the ``2N`` rows: ``[0..N-1, 0..N-1]``."""
    return torch.arange(num_slices, device=device).repeat(2)


def positive_mask(groups: torch.Tensor) -> torch.Tensor:
    """(2N,) group ids -> (2N, 2N) bool mask of pairs in the same group, diagonal excluded."""
    same = groups[:, None] == groups[None, :]
    return same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)


def meta_label_positive_mask(meta: torch.Tensor) -> torch.Tensor:
    """Positives of GCL Eq. 1 for one meta label.

    Args:
        meta: (N,) meta-label value per slice (e.g. slice quantile).
    Returns:
        (2N, 2N) bool: ``P_i^m`` as rows -- the other view of the same slice, and every view of
        another slice with the same value of ``m``.  Since both views of a slice share its value,
        this is ``positive_mask(meta.repeat(2))``.
    """
    return positive_mask(meta.repeat(2))


def pair_log_prob(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax`` of ``z_i . z_a / tau`` over ``a != i``: (2N, D) -> (2N, 2N), diagonal -inf."""
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    return logits.log_softmax(dim=1)


def pair_log_prob_vs_negatives(z: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """``z_i.z_j/tau - log(exp(z_i.z_j/tau) + sum_{a in N_i} exp(z_i.z_a/tau))`` for every pair: (2N, D) -> (2N, 2N).

    ``z`` is expected normalised.  An anchor without negatives gets 0 for every pair (finite gradients:
    masked logits are the dtype's lowest finite value, not -inf).
    """
    logits = z @ z.T / temperature
    keep = negatives & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    negative_lse = logits.masked_fill(~keep, torch.finfo(logits.dtype).min).logsumexp(dim=1, keepdim=True)
    return logits - torch.logaddexp(logits, negative_lse)


def multi_positive_info_nce(
    z: torch.Tensor,
    positives: torch.Tensor,
    temperature: float = 0.1,
    weights: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """GCL Eq. 1 averaged over anchors (SimCLR's NT-Xent when the only positive is the other view).

    ``L = mean_i  -1/|P_i| sum_{j in P_i} w_ij log( exp(z_i.z_j/tau) / sum_{a != i} exp(z_i.z_a/tau) )``

    With ``negatives`` (GLCL Eqs. 1 and 3, where some images are neither positive nor negative) each
    positive pair has its own denominator, the pair itself plus the anchor's negatives ``N_i``:
    ``log( exp(z_i.z_j/tau) / (exp(z_i.z_j/tau) + sum_{a in N_i} exp(z_i.z_a/tau)) )``.  With
    ``negatives = ~positives`` (diagonal aside) and one positive per anchor this is the default again.

    Args:
        z: (2N, D) embeddings; normalised here (cosine similarity, as SimCLR [10]).
        positives: (2N, 2N) bool mask, ``positives[i, j]`` when ``j in P_i``.
        temperature: tau.
        weights: optional (2N, 2N) per-pair weights (SPCL's self-paced weights); 1 when omitted.
        negatives: optional (2N, 2N) bool mask, ``negatives[i, a]`` when ``a in N_i`` (the diagonal is
            ignored); omitted, the denominator runs over every ``a != i``.
    Returns:
        scalar loss; anchors without positives are skipped.
    """
    z = F.normalize(z, dim=1)
    log_prob = pair_log_prob(z, temperature) if negatives is None else pair_log_prob_vs_negatives(z, negatives, temperature)
    return mean_over_positives(log_prob, positives, weights)


def mean_over_positives(log_prob: torch.Tensor, positives: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i -1/|P_i| sum_{j in P_i} w_ij log_prob[i, j]`` over the anchors with a positive.

    Args:
        log_prob: (R, R') log-probabilities of the pairs (entries outside ``positives`` are ignored, -inf included).
        positives: (R, R') bool mask of ``P_i``.  weights: optional (R, R') per-pair weights.
    """
    pair_weight = positives.to(log_prob.dtype) if weights is None else positives.to(log_prob.dtype) * weights
    per_pair = -(log_prob.masked_fill(~positives, 0.0)) * pair_weight
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    per_anchor = per_pair.sum(dim=1)[has_positive] / counts[has_positive]
    return per_anchor.mean()


def nt_xent(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent on (2N, D) two-view embeddings: the only positive is the other view."""
    return multi_positive_info_nce(z, positive_mask(view_ids(len(z) // 2, z.device)), temperature)


def meta_label_contrastive(z: torch.Tensor, meta: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """GCL Eq. 1 for one meta label: (2N, D) embeddings and (N,) meta values -> scalar."""
    return multi_positive_info_nce(z, meta_label_positive_mask(meta), temperature)
