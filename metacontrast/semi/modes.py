"""The fine-tune config key ``semi_supervised``: what each mode changes in the shared fine-tune workflow.

=================  ===========================================================================================
``none``           plain supervised fine-tuning (Dice + CE on the L labelled volumes' slices)
``mean_teacher``   + EMA teacher and ramped softmax-MSE consistency on unlabelled slices (:mod:`.mean_teacher`)
``mixup``          labelled slices and one-hot labels mixed, Dice + CE on soft labels (:mod:`.mixup`)
``cross_pseudo``   two-decoder U-Net, cross pseudo supervision on unlabelled slices (IDEAL; :mod:`.cross_pseudo`)
=================  ===========================================================================================

``bundles/common/configs/finetune.json`` asks :func:`build_semi_supervised` for the pieces a mode
replaces (loss, batch preparation, inferer, extra handlers, extra training-checkpoint objects) and
:func:`network_class` for the network; the evaluate workflow builds the same network class.
Unlabelled slices are the ``train`` volumes that are not among the L labelled ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer
from torch import nn

from ..engines.prepare_batch import AugmentedPrepareBatch
from ..nets.dual_decoder import DualDecoderUNet
from ..nets.unet import SegmentationUNet
from ..errors import ConfigError
from ..method_name import split_method_name
from ..workflows.handlers import LossTermLogger
from .batches import SemiSupervisedPrepareBatch
from .cross_pseudo import CrossPseudoSupervisionLoss, DualDecoderInferer
from .mean_teacher import MeanTeacher, MeanTeacherLoss
from .mixup import MixupPrepareBatch

MODES = ("none", "mean_teacher", "mixup", "cross_pseudo")
#: modes that add a semi-supervised method (the results runner's ``<method>+<add-on>``)
ADD_ONS = MODES[1:]
#: modes that train on unlabelled slices too
USES_UNLABELED = frozenset({"mean_teacher", "cross_pseudo"})


def check_mode(semi_supervised: str, method: str = "") -> str:
    """``semi_supervised`` if it is a known mode and agrees with ``method``'s add-on (``gcl+mixup`` -> ``mixup``).

    A method named with an add-on must run that add-on, so no plain fine-tune is logged under a
    Mean Teacher / Mixup label; a method without one may use any mode (a bundle's own default, e.g. IDEAL).
    """
    if semi_supervised not in MODES:
        raise ConfigError(f"semi_supervised must be one of {list(MODES)}, got {semi_supervised!r}")
    add_on = split_method_name(method).add_on
    if add_on and add_on != semi_supervised:
        raise ConfigError(f"method {method!r} names the semi-supervised add-on {add_on!r} but semi_supervised is "
                          f"{semi_supervised!r}; pass --semi_supervised {add_on}")
    return semi_supervised


def network_class(semi_supervised: str) -> type[nn.Module]:
    """The segmentation network a mode trains (and evaluate loads): the two-decoder U-Net for ``cross_pseudo``."""
    return DualDecoderUNet if check_mode(semi_supervised) == "cross_pseudo" else SegmentationUNet


def unlabeled_batch_size(semi_supervised: str, batch_size: int) -> int:
    """Unlabelled slices per step: ``batch_size`` for modes that use them, else 0 (no unlabelled loader)."""
    return int(batch_size) if check_mode(semi_supervised) in USES_UNLABELED else 0


@dataclass
class SemiSupervisedParts:
    """What a mode puts into the fine-tune trainer.

    Attributes:
        loss: ``loss_function(pred, targets) -> scalar``.  prepare_batch: the trainer's ``prepare_batch``.
        inferer: the trainer's ``inferer`` (training forward).  handlers: extra trainer handlers.
        state: extra ``state_dict`` objects for the training checkpoint (teacher, unlabelled sampler).
    """

    loss: Callable[..., torch.Tensor]
    prepare_batch: AugmentedPrepareBatch
    inferer: Inferer = field(default_factory=SimpleInferer)
    handlers: list[Any] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def build_semi_supervised(semi_supervised: str, network: nn.Module, loss: Callable[..., torch.Tensor], augment: Any,
                          data: Any, settings: Mapping[str, Any] | None = None) -> SemiSupervisedParts:
    """The pieces of mode ``semi_supervised`` (see the module table).

    Args:
        network: the student / two-decoder network (already holding the pre-trained encoder).
        loss: the supervised loss on labelled slices (Dice + CE; one-hot targets, or soft ones for mixup).
        augment: the fine-tune ``BatchAugmentation``; its generator also draws Mean Teacher's noise and
            Mixup's ``lam`` and permutation, so a training checkpoint holds all of a step's randomness.
        data: :class:`~metacontrast.workflows.data.FinetuneData` (``unlabeled_loader``, ``unlabeled_sampler``, ``labels``).
        settings: the mode's keyword settings (``semi_supervised_settings[mode]`` in finetune.json).
    """
    settings = dict(settings or {})
    mode = check_mode(semi_supervised)
    generator = getattr(augment, "generator", None)
    if mode == "none":
        return SemiSupervisedParts(loss, AugmentedPrepareBatch(augment))
    if mode == "mixup":
        return SemiSupervisedParts(loss, MixupPrepareBatch(len(data.labels), augment=augment, generator=generator, **settings))
    state = {"unlabeled_sampler": data.unlabeled_sampler}
    if mode == "mean_teacher":
        teacher = MeanTeacher(network, generator=generator, **settings)
        semi_loss = MeanTeacherLoss(loss, teacher)
        prepare = SemiSupervisedPrepareBatch(data.unlabeled_loader, augment, unlabeled_targets=teacher.targets)
        return SemiSupervisedParts(semi_loss, prepare, handlers=[teacher, LossTermLogger(semi_loss)],
                                   state={"teacher": teacher.teacher, **state})
    if not isinstance(network, DualDecoderUNet):
        raise ConfigError(f"semi_supervised 'cross_pseudo' trains a {DualDecoderUNet.__name__}, got {type(network).__name__}")
    semi_loss = CrossPseudoSupervisionLoss(loss, **settings)
    return SemiSupervisedParts(semi_loss, SemiSupervisedPrepareBatch(data.unlabeled_loader, augment), DualDecoderInferer(),
                               handlers=[LossTermLogger(semi_loss)], state=state)
