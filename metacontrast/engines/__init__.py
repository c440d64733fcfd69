from .diagnostics import PretrainDiagnostics
from .events import MultiLossEvents
from .grad_filter import GradFilter, pace
from .grad_mitigator import GradMitigator
from .self_paced import SelfPacedSchedule, power_pace
from .trainer import MultiLossTrainer, NonFiniteLossError
from .prepare_batch import AugmentedPrepareBatch, TwoViewPrepareBatch
from .progress import LossProgressBar, current_loss
from .schedules import WarmupCosine, cosine_schedule
from . import distributed
