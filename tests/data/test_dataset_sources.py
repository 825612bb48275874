"""Datasets by name: JSON lines, JSON, Parquet, CSV, a saved dataset folder, or a Hub id with its split and
configuration after colons. The Hub is a stand-in of ``datasets.load_dataset`` that records what it was asked
and answers with the real Parquet builder over local files (so splits slice as the Hub's do); everything else
runs through the real pyarrow and datasets."""
import json

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.data.examples import load_examples

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
TEST_ROWS = [{"prompt": "add 7 8", "demonstration": "15"}]


def _pairs(examples):
    return [(e.messages()[-1]["content"], e.demonstration) for e in examples]


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub of two datasets: ``org/tiny``, configurations ``default`` (splits train, test) and ``main`` (train
    only), and ``org/qa`` (question / answer columns; train and test); each call's (repo, configuration, split)
    is recorded."""
    import datasets

    real = datasets.load_dataset
    qa = _parquet(tmp_path / "qa.parquet", [{"question": r["prompt"], "answer": r["demonstration"]} for r in ROWS])
    files = {("org/tiny", None, "train"): _parquet(tmp_path / "train.parquet", ROWS),
             ("org/tiny", None, "test"): _parquet(tmp_path / "test.parquet", TEST_ROWS),
             ("org/tiny", "main", "train"): _parquet(tmp_path / "main.parquet", ROWS[:1]),
             ("org/qa", None, "train"): qa, ("org/qa", None, "test"): qa}
    calls = []

    def load_dataset(repo, name=None, split=None, revision=None, **kwargs):
        calls.append((repo, name, split) + ((revision,) if revision else ()))
        if repo not in {r for r, _, _ in files}:
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{repo}' doesn't exist on the Hub or cannot be "
                                                           "accessed.")
        splits = {s: str(f) for (r, n, s), f in files.items() if r == repo and n == name}
        if not splits:
            raise ValueError(f"BuilderConfig '{name}' not found. Available: ['default', 'main']")
        return real("parquet", data_files=splits, split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_parquet_and_csv_files_read_as_jsonl_does(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,demonstration\n"add 1 2",3\n"add 3 4",7\n"add 5 6",11\n')
    expected = _pairs(load_examples(jsonl))
    assert _pairs(load_examples(_parquet(tmp_path / "d.parquet", ROWS))) == expected
    assert _pairs(load_examples(csv)) == expected


def test_parquet_keeps_chat_messages():
    rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             "demonstration": "a"}]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        ex, = load_examples(_parquet(Path(folder) / "chat.parquet", rows))
    assert ex.messages() == rows[0]["prompt"]


def test_a_bad_csv_record_is_named_by_its_line_and_a_quoted_field_may_span_lines(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,demonstration\n"two\nlines",a\nq,\n')
    with pytest.raises(ValueError, match=r"d.csv:4: the demonstration is empty"):
        load_examples(csv)
    csv.write_text('prompt,demonstration\nq,a,extra\n')
    with pytest.raises(ValueError, match=r"d.csv:2: more fields than the header names"):
        load_examples(csv)


def test_a_damaged_parquet_file_is_one_line(tmp_path):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"d.parquet: not a readable Parquet file"):
        load_examples(bad)


def test_a_saved_dataset_folder_reads_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(TEST_ROWS)}).save_to_disk(
        str(tmp_path / "both"))
    assert len(load_examples(tmp_path / "one")) == 3
    assert _pairs(load_examples(tmp_path / "both", split="test")) == [("add 7 8", "15")]
    with pytest.raises(ValueError, match=r"holds the splits train, test, not 'validation'"):
        load_examples(tmp_path / "both", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain is a folder, not a dataset file"):
        load_examples(tmp_path / "plain")


@pytest.mark.parametrize("name, split, asked, rows", [
    ("org/tiny", "train", (None, "train"), 3),
    ("org/tiny", "test", (None, "test"), 1),  # the held-out default
    ("org/tiny:test", "train", (None, "test"), 1),
    ("org/tiny:train[:2]", "train", (None, "train[:2]"), 2),
    ("org/tiny:main:train", "test", ("main", "train"), 1),
    ("org/tiny@v1.0:test", "train", (None, "test", "v1.0"), 1),  # a branch, tag or commit, as hf:// names one
    ("org/tiny@0123abcd:main:train[:1]", "test", ("main", "train[:1]", "0123abcd"), 1),
])
def test_a_hub_id_names_its_split_and_configuration(hub, name, split, asked, rows):
    assert len(load_examples(name, split=split)) == rows
    assert hub == [("org/tiny", *asked)]


def test_a_missing_file_is_never_looked_up_on_the_hub(hub, tmp_path):
    for name in ("data/train.jsonl", str(tmp_path / "nope"), "rows.parquet"):
        with pytest.raises(FileNotFoundError, match="dataset file not found"):
            load_examples(name)
    with pytest.raises(FileNotFoundError,
                       match=r"org/x:a:b:c \(nor a Hub id: ORG/NAME\[@REVISION\]\[:CONFIG\]\[:SPLIT\]\)"):
        load_examples("org/x:a:b:c")
    with pytest.raises(ValueError, match="dataset: the name is empty"):
        load_examples("")
    assert hub == []


@pytest.mark.parametrize("data, says", [
    ("org/missing", "dataset 'org/missing' (split 'train') is not a file here, and the Hub did not give it: "
                    "Dataset 'org/missing' doesn't exist"),
    ("org/tiny:nope:train", "dataset 'org/tiny' (configuration 'nope', split 'train') is not a file here, and the "
                            "Hub did not give it: BuilderConfig 'nope' not found"),
    ("org/tiny:validation", "split 'validation'"),
])
def test_what_the_hub_does_not_give_is_one_line_before_the_model_loads(hub, tmp_path, capsys, monkeypatch, data,
                                                                        says):
    monkeypatch.setattr("sdft.run.prepare.load_model", _no_load)
    monkeypatch.setattr("sdft.models.load_model", _no_load)
    assert cli(["train", "--data", data, "--no-eval", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()  # datasets' own progress bars may come first, as a download's do
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and err.endswith(errors[0]) and says in errors[0], err


def test_without_the_datasets_package_a_hub_id_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"dataset 'org/tiny' is not a file here: a Hub dataset or a saved one "
                                         r"needs the datasets package \(pip install datasets\)"):
        load_examples("org/tiny")


def test_a_run_trains_on_a_hub_split_and_evaluates_on_its_test_split(hub, tmp_path):
    tok = tiny_tokenizer()
    config = SDFTConfig(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
                        progress_bar=False, device="cpu", save_final_model=False, output_dir=str(tmp_path / "run"),
                        eval_data="org/tiny", retention_data="", retention_text="")
    result = train(tiny_llama(vocab=len(tok)), "org/tiny:train[:2]", config, tokenizer=tok)
    assert [r["step"] for r in result.metrics] == [1]
    assert ("org/tiny", None, "train[:2]") in hub and ("org/tiny", None, "test") in hub
    assert [len(e["answers"]) for e in json.loads((tmp_path / "run" / "eval.json").read_text())] == [1, 1]


def _no_load(*args, **kwargs):
    raise AssertionError("the model loaded")


QA = [{"question": f"add {a} {b}", "answer": str(a + b), "id": i} for i, (a, b) in enumerate([(1, 2), (3, 4)])]


def test_column_map_reads_a_datasets_own_columns():
    examples = load_examples(QA, column_map={"prompt": "question", "demonstration": "answer"})
    assert _pairs(examples) == [("add 1 2", "3"), ("add 3 4", "7")]
    with pytest.raises(ValueError, match=r"dataset row 0: no column 'query' for column_map \(columns present: "
                                         r"\['answer', 'id', 'question'\]\)"):
        load_examples(QA, column_map={"prompt": "query", "demonstration": "answer"})


@pytest.mark.parametrize("value, says", [
    ('{"question": "prompt"}', "column_map key 'question': sdft reads the columns prompt, messages, demonstration"),
    ('{"prompt": 3}', "column_map 'prompt' must name a column of the dataset, got 3"),
    ('{"prompt": ', "column_map must be a JSON object"),
])
def test_a_bad_column_map_is_one_line(tmp_path, capsys, value, says):
    assert cli(["train", "--no-eval", "--set", f"column_map={value}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err


def test_a_run_maps_the_columns_of_its_training_and_held_out_data(hub, tmp_path):
    """A Hub dataset whose rows are question/answer: the run reads both splits through column_map."""
    tok = tiny_tokenizer()
    config = SDFTConfig(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
                        progress_bar=False, device="cpu", save_final_model=False, output_dir=str(tmp_path / "run"),
                        eval_data="org/qa:test[:1]", retention_data="", retention_text="",
                        column_map={"prompt": "question", "demonstration": "answer"})
    result = train(tiny_llama(vocab=len(tok)), "org/qa", config, tokenizer=tok)
    assert [r["step"] for r in result.metrics] == [1] and len(result.evaluations) == 2
    assert ("org/qa", None, "train") in hub and ("org/qa", None, "test[:1]") in hub


def test_teacher_check_maps_columns_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdft.models.load_trained", _no_load)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    assert cli(["teacher-check", "--data", str(data), "--column-map", '{"prompt": "question"}']) == 2
    assert "qa.jsonl:1: missing field 'demonstration'" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model loaded"):
        cli(["teacher-check", "--data", str(data), "--column-map", '{"prompt": "question", "demonstration": "answer"}'])


def test_generate_answers_the_prompts_of_a_hub_split_through_column_map(hub, tmp_path, capsys):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    assert cli(["generate", str(folder), "--prompts", "org/qa", "--column-map", '{"prompt": "question"}',
                "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("> add ") == 3 and ("org/qa", None, "test") in hub
    text = tmp_path / "prompts.txt"
    text.write_text("add 1 1\n\nadd 2 2\n")  # a text file: a prompt a line
    assert cli(["generate", str(folder), "--prompts", str(text), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("> add ") == 2
    assert cli(["generate", str(folder), "--prompts", "org/qa", "--max-new-tokens", "2"]) == 2
    assert "org/qa test row 0: a row needs a 'prompt' field (or 'messages')" in capsys.readouterr().err
