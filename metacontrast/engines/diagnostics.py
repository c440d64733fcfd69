"""Pre-training diagnostics measured beside the training step: embedding spread and per-term gradient norms.

:class:`PretrainDiagnostics` is an ignite handler for a :class:`~metacontrast.engines.MultiLossTrainer`.
Every ``interval`` iterations (0: once per epoch, on its last iteration) it re-runs the network and the
loss on the batch the step has just used and writes into ``engine.state.metrics``:

* ``embedding_cosine/encoder``: :func:`mean_pairwise_cosine` of the encoder's own pooled output (the
  deepest encoder block, global average pooling) -- what fine-tuning inherits;
* ``embedding_cosine/<output>``: the same for every (2N, D, h, w) output of the network (the projection
  heads), so a head that spreads its outputs over a collapsed encoder is visible;
* ``grad_norm/<term>``: ``||d term / d theta_enc||_2`` over the encoder's parameters, for each term the loss
  exposes in ``last_components`` when asked (``record_components``; GCL: the image- and pixel-wise term
  per meta label), else for each objective it returns.

When the encoder cosine reaches ``collapse_cosine`` a warning (``warnings`` and the engine's logger) says
so, once per run.  The measurement leaves training untouched: it runs after the step, with
``torch.autograd.grad`` (no ``param.grad`` is written), restores the network's buffers (batch-norm
statistics), the loss's ``last_terms`` and every random generator, so a run with the handler follows the
same trajectory as one without.  It costs one forward pass and one backward pass per term, once per
``interval``.  Why not inside the step: the per-term gradients of the step exist only when GradMitigator
asks for them, and then only for the objectives, not their image- and pixel-wise parts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys
from torch import nn

__all__ = ["PretrainDiagnostics", "encoder_parameters", "gradient_norms", "mean_pairwise_cosine", "pooled"]


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, D, h, w) -> (B, D) (a (B, D) input is returned as it is)."""
    return features.mean(dim=(2, 3)) if features.ndim == 4 else features


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over the ``B (B - 1)`` ordered pairs of distinct rows of ``x`` (B, D).

    With ``u_i = x_i / ||x_i||``: ``sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - B``, divided by ``B (B - 1)``.
    1 when every row points the same way (collapse); about 0 for random directions.  Computed in float64.
    """
    b = x.shape[0]
    if b < 2:
        return float("nan")
    u = F.normalize(x.detach().double().flatten(1), dim=1)
    s = u.sum(dim=0)
    return float((s @ s - b) / (b * (b - 1)))


def gradient_norms(terms: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{name: ||d term / d params||_2}``, the norm over all of ``params`` together (0 if a term does not reach them)."""
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
    return norms


def encoder_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of a U-Net encoder's down and bottom blocks (all of ``encoder``'s without ``encoder_blocks``)."""
    modules = encoder.encoder_blocks() if hasattr(encoder, "encoder_blocks") else [encoder]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


class PretrainDiagnostics:
    """Embedding spread and per-term encoder gradient norms, every ``interval`` iterations (see the module docstring).

    Args:
        interval: iterations between measurements; 0 = once per epoch (its last iteration).
        collapse_cosine: warn (once) when the encoder's mean pairwise cosine reaches this value; > 1 never warns.
        encoder_attribute: name of the encoder inside the trainer's network (``network.encoder``).
    """

    def __init__(self, interval: int = 0, collapse_cosine: float = 0.98, encoder_attribute: str = "encoder") -> None:
        if interval < 0:
            raise ValueError(f"interval must be >= 0 (0 = once per epoch), got {interval}")
        self.interval = int(interval)
        self.collapse_cosine = float(collapse_cosine)
        self.encoder_attribute = encoder_attribute
        self.warned = False
        self.last: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        if self.interval:
            event = Events.ITERATION_COMPLETED(every=self.interval)
        else:
            event = Events.ITERATION_COMPLETED(event_filter=lambda e, i: i % max(int(e.state.epoch_length or 1), 1) == 0)
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output or {}
        if Keys.IMAGE not in output:
            return
        self.last = self.measure(engine.network, engine.loss_function, output[Keys.IMAGE], output[Keys.LABEL], engine.inferer)
        engine.state.metrics.update(self.last)
        cosine = self.last.get("embedding_cosine/encoder", float("nan"))
        if not self.warned and cosine >= self.collapse_cosine:
            self.warned = True
            message = (f"iteration {engine.state.iteration}: the encoder's pooled features are near collapse (mean pairwise "
                       f"cosine {cosine:.4f} >= collapse_cosine {self.collapse_cosine}); the image-wise terms can barely learn")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            engine.logger.warning(message)

    def measure(self, network: nn.Module, loss_function: Any, inputs: torch.Tensor, targets: Any, inferer: Any = None) -> dict[str, float]:
        """The metrics for one batch, leaving ``network``, ``loss_function`` and the random generators as they were."""
        encoder = getattr(network, self.encoder_attribute, None)
        if encoder is None:
            raise AttributeError(f"the network has no {self.encoder_attribute!r} (set encoder_attribute)")
        deepest = encoder.encoder_blocks()[-1] if hasattr(encoder, "encoder_blocks") else encoder
        captured: list[torch.Tensor] = []
        hook = deepest.register_forward_hook(lambda module, args, out: captured.append(out) if not captured else None)
        buffers = {name: b.detach().clone() for name, b in network.named_buffers()}
        saved_terms = getattr(loss_function, "last_terms", None)
        records = hasattr(loss_function, "record_components")
        was_training = network.training
        devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                network.train()
                if records:
                    loss_function.record_components = True
                outputs = inferer(inputs, network) if inferer is not None else network(inputs)
                objectives = loss_function(outputs, targets)
                if isinstance(objectives, torch.Tensor):
                    objectives = {"loss": objectives}
                terms = (getattr(loss_function, "last_components", None) or {}) if records else {}
                params = encoder_parameters(encoder)  # none when the encoder is frozen (GLCL's local stage)
                metrics = {f"grad_norm/{k}": v for k, v in gradient_norms(terms or objectives, params).items()} if params else {}
        finally:
            hook.remove()
            network.train(was_training)
            with torch.no_grad():
                for name, b in network.named_buffers():
                    b.copy_(buffers[name])
            if records:
                loss_function.record_components = False
                loss_function.last_components = {}
            if saved_terms is not None:
                owner = loss_function  # a multi-process wrapper (GlobalBatchLoss) reads its loss's last_terms through a property
                while isinstance(getattr(type(owner), "last_terms", None), property) and hasattr(owner, "loss"):
                    owner = owner.loss
                owner.last_terms = saved_terms
        if captured:
            metrics["embedding_cosine/encoder"] = mean_pairwise_cosine(pooled(captured[0]))
        if isinstance(outputs, Mapping):
            for key, value in outputs.items():
                if isinstance(value, torch.Tensor) and value.ndim == 4 and len(value) == len(inputs) and value.is_floating_point():
                    metrics[f"embedding_cosine/{key}"] = mean_pairwise_cosine(pooled(value))
        return metrics
