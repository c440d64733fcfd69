"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as a fine-tuning add-on.

The teacher is an exponential moving average (EMA) of the student's weights,
``theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t`` (the paper's Eq. 1, after every optimiser
step ``t = 1, 2, ...``), with ``alpha_t = min(1 - 1 / (t + 1), decay)`` as in the authors' code (a true
average of the weights seen so far until that reaches ``decay``; ``decay = 0.999`` here).  On the
unlabelled slices the student is pulled towards the teacher's prediction of a noisy copy of the same
input with the consistency cost ``J = mean((softmax(f_student(x)) - softmax(f_teacher(x + eta)))^2)``
(mean squared error of the class probabilities over classes and pixels), weighted by
``w(t) = w_max exp(-5 (1 - min(t / T, 1))^2)``, the paper's sigmoid-shaped ramp-up over ``T`` iterations.

The teacher is used for nothing else: validation, ``model.pt`` and evaluation use the student.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from .batches import split_labeled


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)``; 1 when ``length <= 0`` (no ramp)."""
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def ema_decay(step: int, decay: float) -> float:
    """``alpha_t = min(1 - 1 / (t + 1), decay)`` for optimiser step ``t >= 1`` (the authors' warm-up)."""
    return min(1.0 - 1.0 / (int(step) + 1), float(decay))


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher <- alpha teacher + (1 - alpha) student`` for every parameter, in place; buffers are copied.

    The two modules must have the same architecture (the teacher is a copy of the student).
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same architecture")
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - alpha)
    for t_buffer, s_buffer in zip(teacher.buffers(), student.buffers()):
        t_buffer.copy_(s_buffer)


class MeanTeacher:
    """The EMA teacher of a student network, and the ramped weight of the consistency cost (an ignite handler).

    Args:
        student: the network being fine-tuned.
        decay: EMA decay cap (0.999 in the paper).
        consistency_weight: ``w_max``, the weight once ramped up.
        rampup_iterations: ``T``, iterations of the sigmoid ramp-up (0 = full weight from the start).
        noise_std: standard deviation of the Gaussian noise ``eta`` added to the teacher's input.
        generator: draws the noise (the fine-tune augmentation's generator, so a resumed run draws the same).

    Attach it to the trainer: at ``STARTED`` of a fresh run the teacher becomes a copy of the student
    (after the pre-trained encoder was loaded; a resumed run restores the saved teacher instead, so the
    teacher belongs in the training checkpoint); at ``ITERATION_STARTED`` ``weight`` becomes
    ``w(t - 1)`` (``t - 1`` optimiser steps done); at ``ITERATION_COMPLETED`` the EMA step with ``alpha_t``.
    The teacher runs in training mode, as in the authors' code (dropout, if any, is part of the noise).
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, consistency_weight: float = 0.1,
                 rampup_iterations: int = 200, noise_std: float = 0.1, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Mean Teacher ema_decay must be in [0, 1), got {decay}")
        if consistency_weight < 0 or rampup_iterations < 0 or noise_std < 0:
            raise ValueError(f"Mean Teacher consistency_weight, rampup_iterations and noise_std must be >= 0, got "
                             f"{consistency_weight}, {rampup_iterations}, {noise_std}")
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.decay, self.max_weight, self.rampup_iterations = float(decay), float(consistency_weight), int(rampup_iterations)
        self.noise_std = float(noise_std)
        self.generator = generator
        self.weight = self.max_weight * sigmoid_rampup(0, self.rampup_iterations)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_STARTED, self.ramp)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def start(self, engine: Engine) -> None:
        device = next(self.student.parameters()).device
        self.teacher.to(device)
        if engine.state.iteration == 0:  # fresh run; a resumed one has its teacher from the checkpoint
            self.teacher.load_state_dict(self.student.state_dict())

    def ramp(self, engine: Engine) -> None:
        self.weight = self.max_weight * sigmoid_rampup(engine.state.iteration - 1, self.rampup_iterations)

    def update(self, engine: Engine) -> None:
        ema_update_(self.teacher, self.student, ema_decay(engine.state.iteration, self.decay))

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher class probabilities (B, C, H, W) of ``images + eta``, ``eta ~ N(0, noise_std^2)``, no gradient."""
        gen_device = self.generator.device if self.generator is not None else "cpu"
        noise = torch.randn(images.shape, generator=self.generator, device=gen_device).to(images.device, images.dtype)
        self.teacher.train()
        with torch.no_grad():
            return torch.softmax(self.teacher(images + self.noise_std * noise), dim=1)


class MeanTeacherLoss(nn.Module):
    """``L = L_sup(f(x_l), y_l) + w(t) J(f(x_u), teacher)`` with ``J`` the softmax MSE (see the module doc).

    ``forward(pred, targets)``: ``pred`` (B_l + B_u, C, H, W) student logits, labelled first; ``targets``
    ``{"label": (B_l, 1, H, W), "unlabeled": (B_u, C, H, W) teacher probabilities}`` as made by
    :class:`~metacontrast.semi.batches.SemiSupervisedPrepareBatch`.  Returns the scalar total;
    ``last_terms`` holds the two terms and the weight for logging.
    """

    def __init__(self, supervised: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean_teacher: MeanTeacher) -> None:
        super().__init__()
        self.supervised = supervised
        self.mean_teacher = mean_teacher
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: torch.Tensor, targets: dict[str, Any]) -> torch.Tensor:
        labeled, unlabeled = split_labeled(pred, targets)
        supervised = self.supervised(labeled, targets["label"])
        consistency = F.mse_loss(torch.softmax(unlabeled.float(), dim=1), targets["unlabeled"].float())
        weight = self.mean_teacher.weight
        self.last_terms = {"supervised": float(supervised.detach()), "consistency": float(consistency.detach()),
                           "consistency_weight": weight}
        return supervised + weight * consistency
