"""A model with a learned position table (GPT-2's n_positions) takes no sequence past it: a training row whose
rollout would go past is one line before the weights load, a held-out prompt one line before it is answered;
a row that fills the table exactly trains (the bound is the positions a pass really uses)."""
import json

import pytest
import torch
import transformers
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import sdft.run.prepare
from sdft import SDFTConfig, train, train_sft
from sdft.data.chat import chat_ids
from sdft.data.examples import load_examples
from sdft.data.templates import teacher_messages
from sdft.eval.evaluation import evaluate, generate_answers
from sdft.models.positions import built_positions, position_limit
from sdft.run.export import save_hf_folder

ROW = {"prompt": "add 1 2", "demonstration": "3"}


def _gpt2(positions: int):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return transformers.GPT2LMHeadModel(config), tok


def _teacher_tokens(tok, config) -> int:
    ex = load_examples([ROW])[0]
    return chat_ids(tok, teacher_messages(ex.messages(), ex.demonstration, config.teacher_template), "cpu").numel()


def _config(tmp_path, **change):
    return SDFTConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1,
                                num_generations=2, max_completion_length=8, progress_bar=False, device="cpu",
                                save_final_model=False), **change})


def test_only_a_learned_position_table_is_a_limit(tmp_path):
    model, tok = _gpt2(96)
    folder = save_hf_folder(model, tok, tmp_path / "gpt2")
    assert position_limit(model) == 96 and position_limit(folder) == 96 and position_limit(str(folder)) == 96
    assert position_limit(tiny_llama()) is None and position_limit(None) is None  # rotary: no hard limit
    assert position_limit(tmp_path / "missing") is None


@pytest.mark.parametrize("run", [train, train_sft])
def test_a_row_past_the_position_table_is_one_line_before_the_weights_load(tmp_path, monkeypatch, run):
    model, tok = _gpt2(64)
    folder = save_hf_folder(model, tok, tmp_path / "gpt2")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ROW) + "\n")
    monkeypatch.setattr(sdft.run.prepare, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    config = _config(tmp_path, max_completion_length=60)
    what = "a rollout of max_completion_length=60" if run is train else "the prompt with its demonstration"
    if run is train_sft:  # the demonstration alone fits 64 positions: shrink the table under it
        folder = save_hf_folder(_gpt2(8)[0], tok, tmp_path / "gpt2-8")
    with pytest.raises(ValueError, match=rf"rows.jsonl:1: .*{what}.* past the model's (64|8) \(n_positions"):
        run(str(folder), str(rows), config)


def test_a_row_that_fills_the_position_table_exactly_trains(tmp_path):
    config = _config(tmp_path, max_completion_length=8, temperature=1.0)
    tok = tiny_tokenizer()
    model, tok = _gpt2(_teacher_tokens(tok, config) + 7)  # a rollout's last token is never fed
    result = train(model, [ROW], config, tokenizer=tok)
    assert result.step == 1 and result.metrics[0]["mean_completion_length"] == 8  # the whole table used
    with pytest.raises(ValueError, match="past the model's"):
        train(_gpt2(_teacher_tokens(tok, config) + 6)[0], [ROW], _config(tmp_path / "b"), tokenizer=tok)


def test_a_held_out_prompt_past_the_table_is_one_line_before_it_is_answered(tmp_path):
    model, tok = _gpt2(40)
    prompt = chat_ids(tok, load_examples([ROW])[0].messages(), "cpu").numel()
    assert generate_answers(model, tok, load_examples([ROW]), 41 - prompt)  # fills the table: answered
    with pytest.raises(ValueError, match=rf"row 0: the prompt and an answer of up to {42 - prompt} tokens take 41 "
                                         "positions, past the model's 40"):
        generate_answers(model, tok, load_examples([ROW]), 42 - prompt)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps(ROW) + "\n")
    with pytest.raises(ValueError, match="heldout.jsonl:1: the prompt and an answer"):
        evaluate(model, tok, str(heldout), max_new_tokens=48)


def test_a_rotary_run_past_the_positions_its_model_was_trained_for_says_so_once(tmp_path, capsys):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    teacher = _teacher_tokens(tok, _config(tmp_path))
    model.config.max_position_embeddings = teacher + 7
    train(model, [ROW], _config(tmp_path, max_completion_length=8), tokenizer=tok)  # fills them exactly
    assert "trained for" not in capsys.readouterr().err
    train(model, [ROW], _config(tmp_path, max_completion_length=9, output_dir=str(tmp_path / "b")), tokenizer=tok)
    err = capsys.readouterr().err
    assert err.count(f"take {teacher + 8} positions, past the {teacher + 7} the model was trained for") == 1
    assert built_positions(_gpt2(96)[0].config) is None  # a learned table is a hard limit instead
