"""SDFTConfig: every knob of a run. Names follow TRL's SDFTConfig where they mean the same."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from sdft_kernels.divergence_spec import make_spec

TEACHER_MODES = ("live", "frozen", "ema")


@dataclass
class SDFTConfig:
    output_dir: str = "sdft-output"
    # Optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 40
    per_device_train_batch_size: int = 2  # prompts per micro-step
    gradient_accumulation_steps: int = 1
    seed: int = 0
    # Rollouts (student samples on-policy)
    num_generations: int = 4  # G rollouts per prompt
    temperature: float = 1.0  # sampling temperature
    max_prompt_length: int = 512
    max_completion_length: int = 48
    # Distillation loss
    divergence: str = "reverse_kl"  # reverse_kl | forward_kl | jsd
    distillation_alpha: float = 0.5  # jsd beta (TRL's name); 0 forward KL, 1 reverse KL
    distillation_temperature: float = 1.0
    # Teacher
    # frozen (weights at the start of train(); LoRA: adapters off, no copy) | live (current weights) | ema.
    # Frozen is the default: on SmolLM2 a live teacher drifted with the student and lost the skill and
    # general answers (benchmarks/results/forgetting.md); the frozen one anchors the student.
    teacher_mode: str = "frozen"
    ema_decay: float = 0.99
    teacher_template: str = "fewshot"  # fewshot | paper | a format string with {prompt} and {demonstration}
    share_prefix: bool = True  # compute each prompt / teacher context once per G rollouts
    # LoRA (via peft)
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Bookkeeping
    logging_steps: int = 1
    save_steps: int = 20
    save_total_limit: int = 2
    resume_from_checkpoint: bool | str = False
    progress_bar: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self):
        make_spec(self.divergence, self.distillation_alpha, self.distillation_temperature)
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher_mode {self.teacher_mode!r}; expected one of {', '.join(TEACHER_MODES)}")
        positive = ["learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "num_generations", "max_prompt_length", "max_completion_length", "save_steps", "logging_steps"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SDFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SDFTConfig option(s): {', '.join(unknown)}")
        return cls(**values)
