"""Where the runs of a dataset live: the one place that knows the run folders, the encoder file and the grid's store.

Under ``<runs_dir>/<dataset>/``::

    <method>/pretrain/                  a pre-training (``encoder.pt``, its checkpoints, its own ``mlruns.db``)
    <method>/L<L>_seed<seed>/           a fine-tune (``model.pt``, ``model_final.pt``) and its evaluation:
        evaluation/, evaluation_last/     the scores of ``model.pt`` and of ``model_final.pt``
    <method>/probe_seed<seed>/          the representation probes of an encoder
    mlruns.db                           the results grid's MLflow store (experiment ``metacontrast-<dataset>``)

``<method>`` is the row name as the run was given it (:mod:`metacontrast.method_name`); a pre-training runs
under the bundle and the variant parts that change it (:func:`metacontrast.variants.pretraining`), so the encoder
of ``gcl/naive_sum+mean_teacher@improved`` is ``gcl/naive_sum``'s, that of ``gcl/frozen_encoder`` is ``gcl``'s,
and a ``random`` row has none.  The bundle configs reach the same paths with one
``$metacontrast.layout.RunLayout(@runs_dir, @dataset)....`` call each; the grid, the probes, the pictures and the
device importer build the same object.  Paths are joined as :class:`pathlib.Path` joins them and returned as
text, which a config can extend (``@output_dir + '/model.pt'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .tracking.store import SQLITE_PREFIX, STORE_FILE
from .variants import pretraining

__all__ = ["ENCODER_FILE", "RunLayout"]

#: the file a pre-training leaves its encoder in (``{"state_dict", "network", "method"}``)
ENCODER_FILE = "encoder.pt"


class RunLayout:
    """The folders of one dataset's runs under ``runs_dir`` (see the module docstring).

    Args:
        runs_dir: the runs folder (``runs``, ``runs_paper_scale``, a test's temporary folder).
        dataset: the manifest name, the folder under ``runs_dir``.
    """

    def __init__(self, runs_dir: str | os.PathLike[str], dataset: str) -> None:
        self.runs_dir, self.dataset = Path(runs_dir), str(dataset)

    @property
    def root(self) -> Path:
        """``<runs_dir>/<dataset>``: every run of the dataset is below it."""
        return self.runs_dir / self.dataset

    def pretrain_dir(self, method: str) -> str:
        """``<runs_dir>/<dataset>/<method>/pretrain``: the output folder of ``method``'s pre-training."""
        return str(self.root / method / "pretrain")

    def encoder(self, method: str) -> str:
        """The pre-trained encoder a row fine-tunes from, ``<runs_dir>/<dataset>/<pre-training>/pretrain/encoder.pt``
        (:func:`~metacontrast.variants.pretraining`); ``""`` for a ``random`` row, which starts from random initialisation."""
        name = pretraining(method)
        return "" if name is None else str(Path(self.pretrain_dir(name)) / ENCODER_FILE)

    def finetune_dir(self, method: str, num_labeled: int | str, seed: int | str) -> str:
        """``<runs_dir>/<dataset>/<method>/L<num_labeled>_seed<seed>``: a fine-tune's folder, which its evaluation shares."""
        return str(self.root / method / f"L{num_labeled}_seed{seed}")

    def probe_dir(self, method: str, seed: int | str) -> str:
        """``<runs_dir>/<dataset>/<method>/probe_seed<seed>``: the probes of ``method``'s encoder under ``seed``."""
        return str(self.root / method / f"probe_seed{seed}")

    @property
    def experiment_name(self) -> str:
        """``metacontrast-<dataset>``: the MLflow experiment every workflow of the dataset logs to (the configs'
        ``experiment_name`` default; the probes' frozen fine-tunes go to ``<experiment_name>-probe-finetunes``)."""
        return f"metacontrast-{self.dataset}"

    def store_uri(self) -> str:
        """``sqlite:///<runs_dir>/<dataset>/mlruns.db`` (absolute): the store of the dataset's results grid."""
        return f"{SQLITE_PREFIX}{(self.root / STORE_FILE).resolve()}"

    @staticmethod
    def evaluation_dir(output_dir: str | os.PathLike[str], last: bool = False) -> Path:
        """Where the evaluation of the fine-tune in ``output_dir`` writes its metrics, summary and predictions:
        ``evaluation/`` for ``model.pt``, ``evaluation_last/`` for ``model_final.pt`` (``last``)."""
        return Path(output_dir) / ("evaluation_last" if last else "evaluation")
