"""The SPARE recipe (localise with saliency, overwrite with a sparse adapter by self-distillation on
concept-critical timesteps) and its baselines in one harness. See :mod:`.recipe`."""
from .config import METHODS, Config
from .trainer import Trainer, run
from .task import Task, canvas_task
from .timesteps import TimestepSampler, probe

__all__ = ["METHODS", "Config", "Task", "TimestepSampler", "Trainer", "canvas_task", "probe", "run"]
