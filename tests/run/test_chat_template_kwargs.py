"""chat_template_kwargs (TRL's; Qwen3's enable_thinking=False): every chat of a run renders with them, prompts,
teacher contexts, demonstrations and evaluations alike; the tokenizer given and the one saved are unchanged."""
import json

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import sdft.eval.evaluation
import sdft.run.trainer
from sdft import SDFTConfig, train, train_sft
from sdft.cli import main as cli
from sdft.data.chat import chat_ids, with_template_kwargs
from sdft.data.examples import load_examples

ROWS = [{"prompt": "add 1 2", "demonstration": "3"}, {"prompt": "add 3 4", "demonstration": "7"}]
OFF = "<think></think>"  # what the template adds to an opened assistant turn when thinking is off
OFF_IF = "{% if enable_thinking is defined and enable_thinking is false %}" + OFF + "{% endif %}"
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}" + OFF_IF
            + "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n" + OFF_IF + "{% endif %}")  # as Qwen3's


def _tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = THINKING
    return tok


def _config(tmp_path, **change):
    return SDFTConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                num_generations=2, max_completion_length=3, progress_bar=False, device="cpu",
                                chat_template_kwargs={"enable_thinking": False}), **change})


def test_the_wrapped_tokenizer_renders_with_them_and_the_original_does_not():
    tok = _tokenizer()
    messages = load_examples(ROWS)[0].messages()
    wrapped = with_template_kwargs(tok, {"enable_thinking": False})
    assert tok.decode(chat_ids(wrapped, messages, "cpu")).endswith(OFF)
    assert not tok.decode(chat_ids(tok, messages, "cpu")).endswith(OFF)
    assert with_template_kwargs(wrapped, {}) is tok and with_template_kwargs(tok, None) is tok


@pytest.mark.parametrize("run", [train, train_sft])
def test_every_chat_of_a_run_renders_with_them(tmp_path, monkeypatch, run):
    tok = _tokenizer()
    encoded, answered = [], []
    for module, name, box in ((sdft.run.trainer, "encode_examples", encoded),
                              (sdft.run.sft, "encode_demonstrations", encoded),
                              (sdft.eval.evaluation, "generate_answers", answered)):
        real = getattr(module, name)

        def spy(*args, real=real, box=box, **kwargs):
            box.append(args[1])  # the tokenizer it renders with
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    result = run(tiny_llama(vocab=len(tok)), ROWS, _config(tmp_path, eval_max_new_tokens=2), tokenizer=tok,
                 eval_dataset=ROWS[:1])
    messages = load_examples(ROWS)[0].messages()
    for used in encoded + answered + [result.tokenizer]:
        assert tok.decode(chat_ids(used, messages, "cpu")).endswith(OFF)
    assert encoded and answered
    assert not tok.decode(chat_ids(tok, messages, "cpu")).endswith(OFF)  # the user's tokenizer is as it was
    saved = json.loads((tmp_path / "run" / "final_model" / "tokenizer_config.json").read_text())
    assert "enable_thinking" not in json.dumps(saved)


def test_the_teacher_context_renders_with_them_too(tmp_path):
    from sdft.run.trainer import encode_examples

    tok = with_template_kwargs(_tokenizer(), {"enable_thinking": False})
    ex = encode_examples(load_examples(ROWS), tok, _config(tmp_path))[0]
    assert tok.decode(ex.prompt_ids).endswith(OFF) and tok.decode(ex.teacher_ids).endswith(OFF)


@pytest.mark.parametrize("value,message", [
    ("[1]", "must be a mapping of template variable names"), ("{x", "must be a JSON object"),
    ('{"add_generation_prompt": false}', "'add_generation_prompt': sdft sets it"),
])
def test_bad_kwargs_are_one_line(value, message, capsys):
    with pytest.raises(ValueError, match=message):
        SDFTConfig.from_strings({"chat_template_kwargs": value})
    assert cli(["generate", "--prompt", "x", "--chat-template-kwargs", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "--chat-template-kwargs" in err and "\n" not in err


def test_trls_chat_template_kwargs_map_onto_the_run(tmp_path):
    import types

    from sdft.integrations.trl import config_from_trl

    args = types.SimpleNamespace(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                 num_generations=8, chat_template_kwargs={"enable_thinking": False}, use_cpu=True)
    assert config_from_trl(args).chat_template_kwargs == {"enable_thinking": False}


def test_the_run_s_exports_and_checkpoints_answer_with_them(tmp_path, capsys):
    from sdft.models import load_trained
    from sdft.run.export import export_checkpoint, load_checkpoint_model, save_hf_folder

    tok = _tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    result = train(str(base), ROWS, _config(tmp_path))
    messages = load_examples(ROWS)[0].messages()
    final = result.output_dir / "final_model"
    exported = export_checkpoint(result.output_dir / "checkpoint-1", tmp_path / "export")
    for folder in (final, exported):
        mark = json.loads((folder / "sdft_export.json").read_text())
        assert mark["chat_template_kwargs"] == {"enable_thinking": False}
        _, loaded = load_trained(folder)
        assert tok.decode(chat_ids(loaded, messages, "cpu")).endswith(OFF)
    _, from_checkpoint = load_checkpoint_model(result.output_dir / "checkpoint-1")
    assert tok.decode(chat_ids(from_checkpoint, messages, "cpu")).endswith(OFF)
    _, plain = load_trained(base)  # a model folder of the user's: as its tokenizer renders
    assert not tok.decode(chat_ids(plain, messages, "cpu")).endswith(OFF)
    capsys.readouterr()
    assert cli(["generate", str(final), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    assert 'chats render with the run\'s chat_template_kwargs {"enable_thinking": false}' in capsys.readouterr().err
    assert cli(["generate", str(final), "--prompt", "hi", "--max-new-tokens", "1", "--chat-template-kwargs", "{}"]) == 0
    assert "chats render with" not in capsys.readouterr().err


def test_evaluate_renders_with_the_kwargs_it_is_given(monkeypatch):
    from sdft.eval.evaluation import evaluate

    tok, seen = _tokenizer(), []
    real = sdft.eval.evaluation.generate_answers

    def spy(model, tokenizer, *args, **kwargs):
        seen.append(tokenizer)
        return real(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(sdft.eval.evaluation, "generate_answers", spy)
    evaluate(tiny_llama(vocab=len(tok)), tok, ROWS[:1], max_new_tokens=1,
             chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(chat_ids(seen[-1], load_examples(ROWS)[0].messages(), "cpu")).endswith(OFF)
    with pytest.raises(ValueError, match="'tokenize': sdft sets it"):
        evaluate(tiny_llama(vocab=len(tok)), tok, ROWS[:1], chat_template_kwargs={"tokenize": True})
