"""The probe table, made only from logged MLflow probe runs.

:func:`write_probe_table` reads every FINISHED run tagged ``workflow=probe`` and ``dataset=<name>`` (tags
``method``, ``seed``; metrics ``probe_<name>`` from :mod:`metacontrast.workflows.probes`), keeps the newest
run of each ``(method, seed)`` and writes ``probes.md``: one row per method, the random encoder first as
the reference, each cell ``mean ± std`` over seeds (population std, ``ddof=0``), then a chance row (the
``probe_chance_*`` metrics: majority class, share of same-patient candidates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .results import MISSING, markdown_head
from .tracking import runs_as_records, search_runs

__all__ = ["collect_probe_runs", "format_probe_table", "write_probe_table"]

#: (column label, metric without ``probe_``) in table order; frozen-encoder Dice columns follow, by L and split.
PROBE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slice quantile k-NN", "knn_slice_quantile"),
    ("cardiac phase k-NN", "knn_organ_state"),
    ("patient retrieval", "patient_retrieval"),
    ("embedding cosine", "embedding_cosine"),
)
REFERENCE = "random"


def collect_probe_runs(tracking_uri: str, dataset: str, experiment_name: str | None = None,
                       output_dir: str | os.PathLike[str] | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """``{(method, seed): {metric without "probe_": value}}`` of the newest FINISHED probe run of each."""
    runs = search_runs(tracking_uri, experiment_name, {"workflow": "probe", "dataset": dataset}, output_dir, status="FINISHED")
    found: dict[tuple[str, int], dict[str, float]] = {}
    for record in runs_as_records(runs):  # newest first
        key = (record["tags"].get("method", ""), int(record["tags"].get("seed", 0)))
        found.setdefault(key, {k[len("probe_"):]: float(v) for k, v in record["metrics"].items() if k.startswith("probe_")})
    return found


def _frozen_columns(metrics: Sequence[str]) -> list[tuple[str, str]]:
    """``frozen_L<L>_<split>_dice`` metrics as columns, by L then split (``val`` before ``test``)."""
    frozen = [m for m in set(metrics) if m.startswith("frozen_L") and m.endswith("_dice")]
    key = lambda m: (int(m.split("_")[1][1:]), {"val": 0, "test": 1}.get(m.split("_")[2], 2), m)
    return [(f"frozen Dice L={m.split('_')[1][1:]} {m.split('_')[2]}", m) for m in sorted(frozen, key=key)]


def _stats_cell(values: Sequence[float]) -> str:
    finite = np.asarray([v for v in values if not math.isnan(v)])
    return MISSING if not finite.size else f"{finite.mean():.3f} ± {finite.std():.3f}"


def format_probe_table(runs: Mapping[tuple[str, int], Mapping[str, float]], dataset: str,
                       methods: Sequence[str] | None = None) -> str:
    """Markdown: methods (random first) x probes, ``mean ± std`` over seeds, the number of seeds, a chance row."""
    found = sorted({method for method, _ in runs})
    order = list(methods) if methods is not None else sorted(found, key=lambda m: (m != REFERENCE, m))
    names = {m for metrics in runs.values() for m in metrics}
    columns = [c for c in PROBE_COLUMNS if c[1] in names] + _frozen_columns(names)
    lines = markdown_head(f"{dataset}: representation probes of frozen encoders, mean ± std over seeds",
                          ["Encoder", *(label for label, _ in columns), "Seeds"])
    for method in order:
        seeds = [metrics for (name, _), metrics in sorted(runs.items()) if name == method]
        cells = [_stats_cell([s.get(metric, float("nan")) for s in seeds]) for _, metric in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(seeds)} |")
    chance = []
    for _, metric in columns:
        key = "chance_" + metric.removeprefix("knn_")
        values = [m[key] for m in runs.values() if key in m]
        chance.append(f"{np.mean(values):.3f}" if values else "")
    lines.append("| chance | " + " | ".join(chance) + " | |")
    lines += ["", "Frozen encoder features of volumes outside the pre-training split (`bundles/common/configs/probe.json`): "
              "k-NN accuracy of a meta label from the pooled encoder output (fit on `train`, scored on the probe's "
              "`score_split`, `val` by default); patient retrieval: top-1 accuracy of finding the same patient in another "
              "volume at another slice quantile (`score_split`); embedding cosine: mean pairwise cosine of the pooled encoder output (1 = collapsed); frozen "
              "Dice: 3D Dice of a decoder-only fine-tune with L labelled volumes (encoder frozen). Chance: the "
              "majority class, the share of same-patient candidates. `random` is the seeded random encoder, the "
              "reference row. Std is the population std over seeds. Made by "
              "`metacontrast.workflows.probe_results.write_probe_table` from MLflow probe runs only.", ""]
    return "\n".join(lines)


def write_probe_table(tracking_uri: str, dataset: str, out_dir: str | os.PathLike[str], methods: Sequence[str] | None = None,
                      experiment_name: str | None = None, output_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Write ``<out_dir>/probes.md`` from the store's probe runs of ``dataset``; ``None`` (nothing written)
    when the store has none."""
    runs = collect_probe_runs(tracking_uri, dataset, experiment_name, output_dir)
    if methods is not None:
        runs = {key: value for key, value in runs.items() if key[0] in methods}
    if not runs:
        return None
    path = Path(out_dir) / "probes.md"
    with atomic_write(path) as handle:
        handle.write(format_probe_table(runs, dataset, methods))
    return path

