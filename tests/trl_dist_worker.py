"""One SGD step of TRL's SDFTTrainer (stock or with sdft's fused loss) on a tiny float64 model, run
under torchrun by tests/test_trl_fused_loss.py; saves every parameter's change (= -lr * gradient)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from datasets import Dataset  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402

from sdft.integrations.trl_loss import FusedSDFTTrainer  # noqa: E402
from sdft.runtime.distributed import leave  # noqa: E402

ROWS = [{"prompt": [{"role": "user", "content": f"add {a} {b}"}], "privileged_context": f"{a} + {b} = {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
LR = 1e-2


def main(model_path, out_path, fused):
    tok = tiny_tokenizer()
    args = SDFTConfig(output_dir=out_path + ".run", model_init_kwargs={"dtype": torch.float64}, use_cpu=True,
                      bf16=False, report_to="none", max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_prompt_length=64, logging_steps=1, save_strategy="no", seed=0,
                      disable_tqdm=True, gradient_checkpointing=False, optim="sgd", learning_rate=LR,
                      max_grad_norm=1e6, lr_scheduler_type="constant", distillation_mode="full_logits",
                      distillation_alpha=0.5)
    cls = FusedSDFTTrainer if fused == "fused" else SDFTTrainer
    trainer = cls(model=model_path, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    delta = {n: (after[n].detach() - before[n]) for n in before}
    torch.save(delta, f"{out_path}.rank{os.environ.get('RANK', '0')}")
    leave(0)  # accelerate leaves its gloo group to the interpreter's finalisation


if __name__ == "__main__":
    main(*sys.argv[1:4])
