"""GradFilter (GCL paper Sec. 3.3, Eqs. 7-8): keep the positives that induce the smallest gradients.

Each anchor pixel ``u`` has a pool ``P_u`` of positive pixels (top-K affinity, Eq. 6).  GradFilter
ranks them by the magnitude of the gradient each one induces and keeps the ``g(t)`` lowest, where
the pace function (Eq. 8) grows the kept share from one positive to the whole pool:

    g(t) = [1 + 1/4 log(t/T + e^-4)] * |P_u|,   clamped to [1, |P_u|], rounded down.

The formula gives 0 at ``t = 0`` (hence the clamp) and slightly more than ``|P_u|`` at ``t = T``.
The gradient magnitudes come from :func:`metacontrast.losses.pixel_contrastive.positive_gradient_norms`
(closed form; see the GCL model card for the choice of layer).  The step ``t`` and horizon ``T`` follow
the trainer: attach the filter to an engine and it reads ``engine.state.iteration`` and
``max_epochs * epoch_length`` at every iteration.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from ignite.engine import Engine, Events


def pace(step: int, total_steps: int, pool_size: int) -> int:
    """Number of positives kept at ``step`` of ``total_steps`` out of ``pool_size`` (Eq. 8, clamped)."""
    fraction = 1.0 + 0.25 * math.log(min(step, total_steps) / max(total_steps, 1) + math.exp(-4.0))
    return int(min(max(math.floor(fraction * pool_size), 1), pool_size))


class GradFilter:
    """Selects, per anchor, the ``pace(t)`` positives with the lowest gradient magnitude.

    Args:
        total_steps: ``T``; when attached to an engine it is taken from the engine instead.
        enabled: ``False`` keeps the whole pool (the "PixCL without GradFilter" ablation row).
    """

    def __init__(self, total_steps: int = 1, enabled: bool = True) -> None:
        self.step = 0
        self.total_steps = int(total_steps)
        self.enabled = enabled

    def num_kept(self, pool_size: int) -> int:
        return pace(self.step, self.total_steps, pool_size) if self.enabled else pool_size

    def select(self, gradient_norms: torch.Tensor) -> torch.Tensor:
        """(..., |P_u|) gradient magnitudes -> bool mask of the same shape, ``num_kept`` True per row."""
        pool_size = gradient_norms.shape[-1]
        keep = self.num_kept(pool_size)
        mask = torch.zeros_like(gradient_norms, dtype=torch.bool)
        if keep == pool_size:
            return mask.fill_(True)
        lowest = gradient_norms.topk(keep, dim=-1, largest=False).indices
        return mask.scatter_(-1, lowest, True)

    # -- engine wiring -------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._follow_engine)

    def _follow_engine(self, engine: Engine) -> None:
        self.step = engine.state.iteration - 1
        self.total_steps = max(int(engine.state.max_epochs or 1) * int(engine.state.epoch_length or 1), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.total_steps, self.enabled = int(state["step"]), int(state["total_steps"]), bool(state["enabled"])
