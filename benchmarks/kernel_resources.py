"""Which tile shape each Triton kernel takes on each GPU, found by compiling, with no GPU.

Triton compiles a kernel for any CUDA architecture on this CPU (its wheel carries ptxas), and the compiled
kernel states the shared memory one program needs; a GPU whose blocks cannot have that much refuses the
launch (``OutOfResources``), and ``sdft_kernels.triton_backend.fitted`` then takes the next shape of its
``tile_chain``. This compiles every kernel variant the launchers use (dtype, shared head or not) for the
listed GPUs, walks each chain as a launch would, and reports the shape taken with its shared memory,
registers and spilled bytes per thread (cuobjdump's resource usage). Registers and spills are measured
on the cubin, not a run: they say where a shape spills, not how fast it is.

    python benchmarks/kernel_resources.py --out benchmarks/results --stem kernel_resources
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (compute capability, shared memory a block may have, bytes: the opt-in maximum)
GPUS = {
    "T4": (75, 65536),
    "A100": (80, 166912),
    "A10 / RTX 3090": (86, 101376),
    "L4 / L40S / RTX 4090": (89, 101376),
    "H100 / H200": (90, 232448),
    "RTX 5090": (120, 101376),
}
FLOATS = {"inv_temp", "cap", "log_beta", "log_1m_beta", "one_m_beta"}
FP32_POINTERS = {"LSE", "STATS", "ROW_GRAD"}
OPERANDS = {"HS", "HT", "W", "WT", "X", "GZ"}


def signature(kernel, dtype: str, outputs: str, ids: str) -> dict:
    """Triton's signature of ``kernel``'s runtime parameters as the launchers pass them: operands in
    ``dtype``, partial outputs in ``outputs``, the sampled ids' pointer as ``ids``; a parameter this table
    does not know is an error, so a kernel's new argument is added here."""
    types = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            continue
        if name in OPERANDS:
            types[name] = f"*{dtype}"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name == "OUT":
            types[name] = outputs
        elif name == "Y":
            types[name] = ids
        elif name in FLOATS:
            types[name] = "fp32"
        elif name in ("N", "V", "H", "H_T", "v_lo", "v_hi", "v_per_split") or name.startswith("s_"):
            types[name] = "i32"
        else:
            raise KeyError(f"kernel_resources.signature: add {kernel.__name__}'s parameter {name!r}")
    return types


def variants(dtype: str):
    """(launcher's kernel name, tile chain's name, kernel, constants, signature) per variant in ``dtype``."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # its kernels and tl's own helpers are interpreted there
        raise RuntimeError("kernel_resources compiles: run it without TRITON_INTERPRET=1")
    from sdft_kernels import triton_kernels as K

    precision = "ieee" if dtype == "fp32" else "tf32"
    for shared in (True, False):
        head = dict(SHARED=shared, CAP=False, PRECISION=precision)
        for name in ("stats", "jsd"):
            kernel = getattr(K, f"{name}_kernel")
            yield f"{name} {'shared head' if shared else 'two heads'}", "stats", kernel, head, \
                signature(kernel, dtype, "*fp32", "*fp32")
        yield f"grad {'shared head' if shared else 'two heads'}", "grad", K.grad_kernel, dict(head, KIND=0), \
            signature(K.grad_kernel, dtype, "*fp32", "*fp32")
    for k in (16, 256):
        yield f"topk k={k}", "topk", K.topk_kernel, dict(CAP=False, K=k, PRECISION=precision), \
            signature(K.topk_kernel, dtype, "*i64", "*fp32")


def compile_for(kernel, constants: dict, types: dict, shape: dict, arch: int, with_v: bool = True):
    """The kernel compiled for ``sm_{arch}`` under one tile shape."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tiles = dict(shape)
    options = dict(num_warps=tiles.pop("num_warps"), num_stages=tiles.pop("num_stages"))
    if not with_v:
        tiles.pop("BLOCK_V")
    constants = {**constants, **tiles}
    source = ASTSource(fn=kernel, signature={**types, **{k: "constexpr" for k in constants}}, constexprs=constants)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def usage(compiled) -> tuple[int, int]:
    """(registers, spilled bytes) per thread of a compiled kernel, from cuobjdump's resource usage."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line for part in line.split())
    return int(fields.get("REG", -1)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def shape_taken(kernel, constants, types, shapes, arch: int, limit: int):
    """(index, shape, compiled) of the first of ``shapes`` whose shared memory fits ``limit`` bytes, as
    ``fitted`` would take it at launch; (None, None, last compiled) when none does."""
    compiled = None
    for index, shape in enumerate(shapes):
        compiled = compile_for(kernel, constants, types, shape, arch, with_v="K" not in constants)
        if compiled.metadata.shared <= limit:
            return index, shape, compiled
    return None, None, compiled


def chain_for(kernel: str, arch: int) -> tuple[dict, ...]:
    """The launchers' tile chain for ``kernel`` on ``sm_{arch}``."""
    from sdft_kernels.triton_backend import tile_chain

    return tile_chain(kernel, divmod(arch, 10))


def probe(gpu: str, dtype: str, name: str) -> dict:
    """The first shape's shared memory and the shape taken, for one variant on one GPU."""
    arch, limit = GPUS[gpu]
    _, chain, kernel, constants, types = next(v for v in variants(dtype) if v[0] == name)
    shapes = chain_for(chain, arch)
    index, _, compiled = shape_taken(kernel, constants, types, shapes, arch, limit)
    first = compile_for(kernel, constants, types, shapes[0], arch, with_v="K" not in constants)
    return dict(first_shared=first.metadata.shared, index=index, shared=compiled.metadata.shared, limit=limit)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--stem", default="kernel_resources")
    parser.add_argument("--probe", nargs=2, metavar=("DTYPE", "KERNEL"),
                        help="one variant on the first of --gpus: a JSON line (the tests' check)")
    args = parser.parse_args()
    import triton

    if args.probe:
        print(json.dumps(probe(args.gpus[0], *args.probe)))
        return

    rows = []
    header = ("| GPU | dtype | kernel | shape taken (of the chain) | shared KiB (limit) | registers | spilled bytes |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    for gpu in args.gpus:
        arch, limit = GPUS[gpu]
        for dtype in args.dtypes:
            if dtype == "bf16" and arch < 80:
                continue  # no bf16 there: a run computes in fp32 or fp16
            for name, chain, kernel, constants, types in variants(dtype):
                index, shape, compiled = shape_taken(kernel, constants, types, chain_for(chain, arch), arch, limit)
                regs, spilled = usage(compiled)
                taken = "none fits" if shape is None else \
                    f"{index + 1}: {shape['BLOCK_N']}x{shape['BLOCK_V'] or constants.get('K')}x{shape['BLOCK_K']}, " \
                    f"{shape['num_warps']} warps, {shape['num_stages']} stages"
                row = (gpu, dtype, name, taken, f"{compiled.metadata.shared / 1024:.0f} ({limit / 1024:.0f})",
                       regs, spilled)
                rows.append(row)
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/kernel_resources.py " + shlex.join(sys.argv[1:])
        text = (f"# Triton kernels: the tile shape each GPU takes (compiled, not run)\n\n"
                f"Triton {triton.__version__}, compiled on a CPU for each GPU's architecture. Command: `{command}`. "
                "Shared memory is the compiled kernel's; the limit is the GPU's opt-in maximum per block; "
                "registers and spilled bytes are per thread (cuobjdump). Shapes are `tile_chain`'s in "
                "sdft_kernels/triton_backend.py (Hopper: GPU_TILES, measured on an H100; others: "
                "OTHER_GPU_TILES).\n\n" + header + "\n"
                + "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows) + "\n")
        (out / f"{args.stem}.md").write_text(text)


if __name__ == "__main__":
    main()
