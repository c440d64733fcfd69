"""The probe table, made only from logged MLflow probe runs.

:func:`write_probe_table` reads every FINISHED run tagged ``workflow=probe`` and ``dataset=<name>`` (tags
``method``, ``seed``; metrics ``probe_<name>`` from :mod:`metacontrast.workflows.probes`; param ``norm``), keeps the newest
run of each ``(method, seed)`` and writes ``probes.md``: one row per method, the random encoder first as
the reference, each cell ``mean ± std`` over seeds (population std, ``ddof=0``), then a chance row (the
``probe_chance_*`` metrics: majority class, share of same-patient candidates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write
from ..tracking import runs_as_records, search_runs
from ..variants import RANDOM
from .tables import MISSING, is_random_row, markdown_head, random_reference

__all__ = ["collect_probe_runs", "format_gain_table", "format_probe_table", "frozen_draws", "reference_of", "write_probe_table"]

#: (column label, metric without ``probe_``) in table order; frozen-encoder Dice columns follow, by L and split.
PROBE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("slice quantile k-NN", "knn_slice_quantile"),
    ("cardiac phase k-NN", "knn_organ_state"),
    ("patient retrieval", "patient_retrieval"),
    ("embedding cosine", "embedding_cosine"),
)


def _probe_records(tracking_uri: str, dataset: str, experiment_name: str | None,
                   output_dir: str | os.PathLike[str] | None) -> dict[int, list[dict[str, Any]]]:
    """The FINISHED probe runs of ``dataset`` as records, newest first, by protocol: ``{frozen_draws: records}``
    with the most labelled-volume draws per frozen fine-tune first (runs from before ``frozen_draws`` was a
    setting drew once), so that no table mixes means over several draws with single draws."""
    runs = search_runs(tracking_uri, experiment_name, {"workflow": "probe", "dataset": dataset}, output_dir, status="FINISHED")
    protocols: dict[int, list[dict[str, Any]]] = {}
    for record in runs_as_records(runs):
        protocols.setdefault(frozen_draws(record), []).append(record)
    return dict(sorted(protocols.items(), reverse=True))


def frozen_draws(record: Mapping[str, Any]) -> int:
    """Labelled-volume draws per frozen fine-tune of a probe run record (1 when the param is absent)."""
    return int(record["params"].get("frozen_draws", 1))


def _metrics_by_key(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    found: dict[tuple[str, int], dict[str, float]] = {}
    for record in records:  # newest first
        key = (record["tags"].get("method", ""), int(record["tags"].get("seed", 0)))
        found.setdefault(key, {k[len("probe_"):]: float(v) for k, v in record["metrics"].items() if k.startswith("probe_")})
    return found


def collect_probe_runs(tracking_uri: str, dataset: str, experiment_name: str | None = None,
                       output_dir: str | os.PathLike[str] | None = None, draws: int | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """``{(method, seed): {metric without "probe_": value}}`` of the newest FINISHED probe run of each, among the
    runs with ``draws`` labelled-volume draws per frozen fine-tune (``None``: the most draws in the store)."""
    protocols = _probe_records(tracking_uri, dataset, experiment_name, output_dir)
    if not protocols:
        return {}
    return _metrics_by_key(protocols.get(next(iter(protocols)) if draws is None else draws, []))


def reference_of(method: str, norms: Mapping[str, str], references: Sequence[str]) -> str | None:
    """The random-encoder row ``method`` is compared with: the one of ``references`` built with the same
    normalisation layer (a batch-norm encoder against ``random/batch_norm``), else ``random``
    (:func:`~metacontrast.reporting.tables.random_reference`); ``None`` for a random row itself or when
    ``references`` lack it."""
    if method in references:
        return None
    rows = [{"method": m, "norm": norms.get(m, "instance")} for m in (*references, method)]
    found = random_reference(rows, method)
    return found if found in references else None


def _frozen_columns(metrics: Sequence[str]) -> list[tuple[str, str]]:
    """``frozen_L<L>_<split>_dice`` metrics as columns, by L then split (``val`` before ``test``)."""
    frozen = [m for m in set(metrics) if m.startswith("frozen_L") and m.endswith("_dice")]
    key = lambda m: (int(m.split("_")[1][1:]), {"val": 0, "test": 1}.get(m.split("_")[2], 2), m)
    return [(f"frozen Dice L={m.split('_')[1][1:]} {m.split('_')[2]}", m) for m in sorted(frozen, key=key)]


def _stats_cell(values: Sequence[float]) -> str:
    finite = np.asarray([v for v in values if not math.isnan(v)])
    return MISSING if not finite.size else f"{finite.mean():.3f} ± {finite.std():.3f}"


def format_probe_table(runs: Mapping[tuple[str, int], Mapping[str, float]], dataset: str,
                       methods: Sequence[str] | None = None, norms: Mapping[str, str] | None = None, draws: int = 1) -> str:
    """Markdown: methods (random first) x probes, ``mean ± std`` over seeds, the number of seeds, a chance row;
    then each encoder's per-seed gain over its random reference (:func:`format_gain_table`).  ``draws``: the
    labelled-volume draws each seed's frozen Dice is the mean of."""
    found = sorted({method for method, _ in runs})
    order = list(methods) if methods is not None else sorted(found, key=lambda m: (m != RANDOM, m))
    names = {m for metrics in runs.values() for m in metrics}
    columns = [c for c in PROBE_COLUMNS if c[1] in names] + _frozen_columns(names)
    protocol = f", frozen Dice over {draws} labelled-volume draws per seed" if draws > 1 else ""
    lines = markdown_head(f"{dataset}: representation probes of frozen encoders, mean ± std over seeds{protocol}",
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
              "Dice: 3D Dice of a decoder-only fine-tune with L labelled volumes (encoder frozen)"
              + (f", the mean over {draws} labelled-volume draws per seed" if draws > 1 else "") + ". Chance: the "
              "majority class, the share of same-patient candidates. `random` is the seeded random encoder, the "
              "reference row. Std is the population std over seeds. Made by "
              "`metacontrast.reporting.probe_results.write_probe_table` from MLflow probe runs only.", ""]
    gains = format_gain_table(runs, dataset, order, columns, norms or {}, protocol)
    return "\n".join(lines + ([gains] if gains else []))


def format_gain_table(runs: Mapping[tuple[str, int], Mapping[str, float]], dataset: str, order: Sequence[str],
                      columns: Sequence[tuple[str, str]], norms: Mapping[str, str], heading_suffix: str = "") -> str:
    """Markdown: each encoder's gain over its random reference (:func:`reference_of`) on every probe but the
    embedding cosine, ``mean ± std (n)`` of the per-seed difference (a seed draws the same frozen fine-tune
    volumes for both), marked ``✓`` where the mean gain exceeds both the reference's std over seeds and the
    std of the gains; ``""`` when no row has a reference.  ``heading_suffix`` ends the heading (the protocol)."""
    references = [m for m in order if is_random_row(m)]
    columns = [c for c in columns if c[1] != "embedding_cosine"]
    rows = []
    for method in order:
        reference = reference_of(method, norms, references)
        if reference is None:
            continue
        cells = []
        for _, metric in columns:
            pairs = [(runs[(method, seed)].get(metric, math.nan), runs[(reference, seed)].get(metric, math.nan))
                     for name, seed in sorted(runs) if name == method and (reference, seed) in runs]
            gains = np.asarray([a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))])
            base = np.asarray([b for _, b in pairs if not math.isnan(b)])
            if not gains.size:
                cells.append(MISSING)
                continue
            beats = gains.mean() > max(base.std(), gains.std())
            cells.append(f"{gains.mean():+.3f} ± {gains.std():.3f} ({gains.size}){' ✓' if beats else ''}")
        rows.append(f"| {method} | {reference} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    lines = markdown_head(f"{dataset}: gain over the random encoder of the same network, per seed{heading_suffix}",
                          ["Encoder", "compared with", *(label for label, _ in columns)])
    lines += rows
    lines += ["", "Each cell: mean ± std (number of seeds) of the encoder's probe value minus its reference's at the same "
              "seed (the same frozen fine-tune volumes and the same random decoder start). The reference is the random "
              "encoder built with the same normalisation layer (`random/batch_norm` for a batch-norm encoder, "
              "`bundles/common/configs/random_init.json`). ✓: the mean gain exceeds both the reference's std over seeds "
              "and the std of the gains.", ""]
    return "\n".join(lines)


def write_probe_table(tracking_uri: str, dataset: str, out_dir: str | os.PathLike[str], methods: Sequence[str] | None = None,
                      experiment_name: str | None = None, output_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Write ``<out_dir>/probes.md`` from the store's probe runs of ``dataset``, one probe table (and gain table)
    per number of frozen draws, the most draws first; ``None`` (nothing written) when the store has none."""
    tables = []
    for draws, records in _probe_records(tracking_uri, dataset, experiment_name, output_dir).items():
        runs = _metrics_by_key(records)
        norms: dict[str, str] = {}
        for record in records:  # newest first
            norms.setdefault(record["tags"].get("method", ""), record["params"].get("norm", "instance"))
        if methods is not None:
            runs = {key: value for key, value in runs.items() if key[0] in methods}
        if runs:
            tables.append(format_probe_table(runs, dataset, methods, norms, draws))
    if not tables:
        return None
    path = Path(out_dir) / "probes.md"
    with atomic_write(path) as handle:
        handle.write("\n".join(tables))
    return path
