"""The dry run's memory plan counts the tensors a run really holds: its weights, gradients, optimizer state and
teacher copy, checked against a one-step run of the same model and settings."""
import dataclasses
import json

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.run import loop, memory_plan, trainer
from sdft.run.dry_run import meta_model
from sdft.run.export import save_hf_folder
from sdft.run.memory_plan import TrainingState, cache_per_token, optimizer_state, rollout_cache, training_state
from sdft.runtime.optimizer import OptimizerSettings

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path_factory.mktemp("m") / "model")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held(folder, tmp_path, monkeypatch, settings) -> dict:
    """The bytes a one-step run of ``settings`` held, by part, read from its own optimizer and teacher."""
    seen = {}

    def recording_optimizer(model, opt_settings):
        optimizer = make(model, opt_settings)
        seen["model"] = model

        def at_step(opt, args, kwargs):
            seen["gradients"] = _nbytes(p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None)
        optimizer.register_step_pre_hook(at_step)
        seen["optimizer"] = optimizer
        return optimizer

    class RecordingTeacher(trainer.Teacher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["teacher"] = self

    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", recording_optimizer)
    monkeypatch.setattr(trainer, "Teacher", RecordingTeacher)
    config = SDFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=3, progress_bar=False, device="cpu",
                        save_strategy="no", save_final_model=False, **settings)
    train(str(folder), ROWS, config)
    optimizer = seen["optimizer"]
    held = {"weights": _nbytes(seen["model"].parameters()), "gradients": seen["gradients"],
            f"{type(optimizer).__name__} state": _nbytes(t for s in optimizer.state.values() for t in s.values()
                                                         if torch.is_tensor(t))}
    copy = seen["teacher"].copy
    if copy is not None:
        held[f"{config.teacher_mode} teacher copy"] = _nbytes(copy.parameters())
    return held, config


@pytest.mark.parametrize("settings", [
    {},  # full fine-tuning in fp32 with a frozen teacher copy
    {"mixed_precision": "bf16"},  # the frozen copy's linear layers kept in bf16
    {"use_lora": True, "teacher_mode": "ema"},  # fp32 adapters on the model, an EMA copy of both
    {"use_lora": True, "dtype": "bfloat16"},  # a bf16 base, fp32 adapters, the teacher: adapters off
    {"dtype": "bfloat16", "teacher_mode": "live"},
    {"optim": "adafactor", "use_lora": True},  # factored second moments: rows and columns, not the matrix
    {"optim": "rmsprop", "weight_decay": 0.1},  # one buffer per parameter, in two weight-decay groups
], ids=["fp32", "bf16-autocast", "lora-ema", "lora-bf16-weights", "bf16-weights-live", "adafactor", "rmsprop"])
def test_the_plan_counts_the_bytes_a_run_holds(folder, tmp_path, monkeypatch, settings):
    held, config = _held(folder, tmp_path, monkeypatch, settings)
    plan = training_state(meta_model(str(folder)), config, 1, torch.device("cpu"))
    assert dict(plan.parts) == held
    assert not plan.uncounted


def test_under_fsdp_each_process_holds_its_share_and_under_ddp_all_of_it_once(folder):
    config = SDFTConfig(device="cpu")
    alone = dict(training_state(meta_model(str(folder)), config, 1, torch.device("cpu")).parts)
    fsdp = dict(training_state(meta_model(str(folder)), SDFTConfig(device="cpu", parallel="fsdp"), 4,
                               torch.device("cpu")).parts)
    ddp = dict(training_state(meta_model(str(folder)), config, 4, torch.device("cpu")).parts)
    assert fsdp == {k: v // 4 for k, v in alone.items()}
    assert ddp == alone  # the gradients are views into DDP's buckets (sdft.runtime.parallel.replicate)


def test_an_optimizer_that_cannot_step_on_the_meta_device_is_named_as_not_counted(folder, monkeypatch):
    def needs_a_gpu(model, settings):  # as bitsandbytes' 8-bit optimizers
        raise RuntimeError("Tensor on device meta is not on the expected device cuda:0")

    monkeypatch.setattr(memory_plan, "make_optimizer", needs_a_gpu)
    plan = training_state(meta_model(str(folder)), SDFTConfig(device="cpu", optim="sgd"), 1, torch.device("cpu"))
    assert [name for name, _ in plan.parts] == ["weights", "gradients", "frozen teacher copy"]
    assert plan.line().endswith("; optim=sgd's state not counted)")


@pytest.mark.parametrize("optim,per_value", [("adamw_8bit", 2), ("paged_adamw_32bit", 8), ("lion_8bit", 1),
                                             ("rmsprop_bnb", 4)])
def test_bitsandbytes_state_comes_from_its_layout(folder, optim, per_value):
    """bitsandbytes is not installed here (a config naming it is refused): its state's layout is read as is."""
    meta = meta_model(str(folder))
    name, state = optimizer_state(meta, OptimizerSettings(optim))
    sizes = [p.numel() for p in meta.parameters()]
    if per_value in (2, 1):  # 8 bits a value, a float32 absmax per 2048, 32 bits under 4096 values
        expected = sum(per_value * (n + 4 * -(-n // 2048)) if n >= 4096 else 4 * per_value * n for n in sizes)
    else:
        expected = per_value * sum(sizes)
    assert (name, state) == (f"{optim} (bitsandbytes)", expected)


def test_a_state_over_the_device_memory_is_said_with_what_shrinks_it():
    plan = TrainingState((("weights", 3 * 2**30), ("gradients", 3 * 2**30), ("frozen teacher copy", 2**29)))
    available = ("cuda:0", 4 * 2**30)
    assert plan.line(available) == ("memory per process before activations: 6.50 GiB (weights 3.00 GiB + gradients "
                                    "3.00 GiB + frozen teacher copy 0.50 GiB) of cuda:0's 4.00 GiB")
    assert plan.warning(available, SDFTConfig()) == (
        "sdft: the run would not fit: its weights, gradients and optimizer state take 6.50 GiB before activations, "
        "more than cuda:0's 4.00 GiB; use_lora=true, dtype=bfloat16, parallel=fsdp over several processes, "
        "teacher_mode=live (no teacher copy) shrink them")
    assert plan.warning(("cuda:0", 8 * 2**30), SDFTConfig()) is None


def test_the_dry_run_prints_the_memory_plan(folder, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["train", "--dry-run", "--model", str(folder), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={tmp_path / 'run'}", "use_lora=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan = training_state(meta_model(str(folder)), SDFTConfig(use_lora=True, device="cpu"), 1, torch.device("cpu"))
    assert lines[5] == "compute: the CPU, float32 throughout (mixed_precision=auto)"
    assert lines[6].startswith(plan.line().split(")")[0] + ")")
    c = SDFTConfig()
    assert lines[7].startswith(f"rollouts: a micro-batch of the {c.per_device_train_batch_size} longest prompts x "
                               f"{c.num_generations} rollouts of up to {c.max_completion_length} tokens reserves a "
                               "KV cache of ")
    assert lines[8].startswith("scoring: the student's pass over that micro-batch (")


def test_activations_over_what_the_state_leaves_are_said_with_what_cuts_them():
    plan = TrainingState((("weights", 2 * 2**30),))
    assert plan.warning(("cuda:0", 4 * 2**30), SDFTConfig(), cache=2**30, activations=2**31) is None
    assert plan.warning(("cuda:0", 4 * 2**30), SDFTConfig(), cache=2**30, activations=3 * 2**30) == (
        "sdft: the run would not fit: its training state (2.00 GiB) and the scoring pass's activations (3.00 GiB) "
        "take more than cuda:0's 4.00 GiB; a smaller per_device_train_batch_size, num_generations or "
        "max_completion_length shrinks them (gradient_accumulation_steps keeps the step's prompts); so does "
        "gradient_checkpointing=true")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rollout_cache_is_the_bytes_the_engine_reserves(folder, monkeypatch, dtype):
    from transformers import AutoModelForCausalLM

    from sdft.rollout import engine

    reserved = []

    def recording(cache, room):
        reserve(cache, room)
        reserved.append(_nbytes(getattr(layer, name) for layer in cache.layers for name in ("key_room", "value_room")))

    reserve = engine.reserve_room
    monkeypatch.setattr(engine, "reserve_room", recording)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tok = tiny_tokenizer()
    prompt = torch.tensor(tok("add 12 34")["input_ids"])
    config = SDFTConfig(per_device_train_batch_size=1, num_generations=3, max_completion_length=5)
    engine.HFRolloutEngine(tok).generate(model, [prompt], 3, 5, temperature=1.0)
    per_token = cache_per_token(meta_model(str(folder)), dtype)
    assert reserved == [rollout_cache(per_token, [[5] * 4, prompt.tolist(), [7, 8]], config, model.config)]
    prompts = [torch.tensor(tok(text)["input_ids"]) for text in ("add 1 2", "add 12 34 and 56", "add 1 3", "x")]
    engine.HFRolloutEngine(tok).generate(model, prompts[:3], 3, 5, temperature=1.0)  # the three longest
    assert reserved[1] == rollout_cache(per_token, [p.tolist() for p in prompts],
                                        dataclasses.replace(config, per_device_train_batch_size=3), model.config)


def test_the_longest_prompts_fill_the_micro_batch_and_flash_copies_each_prompts_cache():
    model_config = tiny_llama().config
    prompts = [list(range(100 * b, 100 * b + n)) for b, n in enumerate([5, 30, 20, 7])]  # nothing shared
    tree = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=10)
    assert rollout_cache(8, prompts, tree, model_config) == 8 * 2 * (30 + 4 * 10)  # a row each, padded
    flash = SDFTConfig(per_device_train_batch_size=2, num_generations=4, max_completion_length=10,
                       attn_implementation="flash_attention_2", tree_attention="auto")
    assert rollout_cache(8, prompts, flash, model_config) == 8 * 2 * 4 * (30 + 10)


def test_a_rollout_cache_over_what_the_state_leaves_is_said_with_what_shrinks_it():
    plan = TrainingState((("weights", 2 * 2**30),))
    assert plan.warning(("cuda:0", 4 * 2**30), SDFTConfig(), cache=2**30) is None
    assert plan.warning(("cuda:0", 4 * 2**30), SDFTConfig(), cache=3 * 2**30) == (
        "sdft: the run would not fit: its training state (2.00 GiB) and the rollouts' KV cache (3.00 GiB) take more "
        "than cuda:0's 4.00 GiB; a smaller per_device_train_batch_size, num_generations or max_completion_length "
        "shrinks the cache (gradient_accumulation_steps keeps the step's prompts)")


def test_the_plan_leaves_the_callers_meta_model_as_it_was(folder):
    meta = meta_model(str(folder))
    before = [(n, p.dtype) for n, p in meta.named_parameters()]
    training_state(meta, SDFTConfig(device="cpu", use_lora=True, dtype="bfloat16"), 1, torch.device("cpu"))
    cache_per_token(meta, torch.bfloat16)
    assert [(n, p.dtype) for n, p in meta.named_parameters()] == before
