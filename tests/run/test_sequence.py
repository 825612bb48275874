"""Skills in sequence: a stage x skill matrix after every stage, a crash-safe resume, bad stages refused first."""
import json

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train_sequence
from sdft.eval.evaluation import evaluate

ADD = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
SUB = [{"prompt": f"sub {a} {b}", "demonstration": str(a - b)} for a, b in [(9, 2), (7, 4), (8, 6), (5, 1)]]


def _stages(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in (("add", ADD), ("sub", SUB)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(path))
    keep = tmp_path / "keep.jsonl"
    keep.write_text(json.dumps({"prompt": "say 1", "demonstration": "1"}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("one two three four five.\n\nsix seven eight.\n")
    return files, str(keep), str(text)


def _config(tmp_path, **change):
    base = dict(output_dir=str(tmp_path / "seq"), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                max_completion_length=4, learning_rate=1e-3, save_steps=1, progress_bar=False, device="cpu",
                retention_scorer="exact")
    return SDFTConfig(**{**base, **change})


def _no_model_load(monkeypatch):
    """Any model load from here on fails the test: what it checks comes before the weights."""
    import sdft.models
    import sdft.run.sequence

    for module in (sdft.models, sdft.run.sequence):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model loaded"))


def _sequence(tmp_path, method="sdft", **change):
    files, keep, text = _stages(tmp_path)
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tok))
    config = _config(tmp_path, retention_data=keep, retention_text=text, **change)
    return train_sequence(model, files, config, tok, eval_stages=files, method=method), tok, files


def test_a_sequence_that_scores_nothing_says_so_before_it_trains(tmp_path, capsys):
    files, _, _ = _stages(tmp_path)
    tok = tiny_tokenizer()
    config = _config(tmp_path, max_steps=1, retention_data="", retention_text="")
    result = train_sequence(tiny_llama(vocab=len(tok)), files, config, tok)
    err = capsys.readouterr().err
    note = "no eval_stages and no retention check: nothing is scored between the stages"
    assert note in err and err.index(note) < err.index("stage 1/2")
    assert "sdft: after add" not in err and result.matrix[-1] == {"after": "sub"}


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_the_matrix_has_a_row_per_stage_and_a_column_per_skill(tmp_path, method):
    result, tok, files = _sequence(tmp_path, method)
    assert result.stages == ["add", "sub"]
    assert [row["after"] for row in result.matrix] == ["base", "add", "sub"]
    for row in result.matrix:
        assert set(row) == {"after", "add", "sub", "retention", "text_perplexity"}
        assert 0.0 <= row["add"] <= 1.0 and row["text_perplexity"] > 1.0
    last = evaluate(result.model, tok, files[0], "exact", 4)["score"]
    assert result.matrix[-1]["add"] == last  # the last row is the returned model's own score
    assert result.matrix[0]["text_perplexity"] != result.matrix[-1]["text_perplexity"]  # it trained
    written = json.loads((tmp_path / "seq" / "sequence.json").read_text())
    assert written["matrix"] == result.matrix and written["method"] == method
    assert (tmp_path / "seq" / "sequence.md").read_text().count("\n| ") == 4  # the header, then 3 rows
    assert (tmp_path / "seq" / "sequence.png").stat().st_size > 0
    assert (tmp_path / "seq" / "stage-1-add" / "final_model").is_dir()


def test_a_sequence_resumed_after_a_crash_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import sdft.run.trainer as trainer

    whole, _, _ = _sequence(tmp_path / "whole")
    real, calls = trainer.clip_and_step, {"n": 0}

    def crash_in_stage_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # stage 2, step 2 (its checkpoint-1 is written)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "clip_and_step", crash_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        _sequence(tmp_path / "crash")
    monkeypatch.setattr(trainer, "clip_and_step", real)
    resumed, _, _ = _sequence(tmp_path / "crash", resume_from_checkpoint=True)
    assert resumed.matrix == whole.matrix
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_bad_stage_file_is_one_line_before_any_training(tmp_path, monkeypatch):
    import sdft.run.trainer as trainer

    files, _, _ = _stages(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="bad.jsonl"):
        train_sequence(tiny_llama(vocab=40), [files[0], str(bad)], _config(tmp_path), tiny_tokenizer())
    with pytest.raises(ValueError, match="one held-out set per stage"):
        train_sequence(tiny_llama(vocab=40), files, _config(tmp_path), tiny_tokenizer(), eval_stages=files[:1])
    with pytest.raises(FileNotFoundError):
        train_sequence(tiny_llama(vocab=40), [files[0], str(tmp_path / "missing.jsonl")], _config(tmp_path),
                       tiny_tokenizer())


def test_sdft_continual_writes_both_matrices_side_by_side(tmp_path, capsys):
    from sdft import cli
    from sdft.run.export import save_hf_folder

    files, keep, _ = _stages(tmp_path)
    tok = tiny_tokenizer()
    model = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    out = tmp_path / "out"
    code = cli.main(["continual", "--model", str(model), "--stages", *files, "--eval-stages", *files,
                     "--baseline", "sft", "--scorer", "exact", "--set", f"output_dir={out}", "max_steps=1",
                     "per_device_train_batch_size=2", "num_generations=2", "max_completion_length=4",
                     f"retention_data={keep}", "retention_scorer=exact", "progress_bar=false", "device=cpu"])
    assert code == 0
    for method in ("sdft", "sft"):
        record = json.loads((out / method / "sequence.json").read_text())
        assert [r["after"] for r in record["matrix"]] == ["base", "add", "sub"]
    compared = (out / "sdft-vs-sft.md").read_text()
    assert "SDFT: score after each stage" in compared and "SFT: score after each stage" in compared
    assert (out / "sdft-vs-sft.png").is_file()
    assert "| sub |" in capsys.readouterr().out


def test_sdft_continual_refuses_a_bad_stage_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from sdft import cli

    files, _, _ = _stages(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    _no_model_load(monkeypatch)
    assert cli.main(["continual", "--stages", files[0], str(bad), "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl" in err[0]


def test_sdft_continual_refuses_selection_without_validation_stages_before_the_model_loads(tmp_path, monkeypatch,
                                                                                          capsys):
    from sdft import cli

    files, _, _ = _stages(tmp_path)
    _no_model_load(monkeypatch)
    args = ["continual", "--stages", *files, "--set", f"output_dir={tmp_path / 'o'}", "load_best_model_at_end=true"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--validation-stages" in err[0]
    assert cli.main(args[:3] + ["--validation-stages", files[0]] + args[3:]) == 2
    assert "one validation set per stage" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sequence.md", "sequence.png", "sequence.json"])
def test_a_file_of_the_users_named_like_the_matrix_is_never_overwritten(tmp_path, name):
    files, _, _ = _stages(tmp_path)
    mine = tmp_path / "seq" / name
    mine.parent.mkdir()
    mine.write_text("my notes")
    with pytest.raises(ValueError, match=f"{name} exists"):
        train_sequence(tiny_llama(vocab=40), files, _config(tmp_path), tiny_tokenizer())
    if name == "sequence.json":  # resuming reads it only when sdft wrote it
        with pytest.raises(ValueError, match="unreadable|not written by sdft.train_sequence"):
            train_sequence(tiny_llama(vocab=40), files, _config(tmp_path, resume_from_checkpoint=True),
                           tiny_tokenizer())
    assert mine.read_text() == "my notes"


def test_sdft_continual_run_again_refuses_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from sdft import cli

    files, _, _ = _stages(tmp_path)
    (tmp_path / "o" / "sft").mkdir(parents=True)
    (tmp_path / "o" / "sft" / "sequence.json").write_text("{}")  # the baseline's, from an earlier call
    _no_model_load(monkeypatch)
    args = ["continual", "--stages", *files, "--baseline", "sft", "--set", f"output_dir={tmp_path / 'o'}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sdft: error: {tmp_path / 'o' / 'sft' / 'sequence.json'} exists: set resume_from_checkpoint=true "
                   "to continue that sequence, or choose another output_dir"]


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_a_row_over_the_length_limit_in_a_later_stage_is_one_line_before_any_stage_trains(tmp_path, monkeypatch,
                                                                                           method):
    from sdft import cli
    from sdft.run.export import save_hf_folder

    files, _, _ = _stages(tmp_path)
    tok = tiny_tokenizer()
    model = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x " * 400, "demonstration": "y"}) + "\n")
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"stage 2 \(long\): .*long.jsonl:1: the prompt.* has \d+ tokens"):
        train_sequence(str(model), [files[0], str(long)], _config(tmp_path, max_prompt_length=64), method=method)
    assert not (tmp_path / "seq").exists()
    with pytest.raises(ValueError, match=r"stage 1 \(add\): unknown SDFTConfig option"):
        train_sequence(str(model), files, _config(tmp_path), stage_overrides=[{"sed": 1}, {}], method=method)
    args = ["continual", "--model", str(model), "--stages", files[0], str(long), "--set",
            f"output_dir={tmp_path / 'o'}", "max_prompt_length=64"]
    assert cli.main(args) == 2


def test_sdft_continual_refuses_eval_steps_without_validation_stages_before_the_model_loads(tmp_path, monkeypatch,
                                                                                          capsys):
    from sdft import cli

    files, _, _ = _stages(tmp_path)
    _no_model_load(monkeypatch)
    assert cli.main(["continual", "--stages", *files, "--set", f"output_dir={tmp_path / 'o'}", "eval_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval_steps=2 in a sequence" in err[0] and "--validation-stages" in err[0]
