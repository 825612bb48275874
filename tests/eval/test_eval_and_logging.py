"""Evaluation on the user's data, `sdft generate`, and logging beside metrics.jsonl."""
import json
import math
import socket
import sys
import types

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.data.examples import load_examples
from sdft.eval.evaluation import demonstration_perplexity, eval_table, evaluate
from sdft.eval.scorers import get_scorer

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, **change):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=1, num_generations=2,
                max_completion_length=4, learning_rate=1e-3, progress_bar=False, device="cpu",
                save_final_model=False, save_steps=1)
    return SDFTConfig(**{**base, **change})


def _train(tmp_path, **change):
    tok = tiny_tokenizer()
    return train(tiny_llama(vocab=len(tok)), ROWS, _config(tmp_path, **change), tokenizer=tok)


@pytest.mark.parametrize("name,answer,demo,expected", [
    ("exact", " 42 ", "42", 1.0), ("exact", "42.", "42", 0.0),
    ("normalized", "The  Answer, Paris!", "answer paris", 1.0), ("normalized", "Lyon", "Paris", 0.0),
    ("json", '{"b": 2, "a": 1}', '{"a":1,"b":2}', 1.0), ("json", "not json", '{"a": 1}', 0.0),
    ("json", '{"a": 2}', '{"a": 1}', 0.0),
    (r"regex:####\s*(-?\d+)", "so it is #### 17", "work ... ####17", 1.0),
    (r"regex:####\s*(-?\d+)", "17", "#### 17", 0.0),
    (r"regex:\d+", "about 5 or 6", "5", 1.0),
])
def test_scorers(name, answer, demo, expected):
    assert get_scorer(name)(answer, demo) == expected


@pytest.mark.parametrize("spec,message", [("fuzzy", "unknown eval_scorer 'fuzzy'"),
                                          ("regex:(", "not a valid regular expression"),
                                          ("", "eval_scorer must be a non-empty string")])
def test_bad_scorer_is_a_config_error(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SDFTConfig(eval_scorer=spec)


def test_a_callable_scorer_that_cannot_take_answer_and_demonstration_is_refused_before_use():
    with pytest.raises(ValueError, match="^eval_scorer <lambda>: a scorer is called as scorer\\(answer, "
                                         "demonstration\\) -> float"):
        get_scorer(lambda answer: 1.0)
    for fine in (lambda a, d: 1.0, lambda *args: 1.0, lambda a, d, weight=1.0: weight):
        assert get_scorer(fine) is fine


def test_bad_report_to_is_a_config_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown report_to 'mlflow'"):
        SDFTConfig(report_to=["mlflow"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    calls = []
    monkeypatch.setattr("sdft.run.prepare.load_model", lambda *a: calls.append(a))
    with pytest.raises(ValueError, match="report_to=wandb needs the wandb package: pip install wandb"):
        train(None, ROWS, SDFTConfig(report_to=["wandb"], output_dir="unused", device="cpu"))
    assert not calls  # refused before any model loads


def test_perplexity_is_the_demonstration_cross_entropy():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).eval()
    examples = load_examples(ROWS)
    nll, count = 0.0, 0
    for ex in examples:
        prompt = tok.apply_chat_template(ex.messages(), add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(ex.messages() + [{"role": "assistant", "content": ex.demonstration}],
                                       return_dict=True)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        for t in range(len(prompt), len(full)):
            nll -= float(logp[t - 1, full[t]])
            count += 1
    assert demonstration_perplexity(model, tok, examples) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_evaluate_with_a_callable_scorer():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    seen = []
    out = evaluate(model, tok, ROWS, scorer=lambda a, d: seen.append((a, d)) or len(a) >= 0, max_new_tokens=3)
    assert out["score"] == 1.0 and out["examples"] == 3 and len(out["answers"]) == 3
    assert [d for _, d in seen] == ["3", "7", "11"] and math.isfinite(out["perplexity"])


def test_train_evaluates_before_and_after_into_eval_json(tmp_path):
    data = _jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    result = _train(tmp_path, eval_data=str(data), eval_scorer="normalized", max_steps=3, eval_steps=2)
    records = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["step"] for r in records] == [0, 2, 3] == [r["step"] for r in result.evaluations]
    for r in records:
        assert 0 <= r["score"] <= 1 and math.isfinite(r["perplexity"]) and len(r["answers"]) == 2
    table = eval_table(records, load_examples(str(data)))
    assert "perplexity" in table and "step 0" in table and "step 3" in table and "add 1 2" in table


def test_resumed_run_keeps_eval_records_up_to_its_checkpoint(tmp_path):
    data = _jsonl(tmp_path / "eval.jsonl", ROWS[:1])
    _train(tmp_path, eval_data=str(data), max_steps=2, eval_steps=1)
    (tmp_path / "run" / "checkpoint-2").rename(tmp_path / "gone")  # resume from step 1
    _train(tmp_path, eval_data=str(data), max_steps=3, eval_steps=1, resume_from_checkpoint=True)
    records = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2, 3]


def test_eval_data_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    calls = []
    monkeypatch.setattr("sdft.run.prepare.load_model", lambda *a: calls.append(a))
    with pytest.raises(ValueError, match="missing field 'demonstration'"):
        train(None, ROWS, _config(tmp_path, eval_data=str(bad)))
    assert not calls


def test_tensorboard_logs_trl_metric_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _jsonl(tmp_path / "eval.jsonl", ROWS[:1])
    _train(tmp_path, report_to=["tensorboard"], eval_data=str(data))
    (run_dir,) = (tmp_path / "run" / "runs").iterdir()  # runs/<date>_<host>, as transformers names it
    assert socket.gethostname() in run_dir.name
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/self_distillation/distillation_loss", "train/grad_norm",
                "train/learning_rate", "train/completions/mean_length", "train/completions/max_length",
                "train/completions/mean_terminated_length", "train/completions/clipped_ratio",
                "train/sdft/tokens_per_second", "train/sdft/peak_memory_mib", "eval/score", "eval/perplexity"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/score")] == [0, 2]


def test_trackio_logs_trl_metric_names_in_its_local_store(tmp_path, monkeypatch):
    """The real trackio, local: its store under TRACKIO_DIR, the project as TRL's project names it."""
    import importlib

    trackio = pytest.importorskip("trackio")
    store = tmp_path / "trackio"  # TRACKIO_DIR, which trackio reads once, when it is imported
    for name in ("trackio", "trackio.utils", "trackio.sqlite_storage"):
        monkeypatch.setattr(importlib.import_module(name), "TRACKIO_DIR", store)
    data = _jsonl(tmp_path / "eval.jsonl", ROWS[:1])
    _train(tmp_path, report_to=["trackio"], eval_data=str(data), project="my-skill")
    (run,) = trackio.SQLiteStorage.get_runs("my-skill")
    assert socket.gethostname() in run  # <date>_<host>, as the TensorBoard run is named
    logs = trackio.SQLiteStorage.get_logs("my-skill", run)
    train_steps = [r["step"] for r in logs if "train/loss" in r]
    eval_steps = [r["step"] for r in logs if "eval/score" in r]
    assert train_steps == [1, 2] and eval_steps == [0, 2]
    assert all("train/self_distillation/distillation_loss" in r for r in logs if "train/loss" in r)
    assert all("eval/loss" in r and "eval/perplexity" in r for r in logs if "eval/score" in r)
    assert (store / "my-skill.db").is_file()


def test_wandb_gets_offline_mode_and_trl_names(tmp_path, monkeypatch):
    """wandb itself is not installed here: a stand-in module records what our glue hands it."""
    logged, inits = [], []

    class Run:
        def log(self, scalars, step):
            logged.append((step, scalars))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("sdft.run.reporting.check_backends", lambda report_to: None)
    monkeypatch.setattr("sdft.run.prepare.check_backends", lambda report_to: None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    _train(tmp_path, report_to=["wandb"])
    assert inits[0]["mode"] == "offline" and inits[0]["config"]["report_to"] == ["wandb"]
    assert [s for s, _ in logged[:-1]] == [1, 2] and logged[-1] == "finished"
    assert logged[0][1]["train/self_distillation/distillation_loss"] == logged[0][1]["train/loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["teacher-check"]])
def test_a_gpu_asked_for_where_there_is_none_is_one_line_before_the_model_loads(command, capsys, monkeypatch):
    import sdft.models

    monkeypatch.setattr(sdft.models, "load_trained", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli(command + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sdft: error: --device=cuda but no CUDA device is available; use --device=cpu"


def test_cli_generate_answers_prompts(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    prompts = _jsonl(tmp_path / "p.jsonl", ROWS[:2])
    assert cli(["generate", str(folder), "--prompt", "add 9 9", "--prompts", str(prompts),
                "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3 and "> add 9 9" in out and "> add 3 4" in out
    assert cli(["generate", str(folder), "--prompt", "hi", "--temperature", "0.7", "--max-new-tokens", "2"]) == 0
    assert cli(["generate", str(folder), "--prompt", "hi", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
                "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate"], "give --prompt TEXT or --prompts FILE"),
        (["generate", "--prompts", "nope.txt"], "dataset file not found: nope.txt"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "must be >= 1"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "finite number >= 0"),
        (["generate", "--prompt", "x", "--temperature", "nan"], "finite number >= 0"),
        (["generate", "--prompt", "x", "--temperature", "inf"], "finite number >= 0"),
        (["generate", "--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["generate", "--prompt", "x", "--top-k", "5"], "give --temperature too"),
        (["generate", "--prompt", " "], "--prompt is empty"),
        (["generate", "--prompt", "x", "--prompt", ""], "--prompt 2 of 2 is empty"),
        (["generate", "--prompt", "x", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["teacher-check", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_cli_generate_errors_are_one_line(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("text,message", [
    ("\n\n", "p.jsonl holds no prompts"),
    ('{"prompt": "a"}\n\n{"prompt": 5}\n', "p.jsonl:3: 'prompt' must be a string or a list of chat messages"),
    ('{"text": "a"}\n', "p.jsonl:1: a row needs a 'prompt' field"),
])
def test_cli_generate_names_the_line_of_a_bad_prompts_file(tmp_path, capsys, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    assert cli(["generate", "--prompts", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_train_with_eval_data_prints_the_table(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    data = _jsonl(tmp_path / "train.jsonl", ROWS)
    heldout = _jsonl(tmp_path / "heldout.jsonl", ROWS[:2])
    code = cli(["train", "--model", str(folder), "--data", str(data), "--eval-data", str(heldout), "--scorer", "json",
                "--set", f"output_dir={tmp_path / 'run'}", "max_steps=1", "num_generations=2",
                "max_completion_length=3", "per_device_train_batch_size=1", "progress_bar=false", "device=cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "evaluation on" in out and "perplexity" in out and "final_model" in out
    assert [r["step"] for r in json.loads((tmp_path / "run" / "eval.json").read_text())] == [0, 1]


def test_help_lists_the_new_keys(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("distillation_mode", "distillation_is_clip (float|none, default none)", "eval_scorer", "report_to",
                "loss_normalization", "lr_scheduler_type"):
        assert key in out, key


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "eval_steps=5"], "eval_steps=5 evaluates eval_data during training, and the run has none"),
    (["train", "--scorer", "json"], "--scorer json scores the answers to --eval-data: give --eval-data FILE"),
    (["train", "--set", "load_best_model_at_end=true"], "load_best_model_at_end ranks the evaluations on eval_data"),
    (["continual", "--stages", "ROWS", "--set", "eval_steps=2"], "eval_steps=2 in a sequence evaluates each stage's "
                                                                  "validation set"),
])
def test_evaluation_settings_with_nothing_to_evaluate_are_one_line_before_the_model_loads(
        tmp_path, capsys, monkeypatch, argv, message):
    import sdft.models

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(sdft.models, "load_model", no_model_load)
    rows = _jsonl(tmp_path / "rows.jsonl", ROWS)
    argv = [str(rows) if a == "ROWS" else a for a in argv] + ["--set", f"output_dir={tmp_path / 'o'}"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_eval_steps_without_eval_data_is_refused_by_train_too(tmp_path):
    with pytest.raises(ValueError, match="eval_steps=2 evaluates eval_data during training"):
        train("/nonexistent/model", ROWS, _config(tmp_path, eval_steps=2))


@pytest.mark.parametrize("first,steps", [(False, [3, 6]), (True, [1, 3, 6])])
def test_metrics_are_written_every_logging_steps_and_the_first_step_when_asked(tmp_path, first, steps):
    tok = tiny_tokenizer()
    train(tiny_llama(vocab=len(tok)), ROWS, _config(tmp_path, max_steps=6, logging_steps=3, logging_first_step=first),
          tokenizer=tok)
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == steps


def test_each_evaluation_shows_a_bar_of_its_answers_and_its_held_out_loss(tmp_path, capsys):
    """Held-out rows (answered, then scored for the loss) and the retention rows together: an evaluation can
    take minutes, and says so as it goes."""
    tok = tiny_tokenizer()
    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    config = SDFTConfig(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
                        progress_bar=True, device="cpu", save_final_model=False, output_dir=str(tmp_path / "run"),
                        retention_data=str(keep), retention_text="")
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS)
    err = capsys.readouterr().err
    assert "evaluation at step 0:" in err and "evaluation at step 1:" in err
    assert "/8 [" in err  # the total: 3 held-out rows answered, then their loss, and 2 kept
    config = SDFTConfig(**{**config.to_dict(), "progress_bar": False, "output_dir": str(tmp_path / "quiet")})
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS)
    assert "evaluation at step" not in capsys.readouterr().err
