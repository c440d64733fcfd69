"""Wall time of every pre-training, fine-tune and evaluation of a results grid, from its MLflow store.

    python scripts/report_grid_times.py --dataset acdc [--tracking_uri sqlite:///runs/acdc/mlruns.db]

Writes ``results/benchmarks/grid_times_<dataset>.md``: one row per (workflow, method, L) with the mean and
max wall time over seeds, the number of runs, and the totals, next to the CPU-scale targets (pre-training
under 10 minutes, fine-tune + evaluation under 45 s, the whole grid under 2 hours).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.io import atomic_write  # noqa: E402
from metacontrast.layout import RunLayout  # noqa: E402
from metacontrast.tracking import search_runs  # noqa: E402


def main(dataset: str = "acdc", tracking_uri: str = "", output: str = "") -> str:
    layout = RunLayout("runs", dataset)
    uri = tracking_uri or layout.store_uri()
    runs = search_runs(uri, layout.experiment_name, {"dataset": dataset}, status="FINISHED")
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        if run.info.end_time and run.info.start_time:
            tags = run.data.tags
            key = (tags.get("workflow", ""), tags.get("method", ""), tags.get("num_labeled", "-"))
            groups[key].append((run.info.end_time - run.info.start_time) / 1000)
    lines = [f"### {dataset}: wall time per workflow run (this machine, from the MLflow store {uri.split('/')[-1]})", "",
             "| workflow | method | L | runs | mean (s) | max (s) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    totals: dict[str, float] = defaultdict(float)
    for (workflow, method, num_labeled), seconds in sorted(groups.items()):
        totals[workflow] += sum(seconds)
        lines.append(f"| {workflow} | {method} | {num_labeled} | {len(seconds)} | {sum(seconds) / len(seconds):.1f} | {max(seconds):.1f} |")
    finetune_eval = defaultdict(float)
    for (workflow, method, num_labeled), seconds in groups.items():
        if workflow in ("finetune", "evaluate"):
            finetune_eval[(method, num_labeled)] += sum(seconds) / len(seconds)
    worst = max(finetune_eval.values(), default=float("nan"))
    lines += ["", f"Totals: {', '.join(f'{k} {v / 60:.1f} min' for k, v in sorted(totals.items()))}; "
              f"all {sum(totals.values()) / 60:.1f} min. Slowest mean fine-tune + evaluation: {worst:.1f} s. "
              "Targets at CPU scale: pre-training < 600 s, fine-tune + evaluation < 45 s, whole ACDC grid < 2 h.", ""]
    text = "\n".join(lines)
    path = Path(output or f"results/benchmarks/grid_times_{dataset}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(text)
    print(text)
    return str(path)


if __name__ == "__main__":
    fire.Fire(main)
