"""Freed CPU heap memory goes back to the OS before each backward, and nowhere else."""
import torch

import sdft.runtime.parallel as parallel
from sdft.runtime.heap_trim import _malloc_trim, trim_freed_memory
from sdft.runtime.parallel import Runner


def test_trim_runs_on_the_cpu_only():
    assert trim_freed_memory("cuda") is False
    assert trim_freed_memory("cpu") is (_malloc_trim() is not None)


def test_backward_trims_between_forward_and_backward(monkeypatch):
    events = []
    monkeypatch.setattr(parallel, "trim_freed_memory", lambda device: events.append("trim"))
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)

    def loss_fn(m):
        events.append("forward")
        out = m(x).sum()
        out.register_hook(lambda g: events.append("backward"))
        return out

    Runner(model, trim=True).backward(loss_fn, divisor=2.0)
    assert events == ["forward", "trim", "backward"]
    events.clear()
    Runner(model, trim=False).backward(loss_fn, divisor=2.0)
    assert events == ["forward", "backward"]
