"""sdft: Self-Distillation Fine-Tuning with fused LM-head divergence kernels."""
from .config import SDFTConfig
from .evaluation import evaluate, skill_accuracy
from .models import load_model
from .sft import train_sft
from .teacher_check import teacher_check
from .trainer import TrainResult, train

__all__ = ["SDFTConfig", "TrainResult", "evaluate", "load_model", "skill_accuracy", "teacher_check", "train",
           "train_sft"]
