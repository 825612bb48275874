"""One training step on a tiny float64 model, run alone or under torchrun by tests/test_distributed.py.

Rollouts come from a fixed engine (no sampling), so one process with B prompts and B processes with
one prompt each see the same data; every process dumps the gradients it steps with.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import tiny_llama  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

import sdft.run.trainer as trainer  # noqa: E402
from sdft import SDFTConfig, train, train_sft  # noqa: E402
from sdft.rollout.engine import RolloutBatch  # noqa: E402
from sdft.runtime.distributed import leave  # noqa: E402

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


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("out_path")
    p.add_argument("method", choices=["sdft", "sdft_seq", "sft"])
    p.add_argument("per_device", type=int)
    p.add_argument("output_dir")
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--teacher", default="frozen")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--kill-rank1-after", type=int, default=0, help="rank 1 dies after this step (0: never)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--precision", default="no", help="mixed_precision (no, bf16, fp16)")
    p.add_argument("--float32", action="store_true", help="a float32 model (default float64)")
    p.add_argument("--save-best", action="store_true",
                   help="save_strategy=best, evaluating every step on one row scored 0.1, 0.5, 0.3, 0.9, ...")
    p.add_argument("--keep-teacher-dtype", action="store_true",
                   help="a frozen teacher copy keeps its weights' dtype under mixed precision (the reference)")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    captured = {}
    real = trainer.clip_and_step

    def full(t):
        return t.full_tensor() if type(t).__name__ == "DTensor" else t

    def capture(model, optimizer, config, step, loss, scaler=None):
        captured.clear()
        captured["loss"] = loss
        captured["step"] = step + 1
        scale = scaler.get_scale() if scaler is not None else 1.0  # fp16: the gradients of the scaled loss
        captured.update({n: full(p.grad).detach() / scale for n, p in model.named_parameters() if p.grad is not None})
        return real(model, optimizer, config, step, loss, scaler)

    def maybe_die(step, record):
        if rank == 1 and step == args.kill_rank1_after:
            os._exit(3)  # a crash: no cleanup, no barrier

    trainer.clip_and_step = capture
    if args.keep_teacher_dtype:
        import sdft.loss.teacher as teacher

        teacher.store_linears_in = teacher.store_parameters_in = lambda model, dtype: None
    if args.method == "sft":
        import sdft.run.sft as sft

        sft.clip_and_step = capture
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)) if args.float32 else tiny_llama(vocab=len(tok)).double()
    config = SDFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device,
        num_generations=2,
        max_completion_length=5,
        learning_rate=1e-3,
        weight_decay=0.1,  # two AdamW groups (biases and norms not decayed), sharded and resumed
        progress_bar=False,
        device="cpu",
        divergence="forward_kl",
        save_final_model=True,
        teacher_mode=args.teacher,
        ema_decay=0.5,
        save_steps=1,
        use_lora=args.lora,
        lora_r=4,
        mixed_precision=args.precision,
        parallel=args.parallel,
        resume_from_checkpoint=args.resume,
        loss_normalization="sequence_mean" if args.method == "sdft_seq" else "token_mean",
        **(dict(save_strategy="best", eval_steps=1, retention_data="", retention_text="") if args.save_best else {}),
    )
    scores = iter([0.1, 0.5, 0.3, 0.9, 0.2, 0.2])
    evaluation = dict(eval_dataset=ROWS[:1], eval_scorer=lambda answer, demonstration: next(scores)) \
        if args.save_best else {}
    if args.method == "sft":
        train_sft(model, ROWS, config, tokenizer=tok, step_callback=maybe_die, **evaluation)
    else:
        train(model, ROWS, config, tokenizer=tok, engine=FixedEngine(), step_callback=maybe_die, **evaluation)
    torch.save(captured, f"{args.out_path}.rank{rank}")
    leave(0)


if __name__ == "__main__":
    main()
