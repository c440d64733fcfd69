"""What a device session measured, as markdown: the step benchmarks and the paper-scale pre-trainings in its store.

Every figure comes from a file the device returned (the benchmark JSONs) or from the grid's MLflow store after
:func:`~metacontrast.device.importer.import_device_run`; a pre-training cut short by the call's budget is read as
far as it got (status ``RUNNING``) and its 300-epoch wall time projected from its epoch timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metacontrast.reporting.tables import markdown_head
from metacontrast.tracking import filter_string, get_experiment_id, open_client

__all__ = ["benchmark_table", "pretraining_table", "device_report"]

_TERMS = ("train_img/", "train_pix/", "train_embedding_cosine/")


def benchmark_table(paths: Sequence[str | Path]) -> str:
    """One row per (benchmark file, method): ms per step (min-max), images/s, x plain, x floor, peak MiB."""
    lines = markdown_head("Pre-training step per method on one fixed batch of 48 slices x 2 views (median of timed steps)",
                          ["file", "device", "amp", "method", "ms/step", "min-max", "images/s", "x plain", "x floor", "peak MiB"], left_aligned=4)
    for path in paths:
        bench = json.loads(Path(path).read_text())
        plain, floor = (bench["variants"].get(k, {}).get("step_s") for k in ("plain", "floor"))
        for method, row in bench["variants"].items():
            ratio = lambda ref: f"{row['step_s'] / ref:.2f}" if ref else "-"  # noqa: E731
            lines.append(f"| {Path(path).name} | {bench['device']} | {bench.get('amp') or 'fp32'} | {method} | {1000 * row['step_s']:.1f} | "
                         f"{1000 * row['step_s_min']:.1f}-{1000 * row['step_s_max']:.1f} | {row['images_per_s']:.0f} | {ratio(plain)} | "
                         f"{ratio(floor)} | {row.get('peak_mem_mib', 0):.0f} |")
    return "\n".join(lines) + "\n"


def _epoch_seconds(client: Any, run_id: str) -> tuple[int, float]:
    """(epochs logged, median seconds between consecutive epochs' ``train_loss``)."""
    history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    gaps = sorted((b.timestamp - a.timestamp) / 1000 / max(b.step - a.step, 1) for a, b in zip(history, history[1:]))
    return (history[-1].step if history else 0), (gaps[len(gaps) // 2] if gaps else float("nan"))


def pretraining_table(tracking_uri: str, experiment_name: str) -> str:
    """Every pre-training run of the store: status, epochs, s/epoch, projected wall time, last terms and spreads."""
    client = open_client(tracking_uri)
    experiment_id = get_experiment_id(client, tracking_uri, experiment_name, create=False)
    runs = client.search_runs([experiment_id], filter_string({"workflow": "pretrain"})) if experiment_id else []
    lines = markdown_head(f"Pre-trainings in {tracking_uri.split('///')[-1]}",
                          ["method", "status", "epochs", "of", "s/epoch", "projected min", "term", "last", "chance"], left_aligned=2)
    for run in runs:
        epochs, per_epoch = _epoch_seconds(client, run.info.run_id)
        total = int(run.data.params.get("epochs", run.data.params.get("max_epochs", 0)) or 0)
        head = f"| {run.data.tags.get('method')} | {run.info.status} | {epochs} | {total} | {per_epoch:.2f} | {per_epoch * total / 60:.1f} |"
        terms = sorted(k for k in run.data.metrics if k.startswith(_TERMS) and not k.endswith(("/chance", "/min")))
        for k, key in enumerate(terms):
            chance = run.data.metrics.get(f"{key}/chance")
            lines.append((head if k == 0 else "| | | | | | |") + f" {key[len('train_'):]} | {run.data.metrics[key]:.3f} | "
                         + (f"{chance:.3f} |" if chance is not None else "- |"))
    return "\n".join(lines) + "\n"


def device_report(reports: Sequence[str | Path]) -> str:
    """Each call's host and stages (status, seconds) from its ``device_report.json``."""
    lines = markdown_head("Device calls", ["call", "host", "stage", "status", "seconds"], left_aligned=4)
    for path in reports:
        report = json.loads(Path(path).read_text())
        host = report["host"].get("device", "?") + ", torch " + report["host"].get("torch", "?")
        for k, stage in enumerate(report["stages"]):
            lines.append(f"| {Path(path).stem if k == 0 else ''} | {host if k == 0 else ''} | {stage['name']} | {stage['status']} | "
                         f"{stage.get('seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"
