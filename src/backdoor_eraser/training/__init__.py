"""The one trainer and its schedules."""
from .schedules import Schedule
from .trainer import CrossEntropy, Objective, Trainer, TrainConfig, TrainingDiverged, TrainResult, write_history

__all__ = ["CrossEntropy", "Objective", "Schedule", "Trainer", "TrainConfig", "TrainingDiverged", "TrainResult",
           "write_history"]
