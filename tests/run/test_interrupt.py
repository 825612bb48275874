"""Ctrl-C: one line names the checkpoint a resume continues from, the CLI exits 130 without a traceback, and
the resume continues the run as if it had not stopped."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
BASE = dict(per_device_train_batch_size=2, num_generations=2, max_completion_length=6, learning_rate=1e-3,
            save_steps=2, progress_bar=False, device="cpu", save_final_model=False)


def _train(out, step_callback=None, **change):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return train(tiny_llama(vocab=len(tok)), ROWS, SDFTConfig(output_dir=str(out), **{**BASE, **change}),
                 tokenizer=tok, step_callback=step_callback)


def _ctrl_c_at(at):
    def callback(step, record):
        if step == at:
            raise KeyboardInterrupt
    return callback


def test_ctrl_c_names_the_checkpoint_and_the_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    whole = _train(tmp_path / "whole", max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", _ctrl_c_at(3), max_steps=4)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"sdft: interrupted; {tmp_path / 'cut' / 'checkpoint-2'} is the newest checkpoint: "
                    "resume_from_checkpoint=true continues from it (the steps after it are lost)")
    resumed = _train(tmp_path / "cut", max_steps=4, resume_from_checkpoint=True)
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in whole.metrics[2:]]


def test_ctrl_c_before_the_first_checkpoint_says_a_rerun_starts_afresh(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, _ctrl_c_at(1), max_steps=4)
    assert "interrupted before the first checkpoint" in capsys.readouterr().err
    assert _train(tmp_path, max_steps=1).step == 1  # no refusal: nothing of a run to resume or overwrite


def test_ctrl_c_in_the_first_evaluation_is_reported_like_any_other(tmp_path, capsys):
    def ctrl_c_in_evaluation(step, record):
        raise KeyboardInterrupt

    tok = tiny_tokenizer()
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=2, **BASE)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS[:1],
              eval_callback=ctrl_c_in_evaluation)
    assert caught.value.sdft_reported
    assert "interrupted before the first checkpoint" in capsys.readouterr().err


def test_sigint_to_the_cli_is_one_line_and_exit_130(tmp_path):
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    model = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdft.cli", "train", "--model", str(model), "--data", str(data), "--no-eval",
           "--set", f"output_dir={out}", "--set", "max_steps=100000", "--set", "save_steps=1",
           "--set", "progress_bar=false", "--set", "device=cpu", "--set", "num_generations=2",
           "--set", "max_completion_length=4", "--set", "per_device_train_batch_size=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoint-1").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sdft: interrupted; ")
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
