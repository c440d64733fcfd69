"""Representation probes: the probe functions on small real tensors, the frozen encoder, and the probe
workflow end to end on four ACDC volumes (a seeded random encoder against a GCL encoder trained a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import run as run_bundle

from metacontrast.nets import SegmentationUNet
from metacontrast.reporting.probe_grid import encoder_entry, run_probes
from metacontrast.reporting.probe_results import collect_probe_runs
from metacontrast.workflows.probes import KNNProbe, mean_pairwise_cosine, patient_retrieval
from tests.helpers import in_repo

TINY = [8, 16, 32, 64, 128]
CPU = "bundles/common/configs/presets/cpu.json"


def test_knn_probe_votes_by_majority_and_breaks_ties_by_rank() -> None:
    fit = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    score = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    probe = KNNProbe(k=1, centre_features=False)
    assert probe.predict(fit, labels, score).tolist() == [0, 1]
    assert probe.accuracy(fit, labels, score, torch.tensor([0, 0])) == 0.5
    # k = 2 on a query nearest to one member of each class: the tie goes to the nearer one
    between = torch.nn.functional.normalize(torch.tensor([[0.8, 0.7]]), dim=1)
    two = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    assert KNNProbe(k=2, centre_features=False).predict(two, torch.tensor([0, 1]), between).tolist() == [0]
    assert KNNProbe(k=2, centre_features=False).predict(two, torch.tensor([1, 0]), between).tolist() == [1]


def test_patient_retrieval_leaves_out_the_own_volume_and_slice_quantile() -> None:
    # slices 0, 1: patient 0 volume 0; slice 2: patient 0 volume 1 (quantile 1); slice 3: patient 1 volume 2
    meta = {"patient_id": torch.tensor([0, 0, 0, 1]), "volume_index": torch.tensor([0, 0, 1, 2]),
            "slice_quantile": torch.tensor([0, 0, 1, 1])}
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    # slice 3 is every slice's nearest candidate of another volume: no hit; within the own volume slices 0, 1 would hit
    result = patient_retrieval(z, meta, exclude=("volume_index",))
    assert result["n"] == 3 and result["accuracy"] == 0.0  # slice 3's patient has no other slice: not scored
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 2 + 2 / 3) / 3)
    assert patient_retrieval(z, meta, exclude=())["accuracy"] == pytest.approx(2 / 3), "the own volume makes it easy"
    # the default also leaves out the own slice quantile: slice 2 (quantile 1) may only find slices 0, 1, and finds 1
    by_quantile = patient_retrieval(z, meta)
    assert by_quantile["n"] == 3 and by_quantile["accuracy"] == pytest.approx(1 / 3)
    alone = patient_retrieval(z, {**meta, "patient_id": torch.arange(4)})
    assert alone["n"] == 0


def test_mean_pairwise_cosine_is_one_for_a_collapsed_embedding() -> None:
    assert mean_pairwise_cosine(torch.ones(5, 3) / 3**0.5) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)


def test_frozen_encoder_stays_in_eval_mode_and_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    network = SegmentationUNet(in_channels=1, out_channels=3, features=TINY, norm="batch")
    encoder_keys = set(network.module_keys(network.encoder_blocks()))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    network.freeze_encoder()
    network.train()
    assert all(not m.training for block in network.encoder_blocks() for m in block.modules())
    assert all(m.training for block in network.decoder_blocks() for m in block.modules())
    network(torch.rand(4, 1, 32, 32))  # a training-mode forward pass updates batch-norm statistics
    after = network.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in encoder_keys), "the frozen encoder's statistics moved"
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("running_mean") and k not in encoder_keys)


def test_encoder_entries_name_their_rows(tmp_path: Path) -> None:
    assert encoder_entry("random", "runs", "acdc") == ("random", "")
    assert encoder_entry("gcl/no_filter", "runs", "acdc") == ("gcl/no_filter", "runs/acdc/gcl/no_filter/pretrain/encoder.pt")
    assert encoder_entry("x/acdc/gcl/pretrain/encoder.pt", "runs", "acdc") == ("gcl", "x/acdc/gcl/pretrain/encoder.pt")
    assert encoder_entry("lr01=/a/b.pt", "runs", "acdc") == ("lr01", "/a/b.pt")


@pytest.mark.slow
def test_probes_of_a_random_and_a_trained_encoder(repo_root: Path, acdc_dir: Path, tmp_path: Path) -> None:
    common = {"dataset": "acdc", "dataset_dir": str(acdc_dir), "features": TINY, "cache_dir": str(tmp_path / "cache"),
              "num_threads": 1}
    with in_repo(repo_root):
        run_bundle(config_file=["bundles/gcl/configs/pretrain.json", CPU], **common, max_volumes=4, max_iterations=3,
                   output_dir=str(tmp_path / "pretrain"))
        encoder = tmp_path / "pretrain" / "encoder.pt"
        table = run_probes("acdc", str(acdc_dir), ["random", f"gcl={encoder}"], seeds=[0, 1], runs_dir=str(tmp_path / "runs"),
                           results_dir=str(tmp_path / "results"),
                           overrides={**common, "max_volumes": 4, "max_iterations": 4, "frozen_draws": 2})
    uri = f"sqlite:///{(tmp_path / 'runs' / 'acdc' / 'mlruns.db').resolve()}"

    # logged: one FINISHED run per (encoder, seed), tagged, every metric in range
    runs = collect_probe_runs(uri, "acdc", "metacontrast-acdc")
    assert set(runs) == {("random", 0), ("random", 1), ("gcl", 0), ("gcl", 1)}
    for metrics in runs.values():
        for name in ("knn_slice_quantile", "knn_organ_state", "patient_retrieval", "frozen_L1_val_dice",
                     "frozen_L1_test_dice", "frozen_L2_val_dice", "frozen_L2_test_dice"):
            assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
        assert -1.0 <= metrics["embedding_cosine"] <= 1.0 and 0.0 < metrics["chance_organ_state"] <= 1.0
        # frozen Dice: the mean of the two labelled-volume draws, each logged too
        assert metrics["frozen_L1_val_dice"] == pytest.approx((metrics["frozen_L1_val_dice_draw0"] + metrics["frozen_L1_val_dice_draw1"]) / 2)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("metacontrast-acdc").experiment_id], "tags.method = 'gcl'")[0]
    assert {run.data.tags[k] for k in ("workflow", "dataset")} == {"probe", "acdc"} and run.data.tags["seed"] in {"0", "1"}
    # the random encoder is seeded: two seeds, two encoders; a trained encoder's k-NN probes do not depend on the seed
    assert runs[("random", 0)]["embedding_cosine"] != runs[("random", 1)]["embedding_cosine"]
    assert runs[("gcl", 0)]["knn_slice_quantile"] == runs[("gcl", 1)]["knn_slice_quantile"]
    assert runs[("gcl", 0)]["embedding_cosine"] != runs[("random", 0)]["embedding_cosine"]

    # the frozen fine-tunes trained the decoder only: the encoder they end with is the one they were given
    pretrained = torch.load(encoder, map_location="cpu", weights_only=True)["state_dict"]
    random0 = torch.load(tmp_path / "runs" / "acdc" / "random" / "probe_seed0" / "encoder.pt", weights_only=True)["state_dict"]
    for source, folder in ((pretrained, "gcl"), (random0, "random")):
        final = torch.load(tmp_path / "runs" / "acdc" / folder / "probe_seed0" / "frozen_L2_draw1" / "model_final.pt", weights_only=True)
        assert all(torch.equal(final[k], v) for k, v in source.items()), f"{folder}: the frozen encoder changed"
    finetunes = client.search_runs([client.get_experiment_by_name("metacontrast-acdc-probe-finetunes").experiment_id])
    assert len(finetunes) == 16 and all(r.data.params["freeze_encoder"] == "true" for r in finetunes)
    # probe seed s fine-tunes with seeds 2s and 2s + 1: the draws of seeds 0 and 1 are four different fine-tune seeds
    assert {r.data.tags["seed"] for r in finetunes} == {"0", "1", "2", "3"}

    # tabled: random first as the reference, then the trained encoder, then chance; then the gain table
    lines = table.read_text().splitlines()
    first = lines[: lines.index("", 3)]
    rows = [line.split(" | ")[0].strip("| ") for line in first if line.startswith("| ")][2:]
    assert rows == ["random", "gcl", "chance"]
    assert " ± " in lines[4] and lines[4].endswith("| 2 |")
    assert any(line.startswith("| gcl | random | ") for line in lines[len(first):])


def test_write_results_tables_the_probe_runs_of_its_store(tmp_path: Path) -> None:
    from metacontrast.reporting.results import write_results
    from metacontrast.tracking import start_run

    def log(tags: dict, metrics: dict) -> None:
        run = start_run("", "grid", "run", {"dataset": "acdc", **tags}, tmp_path / "store")
        run.log_metrics(metrics)
        run.end()

    log({"workflow": "evaluate", "method": "random", "num_labeled": 1, "seed": 0}, {"test_dice_mean": 0.5})
    assert "probes" not in write_results("", "acdc", tmp_path / "before", output_dir=tmp_path / "store")
    for method, seed, quantile in (("gcl", 0, 0.6), ("random", 0, 0.2), ("random", 1, 0.3), ("gcl", 1, 0.7)):
        log({"workflow": "probe", "method": method, "seed": seed},
            {"probe_knn_slice_quantile": quantile, "probe_chance_slice_quantile": 0.25, "probe_frozen_L1_test_dice": 0.1})
    paths = write_results("", "acdc", tmp_path / "after", output_dir=tmp_path / "store")
    lines = paths["probes"].read_text().splitlines()
    assert lines[2] == "| Encoder | slice quantile k-NN | frozen Dice L=1 test | Seeds |"
    assert lines[4] == "| random | 0.250 ± 0.050 | 0.100 ± 0.000 | 2 |"
    assert lines[5] == "| gcl | 0.650 ± 0.050 | 0.100 ± 0.000 | 2 |"
    assert lines[6] == "| chance | 0.250 |  | |"
    # the gain table: per-seed differences from the random encoder of the same network, ✓ past both spreads
    gain = lines.index("### acdc: gain over the random encoder of the same network, per seed")
    assert lines[gain + 2] == "| Encoder | compared with | slice quantile k-NN | frozen Dice L=1 test |"
    assert lines[gain + 4] == "| gcl | random | +0.400 ± 0.000 (2) ✓ | +0.000 ± 0.000 (2) |"


def test_a_batch_norm_encoder_is_compared_with_the_batch_norm_random_encoder() -> None:
    from metacontrast.reporting.probe_results import format_gain_table, reference_of

    norms = {"random": "instance", "random/batch_norm": "batch", "gcl/bn": "batch", "simclr": "instance"}
    references = ["random", "random/batch_norm"]
    assert [reference_of(m, norms, references) for m in ("gcl/bn", "simclr", "random/batch_norm")] == ["random/batch_norm", "random", None]
    runs = {("random", 0): {"knn_slice_quantile": 0.3}, ("random", 1): {"knn_slice_quantile": 0.3},
            ("random/batch_norm", 0): {"knn_slice_quantile": 0.5}, ("random/batch_norm", 1): {"knn_slice_quantile": 0.3},
            ("gcl/bn", 0): {"knn_slice_quantile": 0.55}, ("gcl/bn", 1): {"knn_slice_quantile": 0.35}}
    table = format_gain_table(runs, "acdc", ["random", "random/batch_norm", "gcl/bn"], [("k-NN", "knn_slice_quantile")], norms)
    # +0.05 on both seeds, but the batch-norm reference's own spread is 0.1: no tick
    assert "| gcl/bn | random/batch_norm | +0.050 ± 0.000 (2) |" in table.splitlines()


def test_the_probe_table_keeps_frozen_draw_protocols_apart(tmp_path: Path) -> None:
    """Runs that drew one labelled volume set per seed and runs that averaged three draws never share a table:
    one table per protocol, the most draws first, each saying how many draws a value averages."""
    from metacontrast.reporting.probe_results import collect_probe_runs, write_probe_table
    from metacontrast.tracking import start_run

    def log(method: str, seed: int, dice: float, draws: int | None) -> None:
        run = start_run("", "grid", "run", {"workflow": "probe", "dataset": "acdc", "method": method, "seed": seed}, tmp_path / "store")
        if draws is not None:
            run.log_params({"frozen_draws": draws})
        run.log_metrics({"probe_frozen_L1_val_dice": dice})
        run.end()

    log("random", 0, 0.1, None)  # before frozen_draws was a setting: one draw
    log("gcl", 0, 0.9, 1)
    one = write_probe_table("", "acdc", tmp_path / "one", output_dir=tmp_path / "store").read_text()
    assert "| gcl | 0.900 ± 0.000 | 1 |" in one and "draws per seed" not in one
    log("random", 0, 0.2, 3)
    log("random", 1, 0.4, 3)
    assert collect_probe_runs("", "acdc", output_dir=tmp_path / "store") == {
        ("random", 0): {"frozen_L1_val_dice": 0.2}, ("random", 1): {"frozen_L1_val_dice": 0.4}}
    assert set(collect_probe_runs("", "acdc", output_dir=tmp_path / "store", draws=1)) == {("random", 0), ("gcl", 0)}
    text = write_probe_table("", "acdc", tmp_path / "both", output_dir=tmp_path / "store").read_text()
    three = text.index("### acdc: representation probes of frozen encoders, mean ± std over seeds, frozen Dice over 3 labelled-volume draws per seed")
    single = text.index("### acdc: representation probes of frozen encoders, mean ± std over seeds\n")
    assert three < single
    assert "| random | 0.300 ± 0.100 | 2 |" in text[three:single] and "| gcl |" not in text[three:single]
    assert "| gcl | 0.900 ± 0.000 | 1 |" in text[single:] and "the mean over 3 labelled-volume draws per seed" in text[three:single]


def test_frozen_draws_are_disjoint_across_seeds_and_one_draw_keeps_the_probe_seed() -> None:
    from metacontrast.errors import ConfigError
    from metacontrast.workflows.probes import FrozenFinetune

    assert FrozenFinetune([1], {}).draw_seeds(2) == [2]
    three = FrozenFinetune([1], {}, draws=3)
    assert [three.draw_seeds(s) for s in (0, 1, 2)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ConfigError, match="frozen_draws"):
        FrozenFinetune([1], {}, draws=0)
