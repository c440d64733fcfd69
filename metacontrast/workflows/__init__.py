"""What the bundle configs instantiate during training and evaluation: data, handlers, checkpoints and the
output folder's run, metrics, evaluate, fine-tune helpers and the representation probes.  What runs after
training to report on it is in :mod:`metacontrast.reporting`; the MLflow layer in :mod:`metacontrast.tracking`."""

from .data import FinetuneData, PretrainData, epochs_for, hyper_parameters, meta_labels_in, read_manifest, select_labeled
from .checkpoints import TrainingCheckpointGiven, UnsafeCheckpointError, checkpoint_norm, initialise_encoder, load_checkpoint, start_workflow_run, state_dict_of
from .finetune import finalise_finetune, parameter_groups, validation_handlers
from .pretrain import finalise_pretrain
from .resources import usable_cores
from .handlers import EncoderSaver, LossTermLogger, atomic_torch_save
from .model_settings import ModelSettingsConflict, read_model_settings, record_model_settings
