"""Per-epoch curves of a grid's runs, from the MLflow store alone.

* ``curves_pretrain_<method>.png`` (:func:`plot_pretrain_curves`): every per-epoch metric of a pre-training
  run, one panel per family (the part of the name before ``/``), each image-wise term with its yardsticks
  (chance level, minimum, joint optimum);
* ``curves_finetune_<method>.png`` (:func:`plot_finetune_curves`): fine-tune training loss and validation
  Dice per epoch, one line per ``(L, seed)`` (colour = L, line style = seed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tracking import RunStore
from .figures import PANEL_PX, figure, grid_shape, pyplot

__all__ = ["FINETUNE_CURVES", "YARDSTICK_STYLES", "joint_optimum_for", "metric_families", "plot_finetune_curves", "plot_pretrain_curves"]


def metric_families(keys: Sequence[str]) -> dict[str, list[str]]:
    """Per-epoch metric names grouped by the part before ``/``, loss families first.

    ``["train_loss", "train_loss/patient_id", "train_img/patient_id", "train_loss_iter"]`` ->
    ``{"train_loss": ["train_loss", "train_loss/patient_id"], "train_img": ["train_img/patient_id"]}``;
    per-iteration metrics (``*_iter``) are left out.
    """
    families: dict[str, list[str]] = {}
    for key in sorted(keys):
        if not key.endswith("_iter"):
            families.setdefault(key.split("/")[0], []).append(key)
    return dict(sorted(families.items(), key=lambda item: ("loss" not in item[0], item[0])))


#: suffixes of a term's yardsticks (:mod:`metacontrast.losses.yardsticks`) and their line styles
YARDSTICK_STYLES = {"chance": ":", "min": "--", "joint": "-."}


def joint_optimum_for(run: Any, joint_optimum: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The ``terms`` of a :mod:`~metacontrast.reporting.joint_optimum` result when it was computed for this run's
    settings (temperature and batch size, where the run logged them), else ``{}``."""
    if not joint_optimum:
        return {}
    params = run.data.params
    for key in ("temperature", "batch_size"):
        if key in params and key in joint_optimum and not math.isclose(float(params[key]), float(joint_optimum[key])):
            return {}
    return dict(joint_optimum.get("terms", {}))


def plot_pretrain_curves(store: RunStore, run: Any, path: str | os.PathLike[str], joint_optimum: Mapping[str, Any] | None = None) -> Path:
    """Every per-epoch metric of a pre-training run, one panel per :func:`metric_families` family.

    A term's logged yardsticks (``<term>/chance``, ``<term>/min``) are drawn in the term's colour, dotted and
    dashed; ``joint_optimum`` (``results/<dataset>/joint_optimum.json``) adds each term's value at the joint
    optimum as a dash-dotted horizontal line (and its chance level and minimum where the run did not log them).
    """
    families = metric_families(list(run.data.metrics))
    if not families:
        raise LookupError(f"pre-training run {run.info.run_id} ({run.info.run_name}) logged no per-epoch metric")
    joint = joint_optimum_for(run, joint_optimum)
    prefix = "train_"
    rows, cols = grid_shape(len(families))
    with figure(rows, cols, PANEL_PX, path) as (fig, axes):
        for ax, (family, keys) in zip(axes.flat, families.items()):
            colours: dict[str, Any] = {}
            for key in [k for k in keys if k.rpartition("/")[2] not in YARDSTICK_STYLES]:
                steps, values = store.history(run.info.run_id, key)
                (line,) = ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key.partition("/")[2] or "total")
                colours[key] = line.get_color()
            for key in [k for k in keys if k.rpartition("/")[2] in YARDSTICK_STYLES]:
                term, _, kind = key.rpartition("/")
                steps, values = store.history(run.info.run_id, key)
                ax.plot(steps, values, color=colours.get(term), linestyle=YARDSTICK_STYLES[kind], linewidth=0.8,
                        label=f"{term.partition('/')[2]} {kind}")
            for term, values in joint.items():
                key = prefix + term
                if key not in colours:
                    continue
                for kind, style in YARDSTICK_STYLES.items():
                    if kind in values and (kind == "joint" or f"{key}/{kind}" not in keys):
                        ax.axhline(values[kind], color=colours[key], linestyle=style, linewidth=0.8,
                                   label=f"{term.partition('/')[2]} {kind}{'' if kind == 'joint' else ' (joint_optimum.json)'}")
            ax.set_title(family, fontsize="medium")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="xx-small", loc="best")
        for ax in list(axes.flat)[len(families):]:
            ax.set_axis_off()
        fig.suptitle(f"{run.data.tags.get('method', '?')} pre-training ({run.info.run_name})", fontsize="medium")
        fig.tight_layout()
    return Path(path)


FINETUNE_CURVES = (("train_loss", "training loss"), ("val_mean_dice", "validation Dice"))


def plot_finetune_curves(store: RunStore, runs: Sequence[Any], path: str | os.PathLike[str], method: str) -> Path:
    """Training loss and validation Dice per epoch of fine-tune ``runs``: one line per (L, seed), colour = L."""
    plt = pyplot()
    labeled = sorted({int(r.data.tags["num_labeled"]) for r in runs})
    seeds = sorted({int(r.data.tags["seed"]) for r in runs})
    styles = ["-", "--", ":", "-."]
    with figure(1, len(FINETUNE_CURVES), PANEL_PX, path) as (fig, axes):
        for ax, (key, title) in zip(axes.flat, FINETUNE_CURVES):
            for run in runs:
                num_labeled, seed = int(run.data.tags["num_labeled"]), int(run.data.tags["seed"])
                steps, values = store.history(run.info.run_id, key)
                if len(steps):
                    ax.plot(steps, values, color=plt.cm.tab10(labeled.index(num_labeled) % 10),
                            linestyle=styles[seeds.index(seed) % len(styles)], marker="." if len(steps) < 30 else None,
                            label=f"L={num_labeled} seed={seed}")  # fmt: skip
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="xx-small", loc="best")
        fig.suptitle(f"{method}: fine-tuning", fontsize="medium")
        fig.tight_layout()
    return Path(path)
