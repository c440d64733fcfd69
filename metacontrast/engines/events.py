"""Iteration events of :class:`~metacontrast.engines.trainer.MultiLossTrainer`.

Registered on the trainer (``event_names=[MultiLossEvents]``) and fired inside every iteration, so
that gradient-level components (GradMitigator, logging, distributed all-reduce) are plain handlers:

``LOSSES_COMPUTED``              ``engine.state.output["losses"]`` holds the named objectives.
``PER_LOSS_GRADIENTS_COMPUTED``  ``engine.state.per_loss_grads`` holds one gradient list per objective
                                 (only when a handler asked for them); a handler combines them into
                                 ``param.grad`` and sets ``engine.state.gradients_combined = True``.
``GRADIENTS_READY``              ``param.grad`` is final (times the loss scale under AMP); the trainer
                                 clips it (``grad_clip_norm``) and the optimiser steps next.
"""

from __future__ import annotations

from ignite.engine import EventEnum


class MultiLossEvents(EventEnum):
    LOSSES_COMPUTED = "losses_computed"
    PER_LOSS_GRADIENTS_COMPUTED = "per_loss_gradients_computed"
    GRADIENTS_READY = "gradients_ready"
