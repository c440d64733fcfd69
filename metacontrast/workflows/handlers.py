"""Ignite handlers the workflows share (what MONAI's handlers do not cover).

* :class:`EncoderSaver` writes the pre-training output the fine-tune workflow loads: the encoder (and
  any pre-trained decoder blocks) under the U-Net's state-dict names, atomically.
* :class:`LossTermLogger` averages the per-iteration loss terms of a multi-term objective (GCL: image and
  pixel loss per meta label, kept positives) and the GradMitigator's cosines and targets over each
  epoch into ``engine.state.metrics``, where StatsHandler and the MLflow handler pick them up.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..nets.unet import encoder_state_dict


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class EncoderSaver:
    """Save ``{"state_dict", "network", "method"}`` to ``<output_dir>/encoder.pt`` every ``interval`` epochs and at the end.

    Args:
        network: the pre-training network (holding the U-Net encoder as ``.encoder`` or ``.unet``).
        output_dir: folder of the run.
        method: method name stored in the checkpoint.
        network_kwargs: the U-Net arguments (``features`` ...) so fine-tuning can check compatibility.
        num_decoder_blocks: how many up blocks (deepest first) were pre-trained too (GLCL, MACL).
    """

    def __init__(self, network: nn.Module, output_dir: str, method: str, network_kwargs: dict | None = None,
                 num_decoder_blocks: int = 0, interval: int = 1, filename: str = "encoder.pt") -> None:
        self.network, self.method = network, method
        self.path = Path(output_dir) / filename
        self.network_kwargs = dict(network_kwargs or {})
        self.num_decoder_blocks = int(num_decoder_blocks)
        self.interval = max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = encoder_state_dict(self.network, self.num_decoder_blocks)
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            engine.logger.error(f"encoder weights are not finite at epoch {engine.state.epoch}; {self.path} not overwritten")
            return
        atomic_torch_save({"state_dict": state, "network": self.network_kwargs, "method": self.method,
                           "epoch": engine.state.epoch, "iteration": engine.state.iteration}, self.path)


class LossTermLogger:
    """Epoch means of ``loss_function.last_terms`` and ``engine.state.mitigator_summary`` into ``engine.state.metrics``."""

    def __init__(self, loss_function: Any) -> None:
        self.loss_function = loss_function
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.publish)

    def reset(self, engine: Engine) -> None:
        self.sums.clear()
        self.count = 0

    def accumulate(self, engine: Engine) -> None:
        terms = dict(getattr(self.loss_function, "last_terms", {}) or {})
        terms.update(getattr(engine.state, "mitigator_summary", None) or {})
        losses = (engine.state.output or {}).get("losses", {})
        terms.update({f"loss/{name}": float(value.detach()) for name, value in losses.items()})
        for key, value in terms.items():
            self.sums[key] += float(value)
        self.count += 1

    def publish(self, engine: Engine) -> None:
        for key, total in self.sums.items():
            engine.state.metrics[key] = total / max(self.count, 1)
