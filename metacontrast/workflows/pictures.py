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
* ``dice_vs_L.png``: :func:`metacontrast.workflows.results.plot_dice` of the evaluate runs.
* ``tsne_<method>.png``: t-SNE (van der Maaten and Hinton, JMLR 2008) of the pre-trained encoder's
  pooled bottleneck features (:func:`metacontrast.nets.heads.pooled_embedding`, unit vectors) of every
  slice of a few volumes, one panel per meta label of the manifest, points coloured by that label:
  the GCL paper's Fig. 6, which shows how the meta labels organise the learned representation.
* ``overlays_<method>.png``: a few test slices, one row each: image, ground truth, and the prediction
  the evaluate run saved (``predictions/<volume_id>.nii.gz``), labels drawn over the image.

Where things are found.  The pre-training run's ``config.json`` artifact gives the manifest, the
preprocessing and ``num_partitions``; its ``encoder.pt`` artifact the weights (loaded weights-only).  The
evaluate run's ``ckpt`` param is ``<output_dir>/model.pt`` and the workflow writes its predictions to
``<output_dir>/evaluation/predictions/`` (the grid's layout ``<runs_dir>/<dataset>/<method>/L<L>_seed<seed>``
is tried second).  Images and labels are read from ``dataset_dir``, which no run records.

Every panel has a fixed size in pixels (:data:`PANEL_PX`, :data:`TILE_PX`), so a figure's size says how
many panels it holds.  A figure that cannot be drawn (no run, a missing file) is skipped with a message
naming what is missing; :class:`Pictures` lists the drawn files and those messages.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import REPO_ROOT
from ..io import atomic_write
from .method_name import split_method_name

__all__ = [
    "DPI",
    "EncoderEmbedding",
    "PANEL_PX",
    "Pictures",
    "RunStore",
    "TILE_PX",
    "choose_overlay_slices",
    "draw_pictures",
    "metric_families",
    "plot_finetune_curves",
    "plot_overlays",
    "plot_pretrain_curves",
    "plot_tsne",
    "tsne",
]

DPI = 100
#: (width, height) in pixels of one curve or t-SNE panel
PANEL_PX = (360, 300)
#: side in pixels of one overlay tile
TILE_PX = 220
#: at most this many curve panels side by side
MAX_COLUMNS = 3


# ----------------------------------------------------------------------------------------------
# reading the store
# ----------------------------------------------------------------------------------------------


@dataclass
class RunStore:
    """The read side of a grid's MLflow store: FINISHED runs of one dataset, metric histories, artifacts.

    Nothing is written to the store; artifacts are copied into a temporary folder to be read.
    """

    tracking_uri: str
    dataset: str
    experiment_name: str | None = None

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise ValueError("tracking_uri is required (e.g. sqlite:///runs/<dataset>/mlruns.db)")
        if self.tracking_uri.startswith("sqlite:///") and not Path(self.tracking_uri[len("sqlite:///"):]).is_file():
            raise FileNotFoundError(f"MLflow store {self.tracking_uri[len('sqlite:///'):]} does not exist")
        from .tracking import _client

        self._client = _client(self.tracking_uri)

    def runs(self, workflow: str, **tags: Any) -> list[Any]:
        """FINISHED runs tagged ``workflow``, ``dataset`` and ``tags``, newest first."""
        from .tracking import completed_runs

        return completed_runs(self.tracking_uri, self.experiment_name, {"workflow": workflow, "dataset": self.dataset, **tags})

    def methods(self) -> list[str]:
        """Every ``method`` tag of the dataset's FINISHED runs, sorted (``random`` first)."""
        from .tracking import completed_runs

        found = {r.data.tags.get("method", "") for r in completed_runs(self.tracking_uri, self.experiment_name, {"dataset": self.dataset})}
        return sorted(found - {""}, key=lambda m: (m != "random", m))

    def history(self, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a metric, ordered by step (the last value of a repeated step)."""
        points = {m.step: m.value for m in sorted(self._client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))}
        steps = np.asarray(sorted(points), dtype=float)
        return steps, np.asarray([points[s] for s in sorted(points)], dtype=float)

    def artifact(self, run: Any, name: str, dst: str | os.PathLike[str]) -> Path:
        """Copy artifact ``name`` of ``run`` into ``dst``; a missing one is named in a ``FileNotFoundError``."""
        names = {a.path for a in self._client.list_artifacts(run.info.run_id)}
        if name not in names:
            raise FileNotFoundError(
                f"run {run.info.run_id} ({run.info.run_name}) has no artifact {name!r} (it has {sorted(names)})"
            )
        return Path(self._client.download_artifacts(run.info.run_id, name, str(dst)))


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


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _figure(rows: int, cols: int, panel_px: tuple[int, int], path: str | os.PathLike[str]) -> Iterator[tuple[Any, np.ndarray]]:
    """A figure of ``rows x cols`` panels of ``panel_px`` pixels each, saved to ``path`` as PNG on exit.

    The PNG is exactly ``(cols * panel_px[0], rows * panel_px[1])`` pixels; no time stamp is written.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_px[0] / DPI, rows * panel_px[1] / DPI), dpi=DPI, squeeze=False)
    try:
        yield fig, axes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)


def metric_families(keys: Sequence[str]) -> dict[str, list[str]]:
    """Per-epoch metric names grouped by the part before ``/``, loss families first.

    ``["train_loss", "train_loss/patient_id", "train_img/patient_id", "train_loss_iter"]`` ->
    ``{"train_loss": ["train_loss", "train_loss/patient_id"], "train_img": ["train_img/patient_id"]}``;
    per-iteration metrics (``*_iter``) are left out.
    """
    families: dict[str, list[str]] = {}
    for key in sorted(keys):
        if not key.endswith("_iter"):
            families.setdefault(key.split("/")[0], []).append(key)
    return dict(sorted(families.items(), key=lambda item: ("loss" not in item[0], item[0])))


def _grid_shape(panels: int) -> tuple[int, int]:
    cols = min(panels, MAX_COLUMNS)
    return math.ceil(panels / cols), cols


#: suffixes of a term's yardsticks (:mod:`metacontrast.losses.yardsticks`) and their line styles
YARDSTICK_STYLES = {"chance": ":", "min": "--", "joint": "-."}


def joint_optimum_for(run: Any, joint_optimum: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """The ``terms`` of a :mod:`~metacontrast.workflows.joint_optimum` result when it was computed for this run's
    settings (temperature and batch size, where the run logged them), else ``{}``."""
    if not joint_optimum:
        return {}
    params = run.data.params
    for key in ("temperature", "batch_size"):
        if key in params and key in joint_optimum and not math.isclose(float(params[key]), float(joint_optimum[key])):
            return {}
    return dict(joint_optimum.get("terms", {}))


def plot_pretrain_curves(store: RunStore, run: Any, path: str | os.PathLike[str], joint_optimum: Mapping[str, Any] | None = None) -> Path:
    """Every per-epoch metric of a pre-training run, one panel per :func:`metric_families` family.

    A term's logged yardsticks (``<term>/chance``, ``<term>/min``) are drawn in the term's colour, dotted and
    dashed; ``joint_optimum`` (``results/<dataset>/joint_optimum.json``) adds each term's value at the joint
    optimum as a dash-dotted horizontal line (and its chance level and minimum where the run did not log them).
    """
    families = metric_families(list(run.data.metrics))
    if not families:
        raise LookupError(f"pre-training run {run.info.run_id} ({run.info.run_name}) logged no per-epoch metric")
    joint = joint_optimum_for(run, joint_optimum)
    prefix = "train_"
    rows, cols = _grid_shape(len(families))
    with _figure(rows, cols, PANEL_PX, path) as (fig, axes):
        for ax, (family, keys) in zip(axes.flat, families.items()):
            colours: dict[str, Any] = {}
            for key in [k for k in keys if k.rpartition("/")[2] not in YARDSTICK_STYLES]:
                steps, values = store.history(run.info.run_id, key)
                (line,) = ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key.partition("/")[2] or "total")
                colours[key] = line.get_color()
            for key in [k for k in keys if k.rpartition("/")[2] in YARDSTICK_STYLES]:
                term, _, kind = key.rpartition("/")
                steps, values = store.history(run.info.run_id, key)
                ax.plot(steps, values, color=colours.get(term), linestyle=YARDSTICK_STYLES[kind], linewidth=0.8,
                        label=f"{term.partition('/')[2]} {kind}")
            for term, values in joint.items():
                key = prefix + term
                if key not in colours:
                    continue
                for kind, style in YARDSTICK_STYLES.items():
                    if kind in values and (kind == "joint" or f"{key}/{kind}" not in keys):
                        ax.axhline(values[kind], color=colours[key], linestyle=style, linewidth=0.8,
                                   label=f"{term.partition('/')[2]} {kind}{'' if kind == 'joint' else ' (joint_optimum.json)'}")
            ax.set_title(family, fontsize="medium")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="xx-small", loc="best")
        for ax in list(axes.flat)[len(families):]:
            ax.set_axis_off()
        fig.suptitle(f"{run.data.tags.get('method', '?')} pre-training ({run.info.run_name})", fontsize="medium")
        fig.tight_layout()
    return Path(path)


FINETUNE_CURVES = (("train_loss", "training loss"), ("val_mean_dice", "validation Dice"))


def plot_finetune_curves(store: RunStore, runs: Sequence[Any], path: str | os.PathLike[str], method: str) -> Path:
    """Training loss and validation Dice per epoch of fine-tune ``runs``: one line per (L, seed), colour = L."""
    plt = _pyplot()
    labeled = sorted({int(r.data.tags["num_labeled"]) for r in runs})
    seeds = sorted({int(r.data.tags["seed"]) for r in runs})
    styles = ["-", "--", ":", "-."]
    with _figure(1, len(FINETUNE_CURVES), PANEL_PX, path) as (fig, axes):
        for ax, (key, title) in zip(axes.flat, FINETUNE_CURVES):
            for run in runs:
                num_labeled, seed = int(run.data.tags["num_labeled"]), int(run.data.tags["seed"])
                steps, values = store.history(run.info.run_id, key)
                if len(steps):
                    ax.plot(steps, values, color=plt.cm.tab10(labeled.index(num_labeled) % 10),
                            linestyle=styles[seeds.index(seed) % len(styles)], marker="." if len(steps) < 30 else None,
                            label=f"L={num_labeled} seed={seed}")  # fmt: skip
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="xx-small", loc="best")
        fig.suptitle(f"{method}: fine-tuning", fontsize="medium")
        fig.tight_layout()
    return Path(path)


# ----------------------------------------------------------------------------------------------
# t-SNE of the encoder's embeddings
# ----------------------------------------------------------------------------------------------


class EncoderEmbedding:
    """A pre-trained encoder checkpoint as a map from slices to unit vectors.

    ``embedding(images)``: (N, 1, H, W) -> (N, D), ``D = features[-1]``: the deepest encoder features,
    global-average pooled and L2-normalised (:func:`~metacontrast.nets.heads.pooled_embedding`), i.e. the
    representation the image-wise contrast (GCL Eq. 1) compares before its projection head.
    """

    def __init__(self, checkpoint: str | os.PathLike[str], batch_size: int = 64) -> None:
        from ..nets import SegmentationUNet, load_pretrained
        from .checkpoints import load_checkpoint, norm_of, state_dict_of

        loaded = load_checkpoint(checkpoint)
        features = (loaded.get("network") or {}).get("features") if isinstance(loaded, dict) else None
        if not features:
            raise ValueError(f"checkpoint {checkpoint} does not say its network's 'features' (expected an encoder.pt of a pre-training run)")
        self.network = SegmentationUNet(features=features, norm=norm_of(loaded, checkpoint)).eval()
        load_pretrained(self.network, state_dict_of(loaded, checkpoint), source=f"encoder checkpoint {checkpoint}")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from ..nets import pooled_embedding

        return torch.cat([pooled_embedding(self.network.encode(batch)[-1]) for batch in images.split(self.batch_size)])


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE coordinates (scikit-learn, PCA initialisation, perplexity min(30, (N-1)/3)).

    Runs on one thread: for a few hundred points OpenMP threads only add overhead (10x slower on a busy
    two-core machine).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(points)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = min(30.0, (n - 1) / 3)
    with threadpool_limits(1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(points)


def plot_tsne(coords: np.ndarray, colourings: Mapping[str, tuple[np.ndarray, Sequence[str]]], path: str | os.PathLike[str],
              title: str) -> Path:
    """One panel per meta label: the (N, 2) ``coords`` coloured by ``colourings[label] = (codes (N,), names)``.

    Ordered labels (``slice_quantile``) use a sequential colour map, the others a qualitative one; the
    legend names the values (at most 12 listed).
    """
    plt = _pyplot()
    with _figure(1, len(colourings), PANEL_PX, path) as (fig, axes):
        for ax, (label, (codes, names)) in zip(axes.flat, colourings.items()):
            values = sorted(set(codes.tolist()))
            ordered = label in ("slice_quantile", "slice_position")
            cmap = plt.cm.viridis if ordered else (plt.cm.tab10 if len(values) <= 10 else plt.cm.tab20)
            for rank, value in enumerate(values):
                colour = cmap(rank / max(len(values) - 1, 1)) if ordered else cmap(rank % cmap.N)
                keep = codes == value
                ax.scatter(coords[keep, 0], coords[keep, 1], s=10, color=colour, label=str(names[value]) if rank < 12 else None)
            ax.set_title(f"{label} ({len(values)} values)", fontsize="medium")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize="xx-small", loc="best", markerscale=1.5)
        fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
    return Path(path)


def _meta_colourings(cache: Any, meta_labels: Sequence[str]) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{label: (codes, names)}`` from a :class:`~metacontrast.data.slices.SliceCache`'s meta tensors."""
    names_of = {"patient_id": list(cache.patient_names), "organ_state": list(cache.organ_state_names)}
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for label in meta_labels:
        if label not in cache.meta:
            raise KeyError(f"meta label {label!r} is not a slice meta key ({sorted(cache.meta)})")
        codes = cache.meta[label].cpu().numpy()
        out[label] = (codes, names_of.get(label, [str(v) for v in range(int(codes.max()) + 1)]))
    return out


# ----------------------------------------------------------------------------------------------
# prediction overlays
# ----------------------------------------------------------------------------------------------


def choose_overlay_slices(labels: Mapping[str, np.ndarray], count: int) -> list[tuple[str, int]]:
    """``count`` (volume_id, slice index) pairs with ground-truth foreground, spread over the volumes.

    ``labels[volume_id]`` is an (X, Y, Z) label map.  The volumes are taken in the given order, one slice
    each, then more from each in turn; a volume's slices are evenly spaced over its foreground slices.
    """
    foreground = {vid: np.flatnonzero(label.reshape(-1, label.shape[-1]).any(axis=0)) for vid, label in labels.items()}
    foreground = {vid: z for vid, z in foreground.items() if z.size}
    if not foreground:
        raise LookupError("no ground-truth foreground in any volume: nothing to overlay")
    vids = list(foreground)
    per_volume = [count // len(vids) + (k < count % len(vids)) for k in range(len(vids))]
    chosen = []
    for vid, n in zip(vids, per_volume):
        if n:
            z = foreground[vid]
            picks = np.unique(z[np.linspace(0, z.size - 1, n + 2)[1:-1].round().astype(int)])
            chosen += [(vid, int(k)) for k in picks]
    return chosen


def plot_overlays(tiles: Sequence[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]], class_names: Mapping[int, str],
                  path: str | os.PathLike[str], title: str) -> Path:
    """Rows of (image, ground truth, prediction) tiles; ``tiles`` = (volume_id, z, image, label, pred) 2D slices."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    classes = sorted(k for k in class_names if k > 0)
    colours = [plt.cm.tab10(k % 10) for k in range(max(classes, default=0) + 1)]
    cmap = ListedColormap(colours)
    with _figure(len(tiles), 3, (TILE_PX, TILE_PX), path) as (fig, axes):
        for row, (vid, z, image, label, pred) in enumerate(tiles):
            lo, hi = np.percentile(image, [1, 99])
            for col, (overlay, name) in enumerate(((None, "image"), (label, "ground truth"), (pred, "prediction"))):
                ax = axes[row, col]
                ax.imshow(np.rot90(image), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                if overlay is not None:
                    shown = np.ma.masked_equal(np.rot90(overlay).astype(int), 0)
                    ax.imshow(shown, cmap=cmap, vmin=0, vmax=len(colours) - 1, alpha=0.5, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name, fontsize="small")
                if col == 0:
                    ax.set_ylabel(f"{vid} z={z}", fontsize="x-small")
        fig.legend(handles=[Patch(color=colours[k], alpha=0.5, label=class_names[k]) for k in classes],
                   loc="lower center", ncol=max(len(classes), 1), fontsize="x-small", frameon=False)  # fmt: skip
        fig.suptitle(title, fontsize="small")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return Path(path)


def _predictions_dir(run: Any, runs_dir: Path, dataset: str) -> Path:
    """Where the evaluate ``run`` wrote its NIfTI predictions (see the module docstring)."""
    tags, params = run.data.tags, run.data.params
    candidates = []
    if params.get("ckpt"):
        candidates.append(Path(params["ckpt"]).parent / "evaluation" / "predictions")
    candidates.append(runs_dir / dataset / tags.get("method", "?") / f"L{tags.get('num_labeled')}_seed{tags.get('seed')}" / "evaluation" / "predictions")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"the predictions of evaluate run {run.info.run_id} ({run.info.run_name}) are not in {' nor '.join(map(str, candidates))}"
    )


def _manifest_path(datalist: str) -> Path:
    path = Path(datalist)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


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

    def pretrain_run(self, method: str) -> Any:
        """The newest FINISHED pre-training of a grid method: ``gcl/naive_sum+x@y`` was pre-trained as
        ``gcl/naive_sum``, or as ``gcl`` when the variant changes only fine-tuning (see ``grid.py``)."""
        parts = split_method_name(method)
        tried = list(dict.fromkeys([parts.pretrained_as, parts.bundle]))
        for name in tried:
            runs = self.store.runs("pretrain", method=name)
            if runs:
                return runs[0]
        raise LookupError(f"no FINISHED pretrain run tagged method in {tried}, dataset={self.store.dataset!r} in {self.store.tracking_uri}")

    def pretrain_curves(self, method: str, path: Path) -> Path:
        return plot_pretrain_curves(self.store, self.pretrain_run(method), path, self.joint_optimum)

    def finetune_curves(self, method: str, path: Path) -> Path:
        runs = _newest_per_combination(self.store.runs("finetune", method=method))
        if not runs:
            raise LookupError(f"no FINISHED finetune run tagged method={method!r}, dataset={self.store.dataset!r} with num_labeled and seed")
        return plot_finetune_curves(self.store, runs, path, method)

    def dice_vs_l(self, methods: Sequence[str], path: Path) -> Path:
        from .results import aggregate, collect_evaluate_runs, plot_dice

        rows = collect_evaluate_runs(self.store.tracking_uri, self.store.dataset, methods, self.store.experiment_name)
        if not rows:
            raise LookupError(f"no FINISHED evaluate runs of {list(methods)} on {self.store.dataset!r}")
        return plot_dice(aggregate(rows), path, self.store.dataset, [m for m in methods if any(r["method"] == m for r in rows)])

    def tsne(self, method: str, split: str, num_volumes: int, path: Path) -> Path:
        from ..data.slices import build_slice_cache
        from ..data.transforms import DEFAULT_NUM_PARTITIONS
        from .data import cap, preprocessing_settings, read_manifest

        run = self.pretrain_run(method)
        dataset_dir = self._require_dataset_dir("the t-SNE")
        folder = Path(self._tmp.name) / run.info.run_id
        config = json.loads(self.store.artifact(run, "config.json", folder).read_text())
        encoder = EncoderEmbedding(self.store.artifact(run, "encoder.pt", folder))
        manifest = read_manifest(_manifest_path(config["datalist"]))
        entries = cap(manifest.get(split, []), num_volumes)
        if not entries:
            raise LookupError(f"split {split!r} of {config['datalist']} has no volume to embed")
        settings = preprocessing_settings(manifest, config.get("preprocessing_overrides"), config.get("dataset", self.store.dataset))
        cache = build_slice_cache(entries, dataset_dir, settings["pixel_size"], settings["spatial_size"],
                                  num_partitions=int(config.get("num_partitions", DEFAULT_NUM_PARTITIONS)),
                                  with_labels=False, progress=False, num_workers=0)  # fmt: skip
        coords = tsne(encoder(cache.images).numpy(), self.seed)
        title = f"{method}: t-SNE of pooled encoder features, {len(coords)} slices of {len(entries)} {split} volumes"
        return plot_tsne(coords, _meta_colourings(cache, manifest["meta_labels"]), path, title)

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
        import nibabel as nib

        from ..data.dicom import load_volume
        from .data import read_manifest

        run = self.evaluate_run(method, num_labeled, seed)
        dataset_dir = self._require_dataset_dir("the overlays")
        predictions = _predictions_dir(run, self.runs_dir, self.store.dataset)
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
    experiment_name: str | None = None,
    tsne_split: str = "pretrain",
    tsne_volumes: int = 8,
    overlay_slices: int = 4,
    overlay_labeled: int | None = None,
    overlay_seed: int = 0,
    seed: int = 0,
    joint_optimum: str = "",
) -> Pictures:
    """Draw every picture of a grid's runs into ``out_dir``.

    Args:
        dataset: the ``dataset`` tag of the runs (and the manifest name).
        dataset_dir: the raw data folder the manifest's paths are relative to (t-SNE and overlays read scans).
        tracking_uri: the grid's MLflow store; empty: ``sqlite:///<runs_dir>/<dataset>/mlruns.db``.
        runs_dir: the grid's runs folder (default store; second place to look for predictions).
        out_dir: where the PNG files go; empty: ``results/<dataset>/figures``.
        methods: which methods (e.g. ``["random", "gcl"]``); ``None``: every method of the dataset's runs.
        experiment_name: restrict to one experiment (``None``: all).
        tsne_split: the manifest split whose volumes the t-SNE embeds (every slice of each).
        tsne_volumes: how many volumes of ``tsne_split`` (the first ones).
        overlay_slices: rows of the overlay figures (test slices with ground truth, spread over volumes).
        overlay_labeled: the L of the evaluate run shown (``None``: the largest L logged for the method).
        overlay_seed: its seed (absent: the lowest seed logged).
        seed: the t-SNE's random state.
        joint_optimum: ``scripts/joint_optimum.py``'s JSON, drawn in the pre-training curves; empty:
            ``results/<dataset>/joint_optimum.json`` when it exists.

    Returns:
        :class:`Pictures`: the files drawn and one message per figure that could not be drawn.

    Raises:
        LookupError: the store holds no FINISHED run of ``dataset`` (or of any of ``methods``).
    """
    runs_path = Path(runs_dir)
    uri = tracking_uri or f"sqlite:///{(runs_path / dataset / 'mlruns.db').resolve()}"
    store = RunStore(uri, dataset, experiment_name)
    found = store.methods()
    if not found:
        raise LookupError(f"no FINISHED run of dataset {dataset!r} in {uri}")
    from .grid import method_names, parse_method

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
