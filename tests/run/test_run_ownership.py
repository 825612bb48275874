"""Nothing a user owns is lost or overwritten; a run owns its folder; every failure is one line."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

import sdft.models
from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.run.checkpoint import CheckpointSaveError, damage, list_checkpoints
from sdft.run.export import EXPORT_MARK, check_target, save_hf_folder
from sdft.run.lock import LOCK_FILE, RunLock, RunLockedError

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
BASE = dict(max_steps=2, per_device_train_batch_size=1, num_generations=2, max_completion_length=4,
            save_steps=1, progress_bar=False, device="cpu", save_final_model=False)


def _run(out, model=None, tokenizer=None, **change):
    tok = tokenizer or tiny_tokenizer()
    config = SDFTConfig(**{**BASE, "output_dir": str(out), **change})
    return train(model if model is not None else tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok)


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# -- 1. a run folder is owned -----------------------------------------------------------------------------

def test_overwrite_removes_only_what_sdft_wrote(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "my_notes.txt").write_text("mine")
    (tmp_path / "train.py").write_text("print('mine')")
    _run(tmp_path, save_final_model=True)
    _run(tmp_path, max_steps=1, overwrite_output_dir=True)
    assert (tmp_path / "runs" / "my_notes.txt").read_text() == "mine"
    assert (tmp_path / "train.py").read_text() == "print('mine')"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "final_model").exists()  # the old run's, recorded: removed
    assert "kept what sdft did not write" in capsys.readouterr().err


def test_a_finished_runs_model_whose_checkpoints_are_gone_is_not_trained_over(tmp_path, capsys, monkeypatch):
    """Checkpoints deleted to free the disk leave final_model as the run's only result: running the same command
    again would replace it at its end; it is refused in one line before the model loads, as with checkpoints."""
    import shutil

    _run(tmp_path, save_final_model=True)
    for checkpoint in list_checkpoints(tmp_path):
        shutil.rmtree(checkpoint)
    weights = sorted(p.name for p in (tmp_path / "final_model").iterdir())
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", "max_steps=2"]) == 2
    assert _one_line(capsys).startswith(f"sdft: error: output_dir {tmp_path} holds final_model, the model of an "
                                        "earlier run whose checkpoints are gone")
    assert sorted(p.name for p in (tmp_path / "final_model").iterdir()) == weights
    monkeypatch.undo()
    _run(tmp_path, max_steps=1, overwrite_output_dir=True)  # asked for: starts afresh
    assert not (tmp_path / "final_model").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_a_users_file_with_a_run_files_name_is_refused_not_overwritten(tmp_path, capsys, monkeypatch, name):
    (tmp_path / name).write_text("the user's own file\n")
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}"]) == 2
    err = _one_line(capsys)
    assert f"holds {name}, which no sdft run wrote there" in err
    assert (tmp_path / name).read_text() == "the user's own file\n"


@pytest.mark.parametrize("flag", [[], ["overwrite_output_dir=true"], ["resume_from_checkpoint=true"]])
def test_another_trainers_checkpoint_folders_are_refused_not_resumed_rotated_or_removed(
        tmp_path, capsys, monkeypatch, flag):
    hf = tmp_path / "checkpoint-2"  # what transformers' Trainer leaves: no file of sdft's
    hf.mkdir()
    (hf / "trainer_state.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"the user's weights")
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", *flag]) == 2
    assert "holds checkpoint-2, which is not an sdft checkpoint" in _one_line(capsys)
    assert (hf / "model.safetensors").read_bytes() == b"the user's weights"
    assert list_checkpoints(tmp_path) == []


def test_a_foreign_checkpoint_that_appears_mid_run_is_not_replaced(tmp_path):
    def intruder(step, record):
        if step == 1:
            (tmp_path / "checkpoint-2").mkdir()
            (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")

    tok = tiny_tokenizer()
    config = SDFTConfig(**{**BASE, "output_dir": str(tmp_path)})
    with pytest.raises(CheckpointSaveError, match="a checkpoint-2 that no sdft run wrote is in the way"):
        train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, step_callback=intruder)
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").read_text() == "{}"
    assert damage(tmp_path / "checkpoint-1") is None


def test_tensorboard_folder_of_the_user_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", "report_to=tensorboard"]) == 2
    assert "holds runs, which no sdft run wrote there" in _one_line(capsys)


_HOLDER = textwrap.dedent("""
    import sys, time
    from sdft.run.lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_run_on_a_locked_folder_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another sdft run \\(pid {holder.pid} on "):
            _run(tmp_path)
        monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
        assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}"]) == 2
        assert f"pid {holder.pid}" in _one_line(capsys)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    _run(tmp_path)  # the holder died without releasing: its lock is stale
    assert "was left by a run that is gone" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end of the run


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
    import sdft.run.prepare

    def refuse(model):
        raise ValueError("a head sdft cannot express")

    monkeypatch.setattr(sdft.run.prepare, "verify_head", refuse)  # fails after the lock, while loading
    with pytest.raises(ValueError, match="cannot express"):
        _run(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock(tmp_path).acquire().release()


def test_a_path_under_the_home_folder_is_never_a_folder_named_tilde(tmp_path, monkeypatch):
    """``output_dir="~/runs/a"`` (quoted in a shell, or from Python) lands in the home folder, as with
    TrainingArguments: a ``./~`` folder would be one ``rm -rf ~`` away from the user's home."""
    from sdft.run.export import export_checkpoint

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    tok = tiny_tokenizer()
    save_hf_folder(tiny_llama(vocab=len(tok)), tok, home / "base")
    (home / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = SDFTConfig(**{**BASE, "output_dir": "~/runs/a", "eval_data": "~/rows.jsonl"})
    assert config.output_dir == str(home / "runs" / "a") and config.eval_data == str(home / "rows.jsonl")
    train("~/base", "~/rows.jsonl", config)
    export_checkpoint("~/runs/a/checkpoint-2", "~/export")
    assert (home / "export" / "model.safetensors").is_file()
    assert json.loads((home / "runs" / "a" / "checkpoint-2" / "state.json").read_text())["model"] == str(home / "base")
    assert list(work.iterdir()) == []


# -- export never wipes a user's folder -------------------------------------------------------------------

def test_export_refuses_a_folder_with_user_files_unless_forced(tmp_path, capsys):
    _run(tmp_path / "run")
    target = tmp_path / "target"
    target.mkdir()
    (target / "thesis.tex").write_text("mine")
    base = tmp_path / "base"
    save_hf_folder(tiny_llama(vocab=len(tiny_tokenizer())), tiny_tokenizer(), base)
    args = ["export", str(tmp_path / "run" / "checkpoint-2"), str(target), "--model", str(base)]
    capsys.readouterr()
    assert cli(args) == 2
    assert "not an earlier sdft export (it holds thesis.tex)" in _one_line(capsys)
    assert (target / "thesis.tex").read_text() == "mine"
    assert cli(args + ["--force"]) == 0 and (target / EXPORT_MARK).is_file() and not (target / "thesis.tex").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("target.replaced-")]
    assert len(aside) == 1 and (aside[0] / "thesis.tex").read_text() == "mine"  # forced: moved, not deleted
    assert f"the folder that was there is now {aside[0]}" in capsys.readouterr().err
    assert cli(args) == 0  # an earlier export is replaced without --force, and without a copy kept
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old" in p.name]
    assert len([p for p in tmp_path.iterdir() if ".replaced-" in p.name]) == 1


@pytest.mark.parametrize("where, message", [
    ("run/checkpoint-2", "is the checkpoint"),
    ("run/checkpoint-2/hf", "is inside the checkpoint"),
    ("run", "holds the checkpoint"),
    (".", "holds the checkpoint"),
    ("run/checkpoint-1", "an sdft checkpoint (--force does not move it aside)"),
    ("run/final_model/hf", "final_model, which the run in"),
])
def test_a_forced_export_never_displaces_the_run_it_reads_from(tmp_path, capsys, where, message):
    _run(tmp_path / "run", save_final_model=True)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    target = tmp_path / where
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(target), "--force"]) == 2
    assert message in _one_line(capsys)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert damage(tmp_path / "run" / "checkpoint-2") is None


@pytest.mark.parametrize("where", ["run/checkpoint-2", "run/checkpoint-2/nested", "run/final_model/nested"])
def test_a_run_inside_another_runs_checkpoint_or_final_model_is_refused(tmp_path, capsys, monkeypatch, where):
    """The other run rotates its checkpoints away and replaces its final_model: a run in there would go too."""
    _run(tmp_path / "run", save_final_model=True)
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    capsys.readouterr()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert cli(["train", "--model", "unused", "--data", str(data), "--no-eval",
                "--set", f"output_dir={tmp_path / where}"]) == 2
    assert "is or lies inside" in _one_line(capsys) and not (tmp_path / where / ".sdft-run.json").exists()
    assert _run(tmp_path / "run" / "beside").metrics  # a new folder in a run's folder is not the run's


def test_a_forced_export_never_displaces_another_runs_folder(tmp_path, capsys):
    _run(tmp_path / "run")
    _run(tmp_path / "other")
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(tmp_path / "other"), "--force"]) == 2
    assert "is an sdft run's output_dir" in _one_line(capsys)
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]


def test_export_onto_a_model_folder_that_is_not_an_export_is_refused(tmp_path, capsys):
    _run(tmp_path / "run")
    base = tmp_path / "base"  # a model the user has: the checkpoint's own base, in the worst case
    save_hf_folder(tiny_llama(vocab=len(tiny_tokenizer())), tiny_tokenizer(), base)
    (base / EXPORT_MARK).unlink()
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(base), "--model", str(base)]) == 2
    assert "the base model" in _one_line(capsys)
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(base), "--model", str(base), "--force"]) == 2
    assert "even --force would put the export in its place" in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]


def test_files_a_user_added_to_an_export_keep_it_from_being_replaced(tmp_path):
    out = save_hf_folder(tiny_llama(vocab=len(tiny_tokenizer())), tiny_tokenizer(), tmp_path / "export")
    (out / "eval_results.txt").write_text("mine")
    with pytest.raises(ValueError, match="it holds eval_results.txt"):
        check_target(out)


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    out = save_hf_folder(model, tok, tmp_path / "export")
    before = sorted(p.name for p in out.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", full_disk)
    with pytest.raises(OSError):
        save_hf_folder(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_hugging_face_folder_without_the_export_mark_is_someones_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an sdft export"):
        check_target(tmp_path)
    check_target(tmp_path, force=True)


# -- checkpoints are self-contained ----------------------------------------------------------------------

def test_a_run_from_a_loaded_model_records_its_source_for_export(tmp_path, capsys):
    tok = tiny_tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")
    model, tokenizer = sdft.models.load_model(str(base))
    _run(tmp_path / "run", model=model, tokenizer=tokenizer)
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "state.json").read_text())["model"] == str(base.resolve())
    os.chdir(tmp_path / "run")  # the recorded path is absolute: export works from any folder
    assert cli(["export", "checkpoint-2", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_checkpoint_trained_on_cuda_reads_and_shows_on_a_cpu_machine(tmp_path, capsys):
    _run(tmp_path)
    state_file = tmp_path / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["device"] = "cuda"
    (tmp_path / "config.json").write_text(json.dumps(state["config"]))
    assert cli(["config", "--show", "--from", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cuda"


def test_a_run_on_a_missing_cuda_device_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", "device=cuda"]) == 2
    assert "no CUDA device is available" in _one_line(capsys)


def _rewrite_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest["files"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("craft,message", [
    ("dotdot", "not a plain file name"),
    ("absolute", "not a plain file name"),
    ("symlink", "not a regular file"),
    ("fifo", "not a regular file"),
    ("unlisted", "does not list optimizer.pt"),
])
def test_crafted_manifests_are_refused_before_reading_outside_the_folder(tmp_path, craft, message):
    _run(tmp_path / "run", max_steps=1)
    folder = tmp_path / "run" / "checkpoint-1"
    outside = tmp_path / "outside.bin"
    outside.write_bytes((folder / "rng.pt").read_bytes())
    entry = json.loads((folder / "manifest.json").read_text())["files"]["rng.pt"]
    if craft == "dotdot":
        _rewrite_manifest(folder, lambda f: f.update({"../../outside.bin": entry}))
    elif craft == "absolute":
        _rewrite_manifest(folder, lambda f: f.update({str(outside): entry}))
    elif craft == "symlink":
        (folder / "rng.pt").unlink()
        (folder / "rng.pt").symlink_to(outside)
    elif craft == "fifo":
        (folder / "rng.pt").unlink()
        os.mkfifo(folder / "rng.pt")  # reading it would block: it must be refused unread
    else:
        _rewrite_manifest(folder, lambda f: f.pop("optimizer.pt"))
    assert message in damage(folder)


def test_a_state_without_its_config_is_damage_not_a_traceback(tmp_path, capsys, monkeypatch):
    from sdft.run import checkpoint

    _run(tmp_path, max_steps=1)
    folder = tmp_path / "checkpoint-1"
    (folder / "state.json").write_text(json.dumps({"step": 1}))
    checkpoint._write_manifest(folder)  # consistent checksums: only the content is wrong
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["export", str(folder), str(tmp_path / "out")]) == 2
    assert "lacks its step or config" in _one_line(capsys)
    assert cli(["config", "--show", "--from", str(folder)]) == 2
    assert "lacks its step or config" in _one_line(capsys)


def test_a_damaged_embedded_model_cache_is_rebuilt_not_fatal(tmp_path, monkeypatch, capsys):
    from sdft.models import loading

    tok = tiny_tokenizer()
    cache = tmp_path / "cache"
    save_hf_folder(tiny_llama(vocab=len(tok)), tok, cache)
    weights = cache / loading.CACHE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    assert loading._read_cache(cache) is None
    assert "is damaged" in capsys.readouterr().err


def test_save_strategy_no_writes_no_checkpoint_and_a_rerun_neither_resumes_nor_replaces_the_model(tmp_path, capsys):
    _run(tmp_path, save_final_model=True, save_strategy="no")
    assert not list_checkpoints(tmp_path) and (tmp_path / "final_model" / "config.json").is_file()
    with pytest.raises(ValueError, match="holds no intact checkpoint"):
        _run(tmp_path, resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="holds final_model, the model of an earlier run whose checkpoints are gone"):
        _run(tmp_path)


def test_save_only_model_checkpoints_export_but_no_run_resumes_or_trains_over_them(tmp_path, capsys):
    """HF's save_only_model: the trainable weights alone (a third of a full fine-tune's checkpoint), exported as
    any checkpoint; a resume, or a fresh run over them, is one line each, never a traceback or a silent restart."""
    from safetensors.torch import load_file

    from sdft.run.checkpoint import resume_note

    tok = tiny_tokenizer()
    base = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "base")  # the export rebuilds on it
    result = _run(tmp_path / "run", model=str(base), tokenizer=tok, save_only_model=True, teacher_mode="ema")
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in newest.iterdir()) == ["manifest.json", "state.json", "trainable.safetensors"]
    assert damage(newest) is None and "no run resumes from it" in resume_note(newest)
    assert resume_note(tmp_path / "nowhere") == "resume_from_checkpoint=true continues from it"  # never raises
    trained = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    saved = load_file(str(newest / "trainable.safetensors"))
    assert all(torch.equal(saved[n], trained[n].detach()) for n in trained)
    assert cli(["export", str(newest), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()
    capsys.readouterr()
    with pytest.raises(ValueError, match=f"{newest} holds the weights only .*no run resumes from it: `sdft export"):
        _run(tmp_path / "run", max_steps=3, resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="holds checkpoints of the weights only .*nothing to resume.*: set "
                                         "overwrite_output_dir=true"):
        _run(tmp_path / "run")


def test_an_embedded_model_cache_of_another_transformers_is_rebuilt_in_one_line(tmp_path, capsys):
    """A cache written before a transformers upgrade (its tokenizer files in the old format: a warning on every
    load, or none that reads) is rebuilt once; the current one is read as it is."""
    import transformers

    from sdft.models import loading

    tok = tiny_tokenizer()
    cache = tmp_path / "cache"
    save_hf_folder(tiny_llama(vocab=len(tok)), tok, cache)
    assert loading._read_cache(cache) is not None and capsys.readouterr().err == ""
    config = json.loads((cache / "config.json").read_text())
    (cache / "config.json").write_text(json.dumps({**config, "transformers_version": "4.57.1"}))
    assert loading._read_cache(cache) is None
    assert _one_line(capsys) == (f"sdft: the embedded model's cache {cache} was written by transformers 4.57.1, "
                                 f"this is {transformers.__version__}; rebuilding it (once, about 20 s)")


# -- full disk, read-only folder -------------------------------------------------------------------------

def _disk_fills_on_the_second_checkpoint(monkeypatch):
    """The disk refuses the second checkpoint's weights (ENOSPC); returns the real writer, to restore."""
    from sdft.run import checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up_on_the_second_checkpoint(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fills_up_on_the_second_checkpoint)
    return real


def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch, capsys):
    from sdft.run import checkpoint

    real = _disk_fills_on_the_second_checkpoint(monkeypatch)
    with pytest.raises(CheckpointSaveError, match="could not write checkpoint-2 .*No space left on device "
                                                  "\\(ENOSPC\\); the previous checkpoint checkpoint-1 is intact"):
        _run(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]  # no .tmp left
    assert damage(tmp_path / "checkpoint-1") is None
    monkeypatch.setattr(checkpoint, "save_file", real)
    result = _run(tmp_path, resume_from_checkpoint=True)
    assert [r["step"] for r in result.metrics] == [2]


def test_a_full_disk_after_a_weights_only_checkpoint_says_it_is_not_for_resuming(tmp_path, monkeypatch):
    _disk_fills_on_the_second_checkpoint(monkeypatch)
    with pytest.raises(CheckpointSaveError, match="the previous checkpoint checkpoint-1 is intact \\(it holds the "
                                                  "weights only \\(save_only_model\\)"):
        _run(tmp_path, save_only_model=True)


def test_a_read_only_output_dir_is_one_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ValueError, match="cannot write in output_dir .*Read-only file system"):
        _run(tmp_path / "ro")


# -- bad input is one line, before the model loads --------------------------------------------------------

@pytest.mark.parametrize("template,message", [
    ('{prompt} {"tool": 1} {demonstration}', 'has a field {"tool"}'),
    ("{prompt} {demonstration} {answer}", "has a field {answer}"),
    ("{prompt} {demonstration} }", "write a literal brace"),
])
def test_templates_with_stray_fields_are_one_line(tmp_path, capsys, monkeypatch, template, message):
    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", f"teacher_template={template}"]) == 2
    assert message in _one_line(capsys)


def test_literal_braces_written_doubled_work():
    from sdft.data.templates import check_template, teacher_messages

    template = '{prompt} {{"tool": 1}} {demonstration}'
    assert check_template(template) == template
    assert teacher_messages([{"role": "user", "content": "q"}], "d", template)[-1]["content"] == 'q {"tool": 1} d'


def test_a_pretty_printed_json_data_file_is_read(tmp_path):
    from sdft.data.examples import load_examples

    for name in ("rows.jsonl", "rows.json"):
        (tmp_path / name).write_text(json.dumps(ROWS, indent=2))
        assert len(load_examples(tmp_path / name)) == 3
    (tmp_path / "one.jsonl").write_text(json.dumps(ROWS[0], indent=2))
    assert len(load_examples(tmp_path / "one.jsonl")) == 1


def test_report_backend_and_eval_data_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    if importlib.util.find_spec("wandb") is None:
        assert cli(["train", "--no-eval", "--set", f"output_dir={tmp_path}", "report_to=wandb"]) == 2
        assert "needs the wandb package" in _one_line(capsys)
    (tmp_path / "eval.jsonl").write_text('{"prompt": "q"}\n')
    assert cli(["train", "--eval-data", str(tmp_path / "eval.jsonl"), "--set", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "missing field 'demonstration'" in _one_line(capsys)


def test_wrong_python_types_are_one_clear_error():
    with pytest.raises(TypeError, match="SDFTConfig.from_dict takes a dict"):
        SDFTConfig.from_dict(["max_steps", 3])
    with pytest.raises(TypeError, match="dataset must be a .jsonl/.json path"):
        train(None, 5, BASE)


# -- random malformed input: always exit 2, one line, no traceback, nothing loaded ------------------------

_BAD_PROMPTS = [
    None,
    3,
    2.5,
    True,
    {},
    "",
    "   ",
    [],
    ["just text"],
    [{"content": "x"}],
    [{"role": 1, "content": "x"}],
    [{"role": "user", "content": 7}],
    [{"role": "assistant", "content": "x"}],
    [{"role": "robot", "content": "x"}],
]
_BAD_DEMOS = [3, "", " \n", ["text"], [{"role": "assistant"}], [{"content": 5}], {"a": 1}]
_BAD_VALUES = [("max_steps", "-3"), ("max_steps", "2.5"), ("learning_rate", "abc"), ("learning_rate", "inf"),
               ("divergence", "kl2"), ("teacher_template", "{oops}"),
               ("teacher_template", "{prompt}{demonstration}{x}"),
               ("report_to", "slack"), ("eval_scorer", "regex:["), ("device", "gpu"), ("save_total_limit", "-1"),
               ("per_device_train_batch_size", "0"), ("num_generations", "two"), ("no_such_option", "1"),
               ("resume_from_checkpoint", "/nonexistent/checkpoint-3"), ("decode_gemm", "fastest"),
               ("full_determinism", "maybe"), ("ema_decay", "1.5"), ("lora_target_modules", "")]


def _bad_row(rng):
    good = {"prompt": "add 1 2", "demonstration": "3"}
    kind = rng.randrange(6)
    if kind == 0:
        return {**good, "prompt": rng.choice(_BAD_PROMPTS)}
    if kind == 1:
        return {**good, "demonstration": rng.choice(_BAD_DEMOS)}
    if kind == 2:
        return {k: v for k, v in good.items() if k != rng.choice(list(good))}
    if kind == 3:
        return rng.choice([["prompt", "demonstration"], "a row", 42, None])
    if kind == 4:
        return {"question": "add 1 2", "answer": "3"}
    return "{not json"


def test_random_malformed_rows_and_values_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import random

    monkeypatch.setattr(sdft.models, "load_model", _no_model_load)
    rng = random.Random(31)
    for case in range(60):
        args = ["train", "--no-eval", "--set", f"output_dir={tmp_path / f'out{case}'}"]
        if case % 2 == 0:
            rows = [json.dumps({"prompt": "q", "demonstration": "a"})] * rng.randrange(3)
            bad = _bad_row(rng)
            rows.insert(rng.randrange(len(rows) + 1), bad if isinstance(bad, str) and bad.startswith("{not")
                        else json.dumps(bad))
            data = tmp_path / f"rows{case}.jsonl"
            data.write_text("\n".join(rows) + "\n")
            args += ["--data", str(data)]
        else:
            key, value = rng.choice(_BAD_VALUES)
            args += [f"{key}={value}"]
        assert cli(args) == 2, args
        err = _one_line(capsys)
        assert err.startswith("sdft: error: ") or err.startswith("usage:"), (args, err)
