"""Workflow building blocks the bundle configs instantiate (data, handlers, tracking, metrics)."""

from .data import ConfigError, FinetuneData, PretrainData, read_manifest, select_labeled
from .handlers import EncoderSaver, LossTermLogger, atomic_torch_save
