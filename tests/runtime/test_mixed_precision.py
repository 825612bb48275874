"""bf16 mixed precision on one process: autocast compute, fp32 master weights and optimizer state; the
loss and its gradients stay within bf16 rounding of the fp32 step."""
import json

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.loss.batch import BatchLoss
from sdft.loss.spec import compute_dtype
from sdft.loss.teacher import Teacher
from sdft.rollout.engine import RolloutBatch
from sdft.runtime.parallel import Runner, compute_precision

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])
ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
BF16_EPS = 2.0 ** -8


def _batch(seed=0, group=3):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 97, (12,), generator=g)
    prompts = [torch.cat([system, torch.randint(3, 97, (n,), generator=g)]) for n in (4, 6)]
    contexts = [torch.cat([p, torch.randint(3, 97, (5,), generator=g)]) for p in prompts]
    completions = torch.randint(3, 97, (2 * group, 7), generator=g)
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 7, 2, 5, 7])[:, None]
    return RolloutBatch(prompts, completions.masked_fill(~mask, 0), mask, torch.zeros(mask.shape)), contexts


def _loss_and_grads(precision, teacher_mode, divergence, device="cpu"):
    model = tiny_llama(hidden=64).to(device)
    batch, contexts = _batch()
    batch = RolloutBatch([p.to(device) for p in batch.prompts], batch.completions.to(device),
                         batch.mask.to(device), batch.logprobs.to(device))
    contexts = [c.to(device) for c in contexts]
    config = SDFTConfig(divergence=divergence, teacher_mode=teacher_mode, device=device, mixed_precision=precision)
    runner = Runner(model, mixed_precision=compute_precision(precision, torch.device(device)))
    loss = runner.backward(BatchLoss.from_config(config), Teacher(model, teacher_mode), batch, contexts, 0,
                           divisor=1.0)
    return float(loss), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("teacher_mode", ["frozen", "live"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_bf16_loss_and_gradients_are_within_bf16_rounding_of_fp32(teacher_mode, divergence, device):
    """On CUDA the bf16 step (Triton kernels, GPU attention) is held to the CPU's fp32 step."""
    loss32, grads32, _ = _loss_and_grads("no", teacher_mode, divergence)
    loss16, grads16, model = _loss_and_grads("bf16", teacher_mode, divergence, device)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(g.dtype == torch.float32 for g in grads16.values())
    # every matrix product rounds its inputs to bf16 (relative 2^-8) through 2 layers and the head: a few
    # dozen eps on the loss, and on whole-tensor gradient norms
    assert abs(loss16 - loss32) <= 32 * BF16_EPS * abs(loss32)
    flat32 = torch.cat([grads32[n].flatten() for n in grads32])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert (flat16 - flat32).norm() <= 32 * BF16_EPS * flat32.norm()
    assert loss16 != loss32  # bf16 really ran


def test_the_fused_op_computes_in_autocasts_dtype():
    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(cpu, torch.float32) == torch.bfloat16


def test_auto_is_fp32_on_cpu_and_bf16_on_a_bf16_gpu():
    assert compute_precision("auto", torch.device("cpu")) == "no"
    assert compute_precision("bf16", torch.device("cpu")) == "bf16"
    if torch.cuda.is_available():
        assert compute_precision("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "no")


def _run(out, device="cpu", **change):
    tok = tiny_tokenizer()
    values = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=1, num_generations=2,
                  max_completion_length=6, save_steps=1, progress_bar=False, device=device, save_final_model=False,
                  full_determinism=device != "cpu",
                  mixed_precision="bf16", learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0)
    config = SDFTConfig(**{**values, **change})
    return train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_bf16_run_trains_and_resumes_bit_identically(tmp_path, device):
    """On CUDA under full_determinism (cuBLAS and attention pick deterministic kernels there)."""
    whole = _run(tmp_path / "whole", device)
    assert all(p.dtype == torch.float32 for p in whole.model.parameters())
    _run(tmp_path / "cut", device, max_steps=2)
    resumed = _run(tmp_path / "cut", device, resume_from_checkpoint=True)
    steps = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    wanted = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["sdft/tokens"]) for r in steps] == [(r["loss"], r["sdft/tokens"]) for r in wanted]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters()))


def test_dtype_bfloat16_loads_the_weights_in_bf16(tmp_path):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    config = SDFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=4, progress_bar=False, device="cpu",
                        save_final_model=False, dtype="bfloat16")
    result = train(str(base), ROWS, config)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    assert result.metrics[0]["loss"] == result.metrics[0]["loss"]
