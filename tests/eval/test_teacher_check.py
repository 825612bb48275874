"""`sdft teacher-check`: the teacher's own answers per template, before a run (is there anything to distil?)."""
import json

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft.cli import main as cli
from sdft.data.examples import load_examples
from sdft.eval.teacher_check import STUDENT, teacher_check, teacher_contexts, verdict

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


def test_rows_score_the_student_then_each_template():
    tok = tiny_tokenizer()
    rows = teacher_check(tiny_llama(vocab=len(tok)), tok, ROWS, ["fewshot", "paper", "{prompt} / {demonstration}"],
                         scorer="exact", limit=2, max_new_tokens=3)
    assert [r["context"] for r in rows] == [STUDENT, "fewshot", "paper", "{prompt} / {demonstration}"]
    assert all(r["examples"] == 2 and 0.0 <= r["score"] <= 1.0 and isinstance(r["first_answer"], str) for r in rows)


def test_teacher_contexts_are_the_ones_sdft_builds_and_keep_the_demonstration_as_target():
    from sdft.data.templates import teacher_messages

    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "demonstration": "A"}
    for template in ("fewshot", "paper"):
        (ex,) = teacher_contexts(load_examples([row]), template)
        assert ex.messages() == teacher_messages(row["prompt"], "A", template) and ex.demonstration == "A"
    (ex,) = teacher_contexts(load_examples([row]), "fewshot")
    assert [m["content"] for m in ex.messages()] == ["S", "Q", "A", "Q"]


@pytest.mark.parametrize("scores,expected", [
    ((0.0, 0.75, 0.0), "use teacher_template='fewshot' (75% against 0%); no edge over the prompt alone with paper"),
    ((0.0, 0.0, 0.0), "no template's teacher beats the prompt alone"),
    ((0.5, 0.5, 0.25), "no template's teacher beats the prompt alone (50%)"),
])
def test_verdict_names_the_template_or_says_there_is_nothing_to_distil(scores, expected):
    rows = [{"context": name, "score": s} for name, s in zip([STUDENT, "fewshot", "paper"], scores)]
    assert expected in verdict(rows)


def test_cli_prints_the_table_and_the_verdict(tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert cli(["teacher-check", "--model", str(folder), "--data", str(data), "--limit", "2",
                "--max-new-tokens", "2", "--scorer", "exact"]) == 0
    out = capsys.readouterr().out
    assert "first 2 rows" in out and STUDENT in out and "fewshot" in out and "paper" in out
    assert "teacher_template" in out or "little to distil" in out


@pytest.mark.parametrize("argv,message", [
    (["--templates", "{prompt} only"], "neither one of"),
    (["--scorer", "fuzzy"], "unknown eval_scorer 'fuzzy'"),
    (["--limit", "0"], "must be >= 1"),
    (["--data", "nope.jsonl"], "dataset file not found"),
])
def test_cli_bad_input_is_one_line_before_the_model_loads(argv, message, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr("sdft.models.load_model", no_model)
    assert cli(["teacher-check", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
