"""Training API input handling: clear errors for bad data and config; skill data and scoring."""
import json

import pytest

from sdft.config import SDFTConfig
from sdft.data.examples import load_examples
from sdft.data.skill import load_skill, score
from sdft.data.templates import teacher_messages


def test_accepts_trl_columns_and_chat_prompts():
    rows = [{"prompt": "hi", "privileged_context": "hello"},
            {"prompt": [{"role": "user", "content": "q"}], "demonstration": "a"}]
    ex = load_examples(rows)
    assert ex[0].demonstration == "hello" and ex[1].messages() == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("rows,message", [
    ([], "holds no examples"),
    ([{"demonstration": "a"}], "missing field 'prompt'"),
    ([{"prompt": "q"}], "missing field 'demonstration'"),
    ([{"prompt": "q", "demonstration": None}], "row 0: 'demonstration' is null: every row needs its demonstration"),
    ([{"prompt": "q", "demonstration": None, "privileged_context": None}], "'demonstration' and 'privileged_context' "
                                                                         "are null"),
    ([{"prompt": "", "demonstration": "a"}], "'prompt' is empty"),
    ([{"prompt": "q", "demonstration": "  "}], "demonstration is empty"),
    ({"prompt": "q", "demonstration": "a"}, "a mapping must hold columns"),
    ({"prompt": ["q", "r"], "demonstration": ["a"]}, "a mapping must hold columns"),
    ({"prompt": [], "demonstration": []}, "holds no examples"),
])
def test_bad_rows_name_the_problem(rows, message):
    with pytest.raises(ValueError, match=message):
        load_examples(rows)


def test_a_mapping_of_splits_names_the_split_to_pass():
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"train": Dataset.from_list([{"prompt": "q", "demonstration": "a"}])})
    with pytest.raises(ValueError, match=r"a mapping of splits \(train\), such as load_dataset returns: pass one "
                                         r"split, e.g. dataset\['train'\]"):
        load_examples(splits)
    assert len(load_examples(splits["train"])) == 1


def test_accepts_a_mapping_of_columns():
    """The shape ``Dataset.from_dict`` takes, without needing the datasets package."""
    ex = load_examples({"prompt": ["q1", "q2"], "demonstration": ["a1", "a2"]})
    assert [(e.messages()[-1]["content"], e.demonstration) for e in ex] == [("q1", "a1"), ("q2", "a2")]


def test_a_bad_row_of_a_file_is_named_by_its_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "demonstration": "b"}\n\n{"prompt": "c"}\n')  # a blank line between
    with pytest.raises(ValueError, match=r"d.jsonl:3: missing field 'demonstration'"):
        load_examples(data)
    listed = tmp_path / "d.json"
    listed.write_text('[{"prompt": "a", "demonstration": "b"}, {"prompt": "c"}]')
    with pytest.raises(ValueError, match=r"d.json row 1: missing field 'demonstration'"):
        load_examples(listed)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_examples(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "demonstration": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_examples(bad)


@pytest.mark.parametrize("change,message", [
    (dict(divergence="kl"), "unknown divergence"),
    (dict(teacher_mode="old"), "unknown teacher_mode"),
    (dict(num_generations=0), "num_generations must be positive"),
    (dict(teacher_template="{prompt} only"), "neither one of"),
    (dict(num_loss_tokens_to_skip=8, max_completion_length=8), "leaves no token of a max_completion_length=8"),
    (dict(distillation_mode="topk_logits", distillation_topk=1), "every divergence is 0"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(**change)
    with pytest.raises(ValueError, match="unknown SDFTConfig option"):
        SDFTConfig.from_dict({"lr": 1})


def test_templates():
    msgs = [{"role": "user", "content": "Q?"}]
    few = teacher_messages(msgs, "A.", "fewshot")
    assert [m["role"] for m in few] == ["user", "assistant", "user"] and few[1]["content"] == "A."
    paper = teacher_messages(msgs, "A.", "paper")
    assert "This is an example for a response to the question" in paper[0]["content"]
    with pytest.raises(ValueError, match="format string"):
        teacher_messages(msgs, "A.", "no placeholders")


def test_bundled_skill_and_scorer():
    train, held_out = load_skill("train"), load_skill("eval")
    assert len(train) > 50 and len(held_out) > 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    demo = held_out[0]["demonstration"]
    assert score(demo, demo) == {"format": 1.0, "exact": 1.0}
    assert score("sure!", demo) == {"format": 0.0, "exact": 0.0}
    assert score(json.dumps({"tool": "x"}), demo) == {"format": 1.0, "exact": 0.0}


def test_trls_conversational_sft_rows_split_into_prompt_and_demonstration():
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    (ex,) = load_examples([{"messages": turns}])
    assert ex.messages() == turns[:2] and ex.demonstration == "a"
    for bad in (turns[:2], turns[2:], "q"):
        with pytest.raises(ValueError, match="row 0: 'messages' must be a list of chat messages, a user turn and "
                                             "then the assistant's answer"):
            load_examples([{"messages": bad}])


def test_content_given_as_text_parts_is_joined_and_other_parts_are_refused():
    parts = [{"type": "text", "text": "add 1 "}, {"type": "text", "text": "2"}]
    (ex,) = load_examples([{"prompt": [{"role": "user", "content": parts}],
                            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "3"}]}]}])
    assert ex.messages() == [{"role": "user", "content": "add 1 2"}] and ex.demonstration == "3"
    with pytest.raises(ValueError, match="row 0: prompt message 0 has image content: sdft trains on text only"):
        load_examples([{"prompt": [{"role": "user", "content": [{"type": "image"}, *parts]}], "demonstration": "3"}])


def test_a_file_saved_with_a_byte_order_mark_and_crlf_reads_as_its_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "q1", "demonstration": "a1"}\r\n'
                     b'{"prompt": "q2", "demonstration": "a2"}\r\n')
    assert [(e.messages()[0]["content"], e.demonstration) for e in load_examples(path)] == [("q1", "a1"), ("q2", "a2")]


def test_a_chat_the_template_refuses_is_one_line_naming_the_row_before_the_weights_load(tmp_path, monkeypatch):
    """Gemma's template raises on a system turn: the row is named, with what to change, not a jinja traceback."""
    from tiny_model import tiny_llama
    from tiny_tokenizer import CHAT_TEMPLATE, tiny_tokenizer

    import sdft.run.prepare
    from sdft import train
    from sdft.eval.evaluation import evaluate
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE)
    model = tiny_llama(vocab=len(tok))
    folder = save_hf_folder(model, tok, tmp_path / "model")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "demonstration": "a"}) + "\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "demonstration": "a"})
        + "\n")
    message = r"rows.jsonl:2: the tokenizer's chat template refuses it \(System role not supported\): fold the system"
    monkeypatch.setattr(sdft.run.prepare, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(ValueError, match=message):
        train(str(folder), str(rows), SDFTConfig(output_dir=str(tmp_path / "run"), device="cpu"))
    with pytest.raises(ValueError, match=message):
        evaluate(model, tok, str(rows))


def test_a_chat_template_that_does_not_parse_is_one_line():
    from tiny_tokenizer import tiny_tokenizer

    from sdft.data.chat import chat_ids

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(ValueError, match=r"the tokenizer's chat template does not parse \(unexpected '}', line 1\)"):
        chat_ids(tok, [{"role": "user", "content": "q"}], "cpu")


@pytest.mark.parametrize("template", ["chat", "none"])
def test_rows_encoded_in_batches_get_the_ids_each_gets_alone(template, monkeypatch):
    """``encode_examples`` (and SFT's ``encode_demonstrations``) render and tokenize templated chats a batch at
    a time: the same ids as ``chat_ids`` chat by chat, for chat rows, plain-text rows (TRL's standard format),
    a tokenizer without a template and template variables, across a batch boundary."""
    from tiny_tokenizer import tiny_tokenizer

    import sdft.data.chat
    from sdft.data.chat import chat_ids, with_template_kwargs
    from sdft.run.trainer import encode_examples

    monkeypatch.setattr(sdft.data.chat, "CHAT_BATCH", 3)
    tok = tiny_tokenizer()
    if template == "none":
        tok.chat_template = None
    else:
        tok.chat_template = "{% if greeting %}{{ greeting }}{% endif %}" + tok.chat_template
        tok = with_template_kwargs(tok, {"greeting": "hello "})
    rows = [{"prompt": f"add {i} {i + 1}", "demonstration": str(2 * i + 1)} for i in range(5)]
    rows += [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
              "demonstration": "yo"}]
    examples = load_examples(rows) + load_examples([{"prompt": "plain text", "completion": "done"}])
    config = SDFTConfig(device="cpu")
    encoded = encode_examples(examples, tok, config)
    for ex, got in zip(examples, encoded, strict=True):
        assert got.prompt_ids.tolist() == chat_ids(tok, ex.messages(), "cpu").tolist()
        teacher = teacher_messages(ex.messages(), ex.demonstration, config.teacher_template)
        assert got.teacher_ids.tolist() == chat_ids(tok, teacher, "cpu").tolist()
    if template == "chat":
        assert tok.decode(encoded[0].prompt_ids).startswith("hello ")
    from sdft.run.sft import encode_demonstrations

    for ex, (ids, prompt_length) in zip(examples, encode_demonstrations(examples, tok, config), strict=True):
        full = ex.messages() + [{"role": "assistant", "content": ex.demonstration}]
        assert ids.tolist() == chat_ids(tok, full, "cpu", add_generation_prompt=False).tolist()
        assert prompt_length == chat_ids(tok, ex.messages(), "cpu").numel()


def test_a_refused_chat_in_a_batch_names_its_own_row():
    from tiny_tokenizer import CHAT_TEMPLATE, tiny_tokenizer

    from sdft.run.trainer import encode_examples

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'bad' %}"
                         "{{ raise_exception('no') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE)
    rows = [{"prompt": p, "demonstration": "a"} for p in ("q", "r", "bad", "s")]
    with pytest.raises(ValueError, match=r"^dataset row 2: the tokenizer's chat template refuses it \(no\)"):
        encode_examples(load_examples(rows), tok, SDFTConfig(device="cpu"))
