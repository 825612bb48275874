"""sdft: Self-Distillation Fine-Tuning with fused LM-head divergence kernels."""
from sdft.config import SDFTConfig
from sdft.eval.evaluation import evaluate, skill_accuracy
from sdft.eval.teacher_check import teacher_check
from sdft.models import load_model
from sdft.run.loop import TrainResult
from sdft.run.sequence import SequenceResult, train_sequence
from sdft.run.sft import train_sft
from sdft.run.trainer import train

__all__ = ["SDFTConfig", "SequenceResult", "TrainResult", "evaluate", "load_model", "skill_accuracy", "teacher_check",
           "train", "train_sequence", "train_sft"]
