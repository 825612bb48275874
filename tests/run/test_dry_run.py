"""``sdft train --dry-run``: every check a run makes before its weights load, every row measured with the model's
tokenizer, and the plan printed; no weights load and nothing is written."""
import json

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.run.export import save_hf_folder

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


@pytest.fixture
def folder(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    path = save_hf_folder(model, tok, tmp_path / "model")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path, sum(p.numel() for p in model.parameters())


def _no_load(*args, **kwargs):
    raise AssertionError("the weights loaded")


def test_a_dry_run_prints_the_plan_and_writes_nothing(folder, tmp_path, capsys, monkeypatch):
    path, count = folder
    monkeypatch.setattr("sdft.run.dry_run.load_model", _no_load)
    monkeypatch.setattr("sdft.models.load_model", _no_load)
    out = tmp_path / "run"
    assert cli(["train", "--dry-run", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={out}", "max_steps=6", "per_device_train_batch_size=2",
                "num_generations=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sdft: dry run: every check a run makes before its weights load passed")
    assert lines[1].startswith(f"model: {path} (llama, {count / 1e6:.1f}M parameters: its weights take ")
    assert lines[2].startswith("training rows: 3; prompt tokens ")
    assert lines[3] == "steps: 6, each 2 prompts x 3 rollouts of up to 48 tokens (4 passes over the rows)"
    assert lines[4] == f"output_dir: {out}: a new run"
    assert lines[5] == "compute: the CPU, float32 throughout (mixed_precision=auto)"
    assert not out.exists()


def test_a_dry_run_says_the_precision_and_when_the_cpu_emulates_it(folder, tmp_path, capsys, monkeypatch):
    from sdft.runtime import precision

    path, _ = folder
    monkeypatch.setattr(precision, "native_16bit", lambda name: False)
    assert cli(["train", "--dry-run", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={tmp_path / 'run'}", "mixed_precision=bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[5] == ("compute: the CPU, bf16 autocast over float32 weights and optimizer state "
                        "(mixed_precision=bf16)")
    assert lines[6].startswith("sdft: mixed_precision=bf16 on a CPU without bf16 matrix instructions")


def test_a_dry_run_refuses_an_over_long_row_as_the_run_does(folder, tmp_path, capsys):
    path, _ = folder
    assert cli(["train", "--dry-run", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={tmp_path / 'run'}", "max_prompt_length=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "d.jsonl:1: the prompt has" in err and "over max_prompt_length=4" in err


def test_a_dry_run_names_the_checkpoint_a_run_resumes_from(folder, tmp_path, capsys):
    path, _ = folder
    out = tmp_path / "run"
    config = SDFTConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=1, num_generations=2,
                        max_completion_length=4, progress_bar=False, device="cpu", save_final_model=False)
    train(str(path), ROWS, config)
    before = sorted(p.name for p in out.iterdir())
    assert cli(["train", "--dry-run", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={out}", "max_steps=2", "max_completion_length=4",
                "resume_from_checkpoint=true"]) == 0
    assert f"output_dir: {out}: resumes from {out / 'checkpoint-1'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_a_gguf_model_gets_the_memory_plan_from_its_metadata(tmp_path, capsys, monkeypatch):
    """A .gguf has no config.json: its metadata gives the config the plan counts (no weights load)."""
    from sdft.models.loading import EMBEDDED_GGUF, embedded_model_dir

    gguf = embedded_model_dir() / EMBEDDED_GGUF
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setattr("sdft.run.dry_run.load_model", _no_load)
    monkeypatch.setattr("sdft.models.load_model", _no_load)
    assert cli(["train", "--dry-run", "--model", str(gguf), "--data", str(tmp_path / "d.jsonl"), "--no-eval",
                "--set", f"output_dir={tmp_path / 'run'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"model: {gguf} (llama, 134.5M parameters: its weights take 0.50 GiB in float32)"
    assert any(line.startswith("memory per process before activations: 2.51 GiB") for line in lines)
    assert any(line.startswith("scoring: the student's pass over that micro-batch") for line in lines)
