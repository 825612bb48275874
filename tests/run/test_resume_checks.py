"""A resume continues the model it was trained from (another base is one line, before the model loads), and
says which settings it changes."""
import json
import re

import pytest
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.run.export import save_hf_folder

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
BASE = dict(per_device_train_batch_size=2, num_generations=2, max_completion_length=4, save_steps=1,
            progress_bar=False, device="cpu", save_final_model=False)


@pytest.fixture
def bases(tmp_path):
    tok = tiny_tokenizer()
    return [save_hf_folder(tiny_llama(vocab=len(tok), seed=s), tok, tmp_path / f"base{s}") for s in (0, 1)]


def _train(out, model, rows=ROWS, **change):
    return train(str(model), rows, SDFTConfig(output_dir=str(out), **{**BASE, **change}))


def test_a_resume_onto_another_base_model_is_refused_in_one_line(tmp_path, bases):
    _train(tmp_path / "run", bases[0], max_steps=1, use_lora=True)
    with pytest.raises(ValueError, match=rf"checkpoint-1 was trained from {bases[0].resolve()}, but this run "
                                         rf"loads {bases[1].resolve()}: resume with that model"):
        _train(tmp_path / "run", bases[1], max_steps=2, use_lora=True, resume_from_checkpoint=True)
    assert _train(tmp_path / "run", bases[0], max_steps=2, use_lora=True, resume_from_checkpoint=True).step == 2


def test_a_base_model_folder_moved_since_is_not_compared_and_a_note_names_the_stand_in(tmp_path, bases, capsys):
    _train(tmp_path / "run", bases[0], max_steps=1)
    moved = bases[0].rename(tmp_path / "moved")
    assert _train(tmp_path / "run", moved, max_steps=2, resume_from_checkpoint=True).step == 2
    assert (f"checkpoint-1 was trained from {bases[0].resolve()}, which is not there any more: resuming on "
            f"{moved.resolve()} as its base") in capsys.readouterr().err


def test_the_cli_refuses_another_base_before_loading_it(tmp_path, bases, monkeypatch, capsys):
    import sdft.models

    _train(tmp_path / "run", bases[0], max_steps=1)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.setattr(sdft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = cli(["train", "--model", str(bases[1]), "--data", str(data), "--no-eval", "--set",
              f"output_dir={tmp_path / 'run'}", "--set", "resume_from_checkpoint=true", "--set", "device=cpu"])
    assert rc == 2
    assert "was trained from" in capsys.readouterr().err


def test_a_resume_names_the_settings_it_changes(tmp_path, bases, capsys):
    _train(tmp_path / "run", bases[0], max_steps=1, learning_rate=1e-5)
    capsys.readouterr()
    _train(tmp_path / "run", bases[0], max_steps=2, learning_rate=1e-4, resume_from_checkpoint=True)
    err = capsys.readouterr().err
    assert "sdft: resuming with changed settings: learning_rate 1e-05 -> 0.0001, max_steps 1 -> 2\n" in err


def test_export_onto_another_base_than_the_checkpoint_s_is_refused(tmp_path, bases):
    from sdft.run.export import export_checkpoint

    _train(tmp_path / "run", bases[0], max_steps=1, use_lora=True)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    with pytest.raises(ValueError, match=r"was trained from .*base0, which is still here, not from .*base1: drop "
                                         r"--model"):
        export_checkpoint(checkpoint, tmp_path / "out", str(bases[1]))
    assert not (tmp_path / "out").exists()
    assert (export_checkpoint(checkpoint, tmp_path / "out", str(bases[0])) / "adapter_config.json").is_file()


def test_a_resume_on_other_rows_says_so_and_on_the_same_rows_says_nothing(tmp_path, bases, capsys):
    _train(tmp_path / "run", bases[0], max_steps=1)
    _train(tmp_path / "run", bases[0], max_steps=2, resume_from_checkpoint=True)
    assert "other training rows" not in capsys.readouterr().err
    more = ROWS + [{"prompt": "add 5 5", "demonstration": "10"}]
    _train(tmp_path / "run", bases[0], more, max_steps=3, resume_from_checkpoint=True)
    assert ("sdft: resuming on other training rows than checkpoint-2 was trained on (2 rows then, 3 now): the steps "
            "from here draw from the new rows\n") in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["final_model", "checkpoint-1"])
def test_a_model_in_what_the_run_replaces_is_refused(tmp_path, bases, entry):
    import shutil

    _train(tmp_path / "run", bases[0], max_steps=1, save_final_model=True)
    inside = tmp_path / "run" / entry
    if entry != "final_model":  # a model folder where a checkpoint of the run lies (or will)
        shutil.copytree(tmp_path / "run" / "final_model", inside / "model")
        inside = inside / "model"
    with pytest.raises(ValueError, match=rf"the model .* is in .*run's {entry}, which this run writes or may "
                                         "replace: copy it out"):
        _train(tmp_path / "run", inside, max_steps=2, overwrite_output_dir=True)
    assert (tmp_path / "run" / entry).is_dir()
    assert _train(tmp_path / "other", tmp_path / "run" / "final_model", max_steps=1).step == 1


def test_a_resume_past_max_steps_says_nothing_is_left_to_train(tmp_path, bases, capsys):
    _train(tmp_path / "run", bases[0], max_steps=2)
    capsys.readouterr()
    assert _train(tmp_path / "run", bases[0], max_steps=1, resume_from_checkpoint=True).metrics == []
    assert "checkpoint-2 is at step 2, max_steps=1: nothing left to train (raise max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("change,named", [
    (dict(use_lora=True, lora_r=4), "lora_r 16 -> 4"),
    (dict(use_lora=True, lora_target_modules=["q_proj"]), "lora_target_modules ['q_proj', 'k_proj', 'v_proj', "
                                                          "'o_proj'] -> ['q_proj']"),
    (dict(use_lora=False), "use_lora True -> False"),
])
def test_a_resume_whose_settings_no_longer_fit_the_weights_is_one_line_before_the_model_loads(
        tmp_path, bases, monkeypatch, change, named):
    import sdft.models

    _train(tmp_path / "run", bases[0], max_steps=1, use_lora=True)
    monkeypatch.setattr(sdft.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    message = rf"checkpoint-1 holds weights these settings no longer fit \({re.escape(named)}\): resume with the"
    with pytest.raises(ValueError, match=message):
        _train(tmp_path / "run", bases[0], max_steps=2, resume_from_checkpoint=True, **change)


def test_a_resume_on_another_number_of_processes_says_the_step_changes(tmp_path, bases, capsys):
    from sdft.run.run_dir import plan_run, start_run

    _train(tmp_path / "run", bases[0], max_steps=1)
    config = SDFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, resume_from_checkpoint=True, **BASE)
    capsys.readouterr()
    start_run(config, plan_run(config), processes=1)
    assert "processes" not in capsys.readouterr().err
    start_run(config, plan_run(config), processes=4)
    assert ("resuming on 4 processes, checkpoint-1 was written by 1: a step now takes 8 prompts instead of 2, "
            "in another order") in capsys.readouterr().err


class _Cuda:
    """A stand-in for ``torch.cuda``'s generator calls on a machine with ``devices`` GPUs."""

    def __init__(self, devices, current=0):
        self.devices, self.current, self.set = devices, current, []

    def install(self, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.full((4,), self.current, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: self.set.append(int(state[0])))
        return self


def test_a_checkpoint_written_on_many_gpus_restores_its_rng_on_fewer(monkeypatch):
    import torch

    from sdft.run.checkpoint import rng_state, set_rng_state

    written = _Cuda(devices=8, current=0).install(monkeypatch)
    state = rng_state()
    assert state["cuda"].shape == (4,), "this device's state alone, not one per device"
    set_rng_state(state)
    assert written.set == [0]
    # an older checkpoint: a state per device, from an 8-GPU machine, restored on device 2 of a smaller one
    older = {"cpu": torch.get_rng_state(), "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    resumed = _Cuda(devices=4, current=2).install(monkeypatch)
    set_rng_state(older)
    assert resumed.set == [2]
    beyond = _Cuda(devices=16, current=9).install(monkeypatch)
    set_rng_state(older)
    assert beyond.set == [], "a device the writing machine did not have keeps its own state"
