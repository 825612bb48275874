"""Typed config, one-line CLI errors before the model loads, crash-safe reruns, verified
checkpoints, loud non-finite steps."""
import json
import math
import re

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import sdft.models
from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.config import describe_fields
from sdft.run.checkpoint import list_checkpoints

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
BASE = dict(max_steps=3, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
            save_steps=1, progress_bar=False, device="cpu", save_final_model=False)


def _run(tmp_path, step_callback=None, **change):
    tok = tiny_tokenizer()
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path), **change})
    return train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, step_callback=step_callback)


def _steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -- 4. typed config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("max_steps=abc", "max_steps must be an integer, got 'abc'"),
    ("max_steps=1.5", "max_steps must be an integer, got '1.5'"),
    ("max_steps=true", "max_steps must be an integer, got 'true'"),
    ("max_steps=0", "max_steps must be positive"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("learning_rate=Infinity", "learning_rate must be a finite number"),
    ("learning_rate=nan", "learning_rate must be a finite number"),
    ("share_prefix=maybe", "share_prefix must be true or false"),
    ("divergence=kl", "unknown divergence 'kl'"),
    ("ema_decay=1", "ema_decay must be below 1"),
    ("lr=1", "unknown SDFTConfig option(s): lr;"),
    ("max_step=1", "unknown SDFTConfig option(s): max_step (here: max_steps);"),
    ("bf16=true", "unknown SDFTConfig option(s): bf16 (here: mixed_precision=bf16);"),
])
def test_cli_values_are_parsed_by_type_and_checked(text, message, capsys, monkeypatch):
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize("change,message", [
    (dict(max_steps=1.5), "max_steps must be an integer"),
    (dict(max_steps=True), "max_steps must be an integer"),
    (dict(output_dir=123), "output_dir must be a non-empty string"),
    (dict(lora_target_modules="q_proj"), "lora_target_modules must be a non-empty list"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number"),
    (dict(resume_from_checkpoint=""), "resume_from_checkpoint must be true, false or a checkpoint path"),
    (dict(nonfinite="ignore"), "unknown nonfinite 'ignore'"),
])
def test_api_config_checks_types(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SDFTConfig(**change)


def test_a_step_larger_than_the_data_says_rows_repeat(tmp_path, capsys):
    _run(tmp_path / "a", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert ("sdft: a step takes 4 prompts (per_device_train_batch_size x gradient_accumulation_steps x processes) "
            "from 3 rows: each step sees some rows more than once") in capsys.readouterr().err
    _run(tmp_path / "b", max_steps=1, per_device_train_batch_size=3)
    assert "each step sees some rows" not in capsys.readouterr().err


def test_a_step_out_of_memory_names_the_knobs_and_the_checkpoint(tmp_path, monkeypatch, capsys):
    import sdft.run.trainer as trainer
    from sdft.run.errors import OutOfMemory

    real, calls = trainer._train_step, {"n": 0}

    def runs_out_in_step_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_train_step", runs_out_in_step_two)
    with pytest.raises(OutOfMemory) as caught:
        _run(tmp_path)
    assert str(caught.value) == (
        "out of memory in step 2: lower per_device_train_batch_size=1, num_generations=2, max_completion_length=4, "
        f"or set gradient_checkpointing=true / mixed_precision=bf16; {tmp_path / 'checkpoint-1'} is the newest "
        "checkpoint (resume_from_checkpoint=true continues from it) (CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_a_model_too_large_for_the_device_is_one_line(tmp_path):
    from sdft.run.errors import OutOfMemory

    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))

    def does_not_fit(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    model.to = does_not_fit
    with pytest.raises(OutOfMemory, match=r"the model does not fit on cpu in float32 \(0.0M parameters\): "
                                          "dtype=bfloat16 halves its weights"):
        train(model, ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path)}), tokenizer=tok)


def test_evaluation_rows_that_are_training_rows_are_named(tmp_path, capsys):
    tok = tiny_tokenizer()
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path), "max_steps": 1})
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS[:2] + [{"prompt": "new",
                                                                                            "demonstration": "x"}])
    assert ("sdft: 2 of the 3 evaluation rows are also training rows: their score measures recall of what was "
            "trained, not the skill on new prompts") in capsys.readouterr().err


def test_a_model_of_the_wrong_type_is_named_by_its_type(tmp_path):
    with pytest.raises(TypeError, match="model must be None .*, a local path or a transformers model, got int"):
        train(5, [{"prompt": "q", "demonstration": "a"}], SDFTConfig(output_dir=str(tmp_path)))


def test_cli_lists_and_parses_typed_values(capsys):
    config = SDFTConfig.from_strings({"lora_target_modules": "q_proj, v_proj", "max_steps": "7",
                                      "learning_rate": "3e-4", "use_lora": "true", "output_dir": "123"})
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.max_steps == 7
    assert config.use_lora is True and config.output_dir == "123" and config.learning_rate == 3e-4
    for text in ('["q_proj", "v_proj"]', "'q_proj','v_proj'", '"q_proj", "v_proj"'):  # as a config file quotes them
        assert SDFTConfig.from_strings({"lora_target_modules": text}).lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="names separated by commas or a JSON list"):
        SDFTConfig.from_strings({"lora_target_modules": '["q_proj",'})
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    help_text = capsys.readouterr().out
    for line in describe_fields().splitlines():
        assert line.strip() in help_text
    for name in SDFTConfig.__dataclass_fields__:
        assert f"  {name} (" in help_text


def test_config_show_prints_the_resolved_config(tmp_path, capsys):
    assert cli(["config", "--show", "--set", "max_steps=9"]) == 0
    assert json.loads(capsys.readouterr().out)["max_steps"] == 9
    _run(tmp_path, max_steps=1)
    assert cli(["config", "--show", "--from", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_steps"] == 1 and shown["output_dir"] == str(tmp_path)
    assert cli(["config", "--show", "--from", str(tmp_path / "checkpoint-1"), "--set", "seed=4"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 4


def test_repeated_set_flags_add_up(capsys):
    """``--set a=1 --set b=2`` keeps both (argparse's default would keep only the last flag's values)."""
    assert cli(["config", "--show", "--set", "max_steps=9", "--set", "seed=4", "learning_rate=2e-5"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["max_steps"], shown["seed"], shown["learning_rate"]) == (9, 4, 2e-5)


# -- 6. bad paths: one line, before the model loads ----------------------------------------------------

def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def test_bad_paths_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes('{"prompt": "caf\xe9", "demonstration": "x"}\n'.encode("latin-1"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--data", str(tmp_path)], "is a folder, not a dataset file"),
        (["--data", str(binary)], f"{binary}: not UTF-8 text"),
        (["--data", str(tmp_path / "none.jsonl")], "dataset file not found"),
        (["--set", f"output_dir={a_file}"], "exists and is not a folder"),
    ]
    for args, message in cases:
        assert cli(["train", "--no-eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_lora_targets_the_model_lacks_are_one_line_naming_its_layers_before_the_weights_load(tmp_path, capsys,
                                                                                             monkeypatch):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    message = ("lora_target_modules qkv: no such layer in the model; its linear layers are down_proj, gate_proj, "
               "k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear, or auto: peft's default for its family)")
    assert cli(["train", "--no-eval", "--model", str(folder), "--set", f"output_dir={tmp_path / 'run'}",
                "use_lora=true", "lora_target_modules=q_proj,qkv"]) == 2
    assert capsys.readouterr().err.strip() == f"sdft: error: {message}"
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "obj"), "use_lora": True,
                           "lora_target_modules": ["qkv"]})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)  # a model object: the same line


def test_a_checkpoint_or_run_folder_given_as_the_model_says_what_to_pass(tmp_path, capsys):
    _run(tmp_path / "run", max_steps=1)
    cases = [(["train", "--no-eval", "--model", str(tmp_path / "run" / "checkpoint-1")],
              "is an sdft checkpoint, not a model folder: `sdft export"),
             (["generate", str(tmp_path / "run"), "--prompt", "hi"],
              f"is an sdft run folder, not a model folder: its model is {tmp_path / 'run'}/final_model"),
             (["train", "--no-eval", "--model", str(tmp_path / "run")], "is an sdft run folder")]
    for argv, message in cases:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_a_lora_adapter_folder_answers_and_teacher_checks_but_is_not_trained_from(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "run"), "max_steps": 1, "use_lora": True,
                           "lora_target_modules": ["q_proj", "v_proj"], "save_final_model": True})
    adapter = train(str(base), ROWS, config).output_dir / "final_model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["generate", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert cli(["teacher-check", "--model", str(adapter), "--data", str(data), "--limit", "1",
                "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    for argv in (["train", "--model", str(adapter), "--data", str(data)], ["continual", "--model", str(adapter),
                                                                           "--stages", str(data)]):
        assert cli(argv + ["--set", f"output_dir={tmp_path / 'again'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"sdft: error: {adapter} is a LoRA adapter, not a model folder: train from the merged model "
                       "(`sdft export CHECKPOINT OUT --merge` writes it from the run's checkpoint; peft's "
                       f"merge_and_unload from Python); `sdft generate {adapter}` answers with the adapter as it is")


@pytest.mark.parametrize("lora", [False, True])
def test_generate_answers_from_a_checkpoint_as_from_its_export(tmp_path, capsys, lora):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    train(str(base), ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "run"), "max_steps": 1,
                                         "learning_rate": 1e-2, "use_lora": lora}))
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert cli(["export", str(checkpoint), str(tmp_path / "export"), *(["--merge"] if lora else [])]) == 0
    capsys.readouterr()
    answers = []
    for model in (checkpoint, tmp_path / "export"):
        assert cli(["generate", str(model), "--prompt", "add 1 2", "--max-new-tokens", "6"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].startswith("> add 1 2\n")
    from sdft.run.export import load_checkpoint_model

    full, _ = load_checkpoint_model(checkpoint)
    half, _ = load_checkpoint_model(checkpoint, dtype=torch.bfloat16)  # the base loads in bf16: no fp32 copy first
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_model_folder_with_broken_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert cli(["train", "--no-eval", "--model", str(tmp_path), "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json is not valid JSON" in err


@pytest.mark.parametrize("damage,message", [
    ("truncate", "a weights file does not read (Error while deserializing header"),
    ("config", "its weights do not fit its config.json ("),
])
def test_weights_that_do_not_read_or_do_not_fit_the_config_are_one_line(tmp_path, capsys, damage, message):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    if damage == "truncate":  # an interrupted copy
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # the config of another model beside these weights
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "q", "demonstration": "a"}) + "\n")
    assert cli(["train", "--model", str(folder), "--data", str(data), "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sdft: error: {folder}: ") and message in err, err


def test_a_model_folder_without_its_tokenizer_is_one_line_before_the_weights_load(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert cli(["train", "--no-eval", "--model", str(folder), "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sdft: error: {folder} holds no tokenizer (tokenizer.json, tokenizer.model, ...): save the "
                   f"model's tokenizer beside it (tokenizer.save_pretrained('{folder}'))")


def test_a_tokenizer_with_more_ids_than_the_model_embeds_is_one_line_before_the_weights_load(tmp_path, capsys,
                                                                                             monkeypatch):
    import transformers

    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok) - 6), tok, tmp_path / "base")
    line = (f"{folder}: the tokenizer has {len(tok)} token ids but the model embeds {len(tok) - 6} (vocab_size): "
            f"ids {len(tok) - 6}-{len(tok) - 1} cannot be embedded. Use the model's own tokenizer, or, where tokens "
            "were added to it, model.resize_token_embeddings(len(tokenizer)) and save both")

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the vocabulary was compared")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
        for args in (["train", "--no-eval", "--model", str(folder), "--set", f"output_dir={tmp_path / 'out'}"],
                     ["generate", str(folder), "--prompt", "hi"]):
            assert cli(args) == 2
            assert capsys.readouterr().err.strip() == f"sdft: error: {line}"
    model = tiny_llama(vocab=len(tok) - 6)  # a model object: before any step, named as such
    with pytest.raises(ValueError, match="^the model object: the tokenizer has"):
        train(model, ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "obj")}), tokenizer=tok)
    assert not (tmp_path / "obj" / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_a_row_over_the_length_limit_is_named_by_its_line_before_the_weights_load(tmp_path, monkeypatch, method):
    import transformers

    from sdft import train_sft
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "add 1 2", "demonstration": "3"}] * 2 + [{"prompt": "add 1 2", "demonstration": "9" * 80}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the rows were measured")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    config = SDFTConfig(output_dir=str(tmp_path / "out"), max_prompt_length=60, max_completion_length=8)
    message = {"sdft": "the teacher context (prompt + demonstration) has",
               "sft": "the prompt with its demonstration has"}
    with pytest.raises(ValueError, match=rf"{data}:3: {re.escape(message[method])} \d+ tokens, over "):
        (train if method == "sdft" else train_sft)(str(folder), str(data), config)


def test_a_library_error_of_several_lines_is_printed_on_one(capsys, monkeypatch):
    import sdft.cli

    def several_lines(args, parser):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) another")

    monkeypatch.setattr(sdft.cli, "_generate", several_lines)
    assert cli(["generate", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == ("sdft: error: Couldn't instantiate the backend tokenizer from one of: "
                                       "(1) a file, (2) another\n")


def test_a_base_model_without_a_chat_template_trains_on_plain_text(tmp_path, capsys):
    from sdft.data.chat import chat_ids, demonstration_ids
    from sdft.data.examples import load_examples
    from sdft.data.templates import teacher_messages

    tok = tiny_tokenizer()
    tok.chat_template = None  # a base model's tokenizer
    ex = load_examples([{"prompt": "add 1 2", "demonstration": "3"}])[0]
    assert tok.decode(chat_ids(tok, ex.messages(), "cpu")) == "add 1 2"  # TRL's plain-text prompt
    teacher = chat_ids(tok, teacher_messages(ex.messages(), ex.demonstration, "fewshot"), "cpu")
    assert tok.decode(teacher) == "add 1 2\n\n3\n\nadd 1 2"
    full, prompt = demonstration_ids(tok, ex, "cpu")
    assert prompt == 7 and full[prompt:].tolist() == tok("3", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    result = train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path)}),
                   tokenizer=tok)
    assert result.step == 3 and all(math.isfinite(r["loss"]) for r in result.metrics)
    assert "the tokenizer has no chat template (a base model's): prompts and demonstrations are plain text" in (
        capsys.readouterr().err)


# -- 2. reruns never silently start over ---------------------------------------------------------------

def test_rerun_into_a_used_output_dir_refuses_then_resumes_or_overwrites(tmp_path, capsys):
    _run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="already holds checkpoints .*resume_from_checkpoint=true.*"
                                         "overwrite_output_dir=true.*fresh output_dir"):
        _run(tmp_path, max_steps=3)
    assert _steps(tmp_path) == [1, 2] and [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    _run(tmp_path, max_steps=3, resume_from_checkpoint=True)
    assert "resuming from" in capsys.readouterr().err
    assert _steps(tmp_path) == [1, 2, 3]
    _run(tmp_path, max_steps=1, overwrite_output_dir=True)
    assert _steps(tmp_path) == [1] and [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]


# -- 3. damaged checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.pt", "manifest.json"])
def test_damaged_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, capsys, victim):
    _run(tmp_path, max_steps=3)
    latest = tmp_path / "checkpoint-3" / victim
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    result = _run(tmp_path, max_steps=3, resume_from_checkpoint=True)
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "checkpoint-3" in err and "resuming from" in err
    assert [r["step"] for r in result.metrics] == [3] and _steps(tmp_path) == [1, 2, 3]


def test_a_damaged_named_checkpoint_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    _run(tmp_path, max_steps=1)
    weights = tmp_path / "checkpoint-1" / "trainable.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, wrong bytes
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}",
                f"resume_from_checkpoint={tmp_path / 'checkpoint-1'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainable.safetensors does not match its checksum" in err


def test_saving_a_step_again_keeps_the_old_copy_until_the_new_one_is_in(tmp_path, monkeypatch):
    """A crash between moving the old copy of a step aside and renaming the new one in must leave
    that step usable."""
    from sdft.run import checkpoint
    from sdft.run.checkpoint import damage, save_checkpoint
    from sdft.runtime.optimizer import OptimizerSettings, make_optimizer

    result = _run(tmp_path, max_steps=2)
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path)})
    real = checkpoint.os.replace

    def crash_renaming_the_new_copy_in(src, dst):  # the old copy has been moved aside by then
        if str(src).endswith(".checkpoint-2.tmp"):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_renaming_the_new_copy_in)
    optimizer = make_optimizer(result.model, OptimizerSettings.from_config(config))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, result.model, optimizer, None, config, keep=2)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-1", ".checkpoint-2.old"] and damage(found[-1]) is None
    result = _run(tmp_path, max_steps=3, resume_from_checkpoint=True)
    assert [r["step"] for r in result.metrics] == [3] and _steps(tmp_path) == [1, 2, 3]
    names = sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name)
    assert names == [".checkpoint-2.old", "checkpoint-3"]  # the crash's half-written copy is gone too


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """Rewind then resume: the abandoned run's checkpoints (and final model) move to a named branch,
    rotation keeps the fresh ones, and resume=true continues the fresh run, not the abandoned one."""
    _run(tmp_path, max_steps=3, save_total_limit=0, save_final_model=True)
    first = (tmp_path / "checkpoint-3" / "trainable.safetensors").read_bytes()
    _run(tmp_path, max_steps=2, save_total_limit=2, resume_from_checkpoint=str(tmp_path / "checkpoint-1"),
         save_final_model=True)
    err = capsys.readouterr().err
    branches = [p for p in tmp_path.iterdir() if p.name.startswith("abandoned-")]
    assert len(branches) == 1 and "moved to" in err and branches[0].name.endswith("after-step-1")
    assert sorted(p.name for p in branches[0].iterdir()) == ["checkpoint-2", "checkpoint-3", "final_model",
                                                              "metrics.jsonl"]
    assert [json.loads(x)["step"] for x in (branches[0] / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert _steps(tmp_path) == [1, 2]
    _run(tmp_path, max_steps=3, resume_from_checkpoint=True)
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in capsys.readouterr().err
    assert _steps(tmp_path) == [1, 2, 3]
    assert (branches[0] / "checkpoint-3" / "trainable.safetensors").read_bytes() == first  # kept, untouched


def test_checkpoint_pickles_load_with_weights_only(tmp_path):
    _run(tmp_path, max_steps=1)
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(tmp_path / "checkpoint-1" / name, weights_only=True)


# -- 8. non-finite loss or gradient --------------------------------------------------------------------

def test_nonfinite_step_stops_loudly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import sdft.run.trainer as trainer
    from sdft.run.errors import NonFiniteError

    real = trainer.BatchLoss.__call__
    calls = {"n": 0}

    def nan_on_second_call(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer.BatchLoss, "__call__", nan_on_second_call)
    with pytest.raises(NonFiniteError, match="step 2: loss nan"):
        _run(tmp_path / "stop", max_steps=3)
    assert [p.name for p in list_checkpoints(tmp_path / "stop")] == ["checkpoint-1"]
    calls["n"] = 0
    result = _run(tmp_path / "skip", max_steps=3, nonfinite="skip")
    assert [r["skipped"] for r in result.metrics] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_max_grad_norm_zero_turns_clipping_off_and_still_logs_the_norm():
    """As the HF Trainer's ``max_grad_norm=0``: the gradients reach AdamW as they are."""
    from sdft.run.loop import clip_and_step

    def step(max_grad_norm):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        (100 * model(torch.ones(2, 4)).square().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm, skipped = clip_and_step(model, optimizer, SDFTConfig(max_grad_norm=max_grad_norm), 0, 1.0)
        return norm, skipped, grads, [p.detach() for p in model.parameters()]

    norm, skipped, grads, weights = step(0.0)
    assert not skipped and norm == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item()) and norm > 1
    torch.manual_seed(0)
    start = [p.detach().clone() for p in torch.nn.Linear(4, 3).parameters()]
    assert all(torch.equal(w, s - g) for w, s, g in zip(weights, start, grads))  # SGD, lr 1, unclipped
    clipped = step(1.0)[3]
    assert not torch.equal(clipped[0], weights[0])
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        SDFTConfig(max_grad_norm=-1.0)


def test_a_model_object_without_loaded_or_trainable_weights_is_one_line_before_any_step(tmp_path):
    tok = tiny_tokenizer()
    frozen = tiny_llama(vocab=len(tok)).requires_grad_(False)
    with pytest.raises(ValueError, match="^the model has no trainable parameters .* or set use_lora=true"):
        train(frozen, ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "frozen")}), tokenizer=tok)
    adapters = train(frozen, ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "lora"), "use_lora": True,
                                                 "max_steps": 1}), tokenizer=tok)
    assert adapters.step == 1  # the same frozen model trains its LoRA adapters
    meta = tiny_llama(vocab=len(tok)).to("meta")
    with pytest.raises(ValueError, match="^the model object's weights are not loaded \\(model.embed_tokens.weight "
                                         "is on the meta device\\)"):
        train(meta, ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "meta")}), tokenizer=tok)
    assert not (tmp_path / "frozen" / "metrics.jsonl").exists() and not (tmp_path / "meta" / "metrics.jsonl").exists()


def test_float16_trainable_weights_train_with_a_line_saying_what_that_costs(tmp_path, capsys):
    tok = tiny_tokenizer()
    result = train(tiny_llama(vocab=len(tok)).half(), ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "h"),
                                                                          "max_steps": 1}), tokenizer=tok)
    assert result.step == 1 and "the model's trainable weights are float16" in capsys.readouterr().err
    train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**{**BASE, "output_dir": str(tmp_path / "f"), "max_steps": 1}),
          tokenizer=tok)
    assert "float16" not in capsys.readouterr().err


def test_a_config_file_or_a_run_folder_gives_the_settings_and_set_overrides_them(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "c.yaml").write_text("max_steps: 2\nlearning_rate: 1e-4\nmax_completion_length: 3\n"
                                     "per_device_train_batch_size: 1\nnum_generations: 2\nprogress_bar: false\n")
    common = ["train", "--model", str(folder), "--data", str(data)]
    assert cli(common + ["--config", str(tmp_path / "c.yaml"), "--set", f"output_dir={tmp_path / 'a'}"]) == 0
    ran = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (ran["max_steps"], ran["learning_rate"], ran["max_completion_length"]) == (2, 1e-4, 3)  # YAML's 1e-4 text
    resumed = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**resumed, "resume_from_checkpoint": True}))
    assert cli(common + ["--config", str(tmp_path / "a"), "--set", f"output_dir={tmp_path / 'b'}", "max_steps=1"]) == 0
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (again["max_steps"], again["learning_rate"], again["max_completion_length"]) == (1, 1e-4, 3)
    assert again["resume_from_checkpoint"] is False  # a run folder gives how it trained, not how it started
    capsys.readouterr()
    for text, name, message in (("max_steps: [2\n", "bad.yaml", "bad.yaml: not valid YAML"),
                                ('{"max_steps": 2,}', "bad.json", "bad.json: not valid JSON"),
                                ("[1]", "list.json", "list.json: a config file holds a mapping"),
                                ('{"epochs": 3}', "unknown.json",
                                 "unknown.json: unknown SDFTConfig option(s): epochs (here: max_steps, in optimizer"),
                                ('{"max_steps": "x"}', "typed.json", "typed.json: max_steps must be an integer")):
        (tmp_path / name).write_text(text)
        assert cli(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert cli(["config", "--show", "--config", str(tmp_path / "c.yaml")]) == 0
    assert '"learning_rate": 0.0001' in capsys.readouterr().out
