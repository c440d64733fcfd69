"""GCL's pixel-wise contrastive loss (GCL paper Sec. 3.3, Eqs. 5-7), vectorised over pixels and image pairs.

For every image-wise positive pair ``(i, j)`` under a meta label (the mask of Eq. 1), each anchor pixel
``i(u)`` takes the top-K most similar pixels of ``x_j`` as its positive pool ``P_u``; the affinity
(Eq. 6) is the cosine of the ``h_img`` features before pooling.  The remaining pixels of ``x_j`` are its
negatives ``N_u``.  With ``u = h_pix(f(x))`` normalised per pixel, Eq. 5 for one anchor is

    L_u = -1/|P_u| sum_{u+ in P_u} log( exp(u.u+/tau) / (exp(u.u+/tau) + sum_{u- in N_u} exp(u.u-/tau)) )

which per positive is ``softplus(lse_{N_u}(u.u-/tau) - u.u+/tau)``.  The loss of a pair is the mean over
its anchor pixels, and the loss of a meta label the mean over its positive pairs.

The value of a pair does not depend on the meta label -- only which pairs count does -- so
:meth:`PixelContrastiveLoss.pair_losses` evaluates each pair that some meta label needs once, and each
meta label takes a masked mean of the resulting ``(B, B)`` matrix.  The pixel similarities come from one
matmul over all pixels, of which only the ``P`` needed ``(hw, hw)`` blocks are kept; every later step
(top-K pools, GradFilter's magnitudes and selection (Eq. 8), the value and its local gradient) works on
``(P, hw, hw)`` tensors in a single pass.
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


def _pair_blocks(a: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, n, D) pixels -> (P, n, n) dot products ``a[first[p]] a[second[p]]^T`` of the P listed image pairs.

    One (B n, B n) matmul over all pixels (a single large GEMM is faster than gathering the operands of
    P small ones), then the listed blocks are copied out.
    """
    batch, n, dim = a.shape
    flat = a.reshape(batch * n, dim)
    return (flat @ flat.T).view(batch, n, batch, n).transpose(1, 2)[first, second]


def positive_gradient_norms(
    logits: torch.Tensor, pool: torch.Tensor, weights: torch.Tensor, neg_lse: torch.Tensor, weighted_gram: torch.Tensor,
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

    Args (P image pairs ``(i, j)``, ``hw`` pixels per image, ``k`` positives per pool):
        logits: (P, hw, hw) ``u . u_j / tau`` of every anchor pixel of ``x_i`` and pixel of ``x_j``.
        pool: (P, hw, k) indices of each anchor's positives in ``x_j``.
        weights: (P, hw, hw) softmax of the logits over ``N_u`` (0 outside it; all 0 without negatives).
        neg_lse: (P, hw, 1) ``lse_{N_u}`` of the logits.
        weighted_gram: (P, hw, hw) ``w G_j``.
    Returns:
        (P, hw, k) gradient magnitudes, one per positive.
    """
    pos_logit = logits.gather(-1, pool)
    p_pos = torch.sigmoid(pos_logit - neg_lse)
    u_dot_pos = pos_logit * temperature
    u_dot_m = torch.linalg.vecdot(weights, logits).unsqueeze(-1) * temperature
    m_dot_pos = weighted_gram.gather(-1, pool)
    m_sq = torch.linalg.vecdot(weighted_gram, weights).unsqueeze(-1)
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
        """(B, B) loss of every image pair ``(i, j)`` in ``needed`` (mean over anchor pixels of ``x_i``); the
        other pairs hold 0, are never evaluated and pass no gradient.

        The value and its local gradient with respect to the logits are computed together without
        autograd (:class:`_PairLosses`); the backward pass -- GradMitigator runs one per meta label -- is
        a weighted sum of per-pair products computed once.
        """
        u = _pixels(pixel_embeddings)
        batch, hw = u.shape[0], u.shape[1]
        pool_size = max(1, min(hw, math.ceil(self.top_k * hw)))
        num_kept = self.grad_filter.num_kept(pool_size) if self._filtering else pool_size
        first, second = needed.nonzero(as_tuple=True)                          # the P needed pairs, grouped by anchor image
        with torch.no_grad():
            z = _pixels(affinity_features)
            grams = u @ u.transpose(1, 2) if num_kept < pool_size else None
            chunk = self.anchor_chunk or batch
            parts = []
            for s in range(0, batch, chunk):
                rows = ((first >= s) & (first < s + chunk)).nonzero().squeeze(1) if chunk < batch else slice(None)
                parts.append(self._pair_rows(u, z, first[rows], second[rows], pool_size, num_kept, grams))
            losses = torch.cat([p[0] for p in parts])
            local_grad = torch.cat([p[1] for p in parts])
        self.last_kept_fraction = num_kept / pool_size if len(first) else 0.0
        return _PairLosses.apply(u, losses, local_grad, first, second, self.temperature)

    @property
    def _filtering(self) -> bool:
        return self.grad_filter is not None and self.grad_filter.enabled

    def _pair_rows(self, u, z, first, second, pool_size: int, num_kept: int, grams) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``(first[p], second[p])``: losses (P,) and their gradient with respect to the logits (P, hw, hw).

        One pass: each (P, hw, hw) tensor is made once and reused in place (they dominate the step's memory
        traffic); GradFilter's magnitudes are computed only when it drops positives.
        """
        hw = u.shape[1]
        pool = _pair_blocks(z, first, second).topk(pool_size, dim=-1, sorted=False).indices  # Eq. 6 top-K: (P, hw, k)
        logits = _pair_blocks(u, first, second).div_(self.temperature)         # (P, hw, hw)
        pos_logits = logits.gather(-1, pool)
        weights = logits.scatter(-1, pool, float("-inf"))                      # logits over N_u only ...
        neg_max = weights.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)   # (0 without negatives: no -inf - -inf)
        weights = weights.sub_(neg_max).exp_()
        neg_sum = weights.sum(dim=-1, keepdim=True)
        neg_lse = neg_sum.log().add_(neg_max)
        weights = weights.div_(neg_sum.clamp_min(torch.finfo(weights.dtype).tiny))  # ... -> softmax over N_u (0 without negatives)
        per_positive = F.softplus(neg_lse - pos_logits)                        # (P, hw, k)
        pos_grad = torch.sigmoid(neg_lse - pos_logits).neg_()                   # d per_positive / d positive logit
        if num_kept < pool_size:
            norms = positive_gradient_norms(logits, pool, weights, neg_lse, torch.bmm(weights, grams[second]), self.temperature)
            keep = self.grad_filter.select(norms).to(logits.dtype)
            per_positive, pos_grad = per_positive * keep, pos_grad * keep
        share = 1.0 / (num_kept * hw)                                          # each kept positive's share of the pair loss
        losses = per_positive.sum(dim=(1, 2)) * share                          # (P,)
        pos_grad = pos_grad * share
        # d loss / d logit: the kept positives' own terms; their sum times the softmax over N_u for negatives
        local_grad = weights.mul_(-pos_grad.sum(-1, keepdim=True)).scatter_add_(-1, pool, pos_grad)
        return losses, local_grad


class _PairLosses(torch.autograd.Function):
    """Pair losses with a precomputed local gradient ``d loss_p / d logit_p`` (P, hw, hw) -> ``d/dU``.

    The local gradients are laid out as one (B hw, B hw) matrix ``LG`` (zero outside the needed pairs).
    With ``logits = U U^T / tau`` over all (image, pixel) rows, a cotangent ``c`` (B, B) gives
    ``dS = c_ij * LG_iujv`` and ``dU = (dS + dS^T) U / tau``: two matmuls per backward pass, also when
    the pass is batched over several cotangents (``torch.autograd.grad(..., is_grads_batched=True)``).
    """

    @staticmethod
    def forward(ctx, u, losses, local_grad, first, second, temperature: float) -> torch.Tensor:
        batch, hw, _ = u.shape
        dense = local_grad.new_zeros(batch, hw, batch, hw)
        dense.transpose(1, 2)[first, second] = local_grad
        ctx.save_for_backward(u, dense)
        ctx.temperature = temperature
        out = losses.new_zeros(batch, batch)
        out[first, second] = losses
        return out

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        u, dense = ctx.saved_tensors
        batch, hw, dim = u.shape
        d_logits = (dense * (grad_losses / ctx.temperature)[:, None, :, None]).reshape(batch * hw, batch * hw)
        flat = u.reshape(batch * hw, dim)
        d_u = d_logits @ flat + d_logits.T @ flat
        return d_u.view(batch, hw, dim), None, None, None, None, None


def masked_pair_mean(pair_losses: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, B) pair-loss matrix over the pairs in ``positives`` (0, with a gradient, if none)."""
    count = positives.sum()
    if count == 0:
        return pair_losses.sum() * 0.0
    return (pair_losses * positives).sum() / count
