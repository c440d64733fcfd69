"""GradMitigator (GCL paper Sec. 3.2, Algorithm 1, Eqs. 3-4).

Given one gradient ``g_m`` per meta label (objective ``L^m = L_img^m + L_pix^m``), for every ordered
pair ``(i, j)``, per parameter tensor (Sec. 4.2: "all the parameters of the encoder are updated
individually"):

    w_ij      = g_i' . g_j / (||g_i'|| ||g_j||)                       (Alg. 1 line 6, corrected)
    w^_ij    <- (1 - beta) w^_ij + beta w_ij                           (Eq. 4, updated first, init 0)
    if w_ij < w^_ij:
        g_i' <- g_i' + ||g_i'|| (w^ sqrt(1 - w^2) - w sqrt(1 - w^^2)) / (||g_j|| sqrt(1 - w^^2)) g_j   (Eq. 3)

and the update is the mean of the ``g_i'`` (Alg. 1 line 13).  Line 6 of Algorithm 1 as printed divides
by ``||g_j'|| ||g_j||``; the cosine it names (and Eq. 3's geometry, which makes ``cos(g_i', g_j)`` hit the
target) needs ``||g_i'|| ||g_j||``.  ``cosine_norm="corrected"`` (default) uses the latter;
``"as_printed"`` reproduces the typo for comparison, reading ``g_j'`` as the already-modified gradient
when ``j < i`` and as ``g_j`` otherwise (the value is clamped to [-1, 1]).  Where ``g_i'`` or ``g_j`` is
exactly zero on a tensor the cosine is undefined, and that (tensor, pair) is skipped: its EMA target is not
updated and ``g_i'`` is not modified (``last_cosines`` holds NaN there).  The EMA targets are kept per
parameter tensor and ordered pair and are saved in checkpoints through ``state_dict``.  Parameters outside ``mitigated_prefixes`` (the projection heads)
get the plain average of the per-label gradients.

Vectorised over parameter tensors: all mitigated gradients are flattened into one (M, P) matrix and
per-tensor dot products are segment sums, so the only Python loop is over the M(M-1) label pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine

from .events import MultiLossEvents


def segment_sum(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum (P,) ``values`` into (num_segments,) bins given (P,) ``segments`` ids."""
    return torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add_(0, segments, values)


class GradMitigator:
    """Mitigates conflicts between per-objective gradients; a handler of ``MultiLossTrainer``.

    Args:
        beta: EMA weight of the target cosine (0.01 in the paper); must be in (0, 1].
        mitigated_prefixes: parameter-name prefixes treated per tensor by Alg. 1 (the encoder).
        cosine_norm: ``"corrected"`` or ``"as_printed"`` (see the module docstring).
        eps: guards the denominator of Eq. 3's step where the target cosine is +-1.
    """

    def __init__(self, beta: float = 0.01, mitigated_prefixes: Sequence[str] = ("encoder.",), cosine_norm: str = "corrected",
                 eps: float = 1e-12) -> None:
        if not 0 < beta <= 1:
            raise ValueError(f"GradMitigator beta must be in (0, 1], got {beta}")
        if cosine_norm not in ("corrected", "as_printed"):
            raise ValueError(f"cosine_norm must be 'corrected' or 'as_printed', got {cosine_norm!r}")
        self.cosine_norm = cosine_norm
        self.beta = beta
        self.mitigated_prefixes = tuple(mitigated_prefixes)
        self.eps = eps
        self.targets: torch.Tensor | None = None  # (num_tensors, M, M) EMA targets w^_ij
        self.last_cosines: torch.Tensor | None = None  # (num_tensors, M, M) w_ij of the last step
        self.steps = 0

    # -- the algorithm ---------------------------------------------------------------------------
    def mitigate(self, grads: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
        """Algorithm 1: (M, P) per-objective gradients -> (P,) update ``g' = mean_i g_i'`` (line 13)."""
        return self.modified_gradients(grads, segments, num_segments).mean(dim=0)

    def modified_gradients(self, grads: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
        """Algorithm 1 lines 2-12 on flattened gradients; advances the EMA targets by one step.

        Args:
            grads: (M, P) one flattened gradient per objective.
            segments: (P,) index of the parameter tensor each entry belongs to.
            num_segments: number of parameter tensors.
        Returns:
            (M, P) the modified gradients ``g_i'``.
        """
        num_objectives = grads.shape[0]
        if self.targets is None:
            self.targets = torch.zeros(num_segments, num_objectives, num_objectives, dtype=grads.dtype, device=grads.device)
        self.targets = self.targets.to(grads.device, grads.dtype)
        cosines = torch.zeros_like(self.targets)
        sq_norms = torch.stack([segment_sum(g * g, segments, num_segments) for g in grads])  # (M, S)
        modified_sq_norms = sq_norms.clone()  # ||g_j'||^2, final once row j has been processed
        modified = []
        for i in range(num_objectives):
            g_i = grads[i].clone()
            sq_norm_i = sq_norms[i].clone()
            for j in range(num_objectives):
                if j == i:
                    continue
                norm_i, norm_j = sq_norm_i.sqrt(), sq_norms[j].sqrt()
                dot = segment_sum(g_i * grads[j], segments, num_segments)
                first_norm = norm_i if self.cosine_norm == "corrected" else modified_sq_norms[j].sqrt()
                defined = (norm_i > 0) & (norm_j > 0) & (first_norm > 0)  # (S,) a zero gradient has no direction
                w = (dot / torch.where(defined, first_norm * norm_j, torch.ones_like(dot))).clamp(-1.0, 1.0)
                target = torch.where(defined, (1 - self.beta) * self.targets[:, i, j] + self.beta * w, self.targets[:, i, j])
                self.targets[:, i, j] = target
                cosines[:, i, j] = torch.where(defined, w, torch.full_like(w, float("nan")))
                below = defined & (w < target)
                if below.any():
                    sin_target = (1 - target**2).clamp_min(0).sqrt()
                    mu = norm_i * (target * (1 - w**2).clamp_min(0).sqrt() - w * sin_target) / (norm_j * sin_target).clamp_min(self.eps)
                    mu = torch.where(below, mu, torch.zeros_like(mu))
                    g_i = g_i + mu[segments] * grads[j]
                    # ||g_i + mu g_j||^2 without another pass over P
                    sq_norm_i = (sq_norm_i + 2 * mu * dot + mu**2 * sq_norms[j]).clamp_min(0)
            modified.append(g_i)
            modified_sq_norms[i] = sq_norm_i
        self.last_cosines = cosines
        self.steps += 1
        return torch.stack(modified)

    # -- engine wiring ------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.state.per_loss_gradients_required = True
        engine.add_event_handler(MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED, self)

    def __call__(self, engine: Engine) -> None:
        """Combine ``engine.state.per_loss_grads`` ({name: [grad per param]}) into ``param.grad``."""
        names, params = engine.state.grad_param_names, engine.state.grad_params
        per_loss = list(engine.state.per_loss_grads.values())
        mitigated = [k for k, n in enumerate(names) if n.startswith(self.mitigated_prefixes)]
        mitigated_set = set(mitigated)
        for k, p in enumerate(params):
            if k not in mitigated_set:
                p.grad = torch.stack([g[k] for g in per_loss]).mean(dim=0)
        if mitigated:
            flat = torch.stack([torch.cat([g[k].reshape(-1) for k in mitigated]) for g in per_loss])
            sizes = torch.tensor([params[k].numel() for k in mitigated], device=flat.device)
            segments = torch.repeat_interleave(torch.arange(len(mitigated), device=flat.device), sizes)
            combined = self.mitigate(flat, segments, len(mitigated))
            for k, chunk in zip(mitigated, combined.split(sizes.tolist())):
                params[k].grad = chunk.view_as(params[k]).clone()
        engine.state.gradients_combined = True
        engine.state.mitigator_summary = self.summary(list(engine.state.per_loss_grads))

    def summary(self, loss_names: Sequence[str]) -> dict[str, float]:
        """Mean over parameter tensors of the last cosine and target of each ordered pair, for logging; the
        cosine's mean skips tensors where it was undefined (and the pair when it was undefined on all)."""
        if self.targets is None or self.last_cosines is None:
            return {}
        out = {}
        for i, a in enumerate(loss_names):
            for j, b in enumerate(loss_names):
                if i != j:
                    if not self.last_cosines[:, i, j].isnan().all():
                        out[f"cos/{a}-vs-{b}"] = float(self.last_cosines[:, i, j].nanmean())
                    out[f"target/{a}-vs-{b}"] = float(self.targets[:, i, j].mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "steps": self.steps, "targets": None if self.targets is None else self.targets.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.steps = float(state["beta"]), int(state["steps"])
        self.targets = state["targets"]
