"""Semi-supervised fine-tuning add-ons on top of any pre-trained encoder, selected by the fine-tune key
``semi_supervised``: Mean Teacher, Mixup, cross pseudo supervision (IDEAL).  See :mod:`.modes`."""

from .batches import SemiSupervisedPrepareBatch, UnlabeledStream, split_labeled
from .cross_pseudo import CrossPseudoSupervisionLoss, DualDecoderInferer, cross_pseudo_supervision
from .mean_teacher import MeanTeacher, MeanTeacherLoss, ema_decay, ema_update_, sigmoid_rampup
from .mixup import MixupPrepareBatch, mixup, sample_lambda
from .modes import (
    ADD_ONS,
    MODES,
    SemiSupervisedParts,
    build_semi_supervised,
    check_mode,
    network_class,
    unlabeled_batch_size,
)
