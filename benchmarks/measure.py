"""Timing and peak-memory measurement shared by the benchmark scripts (CPU and CUDA)."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds, device work included."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory fn() needs above what was held before it (GPU: allocator; CPU: resident set, after the
    freed heap pages are returned, so that the pages fn touches count the same on every call)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from sdft.runtime.heap_trim import trim_freed_memory

    trim_freed_memory("cpu")  # freed heap pages out first: fn's pages count whether or not glibc kept old ones
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def bf16_gemm_tflops(device: torch.device) -> float | None:
    """Measured bf16 matrix-product rate on this GPU (8192^3, random data)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def environment(device: torch.device) -> dict:
    from sdft.runtime.precision import native_16bit

    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        info["cpu"] = cpu_model()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX2, AVX512, ...
        info["cpu_bf16"] = native_16bit("bf16")
    return info


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (machines sold under one name differ)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def write_results(out_dir: Path, stem: str, payload: dict, table: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (out_dir / f"{stem}.md").write_text(table)
    print(table)


def write_report(out_dir: Path, stem: str, title: str, settings: str, command: str, payload: dict, rows: list[dict],
                 columns: list[str] | None = None, device: torch.device = torch.device("cpu")):
    """A run's results as the benchmarks write them: ``payload`` with the environment as JSON, and a markdown
    table of ``rows`` under a header with the environment, ``settings`` (what was run) and ``command``."""
    env = environment(device)
    header = f"# {title}\n\nEnvironment: {env}. {settings}\n\nCommand: `{command}`\n\n"
    table = markdown_table(rows, columns or list(rows[0]))
    write_results(out_dir, stem, {"environment": env, **payload}, header + table)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_in_subprocess(module: str, function: str, *args) -> dict:
    """``module.function(*args)`` in a fresh Python process (CPU: its peak resident set is its own).

    Arguments travel as Python literals; the function returns something JSON can carry.
    """
    code = (f"import json, torch; from {module} import {function}; "
            f"print(json.dumps({function}(*{args!r})))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module}.{function}{args!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
