"""GCL's losses, GradMitigator and GradFilter against direct evaluations of the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metacontrast.engines import GradFilter, GradMitigator, pace
from metacontrast.losses import PixelContrastiveLoss, meta_label_contrastive, meta_label_positive_mask, nt_xent



@pytest.fixture(autouse=True)
def float64_by_default():
    """Exact comparisons with the direct evaluations; restored so other test modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _single(mitigator: GradMitigator, grads: torch.Tensor) -> torch.Tensor:
    segments = torch.zeros(grads.shape[1], dtype=torch.long)
    return mitigator.modified_gradients(grads, segments, 1)


# -- GradMitigator (Algorithm 1, Eqs. 3-4) -------------------------------------------------------

def test_mitigated_gradient_meets_target_cosine():
    """(a) when w_ij is below its target, cos(g_i', g_j) equals the target after Eq. 3."""
    mitigator = GradMitigator(beta=0.5)
    mitigator.targets = torch.full((1, 2, 2), 0.6)  # a target the conflicting pair is below
    g = torch.tensor([[1.0, 0.0, 0.2], [-0.5, 1.0, 0.1]])
    w_before = F.cosine_similarity(g[0], g[1], dim=0)
    target = 0.5 * 0.6 + 0.5 * w_before  # Eq. 4 updated first
    assert w_before < target
    modified = _single(mitigator, g)
    assert F.cosine_similarity(modified[0], g[1], dim=0) == pytest.approx(float(target), abs=1e-5)
    assert not torch.allclose(modified[0], g[0])


def test_gradients_at_or_above_target_are_untouched():
    """(b) aligned gradients (w_ij >= target, initial target 0) pass unchanged; the update is their mean."""
    mitigator = GradMitigator(beta=0.01)
    g = torch.tensor([[1.0, 0.5, 0.0], [0.8, 0.7, 0.1], [0.9, 0.2, 0.3]])
    modified = _single(mitigator, g)
    torch.testing.assert_close(modified, g)
    mitigator2 = GradMitigator(beta=0.01)
    torch.testing.assert_close(mitigator2.mitigate(g, torch.zeros(3, dtype=torch.long), 1), g.mean(0))


def test_single_objective_gives_plain_gradient():
    """(c) M = 1: the update is the gradient itself."""
    g = torch.randn(1, 50)
    torch.testing.assert_close(GradMitigator().mitigate(g, torch.zeros(50, dtype=torch.long), 1), g[0])


def test_ema_targets_follow_eq4_over_steps():
    """(d) w^_ij(t) = (1 - beta) w^_ij(t-1) + beta w_ij(t), from 0, per parameter tensor."""
    torch.manual_seed(0)
    beta = 0.1
    mitigator = GradMitigator(beta=beta)
    segments = torch.tensor([0, 0, 0, 1, 1])
    expected = torch.zeros(2)  # target of pair (1, 0) for each of the two tensors
    for _ in range(5):
        g = torch.randn(2, 5)
        # pair (i=1, j=0) is visited with g_1' = g_1 (first and only j for i = 1)
        w = torch.stack([F.cosine_similarity(g[1, s], g[0, s], dim=0) for s in (slice(0, 3), slice(3, 5))])
        expected = (1 - beta) * expected + beta * w
        mitigator.modified_gradients(g, segments, 2)
        torch.testing.assert_close(mitigator.targets[:, 1, 0], expected)


def test_each_parameter_tensor_is_mitigated_separately():
    """Conflict in one tensor does not modify another tensor whose gradients agree."""
    mitigator = GradMitigator(beta=1.0)  # target = current cosine: nothing is below it
    mitigator.targets = torch.tensor([[[0, 0.9], [0.9, 0]], [[0, 0.0], [0.0, 0]]])
    g = torch.tensor([[1.0, 0.0, 1.0, 0.0], [-1.0, 0.1, 1.0, 0.1]])
    mitigator.beta = 0.5
    modified = mitigator.modified_gradients(g, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(modified[:, 2:], g[:, 2:])  # tensor 1 agrees: untouched
    assert not torch.allclose(modified[:, :2], g[:, :2])  # tensor 0 conflicts: modified


def test_pair_with_a_zero_gradient_on_a_tensor_is_skipped():
    """Where g_i or g_j is exactly zero on a tensor the cosine is undefined: that (tensor, pair) keeps its
    EMA target and its gradients, while the other tensor follows Eq. 4 as usual."""
    for cosine_norm in ("corrected", "as_printed"):
        mitigator = GradMitigator(beta=0.5, cosine_norm=cosine_norm)
        mitigator.targets = torch.full((2, 2, 2), 0.6)
        # tensor 0: label 1's gradient is zero; tensor 1: both gradients non-zero and conflicting
        g = torch.tensor([[1.0, 0.2, 1.0, 0.0], [0.0, 0.0, -0.5, 1.0]])
        w = F.cosine_similarity(g[0, 2:], g[1, 2:], dim=0)
        modified = mitigator.modified_gradients(g, torch.tensor([0, 0, 1, 1]), 2)
        torch.testing.assert_close(mitigator.targets[0], torch.full((2, 2), 0.6))  # no EMA step with cos = 0
        assert (mitigator.targets[1] != torch.full((2, 2), 0.6)).sum() == 2  # both ordered pairs moved
        torch.testing.assert_close(modified[:, :2], g[:, :2])
        assert not torch.allclose(modified[:, 2:], g[:, 2:])  # the defined tensor is still mitigated
        assert mitigator.last_cosines[0, 0, 1].isnan() and mitigator.last_cosines[0, 1, 0].isnan()
        if cosine_norm == "corrected":  # pair (0, 1) is visited first, with g_0' = g_0
            assert float(mitigator.targets[1, 0, 1]) == pytest.approx(0.5 * 0.6 + 0.5 * float(w))
            summary = mitigator.summary(["a", "b"])
            assert summary["cos/a-vs-b"] == pytest.approx(float(w))  # mean over the tensors where it is defined


def test_mitigator_state_roundtrip():
    mitigator = GradMitigator(beta=0.2)
    mitigator.mitigate(torch.randn(3, 10), torch.zeros(10, dtype=torch.long), 1)
    restored = GradMitigator()
    restored.load_state_dict(mitigator.state_dict())
    torch.testing.assert_close(restored.targets, mitigator.targets)
    assert restored.steps == 1 and restored.beta == 0.2


def test_beta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="beta"):
        GradMitigator(beta=0.0)


# -- Image-wise loss (Eq. 1) -----------------------------------------------------------------------

def _eq1_direct(z: torch.Tensor, meta: list[int], tau: float) -> float:
    """Eq. 1 written out with loops: rows k and k+N are the two views of slice k."""
    n2 = len(z)
    n = n2 // 2
    z = F.normalize(z, dim=1)
    total, anchors = 0.0, 0
    for i in range(n2):
        positives = [j for j in range(n2) if j != i and (j % n == i % n or meta[j % n] == meta[i % n])]
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n2) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[j]) / tau) / denominator) for j in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_image_wise_loss_equals_eq1():
    """(e)"""
    torch.manual_seed(1)
    z = torch.randn(10, 6)
    meta = [0, 1, 0, 2, 1]
    loss = meta_label_contrastive(z, torch.tensor(meta), temperature=0.1)
    assert float(loss) == pytest.approx(_eq1_direct(z, meta, 0.1), rel=1e-9)


def test_nt_xent_is_eq1_with_view_positives_only():
    torch.manual_seed(2)
    z = torch.randn(8, 5)
    assert float(nt_xent(z, 0.1)) == pytest.approx(_eq1_direct(z, [0, 1, 2, 3], 0.1), rel=1e-9)


def test_positive_mask_holds_views_and_shared_meta():
    mask = meta_label_positive_mask(torch.tensor([3, 4, 3]))
    # slice 0's views are rows 0 and 3; its positives: its other view and both views of slice 2
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 5]
    assert not mask.diagonal().any()


# -- Pixel-wise loss (Eqs. 5-6) ---------------------------------------------------------------------

def _eq5_direct(u_map, z_map, positives, tau, k_fraction, keep=None):
    """Eq. 5 with loops over pairs, anchor pixels and positives."""
    u = F.normalize(u_map.flatten(2), dim=1)  # (B, D, hw)
    z = F.normalize(z_map.flatten(2), dim=1)
    hw = u.shape[2]
    k = math.ceil(k_fraction * hw)
    losses = []
    for i, j in positives.nonzero().tolist():
        for a in range(hw):
            affinity = [float(z[i, :, a] @ z[j, :, v]) for v in range(hw)]
            pool = sorted(range(hw), key=lambda v: -affinity[v])[:k]
            negatives = [v for v in range(hw) if v not in pool]
            kept = pool if keep is None else [v for v in pool if keep(i, j, a, v)]
            neg_sum = sum(math.exp(float(u[i, :, a] @ u[j, :, v]) / tau) for v in negatives)
            terms = []
            for v in kept:
                pos = math.exp(float(u[i, :, a] @ u[j, :, v]) / tau)
                terms.append(-math.log(pos / (pos + neg_sum)))
            losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_pixel_loss_equals_eq5():
    """(f) whole pools (GradFilter off) on a 3x3 map, two meta values."""
    torch.manual_seed(3)
    u_map, z_map = torch.randn(6, 4, 3, 3), torch.randn(6, 5, 3, 3)
    positives = meta_label_positive_mask(torch.tensor([0, 1, 0]))
    loss = PixelContrastiveLoss(temperature=0.1, top_k=0.3)(u_map, z_map, positives)
    assert float(loss) == pytest.approx(_eq5_direct(u_map, z_map, positives, 0.1, 0.3), rel=1e-9)


# -- GradFilter (Eqs. 7-8) ---------------------------------------------------------------------------

def test_pace_function_values():
    """(h) g(0) clamps to 1, g(T/2) = [1 + log(1/2 + e^-4)/4] |P|, g(T) clamps to |P|."""
    assert pace(0, 100, 40) == 1
    assert pace(50, 100, 40) == math.floor((1 + 0.25 * math.log(0.5 + math.exp(-4))) * 40) == 33
    assert pace(100, 100, 40) == 40


def test_grad_filter_matches_brute_force_autograd():
    """(g) the closed form selects the same positives as per-positive autograd on the embedding layer.

    Brute force: for each (anchor, positive) the single-positive term of Eq. 5 is differentiated with
    ``torch.autograd.grad`` w.r.t. the weight and bias of the 1x1 conv producing the pixel embeddings
    (positives and negatives held fixed, as in the closed form), and the g(t) smallest norms are kept.
    """
    torch.manual_seed(4)
    tau, top_k = 0.1, 0.5
    layer = torch.nn.Conv2d(6, 4, kernel_size=1)
    features = torch.randn(4, 6, 3, 3)  # (2N, C, h, w): 2 slices, 2 views
    z_map = torch.randn(4, 5, 3, 3)
    positives = meta_label_positive_mask(torch.tensor([0, 0]))
    grad_filter = GradFilter(total_steps=10)
    grad_filter.step = 5
    loss_fn = PixelContrastiveLoss(tau, top_k, grad_filter)

    with torch.no_grad():
        u = F.normalize(layer(features).flatten(2).transpose(1, 2), dim=-1)
        z = F.normalize(z_map.flatten(2).transpose(1, 2), dim=-1)
    hw = u.shape[1]
    k = math.ceil(top_k * hw)
    kept_brute = set()
    for i, j in positives.nonzero().tolist():
        for a in range(hw):
            pool = (z[i, a] @ z[j].T).topk(k).indices.tolist()
            negatives = [v for v in range(hw) if v not in pool]
            norms = []
            for v in pool:
                anchor = F.normalize(layer(features[i : i + 1]).flatten(2)[0, :, a], dim=0)
                logits = torch.stack([anchor @ u[j, v]] + [anchor @ u[j, n] for n in negatives]) / tau
                term = -logits.log_softmax(0)[0]
                grads = torch.autograd.grad(term, [layer.weight, layer.bias])
                norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))
            order = sorted(range(k), key=lambda s: norms[s])[: grad_filter.num_kept(k)]
            kept_brute.update((i, j, a, pool[s]) for s in order)

    with torch.no_grad():
        loss_fn(layer(features), z_map, positives)
    # the loss with the brute-force selection equals the loss with GradFilter's own selection
    expected = _eq5_direct(layer(features).detach(), z_map, positives, tau, top_k, keep=lambda *key: key in kept_brute)
    assert float(loss_fn(layer(features), z_map, positives)) == pytest.approx(expected, rel=1e-9)
    assert 1 < grad_filter.num_kept(k) < k  # a real selection was made


def test_grad_filter_disabled_keeps_whole_pool():
    grad_filter = GradFilter(total_steps=10, enabled=False)
    assert grad_filter.select(torch.rand(2, 3, 7)).all()


def test_as_printed_cosine_uses_the_other_gradients_norm():
    """Alg. 1 line 6 as printed divides by ||g_j'|| ||g_j||: for i = 0 that is ||g_1||^2, not ||g_0|| ||g_1||."""
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    printed = GradMitigator(beta=1.0, cosine_norm="as_printed")
    printed.modified_gradients(g, torch.zeros(2, dtype=torch.long), 1)
    assert float(printed.last_cosines[0, 0, 1]) == pytest.approx(min(3.0 / 2.0, 1.0))  # g0.g1 / ||g1||^2, clamped
    corrected = GradMitigator(beta=1.0)
    corrected.modified_gradients(g, torch.zeros(2, dtype=torch.long), 1)
    assert float(corrected.last_cosines[0, 0, 1]) == pytest.approx(3.0 / (3.0 * math.sqrt(2)))


def _eq5_autograd(u_map, z_map, positives, tau, k_fraction):
    """Eq. 5 with torch ops per pair (autograd reference for the closed-form backward)."""
    u = F.normalize(u_map.flatten(2), dim=1)
    z = F.normalize(z_map.flatten(2), dim=1).detach()
    hw = u.shape[2]
    k = math.ceil(k_fraction * hw)
    pair_losses = []
    for i, j in positives.nonzero().tolist():
        logits = u[i].T @ u[j] / tau  # (hw, hw)
        pool = (z[i].T @ z[j]).topk(k, dim=-1).indices
        negatives = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, pool, False)
        neg_lse = logits.masked_fill(~negatives, float("-inf")).logsumexp(-1, keepdim=True)
        pair_losses.append(F.softplus(neg_lse - logits.gather(-1, pool)).mean())
    return torch.stack(pair_losses).mean()


def test_pixel_loss_gradient_matches_autograd():
    """The closed-form backward of the pair losses equals autograd through Eq. 5."""
    torch.manual_seed(5)
    u_map, z_map = torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(6, 5, 3, 3)
    positives = meta_label_positive_mask(torch.tensor([0, 1, 0]))
    (grad,) = torch.autograd.grad(PixelContrastiveLoss(0.1, 0.3)(u_map, z_map, positives), u_map)
    (expected,) = torch.autograd.grad(_eq5_autograd(u_map, z_map, positives, 0.1, 0.3), u_map)
    torch.testing.assert_close(grad, expected)


def test_pixel_loss_does_not_depend_on_anchor_chunks():
    """Chunking the anchors (to bound memory at full scale) changes neither the loss, the GradFilter choice, nor the gradient."""
    torch.manual_seed(6)
    u_map, z_map = torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, 5, 3, 3)
    positives = meta_label_positive_mask(torch.tensor([0, 1, 0, 1]))
    results = []
    for chunk in (0, 3):
        grad_filter = GradFilter(total_steps=10)
        grad_filter.step = 5
        loss = PixelContrastiveLoss(0.1, 0.5, grad_filter, anchor_chunk=chunk)(u_map, z_map, positives)
        results.append((loss, *torch.autograd.grad(loss, u_map)))
    torch.testing.assert_close(results[0], results[1])


def _dense_reference(u_map, z_map, needed, tau, top_k, grad_filter):
    """The formulation before the pair list: every (B, hw, B, hw) pixel pair, GradFilter's magnitudes on the dense
    tensors, the selection held fixed and autograd for the gradient; pairs outside ``needed`` hold 0."""
    u = F.normalize(u_map.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, D)
    z = F.normalize(z_map.flatten(2).transpose(1, 2), dim=-1).detach()
    batch, hw = u.shape[:2]
    k = math.ceil(top_k * hw)
    pool = torch.einsum("iud,jvd->iujv", z, z).topk(k, dim=-1).indices
    logits = torch.einsum("iud,jvd->iujv", u, u) / tau
    masked = logits.scatter(-1, pool, float("-inf"))
    neg_lse = masked.logsumexp(-1, keepdim=True)
    per_positive = F.softplus(neg_lse - logits.gather(-1, pool))
    with torch.no_grad():  # Eq. 7 closed form as the dense code had it
        weights = masked.softmax(-1).nan_to_num(0.0)
        weighted_gram = torch.einsum("iujv,jvw->iujw", weights, u @ u.transpose(1, 2))
        pos = logits.gather(-1, pool)
        tangential = ((weighted_gram * weights).sum(-1, keepdim=True) - 2 * weighted_gram.gather(-1, pool) + 1
                      - ((weights * logits).sum(-1, keepdim=True) * tau - pos * tau) ** 2)
        norms = (1 - torch.sigmoid(pos - neg_lse)) / tau * tangential.clamp_min(0).sqrt()
        keep = grad_filter.select(norms).to(u.dtype)
    pair = (per_positive * keep).sum(-1) / keep.sum(-1)  # (B, hw, B)
    return pair.mean(1) * needed


@pytest.mark.parametrize("step", [3, 10])
def test_pair_list_equals_dense_formulation(step):
    """The pair-list loss (only the needed pairs, GradFilter in the same pass, precomputed local gradient) gives the
    dense formulation's pair losses and gradients, for two cotangents through the same graph (GradMitigator's case)."""
    torch.manual_seed(7)
    u_map, z_map = torch.randn(12, 8, 4, 4, requires_grad=True), torch.randn(12, 6, 4, 4)
    needed = meta_label_positive_mask(torch.tensor([0, 1, 0, 2, 1, 0])) | meta_label_positive_mask(torch.tensor([0, 0, 1, 1, 2, 2]))
    assert 0 < needed.sum() < needed.numel() - 12  # some pairs are left out
    grad_filter = GradFilter(total_steps=10)
    grad_filter.step = step
    got = PixelContrastiveLoss(0.1, 0.3, grad_filter, anchor_chunk=5).pair_losses(u_map, z_map, needed)
    want = _dense_reference(u_map, z_map, needed, 0.1, 0.3, grad_filter)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for cotangent in (needed / needed.sum(), torch.rand(12, 12)):
        (g_got,) = torch.autograd.grad(got, u_map, cotangent, retain_graph=True)
        (g_want,) = torch.autograd.grad(want, u_map, cotangent, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
