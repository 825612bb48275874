"""DDP and FSDP2 under torchrun on CPU (gloo): 2 processes x 1 prompt take the same step as
1 process x 2 prompts (compared on the gradients of a float64 model, not on weights after AdamW); a
run whose rank 1 dies resumes from its last checkpoint on another number of processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parents[1]  # tests/, where the workers lie
WORKER = HERE / "dist_worker.py"
ROTARY_TOL = 16 * 2.0 ** -24
PORT = [29500 + os.getpid() % 500]


def _run(args, tmp_path, procs: int = 1, ok: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(WORKER)]
    if procs > 1:
        PORT[0] += 1
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--nproc_per_node", str(procs), "--master_port", str(PORT[0]), str(WORKER)]
    out = subprocess.run(cmd + [str(a) for a in args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert (out.returncode == 0) == ok, out.stderr[-3000:]


def _same_gradients(single: dict, got: dict):
    names = [n for n in single if n not in ("loss", "step")]
    assert set(got) == set(single) and len(names) > 5
    for name in names:
        ref = torch.as_tensor(single[name])
        # float64 model, but transformers' rotary tables are float32 and may differ by an ulp between
        # batch shapes (one packed row of two prompts vs one prompt): test_batch_prefix's ROTARY_TOL
        torch.testing.assert_close(torch.as_tensor(got[name]), ref, rtol=0,
                                   atol=ROTARY_TOL * max(ref.abs().max().item(), 1e-30), msg=name)


@pytest.mark.parametrize("method,parallel,teacher", [
    ("sdft", "ddp", "frozen"), ("sdft_seq", "ddp", "frozen"), ("sft", "ddp", "frozen"), ("sdft", "ddp", "lora"),
    ("sdft", "fsdp", "frozen"), ("sdft", "fsdp", "live"), ("sdft", "fsdp", "ema"), ("sft", "fsdp", "frozen")])
def test_two_processes_take_the_single_process_step(tmp_path, method, parallel, teacher):
    """teacher "lora": LoRA adapters under DDP with the frozen teacher (the base, adapters off)."""
    lora = teacher == "lora"
    flags = ["--parallel", parallel, "--teacher", "frozen" if lora else teacher] + (["--lora"] if lora else [])
    _run([tmp_path / "single", method, 2, tmp_path / "run1", *flags], tmp_path)
    _run([tmp_path / "dist", method, 1, tmp_path / "run2", *flags], tmp_path, procs=2)
    single = torch.load(tmp_path / "single.rank0")
    for r in (0, 1):
        _same_gradients(single, torch.load(tmp_path / f"dist.rank{r}"))
    run2 = tmp_path / "run2"
    assert (run2 / "checkpoint-1").is_dir() and (run2 / "metrics.jsonl").is_file()
    # the checkpoint and the exported model hold full tensors, whatever the sharding
    from safetensors.torch import load_file

    for kept in ("trainable",) + (("teacher",) if teacher == "ema" else ()):  # process 0 writes what all gathered
        one = load_file(str(tmp_path / "run1" / "checkpoint-1" / f"{kept}.safetensors"))
        two = load_file(str(run2 / "checkpoint-1" / f"{kept}.safetensors"))
        assert set(two) == set(one) and all(two[name].shape == value.shape for name, value in one.items())
    assert (run2 / "final_model" / ("adapter_config.json" if lora else "config.json")).is_file()


def test_a_dead_rank_leaves_a_checkpoint_that_resumes_on_one_process(tmp_path):
    """FSDP2 on 2 processes with an EMA teacher; rank 1 dies after step 2. One process resumes from
    checkpoint-2 (full tensors) and its step 3 has the gradients of an uninterrupted 2-process run."""
    flags = ["--parallel", "fsdp", "--teacher", "ema", "--steps", 3]
    _run([tmp_path / "whole", "sdft", 1, tmp_path / "whole_run", *flags], tmp_path, procs=2)
    _run([tmp_path / "killed", "sdft", 1, tmp_path / "run", *flags, "--kill-rank1-after", 2], tmp_path, procs=2,
         ok=False)
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and not (tmp_path / "run" / "checkpoint-3").exists()
    _run([tmp_path / "resumed", "sdft", 2, tmp_path / "run", *flags, "--resume"], tmp_path)
    resumed = torch.load(tmp_path / "resumed.rank0")
    assert resumed["step"] == 3
    _same_gradients(torch.load(tmp_path / "whole.rank0"), resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_save_strategy_best_checkpoints_the_same_steps_on_every_process(tmp_path, parallel):
    """Evaluations score 0.1 (before training), 0.5, 0.3, 0.9: checkpoints after steps 1 and 3, written by
    every process together (process 0 decides; a process left out would hang the checkpoint's barrier)."""
    _run([tmp_path / "dist", "sdft", 1, tmp_path / "run", "--parallel", parallel, "--steps", 3, "--save-best"],
         tmp_path, procs=2)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_close_to_full_precision(tmp_path, parallel, precision):
    """mixed_precision=bf16 or fp16 (FSDP2's policy, DDP's autocast; fp16's loss scale divided out, under
    FSDP2 by the sharded scaler): the step takes the float64 single-process step's direction. bf16 keeps 8
    significant bits (rounding 2^-9), fp16 11; at the first step the teacher nearly equals the student
    (loss ~1e-5), so the gradient is a difference of nearly equal probabilities that loses a few more
    bits: the whole gradient is held to 2^-3 relative error under bf16 (0.05 measured) and 2^-6 under fp16's
    three more bits (0.009 measured), the loss to 2^-6."""
    _run([tmp_path / "single", "sdft", 2, tmp_path / "run1"], tmp_path)
    _run([tmp_path / "dist", "sdft", 1, tmp_path / "run2", "--parallel", parallel, "--precision", precision], tmp_path,
         procs=2)
    single = torch.load(tmp_path / "single.rank0")
    got = torch.load(tmp_path / "dist.rank0")
    assert abs(got["loss"] - single["loss"]) <= 2.0 ** -6 * abs(single["loss"]), (got["loss"], single["loss"])
    names = [n for n in single if n not in ("loss", "step")]
    for name in names:  # gradients land in the parameters' own dtype
        assert torch.as_tensor(got[name]).dtype == torch.as_tensor(single[name]).dtype
    ref = torch.cat([torch.as_tensor(single[n]).flatten() for n in names])
    mine = torch.cat([torch.as_tensor(got[n]).flatten() for n in names])
    error = ((mine - ref).norm() / ref.norm()).item()
    assert 0 < error < {"bf16": 2.0 ** -3, "fp16": 2.0 ** -6}[precision], error  # > 0: it really ran


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_frozen_teacher_stored_in_the_compute_dtype_takes_the_same_step(tmp_path, parallel):
    """Under bf16 a frozen teacher copy keeps its weights in bf16 (FSDP2: every parameter, as its policy gathers
    them; DDP: the linear layers, as autocast computes them): the step's gradients are bit-identical to a
    teacher kept in the model's own dtype."""
    flags = ["--parallel", parallel, "--precision", "bf16", "--float32"]  # autocast leaves float64 alone
    _run([tmp_path / "kept", "sdft", 1, tmp_path / "run1", *flags, "--keep-teacher-dtype"], tmp_path, procs=2)
    _run([tmp_path / "stored", "sdft", 1, tmp_path / "run2", *flags], tmp_path, procs=2)
    kept, stored = torch.load(tmp_path / "kept.rank0"), torch.load(tmp_path / "stored.rank0")
    assert set(kept) == set(stored) and kept["loss"] == stored["loss"] and len(kept) > 5
    for name in kept:
        assert torch.equal(torch.as_tensor(kept[name]), torch.as_tensor(stored[name])), name
