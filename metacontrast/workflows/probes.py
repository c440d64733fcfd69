"""Representation probes: what a frozen encoder already knows, measured without training it.

Pre-training settings are decided on these numbers, so every probe is deterministic for a given
encoder and seed and uses only volumes outside the pre-training split:

* :class:`KNNProbe` -- cosine k-NN accuracy of a meta label (slice quantile, cardiac phase) from the
  pooled encoder output, fitted on the ``train`` volumes' slices and scored on the ``test`` volumes';
* :func:`patient_retrieval` -- for each ``test`` slice, is its nearest slice of another volume and another
  slice quantile from the same patient (top-1 retrieval accuracy);
* :func:`mean_pairwise_cosine` -- the spread of the pooled encoder output (1 = collapsed);
* :class:`FrozenFinetune` -- decoder-only fine-tunes through the shared fine-tune workflow
  (``freeze_encoder``, the GCL paper's Table 3 "frozen" row) at a few L, scored by 3D Dice on ``val`` and
  ``test`` (:func:`volume_dice`).

The pooled encoder output of a slice is ``z = GAP(f) / ||GAP(f)||`` with ``f`` the deepest encoder features
(:func:`metacontrast.nets.pooled_embedding`), computed in eval mode without gradients.  The random
encoder (method ``random``) is initialised under the seed and saved as ``encoder.pt`` in the probe's
output folder, so its frozen fine-tunes start from exactly the weights its k-NN probes measured.
:func:`run_probe` runs them all for one encoder and logs the metrics to the probe's MLflow run
(``bundles/common/configs/probe.json``); :mod:`metacontrast.reporting.probe_grid` runs many encoders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import run as run_bundle
from monai.inferers import SliceInferer
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from .. import REPO_ROOT
from ..data.slices import SliceCache, build_slice_cache
from ..io import atomic_torch_save, atomic_write
from ..layout import ENCODER_FILE
from ..nets import SegmentationUNet, encoder_state_dict, pooled_embedding
from ..errors import ConfigError
from ..tracking import TrackingRun
from .checkpoints import initialise_encoder, load_checkpoint
from .data import VolumeDataset, cap, preprocessing_settings, read_manifest

FINETUNE_CONFIG = REPO_ROOT / "bundles" / "common" / "configs" / "finetune.json"


class ProbeData:
    """The labelled slices the probes read: the k-NN ``fit_split`` and ``score_split`` and the Dice splits.

    Args:
        datalist, dataset_dir, dataset, preprocessing_overrides, cache_dir: as :class:`FinetuneData`
            (the same disk cache, so the fine-tunes and the probes preprocess each volume once).
        fit_split: the volumes k-NN neighbours come from.  score_split: the volumes k-NN and retrieval score.
        dice_splits: the volumes the frozen fine-tunes are scored on.
        max_volumes: the first ``max_volumes`` volumes of each split (0 = all), as in fine-tuning.
    Attributes:
        caches: ``{split: SliceCache}`` with labels, for every split named above.
        labels: the manifest's class names.  meta_labels: the manifest's meta labels.
    """

    def __init__(self, datalist: str, dataset_dir: str, dataset: str, fit_split: str = "train", score_split: str = "test",
                 dice_splits: Sequence[str] = ("val", "test"), max_volumes: int = 0,
                 preprocessing_overrides: dict | None = None, cache_dir: str = "") -> None:
        manifest = read_manifest(datalist)
        if "pretrain" in (fit_split, score_split, *dice_splits):
            raise ConfigError("probes never read the pre-training split: the encoder has seen those volumes")
        self.labels: dict[str, str] = manifest["labels"]
        self.meta_labels: list[str] = list(manifest["meta_labels"])
        self.fit_split, self.score_split, self.dice_splits = fit_split, score_split, list(dice_splits)
        settings = preprocessing_settings(manifest, preprocessing_overrides, dataset)
        self.caches: dict[str, SliceCache] = {}
        for split in dict.fromkeys([fit_split, score_split, *dice_splits]):
            entries = cap(manifest[split], max_volumes)
            if not entries:
                raise ConfigError(f"split {split!r} of {datalist} is empty: the probes need it")
            self.caches[split] = build_slice_cache(entries, dataset_dir, settings["pixel_size"], settings["spatial_size"],
                                                   with_labels=True, cache_dir=cache_dir or None)


def prepare_encoder(network: SegmentationUNet, pretrained_ckpt: str, output_dir: str, method: str) -> str:
    """Load ``pretrained_ckpt`` into ``network``, or (empty: the random encoder) save the network's own seeded
    initial encoder as ``<output_dir>/encoder.pt``; returns the encoder file the frozen fine-tunes start from."""
    if pretrained_ckpt:
        initialise_encoder(network, pretrained_ckpt)
        return str(pretrained_ckpt)
    path = Path(output_dir) / ENCODER_FILE
    atomic_torch_save({"state_dict": encoder_state_dict(network), "network": {"features": list(network.features)},
                       "method": method}, path)
    return str(path)


@torch.no_grad()
def encode_slices(network: SegmentationUNet, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pooled encoder output of every slice: (N, 1, H, W) -> (N, D) unit vectors, D = ``features[-1]``.

    ``z = GAP(f) / ||GAP(f)||`` of the deepest encoder features ``f`` (B, D, H/16, W/16), network in eval mode.
    """
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    try:
        return torch.cat([pooled_embedding(network.encode(batch.to(device))[-1]).cpu() for batch in images.split(batch_size)])
    finally:
        network.train(was_training)


def centre(reference: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract ``reference``'s mean row from ``reference`` and ``others`` and renormalise: (N, D) -> (N, D).

    A direction shared by every embedding carries no information but dominates raw cosines of a nearly
    collapsed encoder; centring on the fit set removes it before neighbours are ranked.
    """
    mean = reference.mean(dim=0, keepdim=True)
    return [torch.nn.functional.normalize(z - mean, dim=1) for z in (reference, *others)]


class KNNProbe:
    """Cosine k-NN classification of a label from embeddings.

    Each scored row ``i`` takes its ``k`` fit rows of highest cosine ``s_ij = z_i . z_j`` (ties: lower index)
    and predicts ``argmax_c sum_{r < k} [y_{n_r} = c] (1 + 2^-(r+1))``: the majority label, a tie going to
    the tied label whose member ranks nearest.  Accuracy = mean over scored rows of ``[pred_i = y_i]``.

    Args:
        k: neighbours.  centre_features: centre both sets on the fit set's mean first (:func:`centre`).
    """

    def __init__(self, k: int = 10, centre_features: bool = True) -> None:
        if k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {k}")
        self.k, self.centre_features = int(k), bool(centre_features)

    def predict(self, fit_z: torch.Tensor, fit_y: torch.Tensor, score_z: torch.Tensor) -> torch.Tensor:
        """``fit_z`` (N, D), ``fit_y`` (N,) int, ``score_z`` (M, D) -> predicted labels (M,)."""
        if self.centre_features:
            fit_z, score_z = centre(fit_z, score_z)
        k = min(self.k, len(fit_z))
        similarity = score_z @ fit_z.T                                     # (M, N)
        order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]
        votes = torch.nn.functional.one_hot(fit_y[order], int(fit_y.max()) + 1).double()   # (M, k, C)
        weights = 1.0 + 0.5 ** torch.arange(1, k + 1, dtype=torch.float64)  # (k,)
        return (votes * weights[None, :, None]).sum(dim=1).argmax(dim=1)

    def accuracy(self, fit_z: torch.Tensor, fit_y: torch.Tensor, score_z: torch.Tensor, score_y: torch.Tensor) -> float:
        return float((self.predict(fit_z, fit_y, score_z) == score_y).double().mean())


def majority_rate(labels: torch.Tensor) -> float:
    """Chance level of a classifier that always says the most frequent label: max_c mean [y = c]."""
    return float(torch.bincount(labels).max() / len(labels))


def patient_retrieval(z: torch.Tensor, meta: Mapping[str, torch.Tensor],
                      exclude: Sequence[str] = ("volume_index", "slice_quantile")) -> dict[str, float]:
    """Top-1 patient retrieval: is a slice's nearest candidate (by cosine of ``z`` (N, D)) from its patient?

    The candidates of slice ``i`` are the slices ``j != i`` that share none of the ``exclude`` meta labels
    with it.  The default leaves out its own volume and its own slice quantile: the same patient's other
    volume at the same position (ACDC: the other cardiac phase) is nearly the same image, found by any
    encoder (a random one scores about 0.98), so the probe asks for the patient at *another* position.
    Only slices with at least one same-patient candidate are scored.

    Returns ``{"accuracy", "chance", "n"}``: hit rate, the mean share of same-patient candidates (what a
    random pick scores), and the number of scored slices (``n = 0``: no such slice; NaNs).
    """
    n = len(z)
    candidate = ~torch.eye(n, dtype=torch.bool)
    for key in exclude:
        candidate &= meta[key][:, None] != meta[key][None, :]
    same_patient = (meta["patient_id"][:, None] == meta["patient_id"][None, :]) & candidate
    scored = same_patient.any(dim=1)
    if not bool(scored.any()):
        return {"accuracy": float("nan"), "chance": float("nan"), "n": 0}
    nearest = (z @ z.T).masked_fill(~candidate, float("-inf")).argmax(dim=1)
    hits = meta["patient_id"][nearest] == meta["patient_id"]
    chance = same_patient.sum(dim=1).double() / candidate.sum(dim=1).double()
    return {"accuracy": float(hits[scored].double().mean()), "chance": float(chance[scored].mean()), "n": int(scored.sum())}


def mean_pairwise_cosine(z: torch.Tensor) -> float:
    """Mean cosine over pairs ``i != j`` of unit rows ``z`` (N, D): 1 when every embedding is the same."""
    n = len(z)
    return float(((z @ z.T).sum() - n) / max(n * (n - 1), 1))


@torch.no_grad()
def volume_dice(network: torch.nn.Module, cache: SliceCache, num_classes: int, batch_size: int = 64) -> float:
    """3D Dice on the preprocessed grid, averaged over foreground classes per volume, then over volumes.

    ``Dice_c = 2 |P_c & G_c| / (|P_c| + |G_c|)`` per volume and foreground class ``c`` (a class absent from a
    volume's ground truth is left out of that volume's mean, as ``monai.metrics.DiceMetric`` does); the
    prediction ``P`` is the argmax of the 2D network run slice by slice (``monai.inferers.SliceInferer``).
    """
    network.eval()
    device = next(network.parameters()).device
    spatial = tuple(cache.images.shape[-2:])
    inferer = SliceInferer(roi_size=spatial, sw_batch_size=batch_size, spatial_dim=2, progress=False)
    metric = DiceMetric(include_background=False, reduction="mean")
    for item in VolumeDataset(cache):
        pred = inferer(item["image"][None].to(device), network).argmax(dim=1, keepdim=True).cpu()
        metric(one_hot(pred, num_classes), one_hot(item["label"][None].long(), num_classes))
    return float(metric.aggregate())


class FrozenFinetune:
    """Decoder-only fine-tunes of one encoder through the shared fine-tune workflow, scored by 3D Dice.

    For each ``L`` in ``labeled`` the fine-tune bundle (``bundles/common/configs/finetune.json``) runs with
    ``freeze_encoder`` true, the encoder file as ``pretrained_ckpt``, ``overrides`` (the probe's data, network
    and MLflow settings, its iteration count and ``recipe``) and ``output_dir = <output_dir>/frozen_L<L>``;
    the weights in ``checkpoint`` (default the final ones: no model selection on a two-volume ``val``) are
    then scored by :func:`volume_dice` on every split of ``data.dice_splits``.

    Args:
        labeled: the L values.  overrides: ``--key value`` pairs for every fine-tune.  recipe: the fine-tune
            settings of the probe (learning rate, batch size ...), applied over ``overrides``.
        checkpoint: the file of ``<output_dir>/frozen_L<L>`` that is scored.
        draws: labelled-volume draws per probe seed.  At L = 1 the volume drawn moves frozen Dice more than
            the encoder does (the random encoder's std over seeds was 0.10 on ACDC), so each L is fine-tuned
            ``draws`` times, draw ``d`` with fine-tune seed ``seed * draws + d`` (one draw: the probe's own
            seed, the folder ``frozen_L<L>``; several: ``frozen_L<L>_draw<d>``), and the Dice is their mean.
            Every encoder probed at one seed gets the same draws, so gains over the reference stay paired.
    """

    def __init__(self, labeled: Sequence[int], overrides: Mapping[str, Any], recipe: Mapping[str, Any] | None = None,
                 checkpoint: str = "model_final.pt", draws: int = 1) -> None:
        if int(draws) < 1:
            raise ConfigError(f"frozen_draws must be >= 1, got {draws}")
        self.labeled = [int(num) for num in labeled]
        self.overrides = {**overrides, **(recipe or {}), "freeze_encoder": True, "semi_supervised": "none"}
        self.checkpoint = checkpoint
        self.draws = int(draws)

    def draw_seeds(self, seed: int) -> list[int]:
        """The fine-tune seeds of probe seed ``seed``: ``seed * draws + d`` for ``d < draws`` (disjoint across seeds)."""
        return [int(seed) * self.draws + draw for draw in range(self.draws)]

    def run(self, encoder: str, network: SegmentationUNet, data: ProbeData, output_dir: str) -> dict[str, float]:
        """Fine-tune and score; returns ``{"frozen_L<L>_<split>_dice": mean over draws}`` and, with several
        draws, each draw's ``frozen_L<L>_<split>_dice_draw<d>``.  ``network`` is only a scratch model of the
        fine-tune's architecture into which each result is loaded."""
        metrics: dict[str, float] = {}
        for num in self.labeled:
            scores: dict[str, list[float]] = {split: [] for split in data.dice_splits}
            for draw, seed in enumerate(self.draw_seeds(int(self.overrides.get("seed", 0)))):
                out = Path(output_dir) / (f"frozen_L{num}" if self.draws == 1 else f"frozen_L{num}_draw{draw}")
                run_bundle(config_file=str(FINETUNE_CONFIG), **{**self.overrides, "num_labeled": num, "seed": seed,
                                                                "pretrained_ckpt": encoder, "output_dir": str(out)})
                network.load_state_dict(load_checkpoint(out / self.checkpoint))
                for split in data.dice_splits:
                    scores[split].append(volume_dice(network, data.caches[split], len(data.labels)))
            for split, values in scores.items():
                metrics[f"frozen_L{num}_{split}_dice"] = sum(values) / len(values)
                if self.draws > 1:
                    metrics.update({f"frozen_L{num}_{split}_dice_draw{d}": v for d, v in enumerate(values)})
        return metrics


def representation_metrics(network: SegmentationUNet, data: ProbeData, knn: KNNProbe, probe_labels: Sequence[str],
                           retrieval_exclude: Sequence[str] = ("volume_index", "slice_quantile")) -> dict[str, float]:
    """The frozen-feature probes of one encoder: ``knn_<label>`` (and ``chance_<label>``) for each probe label,
    ``patient_retrieval`` (and its chance, and ``patient_retrieval_slices``), ``embedding_cosine``."""
    fit, score = data.caches[data.fit_split], data.caches[data.score_split]
    fit_z, score_z = encode_slices(network, fit.images), encode_slices(network, score.images)
    metrics: dict[str, float] = {"embedding_cosine": mean_pairwise_cosine(score_z)}
    for label in probe_labels:
        if label not in fit.meta or label == "patient_id":
            raise ConfigError(f"probe label {label!r} cannot be probed by k-NN (known: slice_quantile, organ_state)")
        metrics[f"knn_{label}"] = knn.accuracy(fit_z, fit.meta[label], score_z, score.meta[label])
        metrics[f"chance_{label}"] = majority_rate(score.meta[label])
    retrieval_z = centre(fit_z, score_z)[1] if knn.centre_features else score_z
    retrieval = patient_retrieval(retrieval_z, score.meta, retrieval_exclude)
    if retrieval["n"]:
        metrics.update(patient_retrieval=retrieval["accuracy"], chance_patient_retrieval=retrieval["chance"],
                       patient_retrieval_slices=retrieval["n"])
    return metrics


def run_probe(tracking: TrackingRun, network: SegmentationUNet, data: ProbeData, knn: KNNProbe, frozen: FrozenFinetune,
              encoder: str, probe_labels: Sequence[str], output_dir: str,
              retrieval_exclude: Sequence[str] = ("volume_index", "slice_quantile")) -> dict[str, float]:
    """Every probe of one encoder: logged as ``probe_<name>`` metrics of ``tracking`` (then ended), written
    to ``<output_dir>/probes.json``, printed; the run is marked FAILED if anything raises."""
    try:
        metrics = representation_metrics(network, data, knn, probe_labels, retrieval_exclude)
        metrics.update(frozen.run(encoder, network, data, output_dir))
    except BaseException:
        tracking.end("FAILED")
        raise
    logged = {f"probe_{name}": value for name, value in sorted(metrics.items())}
    tracking.log_metrics(logged)
    with atomic_write(Path(output_dir) / "probes.json") as handle:
        json.dump(logged, handle, indent=1, sort_keys=True)
        handle.write("\n")
    tracking.end()
    print("probes: " + ", ".join(f"{k} {v:.3f}" for k, v in logged.items()) + f"; MLflow run {tracking.run_id}")
    return logged
