"""sdft.train end to end on a tiny random model: logging, prefix sharing, teacher modes, crash + resume."""
import json
import math

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.run.checkpoint import CheckpointSaveError, list_checkpoints

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]


def _config(tmp_path, **change):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, num_generations=3,
                max_completion_length=6, learning_rate=1e-3, save_steps=2, progress_bar=False, device="cpu",
                save_final_model=False)
    return SDFTConfig(**{**base, **change})


def _run(tmp_path, step_callback=None, **change):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    return train(model, ROWS, _config(tmp_path, **change), tokenizer=tok, step_callback=step_callback)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_logs_metrics_and_checkpoints(tmp_path):
    result = _run(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and result.step == 3
    for r in records:  # TRL's names, then sdft's own under sdft/
        assert math.isfinite(r["loss"]) and r["loss"] >= 0 and r["sdft/tokens"] > 0
        assert r["self_distillation/distillation_loss"] == r["loss"] and r["completions/mean_length"] > 0
        assert r["sdft/tokens_processed"] < r["sdft/tokens_processed_unshared"]
        assert r["sdft/peak_memory_mib"] > 0 and r["sdft/tokens_per_second"] > 0
        assert all(k in ("step", "epoch", "loss", "grad_norm", "learning_rate") or "/" in k for k in r), sorted(r)
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5]  # 2 prompts a step of 4
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("stop_at, checkpoints", [(1, ["checkpoint-1"]), (2, ["checkpoint-2"])])
def test_a_stop_asked_by_the_callback_checkpoints_and_evaluates_that_step_once(tmp_path, stop_at, checkpoints):
    tok = tiny_tokenizer()
    result = train(tiny_llama(vocab=len(tok)), ROWS, _config(tmp_path, max_steps=3, eval_steps=2,
                                                               eval_max_new_tokens=2),
                   tokenizer=tok, eval_dataset=ROWS[:1], step_callback=lambda step, record: step == stop_at)
    assert result.step == stop_at and [r["step"] for r in result.metrics] == list(range(1, stop_at + 1))
    assert [p.name for p in list_checkpoints(tmp_path)] == checkpoints
    assert [r["step"] for r in result.evaluations] == [0, stop_at]  # due or not, once


class Crash(RuntimeError):
    pass


def test_crash_leaves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path):
    full = _params(_run(tmp_path / "full", max_steps=4).model)

    def crash_at_3(step, record):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        _run(tmp_path / "crashed", crash_at_3, max_steps=4)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["checkpoint-2"]
    resumed = _run(tmp_path / "crashed", max_steps=4, resume_from_checkpoint=True)
    assert resumed.metrics[0]["step"] == 3
    logged = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the crashed run's step 3 was cut back, each step appears once
    for name, value in _params(resumed.model).items():
        torch.testing.assert_close(value, full[name], rtol=1e-5, atol=1e-7)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointSaveError, match="checkpoint-4 .*disk full .*; the previous checkpoint checkpoint-2 "
                                                  "is intact"):
        _run(tmp_path, max_steps=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    resumed = _run(tmp_path, max_steps=4, resume_from_checkpoint=True)
    assert [r["step"] for r in resumed.metrics] == [3, 4]


@pytest.mark.parametrize("change", [
    dict(teacher_mode="frozen"),
    dict(teacher_mode="ema", ema_decay=0.5),
    dict(use_lora=True, teacher_mode="frozen"),
    dict(divergence="jsd", distillation_alpha=0.3, gradient_accumulation_steps=2),
    dict(divergence="forward_kl", distillation_temperature=2.0),
])
def test_teacher_modes_lora_and_divergences(tmp_path, change):
    result = _run(tmp_path, max_steps=2, **change)
    assert all(math.isfinite(r["loss"]) for r in result.metrics)
    if change.get("use_lora"):
        trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not a complete sdft checkpoint"):
        _run(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-9"))


def test_too_long_prompt_names_the_example(tmp_path):
    with pytest.raises(ValueError, match="dataset row 0: the prompt has .* over max_prompt_length=5 \\(raise it"):
        _run(tmp_path, max_prompt_length=5)


def test_sft_baseline_learns_the_demonstrations(tmp_path):
    from sdft import train_sft

    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    result = train_sft(model, ROWS, _config(tmp_path, max_steps=30, learning_rate=1e-2), tokenizer=tok)
    losses = [r["loss"] for r in result.metrics]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "checkpoint-30").exists()


def test_lora_wrapping_says_nothing_the_user_cannot_act_on(recwarn):
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``; sdft keeps that warning out."""
    from sdft.models.lora import LoraSettings, apply_lora

    settings = LoraSettings.from_config(SDFTConfig(use_lora=True, lora_target_modules=["q_proj", "v_proj"]))
    apply_lora(tiny_llama(), settings)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_lora_on_the_lm_head_is_one_line_naming_the_option(tmp_path):
    """The fused loss reads the head as a plain weight: adapters on it would be trained by nothing."""
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="lora_target_modules adapts the LM head"):
        train(tiny_llama(vocab=len(tok)), ROWS, _config(tmp_path, use_lora=True, lora_target_modules=["lm_head"]),
              tokenizer=tok)


def test_terminated_lengths_count_only_rollouts_that_ended_as_trl_does():
    from sdft.run.trainer import terminated_lengths

    assert terminated_lengths([2, 6, 4, 6], 6) == {"mean_terminated_length": 3.0, "shortest_terminated": 2,
                                                   "longest_terminated": 4}
    assert terminated_lengths([6, 6], 6) == {"mean_terminated_length": 0.0, "shortest_terminated": 0,
                                             "longest_terminated": 0}  # none ended: TRL reports zeros
