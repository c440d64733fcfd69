"""Workflow building blocks the bundle configs instantiate (data, handlers, tracking, metrics)."""

from .data import ConfigError, FinetuneData, PretrainData, epochs_for, read_manifest, select_labeled
from .checkpoints import UnsafeCheckpointError, checkpoint_norm, initialise_encoder, load_checkpoint, state_dict_of
from .finetune import finalise_finetune, parameter_groups
from .handlers import EncoderSaver, LossTermLogger, atomic_torch_save
