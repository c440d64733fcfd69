"""Per-iteration learning-rate schedules of the pre-training bundles.

The GCL paper (and SimCLR's baseline recipe as the GCL paper runs it) anneals the rate with a cosine
over the whole run and no warm-up.  SimCLR's own practice and the SPCL supplement (10 epochs) warm it
up linearly first; :func:`cosine_schedule` offers both, the paper-literal one at ``warmup_iterations=0``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler


class WarmupCosine:
    """The factor ``f(t)`` on the base rate at scheduler step ``t`` (0-based; one step per iteration).

    With W warm-up iterations out of T in all::

        f(t) = (t + 1) / W                                  t <  W   (linear: lr/W at the first step, lr at step W - 1)
        f(t) = (1 + cos(pi (t - W) / (T - W))) / 2           t >= W   (cosine from lr to 0 over the other T - W)

    A plain object (not a closure) so that ``LambdaLR.state_dict`` saves W and T with the checkpoint.
    """

    def __init__(self, warmup_iterations: int, total_iterations: int) -> None:
        if not 0 < warmup_iterations < total_iterations:
            raise ValueError(f"warm-up must be between 1 and total - 1 iterations, got {warmup_iterations} of {total_iterations}")
        self.warmup_iterations = int(warmup_iterations)
        self.total_iterations = int(total_iterations)

    def __call__(self, step: int) -> float:
        if step < self.warmup_iterations:
            return (step + 1) / self.warmup_iterations
        progress = min(step - self.warmup_iterations, self.total_iterations - self.warmup_iterations)
        return 0.5 * (1.0 + math.cos(math.pi * progress / (self.total_iterations - self.warmup_iterations)))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_iterations: int, warmup_iterations: int = 0) -> LRScheduler:
    """Cosine annealing to 0 over ``total_iterations``, after ``warmup_iterations`` of linear warm-up.

    ``warmup_iterations=0`` (the GCL paper) returns torch's ``CosineAnnealingLR(T_max=total_iterations)``
    itself, so the paper-literal schedule is the one every earlier run used, bit for bit; otherwise a
    ``LambdaLR`` over :class:`WarmupCosine`.  Both resume from their ``state_dict``.
    """
    if warmup_iterations < 0:
        raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
    total = max(int(total_iterations), 1)
    if warmup_iterations == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    return LambdaLR(optimizer, WarmupCosine(int(warmup_iterations), total))
