"""bf16 and fp16 mixed precision on one process: autocast compute, fp32 master weights and optimizer
state; the loss and its gradients stay within bf16 (fp16) rounding of the fp32 step; fp16's loss scale
skips the steps that overflow and resumes where it was."""
import json
import math

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.loss.batch import BatchLoss
from sdft.loss.spec import compute_dtype
from sdft.loss.teacher import Teacher
from sdft.rollout.engine import RolloutBatch
from sdft.runtime.parallel import Runner
from sdft.runtime.precision import compute_precision

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])
ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
EPS = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}  # relative rounding of 8 and 11 significant bits


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
    scale = runner.scaler.get_scale()  # fp16: the backward ran on the scaled loss
    return float(loss), {n: p.grad.cpu() / scale for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("teacher_mode", ["frozen", "live"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_loss_and_gradients_are_within_its_rounding_of_fp32(precision, teacher_mode, divergence,
                                                                              device):
    """On CUDA the reduced-precision step (Triton kernels, GPU attention) is held to the CPU's fp32 step."""
    loss32, grads32, _ = _loss_and_grads("no", teacher_mode, divergence)
    loss16, grads16, model = _loss_and_grads(precision, teacher_mode, divergence, device)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(g.dtype == torch.float32 for g in grads16.values())
    # every matrix product rounds its inputs to 8 (11) significant bits through 2 layers and the head: a
    # few dozen eps on the loss, and on whole-tensor gradient norms
    eps = EPS[precision]
    assert abs(loss16 - loss32) <= 32 * eps * abs(loss32)
    flat32 = torch.cat([grads32[n].flatten() for n in grads32])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert (flat16 - flat32).norm() <= 32 * eps * flat32.norm()
    assert loss16 != loss32  # the reduced precision really ran


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


def _start_at(scale, monkeypatch):
    """fp16 runs start their loss scale at ``scale`` (2^16 by default, which never overflows this model)."""
    import sdft.runtime.parallel as parallel

    monkeypatch.setattr(parallel, "loss_scaler", lambda precision, device_type, sharded: torch.amp.GradScaler(
        device_type, init_scale=scale, enabled=precision == "fp16"))


def test_fp16_skips_the_steps_whose_scaled_gradients_overflow_and_halves_the_scale(tmp_path, monkeypatch):
    """At a loss scale of 2^30 this model's gradients (~1e-3) overflow fp16's 65504: those steps leave the
    weights as they were and halve the scale, until one fits and trains."""
    _start_at(2.0 ** 30, monkeypatch)
    result = _run(tmp_path, max_steps=4, mixed_precision="fp16")
    records = result.metrics
    assert [r["skipped"] for r in records] == [True, True, True, False]
    assert [r["loss_scale"] for r in records] == [2.0 ** 30, 2.0 ** 29, 2.0 ** 28, 2.0 ** 27]
    assert all(math.isfinite(r["loss"]) for r in records) and math.isfinite(records[-1]["grad_norm"])
    from safetensors.torch import load_file

    initial = dict(tiny_llama(vocab=len(tiny_tokenizer())).named_parameters())
    for step, same in ((3, True), (4, False)):
        saved = load_file(str(tmp_path / f"checkpoint-{step}" / "trainable.safetensors"))
        assert all(torch.equal(v, initial[n]) for n, v in saved.items()) is same
    assert json.loads((tmp_path / "checkpoint-4" / "state.json").read_text())["loss_scale"]["scale"] == 2.0 ** 27


def test_an_fp16_run_resumes_its_loss_scale_bit_identically(tmp_path, monkeypatch):
    """Cut while the scale is still falling: the resumed steps start at the checkpoint's scale, not afresh."""
    _start_at(2.0 ** 30, monkeypatch)
    whole = _run(tmp_path / "whole", max_steps=5, mixed_precision="fp16")
    _run(tmp_path / "cut", max_steps=2, mixed_precision="fp16")
    resumed = _run(tmp_path / "cut", max_steps=5, mixed_precision="fp16", resume_from_checkpoint=True)
    assert [r["loss_scale"] for r in resumed.metrics] == [r["loss_scale"] for r in whole.metrics[2:]]
    steps = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    wanted = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["sdft/loss_scale"]) for r in steps] == [(r["loss"], r["sdft/loss_scale"]) for r in wanted]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters()))


def test_fp16_gradients_that_overflow_at_scale_one_stop_the_run(tmp_path):
    """Below a scale of 1 an overflow is the gradients' own: the nonfinite rule applies, naming fp16."""
    from sdft.run.errors import NonFiniteError
    from sdft.run.loop import clip_and_step

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    model.weight.grad[0, 0] = float("inf")  # what an fp16 backward's overflow leaves
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match="under fp16 they overflow even at loss scale 1: mixed_precision=bf16"):
        clip_and_step(model, optimizer, SDFTConfig(mixed_precision="fp16"), 0, 1.0, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_refuses_bf16_weights():
    with pytest.raises(ValueError, match="mixed_precision=fp16 scales the loss for fp32 master weights"):
        SDFTConfig(mixed_precision="fp16", dtype="bfloat16")


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


@pytest.mark.parametrize("native", [False, True])
def test_16bit_on_a_cpu_without_its_instructions_says_fp32_is_faster(monkeypatch, native):
    """bf16 / fp16 products are emulated on an AVX2 CPU (7x fp32's step on this project's): one line says so."""
    from sdft.runtime.precision import cpu_precision_note

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native)
    cpu = torch.device("cpu")
    for precision in ("bf16", "fp16"):
        note = cpu_precision_note(precision, cpu)
        assert (note is None) == native
        assert native or f"mixed_precision={precision} on a CPU without {precision}" in note and "\n" not in note
    assert cpu_precision_note("no", cpu) is None and cpu_precision_note("auto", cpu) is None
    assert cpu_precision_note("bf16", torch.device("cuda")) is None
    weights = cpu_precision_note("auto", cpu, "bfloat16")  # weights in bf16: the same products, without autocast
    assert (weights is None) == native
    assert native or weights.startswith("sdft: dtype=bfloat16 on a CPU without bf16 matrix instructions")
    assert cpu_precision_note("auto", torch.device("cuda"), "bfloat16") is None


def _untied(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_frozen_teacher_keeps_its_linears_in_the_autocast_dtype_and_gives_the_same_bits(precision, tied):
    """What autocast would cast each pass is cast once: the loss and every gradient are bit-identical."""
    runs = []
    for store in (False, True):
        model = tiny_llama(hidden=64) if tied else _untied(tiny_llama(hidden=64))
        batch, contexts = _batch()
        runner = Runner(model, mixed_precision=precision)
        teacher = Teacher(model, "frozen")
        if store:
            teacher.distribute(runner)
            dtypes = {n: p.dtype for n, p in teacher.copy.named_parameters()}
            low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            assert dtypes["model.layers.0.self_attn.q_proj.weight"] == low
            assert dtypes["model.layers.0.mlp.down_proj.weight"] == low
            assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.float32
            assert tied or dtypes["lm_head.weight"] == low  # a head tied to the embedding stays fp32
            assert all(p.dtype == torch.float32 for p in model.parameters())  # the student is untouched
        config = SDFTConfig(divergence="forward_kl", teacher_mode="frozen", mixed_precision=precision)
        loss = runner.backward(BatchLoss.from_config(config), teacher, batch, contexts, 0, divisor=1.0)
        runs.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_no_autocast_leaves_a_frozen_teacher_as_it_is_and_autocast_leaves_float64_alone():
    model = tiny_llama(hidden=64)
    teacher = Teacher(model, "frozen")
    teacher.distribute(Runner(model, mixed_precision="no"))
    assert all(p.dtype == torch.float32 for p in teacher.copy.parameters())
    model = tiny_llama(hidden=64).double()  # autocast computes float64 in float64: nothing to cast
    teacher = Teacher(model, "frozen")
    teacher.distribute(Runner(model, mixed_precision="bf16"))
    assert all(p.dtype == torch.float64 for p in teacher.copy.parameters())


def test_tf32_is_refused_off_cuda_and_switched_on_only_for_the_run(tmp_path, monkeypatch):
    from sdft.runtime.precision import check_tf32, tf32_matmuls

    with pytest.raises(ValueError, match="tf32=true speeds up fp32 matrix products on an Ampere or newer CUDA GPU; "
                                         "this run is on cpu"):
        SDFTConfig(tf32=True, device="cpu").check_device()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="needs an Ampere or newer GPU .* this one is 7.5"):
        check_tf32(True, torch.device("cuda", 0))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    restore = tf32_matmuls(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    restore()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_trls_tf32_maps_onto_the_run(tmp_path):
    import types

    from sdft.integrations.trl import config_from_trl

    args = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=8)
    assert config_from_trl(types.SimpleNamespace(**args, tf32=True)).tf32
    assert not config_from_trl(types.SimpleNamespace(**args, tf32=None)).tf32
