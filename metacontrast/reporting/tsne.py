"""t-SNE (van der Maaten and Hinton, JMLR 2008) of a pre-trained encoder's pooled bottleneck features.

``tsne_<method>.png``: the features (:func:`metacontrast.nets.heads.pooled_embedding`, unit vectors) of every
slice of a few volumes, one panel per meta label of the manifest, points coloured by that label: the GCL
paper's Fig. 6, which shows how the meta labels organise the learned representation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nets import SegmentationUNet, load_pretrained, pooled_embedding
from ..workflows.checkpoints import load_checkpoint, norm_of, state_dict_of
from .figures import PANEL_PX, figure, pyplot

__all__ = ["EncoderEmbedding", "meta_colourings", "plot_tsne", "tsne"]


class EncoderEmbedding:
    """A pre-trained encoder checkpoint as a map from slices to unit vectors.

    ``embedding(images)``: (N, 1, H, W) -> (N, D), ``D = features[-1]``: the deepest encoder features,
    global-average pooled and L2-normalised (:func:`~metacontrast.nets.heads.pooled_embedding`), i.e. the
    representation the image-wise contrast (GCL Eq. 1) compares before its projection head.
    """

    def __init__(self, checkpoint: str | os.PathLike[str], batch_size: int = 64) -> None:
        loaded = load_checkpoint(checkpoint)
        features = (loaded.get("network") or {}).get("features") if isinstance(loaded, dict) else None
        if not features:
            raise ValueError(f"checkpoint {checkpoint} does not say its network's 'features' (expected an encoder.pt of a pre-training run)")
        self.network = SegmentationUNet(features=features, norm=norm_of(loaded, checkpoint)).eval()
        load_pretrained(self.network, state_dict_of(loaded, checkpoint), source=f"encoder checkpoint {checkpoint}")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([pooled_embedding(self.network.encode(batch)[-1]) for batch in images.split(self.batch_size)])


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE coordinates (scikit-learn, PCA initialisation, perplexity min(30, (N-1)/3)).

    Runs on one thread: for a few hundred points OpenMP threads only add overhead (10x slower on a busy
    two-core machine).
    """
    from sklearn.manifold import TSNE  # heavy and only needed here: scikit-learn loads when a t-SNE is drawn
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

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
    plt = pyplot()
    with figure(1, len(colourings), PANEL_PX, path) as (fig, axes):
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


def meta_colourings(cache: Any, meta_labels: Sequence[str]) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{label: (codes, names)}`` from a :class:`~metacontrast.data.slices.SliceCache`'s meta tensors."""
    names_of = {"patient_id": list(cache.patient_names), "organ_state": list(cache.organ_state_names)}
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for label in meta_labels:
        if label not in cache.meta:
            raise KeyError(f"meta label {label!r} is not a slice meta key ({sorted(cache.meta)})")
        codes = cache.meta[label].cpu().numpy()
        out[label] = (codes, names_of.get(label, [str(v) for v in range(int(codes.max()) + 1)]))
    return out
