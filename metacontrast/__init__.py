"""metacontrast: label-efficient medical image segmentation with meta-label contrastive pre-training.

Subpackages follow the pipeline: ``data`` (manifests, transforms, slice cache, samplers, augmentation),
``nets`` (U-Net encoder/decoder, projection heads), ``losses`` (one module per loss), ``engines``
(the multi-loss trainer, GradMitigator, GradFilter), ``semi`` (semi-supervised fine-tune add-ons),
``workflows`` (what the bundle configs instantiate: data, handlers, checkpoints, fine-tune, evaluate),
``tracking`` (MLflow) and ``reporting`` (the grid, results, pictures, cards, run after training); ``ranks``,
``errors`` and ``method_name`` (the row-name grammar) are the small modules every layer may import, and
``layout`` says where the runs of a dataset live.  Subpackages load on first use, so
``import metacontrast`` (as bundle configs do) stays cheap.  Importing it installs :mod:`metacontrast.excepthook`,
which repeats the package's own error (naming the file and what is wrong) as the last line of a failed run, after
MONAI's ``Failed to instantiate component`` that wraps it.
"""

import importlib
from pathlib import Path

from .excepthook import install as _install_excepthook

REPO_ROOT = Path(__file__).resolve().parents[1]
__version__ = "0.1.0"
_SUBPACKAGES = ("data", "engines", "errors", "layout", "losses", "method_name", "nets", "ranks", "reporting", "semi", "tracking",
               "workflows")
_install_excepthook()


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
