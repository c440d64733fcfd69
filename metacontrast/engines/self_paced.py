"""The learning pace gamma of SPCL's self-paced weights (SPCL supplement, Algorithm 1 and Sec. 4.5).

Algorithm 1 initialises ``gamma <- Scheduler(0)`` and, after every epoch, sets ``gamma <- Scheduler(epoch)``;
Sec. 4.5 ramps gamma from ``gamma_start`` (2) to ``gamma_end`` (50) by the main paper's Eq. 16 with
"p = 1/2" fixed.  The main paper's Eq. 16 is not in the supplement; its authors' code (``PScheduler``,
``p: 0.5`` in their configuration) reads

    gamma(e) = gamma_start + (gamma_end - gamma_start) * (e / E)^p,   e = 0 .. E - 1,

where epoch ``e + 1`` (1-based) trains with ``gamma(e)`` and ``E`` is the number of training epochs: the
first epoch uses ``gamma_start``, and gamma rises fast at first (p = 1/2), so that the weights leave zero
within the opening epochs; the last epoch uses ``gamma(E - 1)``, just under ``gamma_end``.  ``p = 1`` is
a plain linear ramp.  Attached to an engine, the schedule reads the epoch and ``E`` from
``engine.state`` when each epoch starts; its ``state_dict`` travels with the training checkpoint
(``method_state``), like GradFilter's.
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events


def power_pace(epoch: int, total_epochs: int, gamma_start: float, gamma_end: float, power: float = 0.5) -> float:
    """``gamma_start + (gamma_end - gamma_start) * (epoch / total_epochs)^power`` for the 0-based ``epoch``
    (clamped to ``[0, total_epochs]``)."""
    fraction = min(max(epoch, 0), max(total_epochs, 1)) / max(total_epochs, 1)
    return float(gamma_start + (gamma_end - gamma_start) * fraction**power)


class SelfPacedSchedule:
    """Holds the current ``gamma`` and moves it along the ramp ``(e / E)^p`` once per epoch.

    Args:
        gamma_start, gamma_end: ends of the ramp (SPCL: 2 and 50, the best of supplement Table 4).
        power: p of the ramp (SPCL: 1/2, supplement Sec. 4.5 and the authors' configuration; 1 is linear).
        total_epochs: ``E``; taken from the engine once attached.
    """

    def __init__(self, gamma_start: float = 2.0, gamma_end: float = 50.0, power: float = 0.5, total_epochs: int = 1) -> None:
        if gamma_start <= 0 or gamma_end <= 0:
            raise ValueError(f"gamma must be > 0, got start {gamma_start}, end {gamma_end}")
        if power <= 0:
            raise ValueError(f"the ramp's power p must be > 0, got {power}")
        self.gamma_start, self.gamma_end, self.power = float(gamma_start), float(gamma_end), float(power)
        self.total_epochs = int(total_epochs)
        self.epoch = 0

    @property
    def gamma(self) -> float:
        return power_pace(self.epoch, self.total_epochs, self.gamma_start, self.gamma_end, self.power)

    # -- engine wiring -------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._follow_engine)

    def _follow_engine(self, engine: Engine) -> None:
        self.epoch = int(engine.state.epoch) - 1
        self.total_epochs = max(int(engine.state.max_epochs or 1), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"gamma_start": self.gamma_start, "gamma_end": self.gamma_end, "power": self.power,
                "epoch": self.epoch, "total_epochs": self.total_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gamma_start, self.gamma_end = float(state["gamma_start"]), float(state["gamma_end"])
        self.power = float(state.get("power", 1.0))  # checkpoints written before p existed ramped linearly
        self.epoch, self.total_epochs = int(state["epoch"]), int(state["total_epochs"])
