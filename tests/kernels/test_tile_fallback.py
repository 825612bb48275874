"""A GPU that cannot hold a kernel's preferred tile shape takes the next one (``tile_chain``), and every
kernel has a shape that fits the GPUs users train on: the launch logic with a stand-in kernel, the fit by
compiling for those GPUs' architectures on this CPU (Triton's ptxas; no GPU needed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime.errors import OutOfResources

from sdft_kernels import triton_backend

ROOT = Path(__file__).resolve().parents[2]

SHAPES = (dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
          dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2),
          dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=1))


def _launcher(max_stages: int, calls: list):
    """A stand-in launch: allocates its output, then is refused (as Triton refuses before any work) when
    the shape buffers more than ``max_stages`` stages."""
    def run(bn, bv, bk, opts):
        out = torch.full((2,), float(bn))
        calls.append(opts.get("num_stages", 0))  # the interpreter's tiles name no stages
        if calls[-1] > max_stages:
            raise OutOfResources(opts["num_stages"] * 64 * 1024, max_stages * 64 * 1024, "shared memory")
        return out
    return run


def test_a_refused_shape_gives_way_to_the_next_and_its_result_is_the_one_returned():
    calls = []
    index, out = triton_backend.first_fitting(SHAPES, _launcher(2, calls))
    assert index == 1 and calls == [4, 2]
    assert torch.equal(out, torch.full((2,), 128.0))


def test_no_shape_fitting_is_one_line_naming_the_torch_backend():
    with pytest.raises(RuntimeError, match="backend='torch'") as err:
        triton_backend.first_fitting(SHAPES, _launcher(0, []))
    assert "shared memory, Required: 65536" in str(err.value)


def test_a_gpu_model_remembers_the_shape_it_took_per_variant(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(triton_backend.GPU_TILES, "grad", SHAPES)
    monkeypatch.setattr(triton_backend, "FITTED", {})
    cuda = torch.device("cuda")
    calls = []
    triton_backend.fitted("grad", cuda, ("fp32",), _launcher(1, calls))
    assert calls == [4, 2, 1]
    calls.clear()
    triton_backend.fitted("grad", cuda, ("fp32",), _launcher(1, calls))
    assert calls == [1]  # straight to the shape that launched
    calls.clear()
    triton_backend.fitted("grad", cuda, ("bf16",), _launcher(4, calls))
    assert calls == [4]  # another variant starts from the preferred shape
    calls.clear()
    triton_backend.fitted("grad", torch.device("cpu"), ("fp32",), _launcher(0, calls))
    assert calls == [0]  # the interpreter: its own small tiles, no chain


def test_hopper_takes_the_shapes_measured_on_an_h100_and_other_gpus_their_own():
    for kernel in ("stats", "grad", "topk"):
        assert triton_backend.tile_chain(kernel, (9, 0)) is triton_backend.GPU_TILES[kernel]
        for capability in ((8, 0), (8, 9), (10, 0), (12, 0)):
            assert triton_backend.tile_chain(kernel, capability) is triton_backend.OTHER_GPU_TILES[kernel]
        assert triton_backend.tile_chain(kernel, (9, 4), hip=True) is triton_backend.OTHER_GPU_TILES[kernel]  # MI300
    for chains in (triton_backend.GPU_TILES, triton_backend.OTHER_GPU_TILES):  # each ends in a small shape
        assert all(chain[-1]["num_stages"] == 1 for chain in chains.values())


def _probe(gpu: str, dtype: str, kernel: str) -> dict:
    """``benchmarks/kernel_resources.py --probe`` in a process of its own: these tests run Triton's
    interpreter, which the compiler cannot share a process with."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton cannot compile for CUDA here: {err}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--gpus", gpu,
                           "--probe", dtype, kernel], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.compiles_for_gpus
@pytest.mark.parametrize("gpu", ["A10 / RTX 3090", "H100 / H200"])
def test_fp32_gradients_with_a_shared_head_find_a_shape_that_fits(gpu):
    """fp32 operands (``mixed_precision=no``, a GPU without bf16) with the teacher sharing the head: the
    grad kernel's preferred shape needs more shared memory than the GPU has (on an H100 288 KiB: three
    fp32 tiles, three stages buffered, against 227 KiB); the chain must reach a shape that launches."""
    found = _probe(gpu, "fp32", "grad shared head")
    assert found["first_shared"] > found["limit"]  # what the GPU refused before the chain
    assert found["index"] is not None and found["shared"] <= found["limit"], found


@pytest.mark.compiles_for_gpus
@pytest.mark.parametrize("kernel", ["stats shared head", "grad two heads"])
def test_the_preferred_bf16_shapes_fit_a_99_kib_gpu(kernel):
    """bf16 (a GPU run's default) takes its preferred shape on consumer and L4-class cards."""
    found = _probe("L4 / L40S / RTX 4090", "bf16", kernel)
    assert found["index"] == 0 and found["first_shared"] <= found["limit"], found
