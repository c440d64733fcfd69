"""Real MLflow stores compared row by row: best validation Dice from the fine-tune's history, test Dice
from the evaluate run, differences paired by seed; pre-training losses against their chance level."""

from __future__ import annotations

import math
from pathlib import Path

from metacontrast.reporting.compare import chance_level, compare_pretraining, compare_stores
from metacontrast.tracking import start_run


def _store(out_dir: Path, val_histories: dict[int, list[float]], test_dice: dict[int, float]) -> str:
    for seed, history in val_histories.items():
        tags = {"workflow": "finetune", "method": "gcl", "dataset": "acdc", "num_labeled": 1, "seed": seed}
        run = start_run("", "grid", f"finetune-s{seed}", tags, out_dir, config={"seed": seed})
        for epoch, value in enumerate(history, 1):
            run.log_metrics({"val_mean_dice": value}, step=epoch)
        run.end()
    for seed, value in test_dice.items():
        tags = {"workflow": "evaluate", "method": "gcl", "dataset": "acdc", "num_labeled": 1, "seed": seed}
        run = start_run("", "grid", f"evaluate-s{seed}", tags, out_dir, config={"seed": seed})
        run.log_metrics({"test_dice_mean": value, "test_hd95_mean": 5.0, "test_asd_mean": 1.0}, step=0)
        run.end()
    return f"sqlite:///{out_dir / 'mlruns.db'}"


def test_compare_stores_pairs_best_validation_and_test_by_seed(tmp_path: Path) -> None:
    short = _store(tmp_path / "short", {0: [0.2, 0.5, 0.4], 1: [0.6, 0.3]}, {0: 0.40, 1: 0.50})
    long = _store(tmp_path / "long", {0: [0.3, 0.6], 1: [0.9, 0.2], 2: [0.99]}, {0: 0.45, 1: 0.45})
    text = compare_stores("acdc", short, long, ["gcl"], ("80", "240"), experiment_name="grid")
    row = next(line for line in text.splitlines() if line.startswith("| gcl | 1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][2:]
    # best val: short 0.5, 0.6; long 0.6, 0.9, 0.99 (seed 2 only in long: not paired); test: seeds 0 and 1
    assert cells == ["0.550 ± 0.050 (2)", "0.830 ± 0.167 (3)", "+0.200 ± 0.100 (2)",
                     "0.450 ± 0.050 (2)", "0.450 ± 0.000 (2)", "+0.000 ± 0.050 (2)"]
    assert "| val Dice 80 | val Dice 240 | 240 - 80 (val, per seed) |" in text


def _pretraining(out_dir: Path, batch_size: int, history: dict[str, list[float]]) -> str:
    tags = {"workflow": "pretrain", "method": "gcl", "dataset": "acdc"}
    run = start_run("", "grid", "pretrain", tags, out_dir, config={"batch_size": batch_size})
    for epoch in range(len(next(iter(history.values())))):
        run.log_metrics({key: values[epoch] for key, values in history.items()}, step=epoch + 1)
    run.end()
    return f"sqlite:///{out_dir / 'mlruns.db'}"


def test_compare_pretraining_reads_image_terms_against_chance(tmp_path: Path) -> None:
    """Only the image-wise terms are reported, each as first / lowest / last epoch and last - log(2N - 1)."""
    assert chance_level(48) == math.log(95)
    stuck = _pretraining(tmp_path / "stuck", 48, {"train_img/patient_id": [4.55, 4.50, 4.56], "train_pix/patient_id": [0.5, 0.4, 0.3]})
    learns = _pretraining(tmp_path / "learns", 8, {"train_loss/views": [2.70, 2.00, 1.50]})
    text = compare_pretraining("acdc", [("lr 0.1", stuck), ("lr 0.01", learns)], ["gcl", "simclr"],
                               experiment_name="grid")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| lr ")]
    assert rows == [
        ["lr 0.1", "gcl", "train_img/patient_id", "4.550", "4.500", "4.560", f"{math.log(95):.3f}", f"{4.56 - math.log(95):+.3f}"],
        ["lr 0.01", "gcl", "train_loss/views", "2.700", "1.500", "1.500", f"{math.log(15):.3f}", f"{1.5 - math.log(15):+.3f}"],
    ]
    assert "No FINISHED simclr pre-training under: lr 0.1, lr 0.01." in text
