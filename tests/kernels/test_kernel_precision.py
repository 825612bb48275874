"""The Triton kernels multiply as the process asks: 16-bit operands on the tensor cores, fp32 ones exactly
unless the run allows TF32 (``tf32=true``), as cuBLAS then does for the rest of the model."""
import torch

from sdft.runtime.precision import tf32_matmuls
from sdft_kernels import triton_backend


def test_fp32_operands_take_tf32_only_where_the_run_allows_it(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)  # the compiled kernels' choice
    assert triton_backend._precision(torch.bfloat16) == "tf32"
    assert triton_backend._precision(torch.float32) == "ieee"
    restore = tf32_matmuls(True)
    try:
        assert triton_backend._precision(torch.float32) == "tf32"
        assert triton_backend._precision(torch.float16) == "tf32"
    finally:
        restore()
    assert triton_backend._precision(torch.float32) == "ieee"
