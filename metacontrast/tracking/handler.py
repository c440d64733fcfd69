"""An ignite/MONAI engine's per-epoch metrics and epoch-mean losses into a :class:`~metacontrast.tracking.run.TrackingRun`.

``monai.handlers.MLFlowHandler`` is not used because it opens its own run (or adopts "the latest active run"
of the experiment, which can be another process's), cannot continue a given run id, and lets MLflow
exceptions propagate into the engine; the fallback and resume contracts of :mod:`metacontrast.tracking.run`
need the run to be owned there, so this handler is a thin view onto it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from .run import TrackingRun, active_run

__all__ = ["MLflowEpochHandler", "scalar_losses"]

logger = logging.getLogger(__name__)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar_losses(output: Any) -> dict[str, float]:
    """Loss terms from an engine output: a scalar, a dict (keys containing ``loss``) or a decollated list."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]  # MONAI decollates the batch; the loss is repeated in every item
    if isinstance(output, Mapping):
        return {str(k): float(v) for k, v in output.items() if "loss" in str(k).lower() and _is_scalar(v)}
    if _is_scalar(output):
        return {"loss": float(output)}
    return {}


class MLflowEpochHandler:
    """Logs, at every epoch end, ``engine.state.metrics`` and the epoch mean of each loss term.

    Attach it to a trainer (losses from ``engine.state.output``, metrics such as a training Dice)
    and/or to a MONAI evaluator (validation metrics; MONAI runs the evaluator with the trainer's
    epoch, so ``step`` lines up).  Logging failures never reach the engine.

    Args:
        run: the run to log into; ``None`` means :func:`active_run` at each epoch end.
        prefix: put before every name (e.g. ``"train_"``, ``"val_"``).
        output_transform: ``engine.state.output`` -> ``{name: float}`` losses to average.
        step_transform: ``engine`` -> the MLflow step (default: ``engine.state.epoch``).
        iteration_interval: also log the raw losses every N iterations (0 = never), as ``<name>_iter``.
        end_on_complete: end the run (FINISHED) when the engine completes.
    """

    leader_only = True  # it only logs: ranks other than 0 drop it (metacontrast.ranks)

    def __init__(
        self,
        run: TrackingRun | None = None,
        prefix: str = "",
        output_transform: Callable[[Any], Mapping[str, float]] = scalar_losses,
        step_transform: Callable[[Engine], int] = lambda engine: engine.state.epoch,
        iteration_interval: int = 0,
        end_on_complete: bool = False,
    ) -> None:
        self.run = run
        self.prefix = prefix
        self.output_transform = output_transform
        self.step_transform = step_transform
        self.iteration_interval = iteration_interval
        self.end_on_complete = end_on_complete
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        if self.end_on_complete:
            engine.add_event_handler(Events.COMPLETED, self._end)

    def _target(self) -> TrackingRun | None:
        return self.run if self.run is not None else active_run()

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._counts.clear()

    def _accumulate(self, engine: Engine) -> None:
        try:
            losses = self.output_transform(engine.state.output)
        except Exception as exc:  # noqa: BLE001
            logger.debug("output_transform failed: %s", exc)
            return
        for name, value in losses.items():
            if math.isfinite(value):
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
        run = self._target()
        if run is not None and self.iteration_interval and engine.state.iteration % self.iteration_interval == 0:
            run.log_metrics({f"{self.prefix}{k}_iter": v for k, v in losses.items()}, step=engine.state.iteration)

    def epoch_values(self, engine: Engine) -> dict[str, Any]:
        """What :meth:`_log_epoch` logs: epoch-mean losses and ``engine.state.metrics``, prefixed."""
        values: dict[str, Any] = {f"{self.prefix}{k}": s / self._counts[k] for k, s in self._sums.items()}
        values.update({f"{self.prefix}{k}": v for k, v in (engine.state.metrics or {}).items()})
        return values

    def _log_epoch(self, engine: Engine) -> None:
        run = self._target()
        if run is not None:
            run.log_metrics(self.epoch_values(engine), step=int(self.step_transform(engine)))

    def _end(self, engine: Engine) -> None:
        run = self._target()
        if run is not None:
            run.end("FINISHED")
