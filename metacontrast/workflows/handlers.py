"""Ignite handlers the workflows share (what MONAI's handlers do not cover).

* :class:`EncoderSaver` writes the pre-training output the fine-tune workflow loads: the encoder (and
  any pre-trained decoder blocks) under the U-Net's state-dict names, atomically.
* :class:`TrainingCheckpointer` saves everything a training run needs to continue (atomically, at an
  interval) and resumes a rerun from the latest good checkpoint, skipping damaged or unsafe files.
* :class:`FiniteCheckpointSaver` is MONAI's ``CheckpointSaver`` that never writes a model whose weights
  or predictions are not finite (a NaN model is never the best one).
* :class:`LossTermLogger` averages the per-iteration loss terms of a multi-term objective (GCL: image and
  pixel loss per meta label, kept positives) and the GradMitigator's cosines and targets over each
  epoch into ``engine.state.metrics``, where StatsHandler and the MLflow handler pick them up.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from monai.utils.enums import CommonKeys
from torch import nn

from ..io import atomic_torch_save
from ..layout import ENCODER_FILE
from ..nets.unet import encoder_state_dict
from .checkpoints import load_checkpoint


class EncoderSaver:
    """Save ``{"state_dict", "network", "method"}`` to ``<output_dir>/encoder.pt`` every ``interval`` epochs and at the end.

    Args:
        network: the pre-training network (holding the U-Net encoder as ``.encoder`` or ``.unet``).
        output_dir: folder of the run.
        method: method name stored in the checkpoint.
        network_kwargs: the U-Net arguments (``features`` ...) so fine-tuning can check compatibility.
        num_decoder_blocks: how many up blocks (deepest first) were pre-trained too (GLCL, MACL).
    """

    leader_only = True  # it only writes: ranks other than 0 drop it (metacontrast.ranks)

    def __init__(self, network: nn.Module, output_dir: str, method: str, network_kwargs: dict | None = None,
                 num_decoder_blocks: int = 0, interval: int = 1, filename: str = ENCODER_FILE) -> None:
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
        if not tensors_finite(state):
            engine.logger.error(f"encoder weights are not finite at epoch {engine.state.epoch}; {self.path} not overwritten")
            return
        atomic_torch_save({"state_dict": state, "network": self.network_kwargs, "method": self.method,
                           "epoch": engine.state.epoch, "iteration": engine.state.iteration}, self.path)


class LossTermLogger:
    """Epoch means of ``loss_function.last_terms`` and ``engine.state.mitigator_summary`` into ``engine.state.metrics``."""

    leader_only = True  # it only logs: ranks other than 0 drop it (metacontrast.ranks)

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


# ----------------------------------------------------------------------------------------------
# resumable training checkpoints
# ----------------------------------------------------------------------------------------------


def tensors_finite(obj: Any) -> bool:
    """Whether every floating-point tensor in a module, state dict or nested container is finite."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(tensors_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(tensors_finite(v) for v in obj)
    return True


class RNGState:
    """The random number generators a training step may draw from, as a ``state_dict``.

    Global torch (CPU and every CUDA device), NumPy's and Python's global generators, plus the
    ``torch.Generator`` objects given (the augmentation's own).  Stored as tensors and plain values
    so the checkpoint loads with ``weights_only=True``.
    """

    def __init__(self, generators: Sequence[torch.Generator | None] = ()) -> None:
        self.generators = [g for g in generators if g is not None]

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
            "generators": [g.get_state() for g in self.generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
        if len(state["generators"]) != len(self.generators):
            raise ValueError(f"checkpoint holds {len(state['generators'])} generator states, this run has {len(self.generators)}")
        for generator, value in zip(self.generators, state["generators"]):
            generator.set_state(value)


class _EngineProgress:
    """The trainer's position (iteration, epoch length, epochs, skipped steps) as a ``state_dict``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        s = self.engine.state
        return {"iteration": int(s.iteration), "epoch": int(s.epoch), "epoch_length": int(s.epoch_length or 0),
                "max_epochs": int(s.max_epochs or 0), "skipped_steps": int(getattr(s, "skipped_steps", 0) or 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.engine.state
        if int(state["epoch_length"]) != int(s.epoch_length or 0):
            raise ValueError(f"checkpoint has {state['epoch_length']} iterations an epoch, this run {s.epoch_length}: the data differ")
        if int(state["iteration"]) > int(s.max_epochs or 0) * int(s.epoch_length or 0):
            raise ValueError(f"checkpoint is at iteration {state['iteration']}, past this run's {s.max_epochs} epochs")
        s.iteration = int(state["iteration"])
        s.epoch = s.iteration // max(int(s.epoch_length), 1)
        s.skipped_steps = int(state.get("skipped_steps", 0))


class UnusableCheckpoint(RuntimeError):
    """No training checkpoint in the output folder could be loaded (all truncated, corrupt or unsafe)."""


class TrainingCheckpointer:
    """Saves everything a training run needs to continue, and resumes from the latest good save.

    Every ``interval`` epochs and when training completes, ``<output_dir>/training_checkpoint_iteration=N.pt``
    holds the ``save_dict`` objects' ``state_dict()`` (network, optimiser, scheduler, sampler, validation
    state ...) and those of ``extra_state`` (what a method or semi-supervised mode adds: GradFilter,
    GradMitigator, a teacher ...), the AMP ``GradScaler`` when the engine has one,
    the RNG states (:class:`RNGState`) and the engine's iteration/epoch.  Files are written atomically
    (temporary file, then rename) and the ``n_saved`` newest are kept; weights that are not finite are
    never written (the previous checkpoints stay).

    When the engine starts and the folder holds checkpoints (a rerun of the same command after a crash;
    :func:`~metacontrast.workflows.checkpoints.prepare_output_dir` has made sure they are of this
    config), the newest one that loads safely (``weights_only``) with finite weights is restored; a
    truncated, corrupt or unsafe newer file is reported (warning naming it and the reason), renamed to
    ``*.corrupt`` and the previous one used.  ``resume=False`` ignores existing checkpoints.

    Why not MONAI's ``CheckpointSaver`` + ``CheckpointLoader``: the saver writes in place (its
    ``DiskSaver`` has ``atomic=False``), the loader needs the file name when the config is written and
    has no fallback when that file is damaged, and neither handles RNG states.
    """

    resumes_on_every_rank = True  # resumes on every rank, saves on rank 0 (metacontrast.ranks)

    def __init__(self, output_dir: str, save_dict: Mapping[str, Any], interval: int = 1, n_saved: int = 2,
                 generators: Sequence[torch.Generator | None] = (), resume: bool = True, prefix: str = "training_checkpoint",
                 run: Any = None, extra_state: Mapping[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        both = sorted(set(save_dict) & set(extra_state or {}))
        if both:
            raise ValueError(f"TrainingCheckpointer: {both} named both in save_dict and in extra_state")
        self.save_dict = {**save_dict, **(extra_state or {})}
        self.interval = max(int(interval), 1)
        self.n_saved = max(int(n_saved), 1)
        self.rng = RNGState(generators)
        self.resume_enabled = bool(resume)
        self.prefix = prefix
        self.run = run  # only to order config resolution: the output folder is checked before this exists
        self.resumed_from: Path | None = None
        self.last_saved_iteration: int | None = None
        self._pattern = re.compile(rf"^{re.escape(prefix)}_iteration=(\d+)\.pt$")

    # -- wiring ------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def objects(self, engine: Engine) -> dict[str, Any]:
        objects = dict(self.save_dict)
        objects["trainer"] = _EngineProgress(engine)
        objects["rng"] = self.rng
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():  # a disabled scaler has no state
            objects["scaler"] = scaler
        return objects

    # -- files ---------------------------------------------------------------------------------------

    def path_for(self, iteration: int) -> Path:
        return self.output_dir / f"{self.prefix}_iteration={iteration:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(iteration, path)`` of the folder's checkpoints, newest first."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := self._pattern.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, engine: Engine) -> None:
        iteration = int(engine.state.iteration)
        if iteration == self.last_saved_iteration:
            return
        objects = self.objects(engine)
        state = {name: obj.state_dict() for name, obj in objects.items()}
        bad = [name for name, obj in self.save_dict.items() if isinstance(obj, nn.Module) and not tensors_finite(state[name])]
        if bad:
            engine.logger.error(f"{bad} weights are not finite at iteration {iteration}: training checkpoint not written "
                                f"(the previous ones in {self.output_dir} are kept)")
            return
        state["format"] = {"version": 1, "iteration": iteration, "objects": sorted(objects)}
        atomic_torch_save(state, self.path_for(iteration))
        self.last_saved_iteration = iteration
        for _, old in self.checkpoints()[self.n_saved :]:
            old.unlink(missing_ok=True)

    # -- resuming ------------------------------------------------------------------------------------

    def _usable(self, path: Path, names: Sequence[str]) -> dict[str, Any]:
        checkpoint = load_checkpoint(path)  # weights only; UnsafeCheckpointError when truncated, corrupt or crafted
        if not isinstance(checkpoint, dict):
            raise ValueError("not a training checkpoint")
        missing = [n for n in names if n not in checkpoint]
        if missing:
            raise ValueError(f"it lacks {missing}")
        bad = [n for n, obj in self.save_dict.items() if isinstance(obj, nn.Module) and not tensors_finite(checkpoint[n])]
        if bad:
            raise ValueError(f"its {bad} weights are not finite")
        return checkpoint

    def resume(self, engine: Engine) -> None:
        for stale in self.output_dir.glob(f".{self.prefix}_*.tmp"):  # half-written by a killed process
            stale.unlink(missing_ok=True)
        candidates = self.checkpoints()
        if not self.resume_enabled or not candidates:
            return
        objects = self.objects(engine)
        problems: list[str] = []
        for iteration, path in candidates:
            try:
                checkpoint = self._usable(path, list(objects))
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is reported and skipped
                reason = str(err).replace(f"checkpoint {path} ", "").strip() or type(err).__name__
                message = f"training checkpoint {path} is unusable ({reason}); trying the one before it"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                engine.logger.warning(message)
                problems.append(f"{path.name}: {reason}")
                path.replace(path.with_name(path.name + ".corrupt"))
                continue
            for name, obj in objects.items():
                obj.load_state_dict(checkpoint[name])
            self.resumed_from, self.last_saved_iteration = path, iteration
            message = (f"resumed from {path} (iteration {engine.state.iteration}, epoch {engine.state.epoch} of "
                       f"{engine.state.max_epochs})")
            engine.logger.warning(message)
            return
        raise UnusableCheckpoint(
            f"no training checkpoint in {self.output_dir} could be loaded ({'; '.join(problems)}); they were renamed "
            f"*.corrupt: rerun to start over, or restore a good copy"
        )


# ----------------------------------------------------------------------------------------------
# best / final model: never a model with non-finite weights or predictions
# ----------------------------------------------------------------------------------------------


class FiniteCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` that never writes a model whose weights or outputs are not finite.

    Before each save (best-by-key-metric, interval, final) every module in ``save_dict`` is checked;
    on an evaluator, the network's raw predictions are checked too (``FORWARD_COMPLETED``), and a
    non-finite key metric never counts as best.  A refused save logs an error and keeps the file that
    is there.  ``state_dict``/``load_state_dict`` carry the best-metric bookkeeping across a resume, so a
    resumed run does not take its first validation for the best one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nonfinite_in_epoch = False  # any prediction of this epoch (an evaluator's pass over val)
        self._nonfinite_last = False  # the latest prediction (a trainer's last step)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        if IterationEvents.FORWARD_COMPLETED in engine._allowed_events:
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._check_prediction)

    def _reset(self, engine: Engine) -> None:
        self._nonfinite_in_epoch = False

    def _check_prediction(self, engine: Engine) -> None:
        output = engine.state.output
        pred = output.get(CommonKeys.PRED) if isinstance(output, dict) else None
        if isinstance(pred, torch.Tensor) and pred.is_floating_point():
            self._nonfinite_last = not bool(torch.isfinite(pred.detach()).all())
            self._nonfinite_in_epoch |= self._nonfinite_last

    def _refuse(self, engine: Engine, what: str) -> bool:
        problems = [name for name, obj in self.save_dict.items() if isinstance(obj, nn.Module) and not tensors_finite(obj)]
        reason = f"weights of {problems} are not finite" if problems else ""
        if not reason and (self._nonfinite_in_epoch if what == "best" else self._nonfinite_last):
            reason = "the network's predictions are not finite"
        if not reason and what == "best":
            key = getattr(engine.state, "key_metric_name", None)
            value = (engine.state.metrics or {}).get(key) if key else None
            if isinstance(value, (int, float, torch.Tensor)) and not math.isfinite(float(value)):
                reason = f"the key metric {key} is {float(value)}"
        if reason:
            engine.logger.error(f"{what} checkpoint not saved at epoch {engine.state.epoch}: {reason}")
            return True
        return False

    def metrics_completed(self, engine: Engine) -> None:
        if not self._refuse(engine, "best"):
            super().metrics_completed(engine)

    def interval_completed(self, engine: Engine) -> None:
        if not self._refuse(engine, "interval"):
            super().interval_completed(engine)

    def completed(self, engine: Engine) -> None:
        if not self._refuse(engine, "final"):
            super().completed(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if self._refuse(engine, "final"):
            raise e
        super().exception_raised(engine, e)

    def state_dict(self) -> dict[str, Any]:
        if self._key_metric_checkpoint is None:
            return {"key_metric": {}}
        # plain floats and strings, so the training checkpoint stays loadable with weights_only=True
        return {"key_metric": {k: [(float(p), str(f)) for p, f in v] for k, v in self._key_metric_checkpoint.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if self._key_metric_checkpoint is not None and state_dict.get("key_metric"):
            self._key_metric_checkpoint.load_state_dict(state_dict["key_metric"])


class EvaluatorBest:
    """A MONAI evaluator's best-metric record (``best_metric``, ``best_metric_epoch``) as a ``state_dict``."""

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        s = self.evaluator.state
        return {"best_metric": float(getattr(s, "best_metric", -1.0)), "best_metric_epoch": int(getattr(s, "best_metric_epoch", -1))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
