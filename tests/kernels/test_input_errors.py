"""Bad input to fused_linear_divergence gives a clear error, never a silent wrong result."""
import pytest
import torch

from sdft_kernels import fused_linear_divergence


def _ok():
    return dict(student_hidden=torch.randn(4, 8), teacher_hidden=torch.randn(4, 8), weight=torch.randn(20, 8))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(student_hidden=torch.randn(4, 7)), "hidden size 7"),
        (dict(teacher_hidden=torch.randn(3, 8)), "one teacher row per student token"),
        (dict(teacher_hidden=torch.randn(4, 5)), "teacher_hidden has hidden size 5"),
        (dict(teacher_weight=torch.randn(19, 8)), "teacher_weight must be [vocab=20"),
        (dict(weight=torch.randn(20, 8, 1)), "weight must be [vocab, hidden]"),
        (dict(student_hidden=torch.randn(4, 8).double()), "cast one of them"),
        (dict(teacher_hidden=torch.randn(4, 8).half()), "cast one of them"),
        (dict(student_hidden=torch.ones(4, 8, dtype=torch.long)), "floating-point"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), "mask has shape"),
        (dict(mask=torch.ones(4)), "mask must be bool or integer"),
        (dict(divergence="kl"), "unknown divergence 'kl'"),
        (dict(beta=1.5), "beta must lie in [0, 1]"),
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(reduction="avg"), "unknown reduction 'avg'"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(mask=torch.ones(4, dtype=torch.bool, device="meta")), "one device"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    kwargs = {**_ok(), **change}
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        fused_linear_divergence(**kwargs)
    assert message in str(err.value)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from sdft_kernels import triton_backend

    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_divergence(**_ok(), backend="triton")


def test_the_kernels_launch_under_the_cuda_tensors_own_device():
    """Triton launches on the current device; a model on cuda:1 needs its device made current (the guard is
    built here without CUDA; the GPU test runs it on a second GPU)."""
    import contextlib

    from sdft_kernels.fused_divergence import on_device_of

    class OnSecondGpu:
        is_cuda, device = True, torch.device("cuda", 1)

    guard = on_device_of(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device_of(torch.zeros(1)), contextlib.nullcontext)
