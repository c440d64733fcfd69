"""Pictures of a results grid, made only from logged MLflow runs and the files those runs point to.

:func:`draw_pictures` writes PNG files (matplotlib, Agg) into ``out_dir`` (``results/<dataset>/figures``):

* ``curves_pretrain_<method>.png``: every per-epoch metric of the method's newest FINISHED pre-training
  run, one panel per family (the part of the name before ``/``): ``train_loss`` (the objective and one
  line per meta label), and for GCL ``train_img`` / ``train_pix`` (the image- and pixel-wise terms,
  Eqs. 1 and 5), ``train_cos`` / ``train_target`` (GradMitigator's cosines and their EMA targets,
  Alg. 1) and ``train_kept_positives`` (GradFilter, Eq. 8); x = epoch.  Each image-wise term is drawn with
  its chance level and minimum for its batches (dotted, dashed) and, from ``results/<dataset>/joint_optimum.json``
  (``scripts/joint_optimum.py``), its value at the joint optimum of the terms (dash-dotted); ``train_embedding_cosine``
  and ``train_grad_norm`` are :class:`~metacontrast.engines.PretrainDiagnostics`' spread and gradient norms.
* ``curves_finetune_<method>.png``: fine-tune training loss and validation Dice per epoch, one line per
  ``(L, seed)`` (colour = L, line style = seed).
* ``dice_vs_L.png``: :func:`metacontrast.reporting.dice_plot.plot_dice` of the evaluate runs.
* ``tsne_<method>.png``: t-SNE (van der Maaten and Hinton, JMLR 2008) of the pre-trained encoder's
  pooled bottleneck features (:func:`metacontrast.nets.heads.pooled_embedding`, unit vectors) of every
  slice of a few volumes, one panel per meta label of the manifest, points coloured by that label:
  the GCL paper's Fig. 6, which shows how the meta labels organise the learned representation.
* ``overlays_<method>.png``: a few test slices, one row each: image, ground truth, and the prediction
  the evaluate run saved (``predictions/<volume_id>.nii.gz``), labels drawn over the image.

Where things are found.  The pre-training run's ``config.json`` artifact gives the manifest, the
preprocessing and ``num_partitions``; its ``encoder.pt`` artifact the weights (loaded weights-only).  The
evaluate run's ``ckpt`` param is ``<output_dir>/model.pt`` and the workflow writes its predictions to
``<output_dir>/evaluation/predictions/`` (the fine-tune folder of :class:`~metacontrast.layout.RunLayout`
is tried second).  Images and labels are read from ``dataset_dir``, which no run records.

The figures are drawn by :mod:`.curves`, :mod:`.tsne` and :mod:`.overlays` on :mod:`.figures`' fixed-size
panels, so a figure's size says how many panels it holds.  A figure that cannot be drawn (no run, a missing file) is skipped with a message
naming what is missing; :class:`Pictures` lists the drawn files and those messages.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .. import REPO_ROOT
from ..data.dicom import load_volume
from ..data.slices import build_slice_cache
from ..data.transforms import DEFAULT_NUM_PARTITIONS
from ..layout import ENCODER_FILE, RunLayout
from ..tracking import RunStore
from ..workflows.data import cap, preprocessing_settings, read_manifest
from .curves import plot_finetune_curves, plot_pretrain_curves
from .grid import method_names, parse_method
from .overlays import choose_overlay_slices, plot_overlays, predictions_dir
from .dice_plot import plot_dice
from .results import collect_evaluate_runs
from .tables import aggregate
from .tsne import EncoderEmbedding, meta_colourings, plot_tsne, tsne

__all__ = ["Pictures", "draw_pictures"]


def _newest_per_combination(runs: Sequence[Any]) -> list[Any]:
    """The newest run of each ``(num_labeled, seed)`` (``runs`` newest first), sorted by L then seed."""
    chosen: dict[tuple[int, int], Any] = {}
    for run in runs:
        try:
            key = (int(run.data.tags["num_labeled"]), int(run.data.tags["seed"]))
        except (KeyError, ValueError):
            continue
        chosen.setdefault(key, run)
    return [chosen[k] for k in sorted(chosen)]


def _manifest_path(datalist: str) -> Path:
    path = Path(datalist)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


@dataclass
class Pictures:
    """What :func:`draw_pictures` made: ``figures[name] = path`` and one message per figure it could not draw."""

    figures: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


class _Drawer:
    """Draws each figure of :func:`draw_pictures`; a figure that fails is recorded in ``pictures.missing``."""

    def __init__(self, store: RunStore, out_dir: Path, dataset_dir: str, runs_dir: Path, seed: int) -> None:
        self.store, self.out_dir, self.dataset_dir, self.runs_dir, self.seed = store, out_dir, dataset_dir, runs_dir, seed
        self.pictures = Pictures()
        self.joint_optimum: dict[str, Any] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="metacontrast-pictures-")

    def attempt(self, name: str, draw: Any, *args: Any) -> None:
        try:
            self.pictures.figures[name] = draw(*args, self.out_dir / f"{name}.png")
            print(f"[pictures] {self.pictures.figures[name]}", flush=True)
        except (LookupError, FileNotFoundError, ValueError) as err:
            message = f"{name}.png not drawn: {err}"
            self.pictures.missing.append(message)
            print(f"[pictures] {message}", flush=True)

    def _require_dataset_dir(self, what: str) -> Path:
        if not self.dataset_dir or not Path(self.dataset_dir).is_dir():
            raise FileNotFoundError(f"{what} reads the scans, but dataset_dir {self.dataset_dir!r} is not a folder (pass --dataset_dir)")
        return Path(self.dataset_dir)

    def pretrain_run(self, pretraining: str) -> Any:
        """The newest FINISHED pre-training tagged ``pretraining``, a row's :attr:`MethodSpec.pretraining` (``gcl`` for
        ``gcl+x@y``, ``gcl/naive_sum`` for ``gcl/naive_sum@y``)."""
        runs = self.store.runs("pretrain", method=pretraining)
        if not runs:
            raise LookupError(f"no FINISHED pretrain run tagged method={pretraining!r}, dataset={self.store.dataset!r} in {self.store.tracking_uri}")
        return runs[0]

    def pretrain_curves(self, pretraining: str, path: Path) -> Path:
        return plot_pretrain_curves(self.store, self.pretrain_run(pretraining), path, self.joint_optimum)

    def finetune_curves(self, method: str, path: Path) -> Path:
        runs = _newest_per_combination(self.store.runs("finetune", method=method))
        if not runs:
            raise LookupError(f"no FINISHED finetune run tagged method={method!r}, dataset={self.store.dataset!r} with num_labeled and seed")
        return plot_finetune_curves(self.store, runs, path, method)

    def dice_vs_l(self, methods: Sequence[str], path: Path) -> Path:
        rows = collect_evaluate_runs(self.store.tracking_uri, self.store.dataset, methods, self.store.experiment_name)
        if not rows:
            raise LookupError(f"no FINISHED evaluate runs of {list(methods)} on {self.store.dataset!r}")
        return plot_dice(aggregate(rows), path, self.store.dataset, [m for m in methods if any(r["method"] == m for r in rows)])

    def tsne(self, pretraining: str, split: str, num_volumes: int, path: Path) -> Path:
        run = self.pretrain_run(pretraining)
        dataset_dir = self._require_dataset_dir("the t-SNE")
        folder = Path(self._tmp.name) / run.info.run_id
        config = json.loads(self.store.artifact(run, "config.json", folder).read_text())
        encoder = EncoderEmbedding(self.store.artifact(run, ENCODER_FILE, folder))
        manifest = read_manifest(_manifest_path(config["datalist"]))
        entries = cap(manifest.get(split, []), num_volumes)
        if not entries:
            raise LookupError(f"split {split!r} of {config['datalist']} has no volume to embed")
        settings = preprocessing_settings(manifest, config.get("preprocessing_overrides"), config.get("dataset", self.store.dataset))
        cache = build_slice_cache(entries, dataset_dir, settings["pixel_size"], settings["spatial_size"],
                                  num_partitions=int(config.get("num_partitions", DEFAULT_NUM_PARTITIONS)),
                                  with_labels=False, progress=False, num_workers=0)  # fmt: skip
        coords = tsne(encoder(cache.images).numpy(), self.seed)
        title = f"{pretraining}: t-SNE of pooled encoder features, {len(coords)} slices of {len(entries)} {split} volumes"
        return plot_tsne(coords, meta_colourings(cache, manifest["meta_labels"]), path, title)

    def evaluate_run(self, method: str, num_labeled: int | None, seed: int) -> Any:
        runs = _newest_per_combination(self.store.runs("evaluate", method=method))
        if num_labeled is None and runs:
            num_labeled = max(int(r.data.tags["num_labeled"]) for r in runs)
        runs = [r for r in runs if int(r.data.tags["num_labeled"]) == num_labeled]
        match = [r for r in runs if int(r.data.tags["seed"]) == seed] or runs
        if not match:
            raise LookupError(f"no FINISHED evaluate run tagged method={method!r}, dataset={self.store.dataset!r}"
                              + (f", num_labeled={num_labeled}" if num_labeled is not None else ""))  # fmt: skip
        return match[0]

    def overlays(self, method: str, num_labeled: int | None, seed: int, count: int, path: Path) -> Path:
        run = self.evaluate_run(method, num_labeled, seed)
        dataset_dir = self._require_dataset_dir("the overlays")
        predictions = predictions_dir(run, self.runs_dir, self.store.dataset)
        manifest = read_manifest(_manifest_path(run.data.params.get("datalist", f"data_manifests/{self.store.dataset}.json")))
        split = run.data.params.get("split", "test")
        entries = [e for e in manifest[split] if (predictions / f"{e['volume_id']}.nii.gz").is_file()]
        if not entries:
            raise FileNotFoundError(f"{predictions} holds no prediction of a {split} volume of the manifest")
        entries = entries[:count]
        labels = {e["volume_id"]: np.asarray(load_volume(dataset_dir / e["label"])).round().astype(np.int16) for e in entries}
        tiles = []
        for vid, z in choose_overlay_slices(labels, count):
            entry = next(e for e in entries if e["volume_id"] == vid)
            image = np.asarray(load_volume(dataset_dir / entry["image"]))
            pred = np.asarray(nib.load(predictions / f"{vid}.nii.gz").dataobj)
            if pred.shape != labels[vid].shape:
                raise ValueError(f"prediction {predictions / f'{vid}.nii.gz'} has shape {pred.shape}, its label {labels[vid].shape}")
            tiles.append((vid, z, image[..., z], labels[vid][..., z], pred[..., z]))
        tags = run.data.tags
        title = f"{method}, L={tags['num_labeled']} seed={tags['seed']}: {split} slices (evaluate run {run.info.run_name})"
        return plot_overlays(tiles, {int(k): v for k, v in manifest["labels"].items()}, path, title)

    def close(self) -> None:
        self._tmp.cleanup()


def draw_pictures(
    dataset: str = "acdc",
    dataset_dir: str = "",
    tracking_uri: str = "",
    runs_dir: str = "runs",
    out_dir: str = "",
    methods: Sequence[str] | None = None,
    experiment_name: str | None = "",
    tsne_split: str = "pretrain",
    tsne_volumes: int = 8,
    overlay_slices: int = 4,
    overlay_labeled: int | None = None,
    overlay_seed: int = 0,
    seed: int = 0,
    joint_optimum: str = "",
    num_threads: int = 0,
) -> Pictures:
    """Draw every picture of a grid's runs into ``out_dir``.

    Args:
        dataset: the ``dataset`` tag of the runs (and the manifest name).
        dataset_dir: the raw data folder the manifest's paths are relative to (t-SNE and overlays read scans).
        tracking_uri: the grid's MLflow store; empty: :meth:`~metacontrast.layout.RunLayout.store_uri`'s.
        runs_dir: the grid's runs folder (default store; second place to look for predictions).
        out_dir: where the PNG files go; empty: ``results/<dataset>/figures``.
        methods: which methods (e.g. ``["random", "gcl"]``); ``None``: every method of the dataset's runs.
        experiment_name: the experiment whose runs are drawn; empty: ``metacontrast-<dataset>``, the one every
            workflow logs to (the probes' frozen fine-tunes, in ``...-probe-finetunes``, are not the grid's);
            ``None``: every experiment of the store.
        tsne_split: the manifest split whose volumes the t-SNE embeds (every slice of each).
        tsne_volumes: how many volumes of ``tsne_split`` (the first ones).
        overlay_slices: rows of the overlay figures (test slices with ground truth, spread over volumes).
        overlay_labeled: the L of the evaluate run shown (``None``: the largest L logged for the method).
        overlay_seed: its seed (absent: the lowest seed logged).
        seed: the t-SNE's random state.
        joint_optimum: ``scripts/joint_optimum.py``'s JSON, drawn in the pre-training curves; empty:
            ``results/<dataset>/joint_optimum.json`` when it exists.
        num_threads: torch's CPU threads for the t-SNE embeddings (``0``: torch's default).

    Returns:
        :class:`Pictures`: the files drawn and one message per figure that could not be drawn.

    Raises:
        LookupError: the store holds no FINISHED run of ``dataset`` (or of any of ``methods``).
    """
    runs_path = Path(runs_dir)
    layout = RunLayout(runs_path, dataset)
    uri = tracking_uri or layout.store_uri()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    store = RunStore(uri, dataset, layout.experiment_name if experiment_name == "" else experiment_name)
    found = store.methods()
    if not found:
        raise LookupError(f"no FINISHED run of dataset {dataset!r} in {uri}")
    methods = list(found if methods is None else method_names(methods))
    absent = [m for m in methods if m not in found]
    if len(absent) == len(methods):
        raise LookupError(f"no FINISHED run of methods {absent} on {dataset!r} in {uri}; it has runs of {found}")
    drawer = _Drawer(store, Path(out_dir or Path("results") / dataset / "figures"), dataset_dir, runs_path, seed)
    drawer.pictures.missing += [f"method {m!r}: no FINISHED run of dataset {dataset!r} in {uri}" for m in absent]
    optimum_path = Path(joint_optimum) if joint_optimum else REPO_ROOT / "results" / dataset / "joint_optimum.json"
    if joint_optimum or optimum_path.is_file():
        drawer.joint_optimum = json.loads(optimum_path.read_text())
    try:
        drawer.attempt("dice_vs_L", drawer.dice_vs_l, [m for m in methods if m not in absent])
        # 'gcl+mean_teacher' and 'gcl@improved' fine-tune GCL's encoder: its pre-training pictures are drawn once
        pretrainings = dict.fromkeys(parse_method(m).pretraining for m in methods if m not in absent)
        for base in (b for b in pretrainings if b is not None):  # random init has no pre-training
            name = base.replace("/", "-")
            drawer.attempt(f"curves_pretrain_{name}", drawer.pretrain_curves, base)
            drawer.attempt(f"tsne_{name}", drawer.tsne, base, tsne_split, tsne_volumes)
        for method in (m for m in methods if m not in absent):
            name = method.replace("/", "-")
            drawer.attempt(f"curves_finetune_{name}", drawer.finetune_curves, method)
            drawer.attempt(f"overlays_{name}", drawer.overlays, method, overlay_labeled, overlay_seed, overlay_slices)
    finally:
        drawer.close()
    return drawer.pictures
