"""What a run keeps: retention data and held-out text scored beside the new skill at every evaluation."""
import json

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import sdft.models
from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.eval.evaluation import eval_table
from sdft.eval.retention import GENERAL_PROBE, HELDOUT_TEXT, resolve, summary
from sdft.eval.scorers import contains
from sdft.run.reporting import eval_scalars

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
KEEP = [{"prompt": "say hi", "demonstration": "hi | hello"}, {"prompt": "count", "demonstration": "1 2 3"}]


def _run(tmp_path, tok=None, model=None, **change):
    tok = tok or tiny_tokenizer()
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=1, num_generations=2,
                  max_completion_length=4, progress_bar=False, device="cpu", save_final_model=False,
                  eval_data=str(tmp_path / "eval.jsonl"), eval_steps=1)
    return train(model or tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(**{**values, **change}), tokenizer=tok)


def test_every_evaluation_scores_what_the_run_keeps(tmp_path):
    (tmp_path / "keep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KEEP))
    (tmp_path / "text.txt").write_text("one two three four\n\nfive six seven eight nine\n")
    result = _run(tmp_path, retention_data=str(tmp_path / "keep.jsonl"), retention_text=str(tmp_path / "text.txt"))
    records = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert 0 <= r["retention_score"] <= 1 and r["retention_text_perplexity"] > 1
        assert len(r["retention_answers"]) == 2 and "score" in r
    assert set(eval_scalars(records[-1])) == {"score", "perplexity", "loss", "retention/score",
                                              "retention/text_perplexity"}
    table = eval_table(result.evaluations, [])
    assert "kept" in table.splitlines()[0] and "text_ppl" in table.splitlines()[0]
    line = summary(records)
    assert line.startswith("kept: retention data ") and "held-out text perplexity" in line


def test_a_users_own_model_gets_no_bundled_probe_but_is_told_what_to_pass(tmp_path, capsys):
    result = _run(tmp_path)  # a model object not from sdft.load_model: not the embedded one
    assert "no retention check for this model" in capsys.readouterr().err
    assert "retention_score" not in result.evaluations[0]


def test_bad_retention_files_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(sdft.models, "load_model", no_model_load)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q"}\n')
    for setting, message in ((f"retention_data={tmp_path / 'bad.jsonl'}", "missing field 'demonstration'"),
                             (f"retention_text={tmp_path / 'none.txt'}", "retention_text"),
                             ("retention_scorer=fuzzy", "unknown eval_scorer 'fuzzy'")):
        assert cli(["train", "--set", f"output_dir={tmp_path / 'o'}", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


@pytest.mark.parametrize("answer,demo,want", [("There are 7 days.", "seven | 7", 1.0), ("17 days", "7", 0.0),
                                              ("The capital is Paris", "paris", 1.0), ("Lyon", "paris", 0.0)])
def test_contains_accepts_any_alternative_as_a_whole_word(answer, demo, want):
    assert contains(answer, demo) == want


def test_the_bundled_probe_is_what_make_prior_probe_writes():
    """The forgetting benchmark and every run's retention check ask the same probe and text."""
    from benchmarks.make_prior_probe import as_row, candidates

    rows = [json.loads(line) for line in GENERAL_PROBE.read_text().splitlines()]
    made = [as_row(item) for item in candidates()]
    assert all(row in made for row in rows) and len(rows) == 103  # the ones the base model answers right
    assert [made.index(row) for row in rows] == sorted(made.index(row) for row in rows)  # in candidate order
    assert len(HELDOUT_TEXT.read_text().strip().split("\n\n")) == 8


def test_the_bundled_check_says_once_what_it_costs_and_how_to_turn_it_off():
    said = []
    resolve("auto", "", "contains", embedded=True, evaluating=True, report=said.append)
    assert said == ["sdft: each evaluation also checks what the embedded model keeps (103 general prompts answered "
                    "greedily: retention_score); retention_data='' turns it off"]
    said.clear()
    resolve("", "", "contains", embedded=True, evaluating=True, report=said.append)
    resolve("auto", "auto", "contains", embedded=True, evaluating=False, report=said.append)
    assert said == []
