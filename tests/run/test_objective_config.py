"""The objectives in training: modes, IS, skipped tokens, per-sequence means, TRL names, presets, schedule."""
import math

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.loss.batch import BatchLoss
from sdft.loss.teacher import Teacher
from sdft.rollout.engine import HFRolloutEngine
from sdft.run.schedule import LRSchedule
from sdft_kernels import reference_linear_divergence

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


def test_paper_and_trl_presets():
    paper = SDFTConfig.paper()
    assert (paper.divergence, paper.distillation_mode, paper.teacher_mode) == ("forward_kl", "full_logits", "ema")
    assert paper.ema_decay == pytest.approx(0.99) and paper.num_loss_tokens_to_skip == 3
    assert paper.num_generations == 1 and paper.loss_normalization == "sequence_mean"
    assert (paper.distillation_is_clip, paper.distillation_is_level) == (2.0, "sequence")
    assert paper.lr_scheduler_type == "cosine" and paper.warmup_ratio > 0 and paper.teacher_template == "paper"
    trl = SDFTConfig.trl(output_dir="x")
    assert (trl.distillation_mode, trl.distillation_topk, trl.divergence, trl.distillation_alpha) == \
        ("topk_logits", 100, "jsd", 0.5)
    assert trl.teacher_mode == "frozen" and trl.num_generations == 8 and trl.max_completion_length == 256
    assert trl.teacher_template == "{prompt}\n\n{demonstration}" and trl.output_dir == "x"


def test_trl_names_are_accepted():
    c = SDFTConfig.from_dict({"teacher_model_kind": "base", "teacher_update_rate": 0.02,
                              "teacher_prompt_template": "{prompt} -- {privileged_context}"})
    assert (c.teacher_mode, c.teacher_template) == ("frozen", "{prompt} -- {demonstration}")
    assert c.ema_decay == pytest.approx(0.98)
    c = SDFTConfig.from_strings({"teacher_model_kind": "ema", "teacher_update_rate": "0.05",
                                 "distillation_is_clip": "none", "distillation_mode": "topk"})
    assert (c.teacher_mode, c.distillation_is_clip, c.distillation_mode) == ("ema", None, "topk_logits")
    assert SDFTConfig.from_strings({"distillation_is_clip": "2"}).distillation_is_clip == 2.0


@pytest.mark.parametrize("values,message", [
    ({"teacher_model_kind": "teacher"}, "unknown teacher_model_kind 'teacher'"),
    ({"teacher_model_kind": "base", "teacher_mode": "live"}, "give teacher_mode or its TRL name"),
    ({"distillation_mode": "sampled_token"}, "reverse-KL estimator"),
    ({"distillation_mode": "top"}, "unknown distillation_mode 'top'"),
    ({"distillation_is_clip": 0.0}, "distillation_is_clip must be positive"),
    ({"loss_normalization": "batch"}, "unknown loss_normalization"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be below 1"),
])
def test_bad_objective_options(values, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig.from_dict({"divergence": "forward_kl", **values})


def test_learning_rate_schedules():
    c = SDFTConfig(learning_rate=1.0, max_steps=10, warmup_ratio=0.2, lr_scheduler_type="cosine")
    lrs = [LRSchedule.from_config(c).at(s) for s in range(10)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    c = SDFTConfig(learning_rate=2.0, max_steps=4, lr_scheduler_type="linear")
    assert [LRSchedule.from_config(c).at(s) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
    assert LRSchedule.from_config(SDFTConfig(learning_rate=3.0)).at(7) == 3.0


def test_a_schedules_keywords_are_checked_by_its_scheduler_before_the_model_loads(tmp_path):
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=4, lr_scheduler_type="warmup_stable_decay")
    with pytest.raises(ValueError, match="lr_scheduler_kwargs={} for warmup_stable_decay: .*num_decay_steps"):
        train("not/loaded", ROWS, config)
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=4, lr_scheduler_type="polynomial",
                        lr_scheduler_kwargs={"powr": 2})
    with pytest.raises(ValueError, match="lr_scheduler_kwargs 'powr': not a keyword of HF's polynomial schedule"):
        train("not/loaded", ROWS, config)
    with pytest.raises(ValueError, match="min_lr_rate=0.1 and lr_scheduler_kwargs 'min_lr' both set"):
        SDFTConfig(lr_scheduler_type="cosine_with_min_lr", min_lr_rate=0.1, lr_scheduler_kwargs={"min_lr": 1e-6})
    parsed = SDFTConfig.from_strings({"lr_scheduler_kwargs": "{\"num_cycles\": 2}"})
    assert parsed.lr_scheduler_kwargs == {"num_cycles": 2}
    with pytest.raises(ValueError, match="lr_scheduler_kwargs must be a JSON object"):
        SDFTConfig.from_strings({"lr_scheduler_kwargs": "num_cycles=2"})


@pytest.mark.parametrize("rows,prompts,accumulation,processes,ends", [
    (3, 1, 1, 1, [3, 6, 9]), (3, 2, 1, 1, [2, 3, 5, 6, 8, 9]), (4, 1, 2, 2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    (10, 3, 1, 1, [4, 7, 10])])
def test_an_epoch_ends_at_the_step_whose_prompts_reach_a_multiple_of_the_rows(rows, prompts, accumulation,
                                                                              processes, ends):
    from sdft.run.loop import epoch_ends

    config = SDFTConfig(per_device_train_batch_size=prompts, gradient_accumulation_steps=accumulation)
    assert [s for s in range(1, 11) if epoch_ends(s, config, rows, processes)] == ends


def test_eval_strategy_epoch_without_anything_to_evaluate_is_one_line_before_the_model_loads(tmp_path):
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=2, eval_strategy="epoch", retention_data="")
    with pytest.raises(ValueError, match="eval_strategy=epoch evaluates eval_data during training, and the run has "
                                         "none"):
        train("not/loaded", ROWS, config)


def test_warmup_steps_count_whole_steps_and_exclude_warmup_ratio():
    c = SDFTConfig(learning_rate=1.0, max_steps=25, warmup_steps=7, lr_scheduler_type="linear")
    lrs = [LRSchedule.from_config(c).at(s) for s in range(25)]
    assert lrs[:8] == pytest.approx([s / 7 for s in range(7)] + [1.0])  # 7 / 25 * 25 rounds up to 8 as a ratio
    with pytest.raises(ValueError, match="warmup_steps=3 and warmup_ratio=0.1 both set the warmup"):
        SDFTConfig(warmup_steps=3, warmup_ratio=0.1)


def test_cosine_with_min_lr_ends_at_its_share_of_the_rate_as_hf_does():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    c = SDFTConfig(learning_rate=1.0, max_steps=10, lr_scheduler_type="cosine_with_min_lr", min_lr_rate=0.1)
    ours = [LRSchedule.from_config(c).at(s) for s in range(10)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 0, 10, min_lr_rate=0.1)
    theirs = []
    for _ in range(10):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    assert ours == pytest.approx(theirs, rel=1e-12) and min(ours) > 0.1
    with pytest.raises(ValueError, match="min_lr_rate=0.1 is where cosine_with_min_lr ends"):
        SDFTConfig(lr_scheduler_type="cosine", min_lr_rate=0.1)


def _rollouts(seed=0, group=3):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).double()
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"][0] for r in ROWS[:2]]
    contexts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"] + " = " + r["demonstration"]}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"][0] for r in ROWS[:2]]
    torch.manual_seed(seed)
    batch = HFRolloutEngine(tok).generate(model, prompts, group, 7, 1.0)
    return tok, model, batch, contexts


def _per_token(model, batch, contexts, config):
    """Per-token reference losses [B*G, L] from each rollout alone (unshared), float64."""
    rows = []
    group = batch.group_size
    with torch.no_grad():
        for r in range(batch.completions.shape[0]):
            out = []
            for ctx in (batch.prompts[r // group], contexts[r // group]):
                ids = torch.cat([ctx, batch.completions[r]])[None]
                out.append(model.get_decoder()(input_ids=ids).last_hidden_state[0, ctx.numel() - 1:-1])
            rows.append(out)
    s = torch.stack([a for a, _ in rows]).requires_grad_()
    t = torch.stack([b for _, b in rows])
    w = model.get_output_embeddings().weight
    return reference_linear_divergence(s, t, w, divergence=config.divergence, reduction="none")


def test_sequence_mean_and_skipped_tokens_match_a_per_rollout_reference():
    tok, model, batch, contexts = _rollouts()
    config = SDFTConfig(divergence="forward_kl", loss_normalization="sequence_mean", num_loss_tokens_to_skip=2,
                        teacher_mode="live", device="cpu")
    with torch.no_grad():
        got = BatchLoss.from_config(config)(model, Teacher(model, "live"), batch, contexts, tok.pad_token_id)
    per_token = _per_token(model, batch, contexts, config)
    mask = batch.mask.clone()
    mask[:, :2] = False
    per_rollout = [(per_token[r][mask[r]].sum() / mask[r].sum()) for r in range(mask.shape[0]) if mask[r].any()]
    normaliser = BatchLoss.from_config(config).normaliser(batch)
    assert normaliser == len(per_rollout)
    expected = torch.stack(per_rollout).mean()
    torch.testing.assert_close(got / normaliser, expected, rtol=1e-6, atol=1e-9)
    token_config = SDFTConfig(divergence="forward_kl", num_loss_tokens_to_skip=2, teacher_mode="live", device="cpu")
    with torch.no_grad():
        got = BatchLoss.from_config(token_config)(model, Teacher(model, "live"), batch, contexts, tok.pad_token_id)
    tokens = BatchLoss.from_config(token_config).normaliser(batch)
    torch.testing.assert_close(got / tokens, per_token[mask].mean(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("change", [
    dict(distillation_mode="topk_logits", distillation_topk=5, divergence="jsd"),
    dict(distillation_mode="topk_logits", distillation_topk=5, distillation_add_tail=True,
         distillation_topk_support="teacher", divergence="forward_kl"),
    dict(distillation_mode="sampled_token", divergence="reverse_kl", distillation_is_clip=2.0),
    dict(divergence="forward_kl", distillation_is_clip=2.0, distillation_is_level="sequence"),
    dict(generate_from_teacher=True, teacher_mode="ema", teacher_sync_steps=2, lr_scheduler_type="cosine",
         warmup_ratio=0.3),
])
def test_every_mode_trains(tmp_path, change):
    tok = tiny_tokenizer()
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=5, learning_rate=1e-3, progress_bar=False, device="cpu",
                        save_final_model=False, **change)
    result = train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in result.metrics)


def test_paper_preset_trains(tmp_path):
    tok = tiny_tokenizer()
    config = SDFTConfig.paper(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                              max_completion_length=6, progress_bar=False, device="cpu", save_final_model=False)
    result = train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)
    schedule = LRSchedule.from_config(config)
    assert [r["learning_rate"] for r in result.metrics] == [schedule.at(0), schedule.at(1)]
