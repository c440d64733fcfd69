#!/usr/bin/env python3
"""Tables of a device session from what it returned and from the store it was imported into (docs/device.md).

    python scripts/report_device_session.py --reports "['results/acdc_paper_scale/device_logs/2026-12-04_call2_report.json']" \
        --benchmarks "['results/benchmarks/pretrain_step_h200_bf16.json']" \
        --tracking_uri sqlite:///runs_paper_scale/acdc/mlruns.db --output results/acdc_paper_scale/device_session.md
"""

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from metacontrast.device.report import benchmark_table, device_report, pretraining_table  # noqa: E402
from metacontrast.io import atomic_write_text  # noqa: E402


def main(reports: Sequence[str] = (), benchmarks: Sequence[str] = (), tracking_uri: str = "", experiment_name: str = "metacontrast-acdc",
         output: str = "") -> str:
    parts = [device_report(reports)] if reports else []
    parts += [benchmark_table(benchmarks)] if benchmarks else []
    parts += [pretraining_table(tracking_uri, experiment_name)] if tracking_uri else []
    text = "\n".join(parts) + "\nMade by `scripts/report_device_session.py` (`metacontrast.device.report`) from the returned files and the store.\n"
    if output:
        atomic_write_text(output, text)
    return text


if __name__ == "__main__":
    fire.Fire(main)
