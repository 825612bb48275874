"""A disk that refuses a write, for real: the CLI under a file-size limit (``ulimit -f``), so every writer
(safetensors, torch.save, Python's own files) fails the way it does on a full disk. Each failure is one line
naming what is still intact, leaves no half-written folder, and never a traceback."""
import json
import os
import resource
import subprocess
import sys

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft.run.checkpoint import damage, list_checkpoints
from sdft.run.export import save_hf_folder

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
SETTINGS = ["max_steps=2", "save_steps=1", "num_generations=2", "max_completion_length=4",
            "per_device_train_batch_size=1", "progress_bar=false", "device=cpu"]
WEIGHTS = 89_576  # bytes of the tiny model's model.safetensors; a checkpoint of rank-1 LoRA is far smaller


@pytest.fixture
def base(tmp_path):
    tok = tiny_tokenizer()
    model = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model, data


def _cli(args, max_file_bytes=None):
    """``python -m sdft.cli ARGS`` where no file may grow past ``max_file_bytes`` (EFBIG past it)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "sdft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if max_file_bytes else None,
                          env={**os.environ, "TQDM_DISABLE": "1"})  # no loading bars: stderr is sdft's lines


def _one_line(proc, notes: int = 0) -> str:
    """The error line of a failed CLI call, after ``notes`` lines of sdft's that say something else."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == notes + 1, proc.stderr
    return lines[-1]


def test_a_checkpoint_the_disk_refuses_is_one_line_and_leaves_no_partial_folder(base, tmp_path):
    model, data = base
    out = tmp_path / "run"
    proc = _cli(["train", "--model", model, "--data", data, "--no-eval", "--set", f"output_dir={out}", *SETTINGS],
                max_file_bytes=WEIGHTS // 2)
    assert _one_line(proc) == (f"sdft: error: could not write checkpoint-1 in {out}: File too large (EFBIG); "
                               "no earlier checkpoint exists")
    assert not any("checkpoint" in p.name for p in out.iterdir())  # the .checkpoint-1.tmp folder is gone


def test_a_final_model_the_disk_refuses_names_the_checkpoint_that_holds_it(base, tmp_path):
    model, data = base
    out = tmp_path / "run"
    proc = _cli(["train", "--model", model, "--data", data, "--no-eval", "--set", f"output_dir={out}", *SETTINGS,
                 "use_lora=true", "lora_r=1", "merge_lora=true"], max_file_bytes=WEIGHTS // 2)
    newest = out / "checkpoint-2"
    assert _one_line(proc) == (
        f"sdft: error: could not write {out / 'final_model'}: File too large (EFBIG); nothing was left there. "
        f"{newest} holds the trained weights: `sdft export {newest} {out / 'final_model'} --merge` writes the "
        "model once there is room")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert damage(newest) is None
    assert not [p.name for p in out.iterdir() if p.name.startswith("final_model")]
    done = _cli(["export", newest, out / "final_model", "--merge"])  # the line's command, with room
    assert done.returncode == 0, done.stderr
    assert (out / "final_model" / "model.safetensors").stat().st_size == WEIGHTS


def test_an_export_the_disk_refuses_keeps_the_earlier_export_whole(base, tmp_path):
    model, data = base
    out = tmp_path / "run"
    assert _cli(["train", "--model", model, "--data", data, "--no-eval", "--set", f"output_dir={out}",
                 *SETTINGS, "save_final_model=false"]).returncode == 0
    target = tmp_path / "export"
    assert _cli(["export", out / "checkpoint-1", target]).returncode == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    proc = _cli(["export", out / "checkpoint-2", target], max_file_bytes=WEIGHTS // 2)
    assert _one_line(proc) == f"sdft: error: could not write {target}: File too large (EFBIG); {target} is as it was"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "export", "rows.jsonl", "run"]


def test_the_disk_reason_is_read_from_each_writers_own_error():
    import errno

    from safetensors import SafetensorError

    from sdft.run.writes import refused_write, write_reason

    assert write_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device (ENOSPC)"
    assert write_reason(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                        ) == "No space left on device (ENOSPC)"
    assert write_reason(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 12\nmore")
                        ) == "[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 12"
    assert refused_write(Exception("File too large (os error 27)"))  # tokenizers' save
    assert not refused_write(Exception("no such key")) and not refused_write(ValueError("os error 2"))


def test_a_best_pick_the_disk_refuses_is_one_line_with_the_free_space(base, tmp_path):
    model, data = base
    out = tmp_path / "run"
    proc = _cli(["train", "--model", model, "--data", data, "--eval-data", data, "--set", f"output_dir={out}",
                 *SETTINGS, "load_best_model_at_end=true"], max_file_bytes=WEIGHTS // 2)
    line = _one_line(proc, notes=2)  # the notes: no retention check for this model; eval rows are training rows
    assert line.startswith(f"sdft: error: could not write {out / 'best_weights.pt'}: ")  # torch.save's own words,
    assert line.endswith(" MiB free on that disk); nothing was picked yet")  # which name no errno
    assert not [p.name for p in out.iterdir() if p.name.startswith("best_weights")]


@pytest.mark.slow
def test_the_embedded_model_loads_where_its_cache_cannot_be_written(tmp_path):
    from sdft.models.loading import embedded_model_dir

    try:
        embedded_model_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    cache = tmp_path / "cache"
    code = "from sdft.models.loading import load_model; print(type(load_model()[0]).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)),
                          env={**os.environ, "SDFT_CACHE": str(cache), "TQDM_DISABLE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "LlamaForCausalLM", proc.stderr
    assert not any(cache.rglob("*")), sorted(cache.rglob("*"))  # its half-written copy was removed
