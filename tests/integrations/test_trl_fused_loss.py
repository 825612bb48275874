"""TRL's own SDFTTrainer with the fused loss gives TRL's loss and gradients.

The same trainer instance computes both: TRL's stock ``compute_loss`` (the parent class's method) and
the fused one, on the same rollout batch produced by TRL's own sampling. Float64 tiny model: both
sides run the very same model forward, so only the loss arithmetic differs.
"""
import os

import pytest
import torch

pytest.importorskip("trl.experimental.sdft")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from tiny_model import tiny_llama  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402
from trl.experimental.sdft import SDFTConfig  # noqa: E402
from trl.experimental.sdft import SDFTTrainer as StockTrainer  # noqa: E402

from sdft.integrations.trl_loss import FusedSDFTTrainer  # noqa: E402

ROWS = [{"prompt": [{"role": "user", "content": f"add {a} {b}"}], "privileged_context": f"{a} + {b} = {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]

CASES = {
    "full_fkl": dict(distillation_mode="full_logits", distillation_alpha=0.0),
    "full_jsd_skip": dict(distillation_mode="full_logits", distillation_alpha=0.5, num_loss_tokens_to_skip=1),
    "full_rkl_is": dict(distillation_mode="full_logits", distillation_alpha=1.0, distillation_is_clip=1.5),
    "topk": dict(distillation_mode="topk_logits", distillation_topk=5, distillation_alpha=0.5),
    "topk_tail": dict(distillation_mode="topk_logits", distillation_topk=7, distillation_alpha=0.0,
                      distillation_add_tail=True),
    "sampled": dict(distillation_mode="sampled_token", distillation_alpha=1.0, temperature=0.8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_equals_trls_loss_and_gradients(tmp_path, case):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    path = save_hf_folder(tiny_llama(vocab=len(tok)).double(), tok, tmp_path / "model")  # TRL loads the teacher by path
    args = SDFTConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"dtype": torch.float64}, use_cpu=True,
                      bf16=False, report_to="none", max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_prompt_length=64, logging_steps=1, save_strategy="no", seed=0,
                      disable_tqdm=True, gradient_checkpointing=False, **CASES[case])
    trainer = FusedSDFTTrainer(model=str(path), args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    torch.manual_seed(1)
    inputs = trainer._prepare_training_batch(ROWS[:2] * 2)
    if args.distillation_is_clip is not None:  # reused rollouts: TRL applies IS against their log-probs
        gen = torch.Generator().manual_seed(2)
        inputs["old_per_token_logps"] = -torch.rand(inputs["completion_ids"].shape, generator=gen,
                                                    dtype=torch.float64) * 3
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    stock = StockTrainer.compute_loss(trainer, model, inputs)
    fused = trainer.compute_loss(model, inputs)
    torch.testing.assert_close(fused, stock, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(stock, params)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10 * max(b.abs().max().item(), 1.0))


def test_fused_trainer_runs_two_processes_like_the_stock_one(tmp_path):
    """Under torchrun (gloo, 2 processes, TRL's own accelerate/DDP handling) the fused trainer takes the
    stock trainer's SGD step: the same parameter changes (-lr x gradient) on every rank."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from sdft.run.export import save_hf_folder

    here = Path(__file__).parents[1]  # tests/, where the worker lies
    tok = tiny_tokenizer()
    path = save_hf_folder(tiny_llama(vocab=len(tok)).double(), tok, tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    for i, kind in enumerate(("stock", "fused")):
        out = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200 + i),
                              str(here / "trl_dist_worker.py"), str(path), str(tmp_path / kind), kind],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    stock = [torch.load(tmp_path / f"stock.rank{r}") for r in (0, 1)]
    fused = [torch.load(tmp_path / f"fused.rank{r}") for r in (0, 1)]
    moved = 0
    for name, ref in stock[0].items():
        scale = max(ref.abs().max().item(), 1e-30)
        moved += scale > 0
        for got in (stock[1][name], fused[0][name], fused[1][name]):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * scale, msg=name)
    assert moved > 5


@pytest.mark.parametrize("precision,dtype,eps", [("bf16", torch.bfloat16, 2.0 ** -8),
                                                 ("fp16", torch.float16, 2.0 ** -11)])
def test_fused_loss_under_trls_autocast_stays_within_its_rounding(tmp_path, precision, dtype, eps):
    """TRL's bf16=True (fp16=True) runs compute_loss under autocast: the fused op then reads bf16 (fp16)
    hidden states and head (accumulating in fp32) and lands within that rounding of the fp32 loss. TRL's
    own loss under the same autocast takes reduced-precision logits' log-softmax and, with teacher ~
    student (a loss of ~1e-3), is further off (measured under bf16: a negative forward KL, -6e-4 against
    1.09e-3)."""
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    path = save_hf_folder(tiny_llama(vocab=len(tok), hidden=64), tok, tmp_path / "model")
    args = SDFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=precision == "bf16",
                      fp16=precision == "fp16", report_to="none", max_steps=1,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                      max_prompt_length=64, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                      gradient_checkpointing=False, distillation_mode="full_logits", distillation_alpha=0.0)
    trainer = FusedSDFTTrainer(model=str(path), args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    torch.manual_seed(1)
    inputs = trainer._prepare_training_batch(ROWS[:2] * 2)
    model = trainer.model
    fp32 = float(trainer.compute_loss(model, inputs).detach())
    with torch.autocast("cpu", dtype=dtype):
        stock = float(StockTrainer.compute_loss(trainer, model, inputs))
        fused = float(trainer.compute_loss(model, inputs))
    assert fused != fp32  # the reduced precision really ran
    assert abs(fused - fp32) <= 32 * eps * abs(fp32)
    assert abs(fused - fp32) <= abs(stock - fp32)
