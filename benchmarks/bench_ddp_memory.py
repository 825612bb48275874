"""Peak memory of a DDP run with gradients as views into DDP's all-reduce buckets (sdft's wrapper) against
separate gradients beside the buckets (DDP's default), two processes under torchrun on this machine (gloo).

Each run fine-tunes the embedded SmolLM2-135M-Instruct fully in fp32 for a few steps with a live teacher
(no teacher copy); each process reports its peak resident set (VmHWM) and its seconds per step.

    python benchmarks/bench_ddp_memory.py            # both settings, results/ddp_memory_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _separate_gradients():
    """DDP as torch builds it by default (``gradient_as_bucket_view=False``), for the comparison."""
    import torch.nn.parallel

    ddp = torch.nn.parallel.DistributedDataParallel

    class SeparateGradients(ddp):
        __signature__ = inspect.signature(ddp)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "gradient_as_bucket_view": False})

    torch.nn.parallel.DistributedDataParallel = SeparateGradients


def worker(mode: str, steps: int, out: str):
    """One process of a run (under torchrun): train, then write its peak RSS and step times."""
    from sdft import SDFTConfig, train

    if mode == "separate":
        _separate_gradients()
    rank = int(os.environ["RANK"])
    times = []
    last = [time.perf_counter()]

    def timed(step, record):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    config = SDFTConfig(output_dir=os.path.join(out, "run"), max_steps=steps, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=16, teacher_mode="live", save_strategy="no",
                        save_final_model=False, progress_bar=False, device="cpu", retention_data="",
                        retention_text="", learning_rate=1e-5)
    train(None, None, config, step_callback=timed)
    peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_rss_mib": peak / 1024, "step_s": times}))


def run(mode: str, steps: int, port: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"ddp-{mode}-")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), __file__, "--worker", mode,
                    "--steps", str(steps), "--dir", out], env=env, check=True)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    shutil.rmtree(out, ignore_errors=True)
    later = sorted(t for r in ranks for t in r["step_s"][1:])  # the first step warms up
    return {"peak_rss_mib": [r["peak_rss_mib"] for r in ranks], "median_step_s": later[len(later) // 2],
            "step_s": [r["step_s"] for r in ranks]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting, interleaved")
    p.add_argument("--worker", choices=["views", "separate"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps, args.dir)
    from benchmarks.measure import write_report

    order = [mode for _ in range(args.repeat) for mode in ("separate", "views")]  # interleaved: drift hits both
    done = [(mode, run(mode, args.steps, 29400 + i)) for i, mode in enumerate(order)]
    runs = {}
    for mode in ("separate", "views"):
        mine = [r for m, r in done if m == mode]
        later = sorted(t for r in mine for rank in r["step_s"] for t in rank[1:])
        runs[mode] = {"peak_rss_mib": [max(r["peak_rss_mib"][k] for r in mine) for k in (0, 1)],
                      "median_step_s": later[len(later) // 2], "runs": mine}
    rows = [{"gradients": "separate (DDP's default)" if mode == "separate" else "views into the buckets (sdft)",
             "peak RSS rank 0 (MiB)": r["peak_rss_mib"][0], "peak RSS rank 1 (MiB)": r["peak_rss_mib"][1],
             "s/step": r["median_step_s"]} for mode, r in runs.items()]
    saved = [a - b for a, b in zip(runs["separate"]["peak_rss_mib"], runs["views"]["peak_rss_mib"])]
    settings = (f"Two processes (torchrun, gloo, one thread each), the embedded SmolLM2-135M-Instruct (134.5M "
                f"parameters: {134.5e6 * 4 / 2**20:.0f} MiB of fp32 gradients) trained fully in fp32, 1 prompt x G=2 "
                f"x 16 tokens per process, live teacher, {args.steps} steps, {args.repeat} run(s) of each setting in "
                f"turn; the highest peak resident set of each process; median seconds per step over steps "
                f"2..{args.steps} of both processes and every run. Views saved "
                f"{saved[0]:.0f} / {saved[1]:.0f} MiB of peak memory on rank 0 / 1.")
    write_report(args.out, "ddp_memory_cpu", "DDP: gradients as bucket views vs separate gradients", settings,
                 f"python benchmarks/bench_ddp_memory.py {' '.join(argv or sys.argv[1:])}",
                 {"runs": runs, "saved_mib": saved}, rows)

if __name__ == "__main__":
    main()
