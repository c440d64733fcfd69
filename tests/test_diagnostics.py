"""Pre-training diagnostics (issue 18, item 1): each contrastive term's chance level and minimum for its
batch, the embedding spread and the per-term encoder gradient norms, logged to MLflow by a real run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from monai.bundle import run as run_bundle

from metacontrast.engines import PretrainDiagnostics
from metacontrast.engines.diagnostics import mean_pairwise_cosine
from metacontrast.losses import GCLLoss, SimCLRLoss, meta_label_positive_mask, multi_positive_info_nce
from metacontrast.losses.ideal import IDEALLoss
from metacontrast.losses.yardsticks import chance_level, single_label_minimum
from metacontrast.nets import EncoderWithHeads, ProjectionHead, UNetEncoder

GCL_PRETRAIN = "bundles/gcl/configs/pretrain.json"
TINY = [8, 16, 32, 64, 128]
DTYPE = torch.float64

# two patients x two slices: slices 0, 1 of patient 0 and slices 2, 3 of patient 1; rows k and k + 4 are views
PATIENT = torch.tensor([0, 0, 1, 1])


def test_bound_on_two_patients_by_two_slices():
    """Each of the 8 rows has 3 positives (its other view, both views of the other slice of its patient) among
    7 others: chance log 7, minimum log 3."""
    positives = meta_label_positive_mask(PATIENT)
    assert positives.sum(dim=1).tolist() == [3] * 8
    assert chance_level(positives) == pytest.approx(math.log(7))
    assert single_label_minimum(positives) == pytest.approx(math.log(3))


def test_loss_meets_its_yardsticks():
    """Equal embeddings give the chance level exactly; each patient collapsed to one pole approaches log 3 as
    tau -> 0; no embedding goes below it."""
    positives = meta_label_positive_mask(PATIENT)
    same = torch.ones(8, 4, dtype=DTYPE)
    assert float(multi_positive_info_nce(same, positives, 0.1)) == pytest.approx(math.log(7), rel=1e-12)
    poles = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DTYPE)[PATIENT.repeat(2)]
    assert float(multi_positive_info_nce(poles, positives, 0.01)) == pytest.approx(math.log(3), abs=1e-12)
    assert float(multi_positive_info_nce(poles, positives, 0.5)) > math.log(3) + 1e-3  # finite tau: above the bound
    torch.manual_seed(0)
    for _ in range(200):
        z = torch.randn(8, 3, dtype=DTYPE)
        assert float(multi_positive_info_nce(z, positives, 0.05)) >= math.log(3)


def test_pair_denominator_form_yardsticks():
    """IDEAL Eq. 1 (each positive pair has its own denominator, the N - 1 other keys as negatives): chance log N."""
    n = 5
    loss = IDEALLoss(local_weight=0.0)
    value = loss({"img": torch.ones(2 * n, 3, 2, 2, dtype=DTYPE)}, {})["global"]
    assert float(value) == pytest.approx(math.log(n), rel=1e-12)
    assert loss.last_terms["loss/global/chance"] == pytest.approx(math.log(n))
    assert loss.last_terms["loss/global/min"] == 0.0


def test_losses_report_their_yardsticks():
    fmap = torch.randn(8, 6, 2, 2, dtype=DTYPE)
    gcl = GCLLoss(["patient_id", "slice_quantile"])
    gcl({"img": fmap}, {"patient_id": PATIENT, "slice_quantile": torch.tensor([0, 1, 2, 3])})
    assert gcl.last_terms["img/patient_id/chance"] == pytest.approx(math.log(7))
    assert gcl.last_terms["img/patient_id/min"] == pytest.approx(math.log(3))
    assert gcl.last_terms["img/slice_quantile/min"] == pytest.approx(0.0)  # only the other view: log 1
    assert gcl.last_components == {}  # tensors are kept only when a diagnostic asks for them
    simclr = SimCLRLoss()
    simclr({"img": fmap})
    assert simclr.last_terms == {"loss/views/chance": pytest.approx(math.log(7)), "loss/views/min": 0.0}


def test_mean_pairwise_cosine():
    assert mean_pairwise_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    x = torch.randn(6, 4, dtype=DTYPE)
    u = torch.nn.functional.normalize(x, dim=1)
    direct = sum(float(u[i] @ u[j]) for i in range(6) for j in range(6) if i != j) / 30
    assert mean_pairwise_cosine(x) == pytest.approx(direct, rel=1e-12)


def test_measure_leaves_network_and_loss_as_they_were():
    """Gradient norms of each GCL part equal a direct autograd computation; no .grad, buffer or last_terms changes."""
    torch.manual_seed(0)
    encoder = UNetEncoder(features=TINY, norm="batch")
    network = EncoderWithHeads(encoder, {"img": ProjectionHead(128, 32, 16)})
    loss = GCLLoss(["patient_id"])
    inputs, meta = torch.randn(8, 1, 32, 32), {"patient_id": PATIENT}
    loss.last_terms = {"sentinel": 1.0}
    before = {k: v.clone() for k, v in network.state_dict().items()}
    metrics = PretrainDiagnostics().measure(network, loss, inputs, meta)
    assert loss.last_terms == {"sentinel": 1.0} and loss.last_components == {} and not loss.record_components
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    params = [p for b in encoder.encoder_blocks() for p in b.parameters()]
    term = loss(network(inputs), meta)["patient_id"]
    direct = torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(term, params)))
    assert metrics["grad_norm/img/patient_id"] == pytest.approx(float(direct), rel=1e-4)
    assert set(metrics) == {"grad_norm/img/patient_id", "embedding_cosine/encoder", "embedding_cosine/img"}
    assert -1.0 <= metrics["embedding_cosine/encoder"] <= 1.0


@pytest.fixture(scope="module")
def gcl_runs(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two 2-iteration GCL pre-trainings on the embedded sample: one measuring every iteration (collapse_cosine
    -1, so the warning must fire), one never measuring."""
    root = tmp_path_factory.mktemp("diagnostics")
    from tests.helpers import in_repo

    def pretrain(name: str, **overrides) -> Path:
        out = root / name
        run_bundle(config_file=GCL_PRETRAIN, features=TINY, output_dir=str(out), cache_dir=str(root / "cache"),
                   tracking_uri=f"sqlite:///{(out / 'mlruns.db').resolve()}", max_iterations=2, num_threads=1, device="cpu",
                   **overrides)
        return out

    with in_repo(repo_root), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = pretrain("measured", diagnostics_interval=1, collapse_cosine=-1.0)
        collapse = [w for w in caught if "near collapse" in str(w.message)]
        plain = pretrain("plain", diagnostics_interval=10**6)
    return {"measured": measured, "plain": plain, "collapse_warnings": len(collapse)}


def _run(out: Path):
    from metacontrast.tracking import RunStore

    store = RunStore(f"sqlite:///{(out / 'mlruns.db').resolve()}", "sample")
    (run,) = store.runs("pretrain")
    return store, run


@pytest.mark.slow
def test_gcl_run_logs_the_diagnostics(gcl_runs: dict):
    """The yardsticks, spread and gradient norms land in the MLflow run beside GradMitigator's cosines; the
    collapse warning fires once."""
    assert gcl_runs["collapse_warnings"] == 1
    _, run = _run(gcl_runs["measured"])
    metrics = run.data.metrics
    for label in ["patient_id", "slice_quantile"]:
        assert metrics[f"train_img/{label}/chance"] > metrics[f"train_img/{label}/min"] >= 0
        assert metrics[f"train_grad_norm/img/{label}"] > 0 and metrics[f"train_grad_norm/pix/{label}"] > 0
    assert -1 <= metrics["train_embedding_cosine/encoder"] <= 1 and "train_embedding_cosine/img" in metrics
    assert "train_cos/patient_id-vs-slice_quantile" in metrics  # GradMitigator's, kept


@pytest.mark.slow
def test_measuring_does_not_change_the_trajectory(gcl_runs: dict):
    weights = lambda out: torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]  # noqa: E731
    a, b = weights(gcl_runs["measured"]), weights(gcl_runs["plain"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_curves_draw_the_joint_optimum_of_matching_settings(gcl_runs: dict, tmp_path: Path):
    from PIL import Image

    from metacontrast.reporting.curves import joint_optimum_for, metric_families, plot_pretrain_curves
    from metacontrast.reporting.figures import PANEL_PX

    store, run = _run(gcl_runs["measured"])
    optimum = {"temperature": 0.1, "batch_size": 48, "terms": {"img/patient_id": {"chance": 4.5, "min": 2.0, "joint": 3.0}}}
    assert joint_optimum_for(run, optimum) == optimum["terms"]
    assert joint_optimum_for(run, {**optimum, "temperature": 0.07}) == {}  # computed for other settings: not drawn
    path = plot_pretrain_curves(store, run, tmp_path / "curves.png", optimum)
    panels = len(metric_families(list(run.data.metrics)))
    assert {"train_img", "train_grad_norm", "train_embedding_cosine"} <= set(metric_families(list(run.data.metrics)))
    width, height = Image.open(path).size
    assert width == min(panels, 3) * PANEL_PX[0] and height == -(-panels // 3) * PANEL_PX[1]


def test_free_embeddings_reach_the_single_label_minimum_and_the_joint_optimum_costs():
    """2 patients x 2 slices, quantile crossing patient: alone, patient ID reaches log 3 (its bound); jointly
    both terms stay above what each reaches alone, since one embedding cannot group by both."""
    from metacontrast.reporting.joint_optimum import evaluate_terms, optimise_free_embeddings

    meta = {"patient_id": PATIENT, "slice_quantile": torch.tensor([0, 1, 0, 1])}
    batches = [[0, 1, 2, 3]]
    alone = {m: evaluate_terms(optimise_free_embeddings(meta, batches, [m], 0.1, 8, 400, 0.05), meta, batches, [m], 0.1)[m]
             for m in meta}
    assert alone["patient_id"] == pytest.approx(math.log(3), abs=1e-3)
    assert alone["slice_quantile"] == pytest.approx(math.log(3), abs=1e-3)
    joint = evaluate_terms(optimise_free_embeddings(meta, batches, list(meta), 0.1, 8, 400, 0.05), meta, batches, list(meta), 0.1)
    assert all(joint[m] > alone[m] + 0.1 for m in meta)
