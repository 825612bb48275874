"""GPU-only: the compiled Triton kernels at realistic sizes (skipped without CUDA)."""
import pytest
import torch
from divergence_cases import assert_close, make_inputs, run_both

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("h_teacher", [None, 320])
def test_gpu_matches_reference(divergence, beta, dtype, tol, h_teacher):
    s, t, w, tw, mask = make_inputs(1031, 576, 5003, dtype=dtype, h_teacher=h_teacher, seed=7, device="cuda")
    ours, ref = run_both(s, t, w, tw, mask=mask, divergence=divergence, beta=beta, temperature=0.9,
                         backend="triton")
    assert_close(ours, ref, tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_the_tensors_gpu_when_it_is_not_the_current_one():
    s, t, w, tw, mask = make_inputs(257, 64, 1000, seed=3, device="cuda:1")
    assert torch.cuda.current_device() == 0
    ours, ref = run_both(s, t, w, tw, mask=mask, divergence="forward_kl", backend="triton")
    assert_close(ours, ref, 1e-4)
