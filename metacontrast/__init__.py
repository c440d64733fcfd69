"""metacontrast: label-efficient medical image segmentation with meta-label contrastive pre-training.

Subpackages follow the pipeline: ``data`` (manifests, transforms, slice cache, samplers, augmentation),
``nets`` (U-Net encoder/decoder, projection heads), ``losses`` (one module per loss), ``engines``
(the multi-loss trainer, GradMitigator, GradFilter) and ``workflows`` (fine-tune, evaluate, tracking).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
__version__ = "0.1.0"

from . import data, engines, losses, nets, workflows  # noqa: E402  (so configs can say "$import metacontrast")
from .workflows import tracking  # noqa: E402,F401
