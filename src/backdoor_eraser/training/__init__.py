"""The one trainer and its schedules."""
from .precision import AMP_MODES, resolve_amp
from .schedules import Schedule
from .tasks import Callback, EvalColumns, Loop, Task, eval_columns
from .trainer import ATTACK_TRAINING, Trainer, TrainConfig, TrainingDiverged, TrainResult, write_history

__all__ = ["ATTACK_TRAINING", "AMP_MODES", "resolve_amp", "Callback", "EvalColumns", "Loop", "Task", "eval_columns", "Schedule", "Trainer", "TrainConfig", "TrainingDiverged", "TrainResult",
           "write_history"]
