"""TRL users switch by changing one import (sdft.integrations.trl.SDFTTrainer)."""
import itertools
import json
import types

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig
from sdft.integrations.trl import SDFTTrainer, config_from_trl

ROWS = [{"prompt": [{"role": "user", "content": f"add {a} {b}"}], "privileged_context": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


def _args(tmp_path, **change):
    """TRL SDFTConfig's attribute names and defaults (those sdft reads), changed where asked."""
    values = dict(output_dir=str(tmp_path), learning_rate=5e-5, lr_scheduler_type="linear", warmup_ratio=0.0,
                  warmup_steps=0, max_steps=-1, num_train_epochs=3.0, per_device_train_batch_size=8,
                  gradient_accumulation_steps=1, gradient_checkpointing=True, weight_decay=0.0, max_grad_norm=1.0,
                  seed=42, logging_steps=10, save_steps=500, save_total_limit=None, report_to=[], bf16=False,
                  use_cpu=True, temperature=1.0, max_prompt_length=512, max_completion_length=256,
                  num_generations=8, use_vllm=False, num_iterations=1, top_k=0, top_p=1.0, min_p=None,
                  repetition_penalty=1.0, teacher_model_kind="base", teacher_update_rate=0.05, teacher_sync_steps=1,
                  distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=100,
                  distillation_is_clip=2.0, distillation_add_tail=False, generate_from_teacher=False,
                  teacher_prompt_template="{prompt}\n\n{privileged_context}", num_loss_tokens_to_skip=0,
                  disable_tqdm=True)
    values.update(change)
    return types.SimpleNamespace(**values)


def test_trl_defaults_translate(tmp_path):
    c = config_from_trl(_args(tmp_path), num_examples=10)
    assert (c.divergence, c.distillation_alpha, c.distillation_mode, c.distillation_topk) == (
        "jsd",
        0.5,
        "topk_logits",
        100,
    )
    assert (c.per_device_train_batch_size, c.num_generations) == (1, 8)  # TRL's 8 counts completions
    assert c.max_steps == 30  # 3 epochs of 10 prompts, one a step
    assert (c.teacher_mode, c.teacher_template) == ("frozen", "{prompt}\n\n{demonstration}")
    assert c.ema_decay == pytest.approx(0.95) and c.loss_normalization == "sequence_mean"
    assert (c.lr_scheduler_type, c.learning_rate, c.seed, c.save_total_limit) == ("linear", 5e-5, 42, 0)
    assert c.distillation_is_clip is None and c.device == "cpu"


def test_epochs_count_the_processes_torchrun_launched_before_the_group_is_joined(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    args = _args(tmp_path, per_device_train_batch_size=2, num_generations=2, num_train_epochs=1.0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the trainer is built before train() joins
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    assert trainer.args.max_steps == 2  # one epoch of 4 prompts, 1 per process a step, 2 processes


def test_trls_bf16_is_mixed_precision_not_a_warning(tmp_path, recwarn):
    """TRL's bf16=True (its default): autocast compute on fp32 master weights, as sdft's mixed_precision=bf16."""
    assert config_from_trl(_args(tmp_path, max_steps=3, bf16=True)).mixed_precision == "bf16"
    assert config_from_trl(_args(tmp_path, max_steps=3, bf16=False)).mixed_precision == "no"
    assert not [w for w in recwarn if "not applied" in str(w.message)]


def test_trls_fp16_is_loss_scaled_mixed_precision(tmp_path):
    """TRL's fp16=True (its bf16 then False): fp16 autocast on fp32 master weights with dynamic loss scaling."""
    assert config_from_trl(_args(tmp_path, max_steps=3, fp16=True)).mixed_precision == "fp16"
    assert config_from_trl(_args(tmp_path, max_steps=3, fp16=True, bf16=None)).mixed_precision == "fp16"


@pytest.mark.parametrize("alpha,divergence", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "jsd")])
def test_alpha_maps_to_the_divergence(tmp_path, alpha, divergence):
    c = config_from_trl(_args(tmp_path, distillation_alpha=alpha, max_steps=5, distillation_mode="full_logits"))
    assert c.divergence == divergence and (divergence != "jsd" or c.distillation_alpha == alpha)


def test_trls_sampling_fields_map_onto_the_rollouts(tmp_path):
    c = config_from_trl(_args(tmp_path, max_steps=3, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1))
    assert (c.top_p, c.top_k, c.min_p, c.repetition_penalty) == (0.9, 50, 0.05, 1.1)
    c = config_from_trl(_args(tmp_path, max_steps=3, top_k=None, min_p=None))
    assert (c.top_p, c.top_k, c.min_p) == (1.0, 0, 0.0)
    c = config_from_trl(_args(tmp_path, max_steps=3, top_p=0.9, generation_kwargs={"top_p": 0.5, "do_sample": True,
                                                                                    "temperature": 0.7}))
    assert (c.top_p, c.temperature) == (0.5, 0.7)  # generation_kwargs win, as in TRL


def test_trls_scheduler_kwargs_go_to_the_schedule_and_its_own_check(tmp_path):
    c = config_from_trl(_args(tmp_path, max_steps=3, lr_scheduler_type="cosine_with_min_lr", learning_rate=1e-4,
                              lr_scheduler_kwargs={"min_lr": 1e-5}))
    assert (c.lr_scheduler_type, c.lr_scheduler_kwargs) == ("cosine_with_min_lr", {"min_lr": 1e-5})
    with pytest.raises(ValueError, match="lr_scheduler_kwargs 'num_cycle': not a keyword of HF's cosine schedule "
                                         r"\(it takes: num_cycles\)"):
        config_from_trl(_args(tmp_path, max_steps=3, lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 2}))
    with pytest.raises(ValueError, match="lr_scheduler_type='reduce_lr_on_plateau': sdft takes the schedules that"):
        config_from_trl(_args(tmp_path, max_steps=3, lr_scheduler_type="reduce_lr_on_plateau"))


def _trainer_rates(args, max_steps: int) -> list:
    """The learning rate of each optimizer step under the HF Trainer's scheduler for ``args``."""
    import torch
    from transformers import get_scheduler
    from transformers.optimization import get_inverse_sqrt_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    warmup = args.get_warmup_steps(max_steps)
    if getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "inverse_sqrt":  # 4.x drops its kwargs
        scheduler = get_inverse_sqrt_schedule(optimizer, warmup, **args.lr_scheduler_kwargs)
    else:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = []
    for _ in range(max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


SCHEDULE_KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_with_restarts": {"num_cycles": 3},
                   "polynomial": {"power": 2.0, "lr_end": 1e-6}, "inverse_sqrt": {"timescale": 4},
                   "cosine_warmup_with_min_lr": {"min_lr": 2e-6, "warmup_lr_rate": 0.1},
                   "warmup_stable_decay": {"num_decay_steps": 5, "min_lr_ratio": 0.1, "decay_type": "linear"}}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr",
                                      "cosine_with_restarts", "polynomial", "inverse_sqrt",
                                      "cosine_warmup_with_min_lr", "warmup_stable_decay"])
@pytest.mark.parametrize("warmup,max_steps", [(0, 12), (3, 12), (7, 25), (0.1, 30), (0.25, 9), (40, 25)])
def test_the_dropins_learning_rates_are_the_trainers_for_trls_warmup_and_schedule(tmp_path, schedule, warmup,
                                                                                     max_steps):
    """transformers 5 reads warmup_steps below 1 as a share of the steps (0.1: 10%, not 0.1 of one step);
    HF's plain constant schedule takes no warmup; warmup longer than the run never reaches the rate; each
    schedule's own keywords (lr_scheduler_kwargs) as the scheduler reads them."""
    import dataclasses

    from sdft.run.schedule import LRSchedule

    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    kwargs = SCHEDULE_KWARGS.get(schedule, {})
    warmup_field = "warmup_steps"
    if 0 < warmup < 1 and "warmup_ratio" in {f.name for f in dataclasses.fields(trl_sdft.SDFTConfig)}:
        warmup_field = "warmup_ratio"  # transformers 4.x: warmup_steps is a whole number, the share is warmup_ratio
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                               max_steps=max_steps, learning_rate=2e-5, lr_scheduler_type=schedule,
                               lr_scheduler_kwargs=kwargs, **{warmup_field: warmup})
    schedule = LRSchedule.from_config(config_from_trl(args))
    assert [schedule.at(s) for s in range(max_steps)] == pytest.approx(_trainer_rates(args, max_steps), rel=1e-12,
                                                                       abs=1e-18)


@pytest.mark.parametrize("kwargs,message", [({"num_beams": 2}, "generation_kwargs 'num_beams'"),
                                            ({"do_sample": False}, "do_sample=False")])
def test_other_generation_kwargs_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_from_trl(_args(tmp_path, max_steps=3, generation_kwargs=kwargs))


def test_non_reentrant_checkpointing_kwargs_are_sdfts_own_and_accepted(tmp_path):
    from sdft.integrations.trl_fields import check_fields

    check_fields(_args(tmp_path, max_steps=3, gradient_checkpointing_kwargs={"use_reentrant": False}))
    with pytest.raises(ValueError, match="other than sdft's use_reentrant=False"):
        check_fields(_args(tmp_path, max_steps=3, gradient_checkpointing_kwargs={"use_reentrant": True}))


@pytest.mark.parametrize("change,message", [
    (dict(use_vllm=True), "use_vllm=True: sdft does not implement vLLM generation"),
    (dict(num_iterations=2), "reusing rollouts"),
    (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha=5.0: sdft does not implement NEFTune"),
    (dict(per_device_train_batch_size=6), "must be a multiple of num_generations=8"),
    (dict(lr_scheduler_type="reduce_lr_on_plateau"), "lr_scheduler_type=.reduce_lr_on_plateau."),
    (dict(teacher_model_kind="server"), "unknown teacher_model_kind"),
    (dict(fp16=True, bf16=True), "bf16=True and fp16=True: set one of them"),
])
def test_unsupported_options_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_trl(_args(tmp_path, max_steps=3, **change))


def test_dropin_trains_with_trl_columns_and_saves(tmp_path):
    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=2, per_device_train_batch_size=4, num_generations=2,
                 max_completion_length=4, distillation_topk=5, logging_steps=1, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 2 and result.metrics["train_loss"] == result.training_loss
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2] and trainer.state.global_step == 2
    assert {"grad_norm", "learning_rate", "epoch", "self_distillation/distillation_loss"} <= set(steps[0])
    assert "train_runtime" in trainer.state.log_history[-1]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    out = trainer.save_model(str(tmp_path / "saved"))
    assert (out / "config.json").is_file()


def test_the_hf_trainers_tail_writes_its_metrics_and_state_files_beside_the_run(tmp_path, capsys):
    """``log_metrics`` / ``save_metrics`` / ``save_state``, the end of most HF and TRL scripts, as the Trainer's."""
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    args = _args(run, max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                 distillation_topk=5, logging_steps=1, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    metrics = trainer.train().metrics
    capsys.readouterr()
    trainer.log_metrics("train", metrics)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "***** train metrics *****" and any("train_loss" in line for line in printed[1:])
    trainer.save_metrics("train", metrics)
    trainer.save_metrics("eval", {"eval_score": 0.5})
    assert json.loads((run / "train_results.json").read_text()) == metrics
    assert json.loads((run / "all_results.json").read_text()) == {**metrics, "eval_score": 0.5}
    trainer.save_state()
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"] == trainer.state.log_history
    again = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=_args(run, **{**vars(args), "max_steps": 3}),
                        train_dataset=ROWS, processing_class=tok)
    again.train(resume_from_checkpoint=True)  # the script's files beside the run are no obstacle, and stay
    assert (run / "trainer_state.json").is_file() and (run / "all_results.json").is_file()


def test_save_model_into_output_dir_as_trl_scripts_end_goes_to_final_model(tmp_path, capfd, recwarn):
    import logging

    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, gradient_checkpointing=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "DefaultFlowCallback" in r.getMessage()]  # sdft's loop is the flow here
    trainer.train()
    out = trainer.save_model(args.output_dir)
    assert out == tmp_path / "run" / "final_model" and (out / "config.json").is_file()
    assert f"the model goes to {out}; load it from there" in capfd.readouterr().err


def test_the_tail_of_trls_scripts_runs_as_there(tmp_path, capfd):
    """trl/scripts/*.py end with accelerator.print, save_model(output_dir) and end() (transformers 5.18+)."""
    import accelerate

    from sdft.integrations.trl import ProcessView

    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    trainer.train(resume_from_checkpoint=None)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(args.output_dir)
    trainer.accelerator.print(f"Model saved to {args.output_dir}.")
    trainer.end()
    out = capfd.readouterr().out
    assert "Training completed." in out and f"Model saved to {args.output_dir}." in out
    view = trainer.accelerator
    assert (view.is_main_process, view.process_index, view.num_processes) == (True, 0, 1)
    names = [n for n in vars(ProcessView) if not n.startswith("_")]
    assert names and all(hasattr(accelerate.Accelerator, n) for n in names)  # accelerate's own names


@pytest.mark.parametrize("conversational", [False, True], ids=["standard_strings", "conversational"])
def test_prompts_and_teacher_contexts_tokenize_as_trl_does(tmp_path, conversational):
    """TRL's own tokenization (its _tokenize_prompts and teacher-context builder, called on a stand-in trainer):
    a string prompt is plain text there even with a chat template, a message list goes through it."""
    trl_sdft = pytest.importorskip("trl.experimental.sdft.sdft_trainer")
    from sdft.integrations.trl import trl_examples
    from sdft.run.trainer import encode_examples

    tok = tiny_tokenizer()
    questions = ["add 1 2", "what is 3 plus 4?"]
    rows = [{"prompt": [{"role": "user", "content": q}] if conversational else q, "privileged_context": d}
            for q, d in zip(questions, ["3", "7"])]
    template = "{prompt}\n\nExample: {privileged_context}"
    args = _args(tmp_path, teacher_prompt_template=template)
    ours = encode_examples(trl_examples(rows), tok, config_from_trl(args, len(rows)), "cpu")
    trainer = types.SimpleNamespace(processing_class=tok, chat_template_kwargs={}, max_prompt_length=None,
                                    args=types.SimpleNamespace(teacher_prompt_template=template))
    teacher_prompts = [trl_sdft.DemonstrationTeacherContextBuilder(trainer)._compose_teacher_prompt(
        r["prompt"], r["privileged_context"]) for r in rows]
    assert [e.prompt_ids.tolist() for e in ours] == trl_sdft.SDFTTrainer._tokenize_prompts(
        trainer, [r["prompt"] for r in rows])
    assert [e.teacher_ids.tolist() for e in ours] == trl_sdft.SDFTTrainer._tokenize_prompts(trainer, teacher_prompts)


def test_standard_format_rows_train_and_evaluate(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"prompt": r["prompt"][0]["content"], "privileged_context": r["privileged_context"]} for r in ROWS]
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=4, num_generations=2,
                 max_completion_length=4, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=rows, eval_dataset=rows[:2],
                          processing_class=tok)
    assert trainer.train().global_step == 1
    assert trainer.evaluate()["eval_examples"] == 2


@pytest.mark.parametrize("share_prefix", [True, False])
def test_standard_format_prompts_of_one_token_train(tmp_path, share_prefix):
    """TRL's plain text has no template around it: "7" is one token, and a prefix of nothing to share."""
    tok = tiny_tokenizer()
    rows = [{"prompt": str(a), "privileged_context": str(a + 1)} for a in range(4)]
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=4, num_generations=2,
                 max_completion_length=4, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=rows, processing_class=tok)
    trainer.args = SDFTConfig.from_dict({**trainer.args.to_dict(), "share_prefix": share_prefix})
    assert trainer.train().global_step == 1


def test_real_trl_config_when_installed(tmp_path):
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=7,
                               distillation_alpha=0.0, distillation_mode="full_logits", teacher_model_kind="ema")
    c = config_from_trl(args)
    assert (c.divergence, c.distillation_mode, c.teacher_mode, c.max_steps) == ("forward_kl", "full_logits", "ema", 7)


@pytest.mark.parametrize("targets,adapted", [(None, {"q_proj", "v_proj"}), ("all-linear", {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})])
def test_lora_config_defaults_and_all_linear_resolve_as_peft_does(tmp_path, targets, adapted):
    from peft import LoraConfig

    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainer.train()
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names == adapted
    out = trainer.save_model()  # TRL's no-argument call: into the run folder's final_model, the run kept
    assert out == tmp_path / "run" / "final_model" and (out / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and (tmp_path / "run" / "config.json").is_file()


@pytest.mark.parametrize("change,message", [(dict(use_dora=True), "use_dora"),
                                            (dict(modules_to_save=["lm_head"]), "modules_to_save"),
                                            (dict(bias="all"), "bias='all'")])
def test_lora_options_sdft_cannot_honour_are_refused(tmp_path, change, message):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=message):
        SDFTTrainer(model="unused", args=_args(tmp_path, max_steps=1), train_dataset=ROWS,
                    peft_config=LoraConfig(**change))


def test_a_rerun_resumes_through_trainers_own_argument(tmp_path):
    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False, logging_steps=1)
    SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok).train()
    again = SDFTTrainer(model=tiny_llama(vocab=len(tok)),
                        args=_args(tmp_path / "run", **{**vars(args), "max_steps": 2}),
                        train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ValueError, match=r"already holds checkpoints .*: trainer.train\(resume_from_checkpoint=True\) "
                                         "continues that run; to start afresh, give a new output_dir"):
        again.train()
    again.train(resume_from_checkpoint=True)
    assert [h["step"] for h in again.state.log_history if "loss" in h] == [2]


def test_a_rerun_over_a_finished_runs_model_without_checkpoints_is_refused_in_the_trainers_terms(tmp_path):
    import shutil

    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False)
    SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok).train()
    for checkpoint in (tmp_path / "run").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    again = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ValueError, match="holds final_model, the model of an earlier run whose checkpoints are "
                                         "gone .*: give a new output_dir"):
        again.train()


def test_save_strategy_epoch_checkpoints_and_calls_on_save_at_each_epochs_end(tmp_path):
    from transformers import TrainerCallback

    saves = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    tok = tiny_tokenizer()  # 4 rows, 1 prompt a step: epochs end at steps 4 and 8, the run at 6
    args = _args(tmp_path / "run", max_steps=6, per_device_train_batch_size=2, num_generations=2, save_steps=1,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False, save_strategy="epoch",
                 save_total_limit=0)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          callbacks=[Saves()])
    trainer.train()
    assert saves == [4, 6]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_save_strategy_no_writes_no_checkpoint_and_calls_no_on_save(tmp_path):
    from transformers import TrainerCallback

    saves = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, num_generations=2, save_steps=1,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False, save_strategy="no")
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          callbacks=[Saves()])
    assert trainer.train().global_step == 2
    assert saves == [] and not list((tmp_path / "run").glob("checkpoint-*"))
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()


def test_every_trl_config_field_is_honoured_refused_or_irrelevant():
    """A field a future TRL adds fails here until sdft.integrations.trl_fields classifies it."""
    import dataclasses

    from sdft.integrations import trl_fields

    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    tables = [trl_fields.HONOURED, trl_fields.REFUSED, trl_fields.IRRELEVANT]
    names = [f.name for f in dataclasses.fields(trl_sdft.SDFTConfig)]
    unclassified = [n for n in names if sum(n in t for t in tables) != 1]
    assert not unclassified, f"classify in sdft/integrations/trl_fields.py: {unclassified}"


@pytest.mark.parametrize("change,message", [
    (dict(save_strategy="best"), "save_strategy='best' ranks the evaluations during training: set eval_strategy"),
    (dict(optim="galore_adamw"), "optim='galore_adamw': sdft's loop does not drive it"),
    (dict(optim="adamw_8bit"), "optim='adamw_8bit': .*`bitsandbytes`"),
    (dict(shuffle_dataset=False), "shuffle_dataset=False"),
    (dict(generation_kwargs={"num_beams": 4}), "generation_kwargs 'num_beams'"),
    (dict(torch_compile=True), "torch_compile=True"),
    (dict(eval_strategy="never"), "eval_strategy='never': sdft evaluates as it trains"),
    (dict(load_best_model_at_end=True), "load_best_model_at_end=True ranks the evaluations during training"),
    (dict(eval_strategy="steps", metric_for_best_model="eval_accuracy"), "metric_for_best_model=.eval_accuracy."),
    (dict(eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_perplexity",
          greater_is_better=True), "greater_is_better=True: perplexity is better when lower"),
    (dict(report_to=["comet_ml"]), "report_to='comet_ml'"),
    (dict(model_init_kwargs={"device_map": "auto"}), "model_init_kwargs 'device_map'"),
    (dict(model_init_kwargs={"attn_implementation": "flash_attention_3"}),
     "model_init_kwargs attn_implementation='flash_attention_3'"),
    (dict(model_init_kwargs={"attn_implementation": "kernels-community/flash-attn2"}),
     "hub kernels are not fetched: install flash-attn for flash_attention_2"),
    (dict(deepspeed="ds.json"), "deepspeed='ds.json'"),
    (dict(model_init_kwargs={"trust_remote_code": True}), "sdft never runs a model repository's code"),
])
def test_trl_fields_sdft_does_not_implement_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        config_from_trl(_args(tmp_path, max_steps=3, **change))


def test_trl_fields_that_map_onto_sdft_keys(tmp_path):
    import torch

    c = config_from_trl(_args(tmp_path, max_steps=3, model_init_kwargs={"torch_dtype": torch.bfloat16,
                                                                        "attn_implementation": "eager"},
                              disable_dropout=True, full_determinism=True, activation_checkpointing=False,
                              dataloader_num_workers=4, vllm_server_port=1234))
    assert (c.dtype, c.disable_dropout, c.full_determinism, c.gradient_checkpointing) == ("bfloat16", True, True, False)
    assert c.attn_implementation == "eager"


def test_trls_optimizer_fields_are_the_runs(tmp_path):
    from sdft.runtime.optimizer import OptimizerSettings

    def config(optim_args):
        return config_from_trl(_args(tmp_path, max_steps=3, optim="sgd", optim_args=optim_args, adam_beta2=0.95,
                                     adam_epsilon=1e-6))

    reads = OptimizerSettings("sgd", args="momentum=0.9")._reads("momentum", "0.9")  # transformers 4.x's: no
    if not reads:
        with pytest.raises(ValueError, match="optim_args 'momentum': transformers' sgd does not read it"):
            config("momentum=0.9")
    given = "momentum=0.9" if reads else ""
    c = config(given)
    assert (c.optim, c.optim_args, c.adam_beta1, c.adam_beta2, c.adam_epsilon) == ("sgd", given, 0.9, 0.95, 1e-6)


def test_trls_trackio_fields_are_the_runs(tmp_path):
    c = config_from_trl(_args(tmp_path, max_steps=3, report_to=["trackio"], project="skills",
                              trackio_space_id="me/dashboard"))
    assert (c.report_to, c.project, c.trackio_space_id) == (["trackio"], "skills", "me/dashboard")


def test_trls_num_generations_eval_is_the_held_out_losss(tmp_path):
    assert config_from_trl(_args(tmp_path, max_steps=3, num_generations_eval=2)).num_generations_eval == 2
    assert config_from_trl(_args(tmp_path, max_steps=3, num_generations_eval=None)).num_generations_eval == 0


def test_the_model_init_kwargs_of_trls_sdft_script_are_taken(tmp_path):
    """trl/experimental/sdft/sdft.py sets revision, trust_remote_code, attn_implementation and dtype from its
    ModelConfig, whatever the model."""
    import torch

    kwargs = dict(revision="main", trust_remote_code=False, attn_implementation=None, dtype=torch.bfloat16)
    c = config_from_trl(_args(tmp_path, max_steps=3, model_init_kwargs=kwargs))
    assert (c.dtype, c.attn_implementation) == ("bfloat16", "auto")


@pytest.mark.parametrize("value, clip", [(None, 0.0), (0, 0.0), (0.5, 0.5)])
def test_trls_max_grad_norm_none_or_zero_turns_clipping_off(tmp_path, value, clip):
    assert config_from_trl(_args(tmp_path, max_steps=3, max_grad_norm=value)).max_grad_norm == clip


def test_a_real_trl_config_with_a_field_sdft_lacks_is_refused(tmp_path):
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, neftune_noise_alpha=5.0)
    with pytest.raises(ValueError, match="neftune_noise_alpha=5.0: sdft does not implement NEFTune"):
        config_from_trl(args)


def _tiny_trainer(tmp_path, max_steps=3, **kwargs):
    tok = tiny_tokenizer()
    args = _args(tmp_path / "run", max_steps=max_steps, per_device_train_batch_size=2, num_generations=2,
                 max_completion_length=4, distillation_topk=5, gradient_checkpointing=False, logging_steps=1)
    return SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                       **kwargs)


def test_callbacks_are_called_at_the_trainers_points_and_can_stop_the_run(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def __getattribute__(self, name):
            if name.startswith("on_"):
                def record(args, state, control, **kwargs):
                    self.events.append((name, state.global_step))
                    if name == "on_step_end" and state.global_step == 1:
                        control.should_training_stop = True
                    return control
                return record
            return super().__getattribute__(name)

    recorder = Recorder()
    trainer = _tiny_trainer(tmp_path, callbacks=[recorder])
    output = trainer.train()
    names = [e for e, _ in recorder.events]
    assert names[:2] == ["on_init_end", "on_train_begin"] and names[-1] == "on_train_end"
    assert ("on_step_begin", 0) in recorder.events and ("on_step_end", 1) in recorder.events
    assert ("on_log", 1) in recorder.events and ("on_step_begin", 1) not in recorder.events  # it stopped
    assert output.global_step == 1  # stopped after step 1 of 3, as the Trainer does
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-1"]
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()


def test_evaluate_scores_the_eval_dataset_and_calls_on_evaluate(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class OnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics)

    trainer = _tiny_trainer(tmp_path, max_steps=1, eval_dataset=ROWS[:2], callbacks=[OnEvaluate()])
    trainer.train()
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_score", "eval_perplexity", "eval_examples"} and metrics["eval_examples"] == 2
    assert 0.0 <= metrics["eval_score"] <= 1.0 and metrics["eval_perplexity"] > 1.0
    assert seen == [metrics] and trainer.state.log_history[-1]["eval_score"] == metrics["eval_score"]


def _tiny_args(tmp_path, max_steps, **change):
    return _args(tmp_path / "run", **{**dict(max_steps=max_steps, per_device_train_batch_size=2, num_generations=2,
                                             max_completion_length=4, distillation_topk=5,
                                             gradient_checkpointing=False, logging_steps=1), **change})


def test_eval_strategy_steps_evaluates_during_training_and_load_best_ends_on_the_pick(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class OnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append((state.global_step, metrics["eval_score"]))

    scores = iter([0.1, 0.7, 0.7, 0.2])  # one eval row: before training and after steps 1, 2, 3; best step 1

    tok = tiny_tokenizer()
    args = _tiny_args(tmp_path, 3, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="eval_score", greater_is_better=True)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          eval_dataset=ROWS[:1], eval_scorer=lambda a, d: next(scores), callbacks=[OnEvaluate()])
    trainer.train()
    assert [score for _, score in seen] == [0.1, 0.7, 0.7, 0.2]
    assert [h["eval_score"] for h in trainer.state.log_history if "eval_score" in h] == [0.1, 0.7, 0.7, 0.2]
    assert trainer.state.best_global_step == 1 and trainer.state.best_metric == 0.7
    assert trainer.result.best_step == 1


def test_eval_strategy_epoch_evaluates_at_each_epochs_end_and_load_best_ranks_those(tmp_path):
    """4 rows, 1 prompt a step: epochs end at steps 4 and 8; the run (6 steps) is evaluated before training, at
    step 4 and at its end."""
    from transformers import TrainerCallback

    seen = []

    class OnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(state.global_step)

    scores = iter([0.1, 0.9, 0.2])
    tok = tiny_tokenizer()
    args = _tiny_args(tmp_path, 6, eval_strategy="epoch", load_best_model_at_end=True)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          eval_dataset=ROWS[:1], eval_scorer=lambda a, d: next(scores), callbacks=[OnEvaluate()])
    trainer.train()
    assert seen == [0, 4, 6] and trainer.state.best_global_step == 4


def test_several_eval_sets_are_each_evaluated_and_named_as_the_trainer_names_them(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class OnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append((state.global_step, sorted(metrics)))

    # (sums, more) before training and after steps 1 and 2, then the evaluate() after it
    scores = itertools.chain([0.1, 0.9, 0.5, 0.2, 0.3, 0.4], itertools.repeat(0.0))
    tok = tiny_tokenizer()
    args = _tiny_args(tmp_path, 2, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="eval_more_score")
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          eval_dataset={"sums": ROWS[:1], "more": ROWS[1:2]}, eval_scorer=lambda a, d: next(scores),
                          callbacks=[OnEvaluate()])
    trainer.train()
    names = {n: [f"eval_{n}_examples", f"eval_{n}_loss", f"eval_{n}_perplexity", f"eval_{n}_score"]
             for n in ("sums", "more")}  # the held-out SDFT loss: during training, where the teacher is
    assert seen == [(step, names[n]) for step in (0, 1, 2) for n in ("sums", "more")]
    assert trainer.state.best_global_step == 0 and trainer.state.best_metric == 0.9  # "more": 0.9, 0.2, 0.4
    records = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["sums_score"] for r in records] == [0.1, 0.5, 0.3]
    metrics = trainer.evaluate({"a": ROWS[:2], "b": ROWS[:1]}, metric_key_prefix="test")
    assert (metrics["test_a_examples"], metrics["test_b_examples"]) == (2, 1) and len(metrics) == 6


def test_a_mapping_of_eval_sets_and_its_metric_names_are_checked_before_the_model_loads(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="the set name 'a b' is not a plain name"):
        SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=_tiny_args(tmp_path, 1), train_dataset=ROWS,
                    processing_class=tok, eval_dataset={"a b": ROWS})
    args = _tiny_args(tmp_path, 1, eval_strategy="steps", load_best_model_at_end=True,
                      metric_for_best_model="eval_other_score")
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok,
                          eval_dataset={"sums": ROWS})
    with pytest.raises(ValueError, match="^metric_for_best_model=other_score: the evaluation gives sums_score, "
                                         "sums_perplexity, sums_loss$"):
        trainer.train()


def test_standard_format_eval_rows_are_plain_text_during_training_as_in_evaluate(tmp_path):
    """TRL's rule for string prompts (no chat template) holds for the evaluations a run makes as it goes."""
    tok = tiny_tokenizer()
    rows = [{"prompt": r["prompt"][0]["content"], "privileged_context": r["privileged_context"]} for r in ROWS]
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=_tiny_args(tmp_path, 1, eval_strategy="steps"),
                          train_dataset=ROWS, processing_class=tok, eval_dataset=rows[:2])
    trainer.train()
    during = [h for h in trainer.state.log_history if "eval_perplexity" in h][-1]["eval_perplexity"]
    assert trainer.evaluate()["eval_perplexity"] == pytest.approx(during, rel=1e-5)


def test_a_model_object_without_processing_class_takes_the_tokenizer_of_its_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    trainer = SDFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=_tiny_args(tmp_path, 1),
                          train_dataset=ROWS)
    assert len(trainer.processing_class) == len(tok) and trainer.train().global_step == 1
    with pytest.raises(ValueError, match="^pass processing_class \\(the model's tokenizer\\): the model object names "
                                         "no folder it came from"):
        SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=_tiny_args(tmp_path, 1), train_dataset=ROWS)


def test_eval_strategy_steps_without_an_eval_dataset_is_one_line(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="pass eval_dataset"):
        SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=_tiny_args(tmp_path, 2, eval_strategy="steps"),
                    train_dataset=ROWS, processing_class=tok)


def test_eval_steps_below_one_is_a_fraction_of_max_steps(tmp_path):
    assert config_from_trl(_args(tmp_path, max_steps=40, eval_strategy="steps", eval_steps=0.25)).eval_steps == 10
    assert config_from_trl(_args(tmp_path, max_steps=40, eval_strategy="steps", logging_steps=5)).eval_steps == 5
    assert config_from_trl(_args(tmp_path, max_steps=40)).eval_steps == 0


def test_logging_and_save_steps_below_one_are_fractions_of_max_steps_as_in_the_trainer(tmp_path):
    c = config_from_trl(_args(tmp_path, max_steps=40, logging_steps=0.1, save_steps=0.25))
    assert (c.logging_steps, c.save_steps) == (4, 10)
    assert config_from_trl(_args(tmp_path, max_steps=40, logging_steps=5, save_steps=20)).save_steps == 20


def test_an_optimizer_of_ones_own_is_refused(tmp_path):
    import torch

    model = tiny_llama(vocab=40)
    with pytest.raises(ValueError, match="sdft builds the optimizer from args"):
        SDFTTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=ROWS,
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


@pytest.mark.parametrize("batch,accumulation", [(16, 1), (8, 3)])
def test_a_real_trl_config_at_another_batch_size_is_accepted(tmp_path, batch, accumulation):
    """TRL fills generation_batch_size / steps_per_generation in from the batch: one generation per step."""
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               num_generations=8)
    c = config_from_trl(args)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (batch // 8, accumulation)


@pytest.mark.parametrize("given", [dict(steps_per_generation=2), dict(steps_per_generation=4),
                                   dict(generation_batch_size=16)])
def test_generations_within_one_optimizer_step_are_accepted(tmp_path, given):
    """TRL sampling once for 2 or 4 of an optimizer step's 4 micro-steps samples from the weights sdft samples
    each micro-step from (generation_batch_size 16 = 2 micro-steps of 8 completions)."""
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                               per_device_train_batch_size=8, gradient_accumulation_steps=4, **given)
    assert config_from_trl(args).gradient_accumulation_steps == 4


@pytest.mark.parametrize("given,message", [
    (dict(steps_per_generation=3), "steps_per_generation=3 and generation_batch_size=24: one generation would "
                                   "serve 3 micro-steps"),
    (dict(steps_per_generation=8), "steps_per_generation=8 and generation_batch_size=64: one generation would "
                                   "serve 8 micro-steps, across optimizer steps of gradient_accumulation_steps=4"),
    (dict(generation_batch_size=64), "steps_per_generation=8 and generation_batch_size=64: one generation")])
def test_generations_reused_over_optimizer_steps_are_refused_naming_the_field_given(tmp_path, given, message):
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                               per_device_train_batch_size=8, gradient_accumulation_steps=4, **given)
    with pytest.raises(ValueError, match=message):
        config_from_trl(args)


def test_trls_liger_switch_is_accepted_since_sdfts_loss_is_fused_anyway(tmp_path):
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                               use_liger_kernel=True, distillation_mode="full_logits")
    assert config_from_trl(args).distillation_mode == "full_logits"


def test_the_dropins_evaluate_renders_with_trls_chat_template_kwargs(tmp_path, monkeypatch):
    import sdft.eval.evaluation
    from sdft.data.chat import template_kwargs_of

    seen = []
    real = sdft.eval.evaluation.generate_answers

    def spy(model, tokenizer, *args, **kwargs):
        seen.append(template_kwargs_of(tokenizer))
        return real(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(sdft.eval.evaluation, "generate_answers", spy)
    tok = tiny_tokenizer()
    args = _tiny_args(tmp_path, 1, chat_template_kwargs={"enable_thinking": False})
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, eval_dataset=ROWS[:1],
                          processing_class=tok)
    assert "eval_score" in trainer.evaluate()
    assert seen == [{"enable_thinking": False}]


def test_logging_first_step_logs_step_one_beside_every_logging_steps(tmp_path):
    tok = tiny_tokenizer()
    args = _tiny_args(tmp_path, 3, logging_steps=2, logging_first_step=True)
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, processing_class=tok)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]


def test_a_scripts_callback_calls_and_log_run_as_on_the_trainer(tmp_path, capsys):
    """TRL's sdft.py adds LogCompletionsCallback and logs its own metrics with trainer.log before training."""
    from transformers import TrainerCallback
    from trl import LogCompletionsCallback

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = _tiny_trainer(tmp_path, max_steps=1, eval_dataset=ROWS[:2])
    trainer.add_callback(Recorder)
    trainer.log({"tool_eval_before/action_accuracy": 0.25})
    epoch = {"epoch": trainer.state.epoch} if trainer.state.epoch is not None else {}
    assert seen == [{"tool_eval_before/action_accuracy": 0.25, **epoch}]
    assert trainer.state.log_history[-1] == {"tool_eval_before/action_accuracy": 0.25, **epoch, "step": 0}
    completions = LogCompletionsCallback.__new__(LogCompletionsCallback)  # its constructor needs TRL's trainer
    trainer.add_callback(completions)
    assert "LogCompletionsCallback is not run" in capsys.readouterr().err
    assert all(type(c) is not LogCompletionsCallback for c in trainer.callback_handler.callbacks)
    assert isinstance(trainer.pop_callback(Recorder), Recorder)
    trainer.train()
    assert len(seen) == 1  # popped: not called again


def test_eval_loss_during_training_and_the_trainers_default_metric_for_load_best(tmp_path):
    """A real TRL config with load_best_model_at_end and no metric_for_best_model: the Trainer's default, 'loss',
    ranks the held-out SDFT loss (eval_loss, lower is better), which each evaluation during training reports."""
    trl_sdft = pytest.importorskip("trl.experimental.sdft")
    tok = tiny_tokenizer()
    args = trl_sdft.SDFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                               max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                               eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                               load_best_model_at_end=True, disable_tqdm=True, gradient_checkpointing=False)
    assert args.metric_for_best_model == "loss"
    trainer = SDFTTrainer(model=tiny_llama(vocab=len(tok)), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2],
                          processing_class=tok)
    trainer.train()
    losses = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    assert sorted(losses) == [0, 1, 2] and all(v >= 0 for v in losses.values())
    assert trainer.state.best_global_step == min(losses, key=lambda s: (losses[s], s))
    assert trainer.state.best_metric == losses[trainer.state.best_global_step]
