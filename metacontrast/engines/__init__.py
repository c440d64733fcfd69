from .events import MultiLossEvents
from .grad_filter import GradFilter, pace
from .grad_mitigator import GradMitigator
from .trainer import MultiLossTrainer, NonFiniteLossError
from .prepare_batch import AugmentedPrepareBatch, TwoViewPrepareBatch
