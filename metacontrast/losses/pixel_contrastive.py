"""GCL's pixel-wise contrastive loss (GCL paper Sec. 3.3, Eqs. 5-7), vectorised over pixels and pairs.

For every image-wise positive pair ``(i, j)`` under a meta label (the mask of Eq. 1), each anchor pixel
``i(u)`` takes the top-K most similar pixels of ``x_j`` as its positive pool ``P_u``; the affinity
(Eq. 6) is the cosine of the ``h_img`` features before pooling.  The remaining pixels of ``x_j`` are its
negatives ``N_u``.  With ``u = h_pix(f(x))`` normalised per pixel, Eq. 5 for one anchor is

    L_u = -1/|P_u| sum_{u+ in P_u} log( exp(u.u+/tau) / (exp(u.u+/tau) + sum_{u- in N_u} exp(u.u-/tau)) )

which per positive is ``softplus(lse_{N_u}(u.u-/tau) - u.u+/tau)``.  The loss is the mean over anchor
pixels and pairs.  GradFilter (Eq. 8) may drop positives from each pool before averaging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..engines.grad_filter import GradFilter


def _pixels(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D), L2-normalised over D."""
    return F.normalize(feature_map.flatten(2).transpose(1, 2), dim=-1)


def positive_gradient_norms(
    anchors: torch.Tensor,
    others: torch.Tensor,
    logits: torch.Tensor,
    pool: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Magnitude of the gradient each positive induces, in closed form (Eq. 7 through the embedding layer).

    For one anchor ``u = v/||v||`` with ``v = W r`` (``W`` the last layer producing the pixel embedding)
    and one positive ``u+``, the loss term ``l = softplus(lse_N - u.u+/tau)`` has
    ``dl/du = (1 - p+)/tau * (m - u+)`` (Eq. 7), with ``p+ = sigmoid(u.u+/tau - lse_N)`` and ``m`` the
    softmax-weighted mean of the negatives.  Through the normalisation and ``W``,
    ``||dl/dW|| = ||(I - u u^T) dl/du|| * ||r|| / ||v||``; the last two factors are shared by every
    positive of the anchor, so the ranking uses ``(1 - p+)/tau * ||(I - u u^T)(m - u+)||``, returned here.
    Gradients flow through the anchor only (positives and negatives act as targets).

    Args:
        anchors: (P, hw, D) unit anchor embeddings ``u`` of image ``i`` for each pair.
        others: (P, hw, D) unit embeddings of image ``j``.
        logits: (P, hw, hw) ``u . u_j / tau``.
        pool: (P, hw, k) indices of each anchor's positives in ``x_j``.
        negatives: (P, hw, hw) bool, True for ``N_u``.
    Returns:
        (P, hw, k) gradient magnitudes, one per positive.
    """
    neg_logits = logits.masked_fill(~negatives, float("-inf"))
    neg_lse = neg_logits.logsumexp(dim=-1, keepdim=True)                     # (P, hw, 1)
    neg_weights = torch.nan_to_num(torch.softmax(neg_logits, dim=-1))         # (P, hw, hw), 0 if no negatives
    mean_negative = neg_weights @ others                                      # m: (P, hw, D)
    pos_logit = logits.gather(-1, pool)                                       # (P, hw, k)
    p_pos = torch.sigmoid(pos_logit - neg_lse)
    u_dot_pos = pos_logit * temperature                                       # u . u+
    u_dot_m = (anchors * mean_negative).sum(-1, keepdim=True)                 # u . m
    m_dot_pos = (mean_negative @ others.transpose(1, 2)).gather(-1, pool)     # m . u+
    m_sq = (mean_negative * mean_negative).sum(-1, keepdim=True)
    # ||(I - u u^T)(m - u+)||^2 = ||m - u+||^2 - (u.(m - u+))^2 with ||u+|| = 1
    tangential_sq = m_sq - 2 * m_dot_pos + 1 - (u_dot_m - u_dot_pos) ** 2
    return (1 - p_pos) / temperature * tangential_sq.clamp_min(0).sqrt()


class PixelContrastiveLoss(nn.Module):
    """Eq. 5 over all image-wise positive pairs of one meta label.

    Args:
        temperature: tau (0.1 in the paper).
        top_k: K, the share of ``x_j``'s pixels forming each pool (0.3 in the paper).
        grad_filter: optional :class:`GradFilter`; ``None`` or disabled uses the whole pool.
        pair_chunk: pairs processed at once, to bound memory (results do not depend on it).
    """

    def __init__(self, temperature: float = 0.1, top_k: float = 0.3, grad_filter: GradFilter | None = None, pair_chunk: int = 4096) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_k <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}")
        self.temperature = temperature
        self.top_k = top_k
        self.grad_filter = grad_filter
        self.pair_chunk = pair_chunk
        self.last_kept_fraction = 1.0

    def forward(self, pixel_embeddings: torch.Tensor, affinity_features: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_embeddings: (2N, D, h, w) ``h_pix`` output.
            affinity_features: (2N, D', h, w) ``h_img`` output before pooling (detached for Eq. 6).
            positives: (2N, 2N) bool image-wise positive mask (Eq. 1's ``P_i^m``).
        Returns:
            scalar loss (0 when the batch holds no positive pair).
        """
        u = _pixels(pixel_embeddings)
        z = _pixels(affinity_features.detach())
        pairs = positives.nonzero()
        if len(pairs) == 0:
            return pixel_embeddings.sum() * 0.0
        pool_size = max(1, min(u.shape[1], math.ceil(self.top_k * u.shape[1])))
        losses, kept = [], []
        for chunk in pairs.split(self.pair_chunk):
            loss, keep = self._pair_losses(u[chunk[:, 0]], u[chunk[:, 1]], z[chunk[:, 0]], z[chunk[:, 1]], pool_size)
            losses.append(loss)
            kept.append(keep)
        self.last_kept_fraction = float(torch.cat(kept).float().mean())
        return torch.cat(losses).mean()

    def _pair_losses(self, u_i, u_j, z_i, z_j, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(pair, anchor pixel) losses (P*hw,) and the kept-positive mask (P, hw, k)."""
        with torch.no_grad():
            pool = (z_i @ z_j.transpose(1, 2)).topk(pool_size, dim=-1).indices     # Eq. 6 top-K: (P, hw, k)
            negatives = torch.ones(u_i.shape[0], u_i.shape[1], u_j.shape[1], dtype=torch.bool, device=u_i.device)
            negatives.scatter_(-1, pool, False)
        logits = u_i @ u_j.transpose(1, 2) / self.temperature                      # (P, hw, hw)
        neg_lse = logits.masked_fill(~negatives, float("-inf")).logsumexp(dim=-1, keepdim=True)
        per_positive = F.softplus(neg_lse - logits.gather(-1, pool))               # (P, hw, k)
        if self.grad_filter is not None and self.grad_filter.enabled:
            with torch.no_grad():
                norms = positive_gradient_norms(u_i, u_j, logits, pool, negatives, self.temperature)
                keep = self.grad_filter.select(norms)
        else:
            keep = torch.ones_like(per_positive, dtype=torch.bool)
        per_anchor = (per_positive * keep).sum(-1) / keep.sum(-1)
        return per_anchor.flatten(), keep
