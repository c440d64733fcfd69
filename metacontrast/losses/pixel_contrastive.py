"""GCL's pixel-wise contrastive loss (GCL paper Sec. 3.3, Eqs. 5-7), vectorised over pixels and image pairs.

For every image-wise positive pair ``(i, j)`` under a meta label (the mask of Eq. 1), each anchor pixel
``i(u)`` takes the top-K most similar pixels of ``x_j`` as its positive pool ``P_u``; the affinity
(Eq. 6) is the cosine of the ``h_img`` features before pooling.  The remaining pixels of ``x_j`` are its
negatives ``N_u``.  With ``u = h_pix(f(x))`` normalised per pixel, Eq. 5 for one anchor is

    L_u = -1/|P_u| sum_{u+ in P_u} log( exp(u.u+/tau) / (exp(u.u+/tau) + sum_{u- in N_u} exp(u.u-/tau)) )

which per positive is ``softplus(lse_{N_u}(u.u-/tau) - u.u+/tau)``.  The loss of a pair is the mean over
its anchor pixels, and the loss of a meta label the mean over its positive pairs.

The value of a pair does not depend on the meta label -- only which pairs count does -- so
:meth:`PixelContrastiveLoss.pair_losses` evaluates every pair of the batch once, as dense
``(B, hw, B, hw)`` tensors (one matmul for all similarities), and each meta label takes a masked mean of
the resulting ``(B, B)`` matrix.  GradFilter (Eq. 8) may drop positives from each pool first.
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


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Ba, n, D) x (Bb, m, D) -> (Ba, n, Bb, m) dot products of every pixel pair, one matmul."""
    return (a.reshape(-1, a.shape[-1]) @ b.reshape(-1, b.shape[-1]).T).view(a.shape[0], a.shape[1], b.shape[0], b.shape[1])


def positive_gradient_norms(
    logits: torch.Tensor, pool: torch.Tensor, weights: torch.Tensor, neg_lse: torch.Tensor, grams: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Magnitude of the gradient each positive induces, in closed form (Eq. 7 through the embedding layer).

    For one anchor ``u = v/||v||`` with ``v = W r`` (``W`` the last layer producing the pixel embedding)
    and one positive ``u+``, the loss term ``l = softplus(lse_N - u.u+/tau)`` has
    ``dl/du = (1 - p+)/tau * (m - u+)`` (Eq. 7), with ``p+ = sigmoid(u.u+/tau - lse_N)`` and ``m`` the
    softmax-weighted mean of the negatives.  Through the normalisation and ``W``,
    ``||dl/dW|| = ||(I - u u^T) dl/du|| * ||r|| / ||v||``; the last two factors are shared by every
    positive of the anchor, so the ranking uses ``(1 - p+)/tau * ||(I - u u^T)(m - u+)||``, returned here.
    Gradients flow through the anchor only (positives and negatives act as targets).  With the
    negatives' softmax weights ``w`` and the Gram matrix ``G_j`` of image ``j``'s unit embeddings, every
    term is a contraction of ``w`` and ``G_j``, so ``m`` is never formed:
    ``m.u+ = (w G_j)[u+]``, ``||m||^2 = (w G_j) . w``, ``u.m = tau * (w . logits)``.

    Args:
        logits: (Bi, hw, Bj, hw) ``u . u_j / tau`` for anchor images ``i`` and other images ``j``.
        pool: (Bi, hw, Bj, k) indices of each anchor's positives in ``x_j``.
        weights: (Bi, hw, Bj, hw) softmax of the logits over ``N_u`` (0 outside it; all 0 without negatives).
        neg_lse: (Bi, hw, Bj, 1) ``lse_{N_u}`` of the logits.
        grams: (Bj, hw, hw) ``G_j = U_j U_j^T``.
    Returns:
        (Bi, hw, Bj, k) gradient magnitudes, one per positive.
    """
    weighted_gram = torch.einsum("iujv,jvw->iujw", weights, grams)           # w G_j
    pos_logit = logits.gather(-1, pool)
    p_pos = torch.sigmoid(pos_logit - neg_lse)
    u_dot_pos = pos_logit * temperature
    u_dot_m = (weights * logits).sum(-1, keepdim=True) * temperature
    m_dot_pos = weighted_gram.gather(-1, pool)
    m_sq = (weighted_gram * weights).sum(-1, keepdim=True)
    # ||(I - u u^T)(m - u+)||^2 = ||m - u+||^2 - (u.(m - u+))^2 with ||u+|| = 1
    tangential_sq = m_sq - 2 * m_dot_pos + 1 - (u_dot_m - u_dot_pos) ** 2
    return (1 - p_pos) / temperature * tangential_sq.clamp_min(0).sqrt()


class PixelContrastiveLoss(nn.Module):
    """Eq. 5 over image-wise positive pairs.

    Args:
        temperature: tau (0.1 in the paper).
        top_k: K, the share of ``x_j``'s pixels forming each pool (0.3 in the paper).
        grad_filter: optional :class:`GradFilter`; ``None`` or disabled uses the whole pool.
        anchor_chunk: anchor images processed at once, to bound memory (results do not depend on it).
    """

    def __init__(self, temperature: float = 0.1, top_k: float = 0.3, grad_filter: GradFilter | None = None, anchor_chunk: int = 0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_k <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}")
        self.temperature = temperature
        self.top_k = top_k
        self.grad_filter = grad_filter
        self.anchor_chunk = anchor_chunk
        self.last_kept_fraction = 1.0

    def forward(self, pixel_embeddings: torch.Tensor, affinity_features: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_embeddings: (2N, D, h, w) ``h_pix`` output.
            affinity_features: (2N, D', h, w) ``h_img`` output before pooling (detached for Eq. 6).
            positives: (2N, 2N) bool image-wise positive mask (Eq. 1's ``P_i^m``).
        Returns:
            scalar: mean of the pair losses over the positive pairs (0 without any).
        """
        return masked_pair_mean(self.pair_losses(pixel_embeddings, affinity_features, positives), positives)

    def pair_losses(self, pixel_embeddings: torch.Tensor, affinity_features: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
        """(B, B) loss of every image pair ``(i, j)`` (mean over anchor pixels of ``x_i``); pairs outside
        ``needed`` hold 0 and pass no gradient.

        The value and its local gradient with respect to the logits are computed together without
        autograd (:class:`_PairLosses`), so a backward pass -- GradMitigator runs one per meta label -- costs
        one matmul instead of a traversal of every elementwise step over the (B, hw, B, hw) tensors.
        """
        u = _pixels(pixel_embeddings)
        with torch.no_grad():
            z = _pixels(affinity_features)
            batch, hw = u.shape[0], u.shape[1]
            pool_size = max(1, min(hw, math.ceil(self.top_k * hw)))
            grams = u @ u.transpose(1, 2) if self._filtering else None
            chunk = self.anchor_chunk or batch
            parts = [self._anchor_rows(u[s : s + chunk], u, z[s : s + chunk], z, pool_size, grams, needed[s : s + chunk])
                     for s in range(0, batch, chunk)]
            losses = torch.cat([p[0] for p in parts])
            local_grad = torch.cat([p[1] for p in parts])
            kept = torch.cat([p[2] for p in parts])
        self.last_kept_fraction = float(kept.sum() / needed.sum().clamp_min(1))
        return _PairLosses.apply(u, losses, local_grad, self.temperature)

    @property
    def _filtering(self) -> bool:
        return self.grad_filter is not None and self.grad_filter.enabled

    def _anchor_rows(self, u_i, u_all, z_i, z_all, pool_size: int, grams, needed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For anchor images ``u_i`` against every image: pair losses (Bi, B), their gradient with respect to
        the logits (Bi, hw, B, hw), and the number of kept positives per pair (Bi, B) averaged over anchors.
        Each (Bi, hw, B, hw) tensor is made once and reused in place (these dominate the step's memory traffic)."""
        hw = u_i.shape[1]
        pool = _pairwise(z_i, z_all).topk(pool_size, dim=-1).indices           # Eq. 6 top-K: (Bi, hw, B, k)
        logits = _pairwise(u_i, u_all).div_(self.temperature)                  # (Bi, hw, B, hw)
        pos_logits = logits.gather(-1, pool)
        weights = logits.scatter(-1, pool, float("-inf"))                      # logits over N_u only ...
        neg_lse = weights.logsumexp(dim=-1, keepdim=True)
        weights = torch.softmax(weights, dim=-1).nan_to_num_(0.0)              # ... -> softmax over N_u (0 without negatives)
        per_positive = F.softplus(neg_lse - pos_logits)                        # (Bi, hw, B, k)
        if self._filtering:
            norms = positive_gradient_norms(logits, pool, weights, neg_lse, grams, self.temperature)
            keep = self.grad_filter.select(norms).to(logits.dtype)
        else:
            keep = torch.ones_like(per_positive)
        needed_f = needed.to(logits.dtype)
        share = keep / keep.sum(-1, keepdim=True) / hw * needed_f[:, None, :, None]  # each kept positive's share of the pair loss
        losses = (per_positive * share).sum(dim=(1, 3))                        # (Bi, B), 0 outside needed
        # d loss / d logit: -sigmoid(lse_N - s+) per kept positive; its sum times the softmax over N_u for negatives
        pos_grad = -torch.sigmoid(neg_lse - pos_logits) * share
        local_grad = weights.mul_(-pos_grad.sum(-1, keepdim=True)).scatter_add_(-1, pool, pos_grad)
        return losses, local_grad, (keep.sum(-1).mean(1) / pool_size) * needed_f


class _PairLosses(torch.autograd.Function):
    """Pair losses with a precomputed local gradient: ``d loss_ij / d logit_iujv`` -> ``d/dU``.

    With ``logits = U U^T / tau`` over all (image, pixel) rows, a cotangent ``c`` (B, B) gives
    ``dS = c_ij * G_iujv`` and ``dU = (dS + dS^T) U / tau``: one matmul per backward pass.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, losses: torch.Tensor, local_grad: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(u, local_grad)
        ctx.temperature = temperature
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        u, local_grad = ctx.saved_tensors
        batch, hw, dim = u.shape
        d_logits = (local_grad * grad_losses[:, None, :, None]).reshape(batch * hw, batch * hw)
        d_logits += d_logits.T.clone()  # dS + dS^T, then one matmul instead of two
        d_u = d_logits @ u.reshape(batch * hw, dim) / ctx.temperature
        return d_u.view(batch, hw, dim), None, None, None


def masked_pair_mean(pair_losses: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, B) pair-loss matrix over the pairs in ``positives`` (0, with a gradient, if none)."""
    count = positives.sum()
    if count == 0:
        return pair_losses.sum() * 0.0
    return (pair_losses * positives).sum() / count
