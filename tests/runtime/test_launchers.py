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


def test_each_gpu_process_takes_its_local_rank_s_gpu_before_joining_the_group(monkeypatch):
    """NCCL, Triton and new CUDA tensors use the current device: left at 0, every process of a node would
    run its collectives on GPU 0 ("duplicate GPU") and launch the fused kernels on another GPU's tensors."""
    import torch

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("group", backend)))
    monkeypatch.setattr(distributed.atexit, "register", lambda f: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("device", index)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    world = distributed.setup("auto")
    assert calls == [("device", 1), ("group", "nccl")] and (world.rank, world.local_rank) == (3, 1)
    monkeypatch.setenv("LOCAL_RANK", "2")  # three processes started on a machine with two GPUs
    with pytest.raises(ValueError, match=r"process 3 has LOCAL_RANK 2, but this machine has 2 CUDA devices: start "
                                         r"at most 2 processes a machine \(torchrun --nproc_per_node 2\)"):
        distributed.setup("auto")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls.clear()
    distributed.setup("cpu")
    assert calls == [("group", "gloo")]
