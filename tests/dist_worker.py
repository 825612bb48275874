"""One training step on a tiny float64 model, run alone or under torchrun by tests/test_distributed.py.

Rollouts come from a fixed engine (no sampling), so one process with B prompts and B processes with
one prompt each see the same data; every process dumps the gradients it steps with.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import sdft.trainer as trainer  # noqa: E402
from sdft import SDFTConfig, train, train_sft  # noqa: E402
from sdft.rollouts import RolloutBatch  # noqa: E402
from tiny_model import tiny_llama  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


class FixedEngine:
    """G deterministic completions per prompt, of different lengths."""

    def generate(self, model, prompts, num_generations, max_new_tokens, temperature, greedy=False):
        rows, masks = [], []
        for prompt in prompts:
            for g in range(num_generations):
                ids = (prompt[-max_new_tokens:].flip(0) + 3 * g + 1) % 90 + 3
                n = max(1, max_new_tokens - g - int(prompt.sum()) % 2)  # from the prompt, not its slot
                rows.append(ids[:max_new_tokens])
                masks.append(torch.arange(ids.numel()) < n)
        completions = torch.stack(rows)
        mask = torch.stack(masks)
        return RolloutBatch(list(prompts), completions.masked_fill(~mask, 0), mask, torch.zeros(mask.shape))


def main(out_path, method, per_device, output_dir):
    captured = {}
    real = trainer.clip_and_step

    def capture(model, optimizer, config, step, loss):
        captured["loss"] = loss
        captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return real(model, optimizer, config, step, loss)

    trainer.clip_and_step = capture
    if method == "sft":
        import sdft.sft as sft

        sft.clip_and_step = capture
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).double()
    config = SDFTConfig(output_dir=output_dir, max_steps=1, per_device_train_batch_size=per_device, num_generations=2,
                        max_completion_length=5, learning_rate=1e-3, progress_bar=False, device="cpu",
                        divergence="forward_kl", save_final_model=False, teacher_mode="frozen",
                        loss_normalization="sequence_mean" if method == "sdft_seq" else "token_mean")
    if method == "sft":
        train_sft(model, ROWS, config, tokenizer=tok)
    else:
        train(model, ROWS, config, tokenizer=tok, engine=FixedEngine())
    rank = int(os.environ.get("RANK", "0"))
    torch.save(captured, f"{out_path}.rank{rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
