"""A training progress bar that shows the current loss.

ignite's ``ProgressBar`` takes what it shows as arguments of ``attach``, which a MONAI trainer calls with the
engine alone (``train_handlers``), so a config cannot give it an ``output_transform``; :class:`LossProgressBar`
takes one when it is built, as MONAI's handlers do, and shows ``[3/10] 30%|███ | loss=0.412 [...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ignite.contrib.handlers import ProgressBar
from ignite.engine import Engine
from monai.utils import CommonKeys


def current_loss(output: Any) -> dict[str, float]:
    """``{"loss": x}``, the iteration's total loss, from a :class:`~metacontrast.engines.MultiLossTrainer` output
    (``output["loss"]``: the mean of its named terms); ``{}`` (nothing shown) for an output without one."""
    loss = output.get(CommonKeys.LOSS) if isinstance(output, Mapping) else None
    return {} if loss is None else {"loss": float(loss)}


class LossProgressBar(ProgressBar):
    """ignite's ``ProgressBar`` with its ``output_transform`` set at construction (default :func:`current_loss`).

    Args:
        persist: keep the bar of each finished epoch on screen.
        output_transform: ``engine.state.output -> {name: number}`` shown after the bar.
        tqdm_kwargs: passed to ``ProgressBar`` (``bar_format``, ``ncols``, ...).
    """

    def __init__(self, persist: bool = False, output_transform: Callable[[Any], Any] = current_loss, **tqdm_kwargs: Any) -> None:
        super().__init__(persist=persist, **tqdm_kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine, metric_names: Any = None, output_transform: Callable[[Any], Any] | None = None,
               **kwargs: Any) -> None:
        super().attach(engine, metric_names=metric_names, output_transform=output_transform or self.output_transform, **kwargs)
