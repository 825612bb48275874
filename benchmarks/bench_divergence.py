"""Fused LM-head divergence, forward + backward: sdft vs naive PyTorch vs TRL's SDFT loss vs liger.

    python benchmarks/bench_divergence.py            # CPU: small N; GPU: N=4096 at SmolLM2 and Qwen shapes

``gemm_floor`` times the four GEMMs alone (no softmax, no divergence): the floor for any exact method.

Writes benchmarks/results/divergence_<device>.json and .md. Useful FLOPs are 8*N*H*V
(student + teacher logits, dH, dW); the rate is reported against a measured bf16 GEMM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import (  # noqa: E402
    bf16_gemm_tflops,
    environment,
    markdown_table,
    median_ms,
    peak_extra_mib,
    run_in_subprocess,
    write_results,
)
from sdft_kernels import fused_linear_divergence, make_spec  # noqa: E402
from sdft_kernels.reference import divergence_from_logits  # noqa: E402

SHAPES = {"smollm2": (576, 49152), "qwen": (1536, 151936)}
ALPHA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # TRL's distillation_alpha / liger's jsd_beta


def ours(hs, ht, w, divergence):
    return fused_linear_divergence(hs, ht, w, divergence=divergence)


def naive(hs, ht, w, divergence):
    """Materialize both [N, V] logits, upcast to fp32, log_softmax, divergence (autograd)."""
    logits = hs @ w.T
    with torch.no_grad():
        teacher = ht @ w.T
    return divergence_from_logits(logits.float(), teacher.float(), make_spec(divergence)).mean()


def trl(hs, ht, w, divergence):
    """TRL's SDFT full_logits loss on the model-dtype logits, as SDFTTrainer computes it."""
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    logits = hs @ w.T
    with torch.no_grad():
        teacher = ht @ w.T
    return compute_full_logit_self_distillation_loss(logits, teacher, distillation_alpha=ALPHA[divergence]).mean()


_LIGER = {}


def liger(hs, ht, w, divergence):
    """liger-kernel's fused linear JSD with beta 0 (forward KL) or 1 (reverse KL)."""
    if divergence not in _LIGER:
        import liger_kernel.transformers as lt

        cls = getattr(lt, "LigerFusedLinearJSDLoss", None) or lt.LigerFusedLinearJSD
        _LIGER[divergence] = cls(jsd_beta=ALPHA[divergence])
    return _LIGER[divergence](hs, w, ht, w.detach(), None)


class _GemmFloor(torch.autograd.Function):
    """The four GEMMs any exact implementation does (student and teacher logits, dH, dW), nothing else."""

    @staticmethod
    def forward(ctx, hs, ht, w):
        ctx.save_for_backward(hs, ht, w)
        s, t = hs @ w.T, ht @ w.T
        return s[0, 0] + t[0, 0]

    @staticmethod
    def backward(ctx, grad):
        hs, ht, w = ctx.saved_tensors
        gz = torch.empty(hs.shape[0], w.shape[0], dtype=hs.dtype, device=hs.device).fill_(grad.item())
        return gz @ w, None, gz.T @ hs


def gemm_floor(hs, ht, w, divergence):
    return _GemmFloor.apply(hs, ht, w)


TOPK = 100  # TRL's default distillation_topk
_TARGETS = {}


def _targets(n: int, vocab: int, device) -> torch.Tensor:
    """Fixed 'sampled' ids for the sampled-token objective (the same for every implementation)."""
    key = (n, vocab, str(device))
    if key not in _TARGETS:
        _TARGETS[key] = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).to(device)
    return _TARGETS[key]


def ours_topk(hs, ht, w, divergence):
    return fused_linear_divergence(hs, ht, w, divergence=divergence, topk=TOPK)


def ours_topk_triton(hs, ht, w, divergence):
    """The streamed Triton top-k kernel (opt-in until this side has been measured on a GPU)."""
    return fused_linear_divergence(hs, ht, w, divergence=divergence, topk=TOPK, backend="triton")


def trl_topk(hs, ht, w, divergence):
    """TRL's default objective: its top-k helper on materialised logits."""
    from trl.experimental.sdft.loss_utils import compute_topk_self_distillation_loss

    logits = hs @ w.T
    with torch.no_grad():
        teacher = ht @ w.T
    return compute_topk_self_distillation_loss(logits, teacher, distillation_topk=TOPK,
                                               distillation_alpha=ALPHA[divergence],
                                               distillation_add_tail=False).mean()


def ours_sampled(hs, ht, w, divergence):
    return fused_linear_divergence(hs, ht, w, divergence="reverse_kl", mode="sampled_token",
                                   targets=_targets(hs.shape[0], w.shape[0], hs.device))


def trl_sampled(hs, ht, w, divergence):
    """TRL's sampled-token helper on materialised logits (reverse KL only)."""
    from trl.experimental.sdft.loss_utils import compute_sampled_token_self_distillation_loss

    logits = hs @ w.T
    with torch.no_grad():
        teacher = ht @ w.T
    targets = _targets(hs.shape[0], w.shape[0], hs.device)
    return compute_sampled_token_self_distillation_loss(logits[None], teacher[None], targets[None],
                                                        distillation_alpha=1.0).mean()


IMPLS = {"sdft": ours, "naive": naive, "trl": trl, "liger": liger, "gemm_floor": gemm_floor,
         "sdft_topk": ours_topk, "sdft_topk_triton": ours_topk_triton, "trl_topk": trl_topk,
         "sdft_sampled": ours_sampled, "trl_sampled": trl_sampled}


def available(name: str, device: torch.device) -> str | None:
    """None if the implementation can run here, else why not."""
    if name in ("liger", "sdft_topk_triton") and device.type != "cuda":
        return "needs CUDA"
    module = {"trl": "trl", "trl_topk": "trl", "trl_sampled": "trl", "liger": "liger_kernel"}.get(name)
    if module:
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed"
    return None


def fwd_bwd(impl, hs, ht, w, divergence):
    def step():
        hs.grad = None
        w.grad = None
        loss = impl(hs, ht, w, divergence)
        loss.backward()
        return loss

    return step


def measure_case(name, shape, n, dtype, divergence, reps, device):
    """Loss, median ms and peak extra MiB of one implementation at one size."""
    h, v = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hs = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    ht = torch.randn(n, h, generator=gen).to(device, dtype)
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    step = fwd_bwd(IMPLS[name], hs, ht, w, divergence)
    try:
        mem = peak_extra_mib(step, device)  # first: a CPU process's freed memory stays resident
        loss = float(step().detach())
        ms = median_ms(step, device, warmup=1, reps=reps)
    finally:
        hs.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"loss": loss, "ms": ms, "peak_extra_mib": mem}


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES) if cuda else ["smollm2"], choices=list(SHAPES))
    p.add_argument("--n", type=int, nargs="+", default=[4096] if cuda else [256])
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--divergences", nargs="+", default=["reverse_kl", "forward_kl"], choices=list(ALPHA))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--reps", type=int, default=10 if cuda else 3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None, help="result file name (default divergence_<device>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    peak = bf16_gemm_tflops(device)
    rows = []
    for shape in args.shapes:
        h, v = SHAPES[shape]
        for n in args.n:
            flops = 8 * n * h * v
            for divergence in args.divergences:
                naive_mem = None
                for name in args.impls:
                    row = {"shape": shape, "N": n, "H": h, "V": v, "divergence": divergence, "impl": name}
                    why = available(name, device)
                    if why:
                        rows.append({**row, "note": why})
                        continue
                    try:
                        if cuda:
                            row.update(measure_case(name, shape, n, dtype, divergence, args.reps, device))
                        else:
                            row.update(run_in_subprocess("benchmarks.bench_divergence", "measure_case", name, shape,
                                                         n, args.dtype, divergence, args.reps, "cpu"))
                    except torch.cuda.OutOfMemoryError:
                        rows.append({**row, "note": "out of memory"})
                        torch.cuda.empty_cache()
                        continue
                    if name == "naive":
                        naive_mem = row["peak_extra_mib"]
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["pct_gemm_peak"] = (100 * row["tflops"] / peak) if peak else None
                    rows.append(row)
                    print(row, flush=True)
                for row in rows:
                    same = row["divergence"] == divergence and row["shape"] == shape and row["N"] == n
                    if same and naive_mem and row.get("peak_extra_mib") is not None:
                        row["mem_vs_naive_pct"] = 100 * row["peak_extra_mib"] / naive_mem
    tag = "gpu_" + env["device"].split()[-1].lower() if cuda else "cpu"
    header = (f"# Fused linear divergence, forward + backward ({args.dtype})\n\n"
              f"Environment: {env}. Measured bf16 GEMM peak: {peak and round(peak)} TFLOP/s. "
              f"Useful FLOPs 8*N*H*V; time is the median of {args.reps} runs; peak extra memory is the "
              "peak above what was allocated before the step (CUDA allocator; CPU resident set).\n\n")
    columns = ["shape", "N", "divergence", "impl", "ms", "peak_extra_mib", "mem_vs_naive_pct", "tflops",
               "pct_gemm_peak", "loss", "note"]
    write_results(
        args.out,
        args.stem or f"divergence_{tag}",
        {"environment": env, "gemm_peak_tflops": peak, "rows": rows},
        header + markdown_table(rows, columns),
    )


if __name__ == "__main__":
    main()
