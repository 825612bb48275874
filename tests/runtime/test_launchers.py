"""A launcher that asked for N processes and started one is refused in one line, before the model loads."""
import pytest

from sdft.runtime import distributed


@pytest.mark.parametrize("cmdline,asked", [
    (["python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "-m", "sdft.cli", "train"], 2),
    (["python", "/venv/bin/accelerate", "launch", "--num_processes=4", "--cpu", "run.py"], 4),
    (["python", "/venv/bin/accelerate", "launch", "run.py", "--num_processes", "8"], None),  # the script's own
    (["python", "/venv/bin/accelerate", "launch", "run.py"], None),
    (["/usr/bin/bash", "-c", "python run.py"], None),
    (["python", "/venv/bin/torchrun", "--nproc_per_node", "2", "run.py"], None),
])
def test_the_process_count_accelerate_was_asked_for_is_read_from_its_command_line(cmdline, asked):
    assert distributed.launcher_processes(cmdline + [""]) == asked


def test_one_process_started_for_several_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_parent_cmdline",
                        lambda: ["python", "accelerate", "launch", "--num_processes", "2", "train.py", ""])
    with pytest.raises(ValueError, match="started 1 process.*torchrun --nproc_per_node 2"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "_parent_cmdline", lambda: ["python", "accelerate", "launch", "train.py", ""])
    assert not distributed.setup("cpu").active


def test_the_cli_refuses_it_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import sdft.models
    from sdft import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_parent_cmdline",
                        lambda: ["python", "accelerate", "launch", "--num_processes", "2", "-m", "sdft.cli", ""])
    monkeypatch.setattr(sdft.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["train", "--set", f"output_dir={tmp_path / 'out'}", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num_processes 2 started 1 process" in err[0]
