"""A MONAI trainer for objectives made of several named losses.

``MultiLossTrainer`` is :class:`monai.engines.SupervisedTrainer` whose ``loss_function`` returns a dict
``{name: scalar}`` (e.g. one GCL objective per meta label).  By default it minimises the plain average
of the objectives (GCL Eq. 2).  A handler that needs the gradient of each objective separately --
GradMitigator -- sets ``engine.state.per_loss_gradients_required`` when attached; the trainer then
computes one gradient list per objective, fires ``PER_LOSS_GRADIENTS_COMPUTED`` and lets the handler
write ``param.grad``.  Why a subclass: ``SupervisedTrainer._iteration`` takes one scalar loss and calls
``backward`` itself, leaving no point where per-objective gradients can be intercepted.

The M per-objective gradients come from M backward passes through the shared graph
(``torch.autograd.grad`` with ``retain_graph``), or, with ``batched_gradients=True``, from one batched
vector-Jacobian product (``is_grads_batched``: the identity's M rows as cotangents of the M objectives).
Both give the same gradients up to float round-off.  On the shared, loaded 2-core CPU the two were within
the noise of each other (GCL at CPU scale, 1 thread: 5.1 s batched vs 5.6 s loop per step, spreads of
+-0.5 s), so the loop stays the default until a quiet or GPU measurement
(``scripts/bench_pretrain_step.py --batched_gradients True``) decides.

Under AMP (``amp=True``, e.g. ``amp_kwargs={"dtype": torch.bfloat16}``) only the forward pass runs under
autocast; its outputs are cast to fp32 and the losses computed outside it (:func:`as_float32`), and parameters and their gradients stay fp32 (autocast
never changes the dtype of a leaf).  The per-objective gradients are divided by the ``GradScaler``'s scale
before handlers see them, so GradMitigator acts on fp32 unscaled gradients; the combined gradient is
re-scaled for ``GradScaler.step`` so its inf/NaN check and unscaling still apply.  Loss scaling is used under
float16 only: bf16 has fp32's exponent range, so the scale is 1 and nothing is rescaled.
A non-finite objective raises :class:`NonFiniteLossError` naming the iteration and the objective, or
skips the step when ``skip_nonfinite=True``.  A ``loss_function`` returning a single tensor (a plain
MONAI loss, as in fine-tuning) is one objective named ``"loss"``, so every workflow gets the same
NaN/inf guard.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.utils.enums import CommonKeys as Keys
from monai.engines.utils import IterationEvents

from .events import MultiLossEvents


def as_float32(outputs: Any) -> Any:
    """``outputs`` (a tensor, or dicts / lists / tuples of them) with every half-precision tensor cast to float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: as_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(as_float32(v) for v in outputs)
    return outputs


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


class MultiLossTrainer(SupervisedTrainer):
    """SupervisedTrainer for ``loss_function(pred, target) -> dict[str, Tensor]`` (or one tensor).

    Extra args (all others as ``SupervisedTrainer``):
        skip_nonfinite: skip the optimiser step (and count it in ``engine.state.skipped_steps``)
            instead of stopping when an objective is NaN/inf.
        grad_clip_norm: c > 0 rescales the final update ``g`` (after every ``GRADIENTS_READY`` handler:
            GradMitigator's combination, the multi-process all-reduce) to ``g min(1, c / ||g||)``, the norm
            taken over all parameters together (torch's ``clip_grad_norm_``); 0 (default) leaves it as is.
        batched_gradients: per-objective gradients from one batched backward pass instead of one pass each.
    """

    def __init__(self, *args, skip_nonfinite: bool = False, grad_clip_norm: float = 0.0, batched_gradients: bool = False,
                 event_names=None, **kwargs) -> None:
        super().__init__(*args, event_names=[MultiLossEvents, *(event_names or [])], **kwargs)
        if grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm must be >= 0 (0: off), got {grad_clip_norm}")
        self.skip_nonfinite = skip_nonfinite
        self.grad_clip_norm = float(grad_clip_norm)
        self.batched_gradients = batched_gradients
        self.state.skipped_steps = 0

    def _iteration(self, engine: MultiLossTrainer, batchdata: dict) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)

        autocast = torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs) if engine.amp else nullcontext()
        with autocast:
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # the losses in float32, outside autocast: contrastive logits over / tau need its precision, and the
        # losses' own index arithmetic (scatter, gather) needs one dtype throughout
        engine.state.output[Keys.PRED] = as_float32(engine.state.output[Keys.PRED])
        losses = engine.loss_function(engine.state.output[Keys.PRED], targets)
        if isinstance(losses, torch.Tensor):  # a plain MONAI loss (fine-tuning): one term named "loss"
            losses = {"loss": losses}
        total = torch.stack([loss.float() for loss in losses.values()]).mean()
        engine.state.output["losses"] = {name: loss.detach() for name, loss in losses.items()}
        engine.state.output[Keys.LOSS] = total.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(MultiLossEvents.LOSSES_COMPUTED)

        bad = [name for name, loss in losses.items() if not torch.isfinite(loss.detach()).all()]
        if bad:
            message = f"iteration {engine.state.iteration}: loss term {bad[0]!r} is {float(losses[bad[0]].detach()):.4g}"
            if not engine.skip_nonfinite:
                raise NonFiniteLossError(message + " (set skip_nonfinite to skip such steps)")
            engine.logger.warning(message + "; step skipped")
            engine.state.skipped_steps += 1
            return engine.state.output

        # scaler.scale() (not get_scale()) sets up the scaler's state on its first call; step() and unscale_() need it
        scale = float(engine.scaler.scale(torch.ones((), device=total.device))) if self._scaled(engine) else 1.0
        if getattr(engine.state, "per_loss_gradients_required", False):
            self._per_loss_backward(engine, losses, scale)
        else:
            (total * scale).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.fire_event(MultiLossEvents.GRADIENTS_READY)
        if engine.grad_clip_norm > 0:
            self._clip_gradients(engine)
        if self._scaled(engine):
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    @staticmethod
    def _scaled(engine: MultiLossTrainer) -> bool:
        """Loss scaling is for float16 autocast only: bfloat16 has float32's range, so under it the scaler MONAI
        creates is left unused (no scale to read back to the host each step, no skipped steps)."""
        return bool(engine.amp and engine.scaler is not None and engine.amp_kwargs.get("dtype", torch.float16) == torch.float16)

    @staticmethod
    def _clip_gradients(engine: MultiLossTrainer) -> None:
        """Clip the update's global norm to ``grad_clip_norm``; under AMP unscale first (``GradScaler.step``
        then knows and does not unscale again).  The norm before clipping is ``engine.state.output["grad_norm"]``."""
        if MultiLossTrainer._scaled(engine):
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        engine.state.output["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, engine.grad_clip_norm).detach()

    @staticmethod
    def _per_loss_backward(engine: MultiLossTrainer, losses: dict[str, torch.Tensor], scale: float) -> None:
        """One backward pass per objective; handlers combine the results into ``param.grad``."""
        named = [(n, p) for n, p in engine.network.named_parameters() if p.requires_grad]
        engine.state.grad_param_names = [n for n, _ in named]
        engine.state.grad_params = [p for _, p in named]
        names, params = list(losses), engine.state.grad_params
        if engine.batched_gradients and len(names) > 1:  # one VJP with the M unit cotangents: (M, *shape) per parameter
            stacked = torch.stack([losses[name].float() for name in names]) * scale
            eye = torch.eye(len(names), dtype=stacked.dtype, device=stacked.device)
            grads = torch.autograd.grad(stacked, params, eye, is_grads_batched=True, allow_unused=True)
            per_loss = {name: [torch.zeros_like(p) if g is None else g[k] / scale for g, p in zip(grads, params)] for k, name in enumerate(names)}
        else:
            per_loss = {}
            for k, name in enumerate(names):
                grads = torch.autograd.grad(losses[name].float() * scale, params, retain_graph=k < len(names) - 1, allow_unused=True)
                per_loss[name] = [torch.zeros_like(p) if g is None else (g / scale if scale != 1.0 else g) for g, p in zip(grads, params)]
        engine.state.per_loss_grads = per_loss
        engine.state.gradients_combined = False
        engine.fire_event(MultiLossEvents.PER_LOSS_GRADIENTS_COMPUTED)
        if not engine.state.gradients_combined:  # no handler combined them: plain average (Eq. 2)
            for k, p in enumerate(engine.state.grad_params):
                p.grad = torch.stack([g[k] for g in per_loss.values()]).mean(dim=0)
        if scale != 1.0:
            for p in engine.state.grad_params:
                p.grad.mul_(scale)
        engine.state.per_loss_grads = None  # free memory

