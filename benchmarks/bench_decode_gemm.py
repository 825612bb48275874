"""Decoding's small-batch GEMMs on CPU: ``F.linear`` vs ``(W @ x.T).T`` by row count, and whole rollouts
with and without ``sdft.rollout.decode_gemm`` (which picks the faster layout per weight shape and row count).

    python benchmarks/bench_decode_gemm.py                 # SmolLM2-135M's weight shapes, 1-128 rows
    python benchmarks/bench_decode_gemm.py --no-rollouts   # the GEMM sweep only

The GEMMs stream their weights from memory as decoding does (each timing cycles through enough copies
of the weight to overflow the caches). Writes benchmarks/results/decode_gemm_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import environment, markdown_table, write_results  # noqa: E402
from sdft.rollout.decode_gemm import _w_x  # noqa: E402

# SmolLM2-135M: (out, in) of q/o, k/v, gate/up, down and the tied LM head
SHAPES = {"attn_q_o": (576, 576), "attn_k_v": (192, 576), "mlp_gate_up": (1536, 576), "mlp_down": (576, 1536),
          "lm_head": (49152, 576)}
ROWS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
STREAM_BYTES = 256 * 2**20  # more than any CPU cache: every product reads its weight from memory


def gemm_rows(shapes: dict, rows: list[int], reps: int, stream_bytes: int = STREAM_BYTES) -> list[dict]:
    """Per (weight, rows): median ms per product of each layout and the weight bytes read per second
    (each timing cycles through ``stream_bytes`` of weight copies)."""
    out = []
    for name, (n_out, n_in) in shapes.items():
        copies = max(1, stream_bytes // (n_out * n_in * 4))
        weights = [torch.randn(n_out, n_in) for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, n_in)
            times = {}
            for layout, fn in (("f_linear", lambda w: F.linear(x, w)), ("w_x", lambda w: _w_x(x, w))):
                fn(weights[0])
                samples = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for w in weights:
                        fn(w)
                    samples.append((time.perf_counter() - t0) / copies)
                times[layout] = statistics.median(samples)
            gb = n_out * n_in * 4 / 1e9
            out.append({"weight": name, "shape": f"{n_out}x{n_in}", "rows": m,
                        "f_linear_ms": times["f_linear"] * 1e3, "w_x_ms": times["w_x"] * 1e3,
                        "f_linear_gb_s": gb / times["f_linear"], "w_x_gb_s": gb / times["w_x"],
                        "w_x_speedup": times["f_linear"] / times["w_x"]})
            print(out[-1], flush=True)
    return out


def rollout_rows(groups: list[int], prompts: int, reps: int) -> list[dict]:
    """Seconds for ``HFRolloutEngine.generate`` on the bundled tool-call prompts (24 tokens at most,
    greedy so every arm decodes the same tokens): plain ``F.linear`` (``decode_gemm=off``), the fixed
    row rule (``rule``, the default) and the per-process timing (``auto``)."""
    from sdft import SDFTConfig, load_model
    from sdft.data.examples import load_examples
    from sdft.data.skill import load_skill
    from sdft.rollout.engine import HFRolloutEngine
    from sdft.run.trainer import encode_examples

    model, tokenizer = load_model()
    examples = load_examples(load_skill("train")[:prompts])
    encoded = encode_examples(examples, tokenizer, SDFTConfig(output_dir="unused"), torch.device("cpu"))
    ids = [ex.prompt_ids for ex in encoded]
    out = []
    for group in groups:
        row = {"prompts": prompts, "G": group, "decode_rows": prompts * group}
        for policy in ("off", "rule", "auto"):
            engine = HFRolloutEngine(tokenizer, decode_gemm=policy)
            engine.generate(model, ids, group, 24, 1.0, greedy=True)  # warm-up (and auto's timings)
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                engine.generate(model, ids, group, 24, 1.0, greedy=True)
                samples.append(time.perf_counter() - t0)
            row[f"{policy}_s"] = statistics.median(samples)
        row["rule_speedup"] = row["off_s"] / row["rule_s"]
        row["auto_speedup"] = row["off_s"] / row["auto_s"]
        out.append(row)
        print(row, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8, 16], help="rollouts per prompt")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--no-rollouts", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="decode_gemm_cpu")
    args = p.parse_args(argv)

    env = environment(torch.device("cpu"))
    gemms = gemm_rows(SHAPES, args.rows, args.reps)
    runs = [] if args.no_rollouts else rollout_rows(args.groups, args.prompts, max(1, args.reps // 2))
    command = "python benchmarks/bench_decode_gemm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Decoding GEMMs on CPU: F.linear vs (W @ x.T).T\n\nEnvironment: {env}. Command: `{command.strip()}`\n\n"
            "Per product, fp32, the weight read from memory (cycled copies, 256 MiB); median of "
            f"{args.reps}.\n\n" + markdown_table(gemms, list(gemms[0])))
    if runs:
        text += ("\n\nWhole rollouts (`HFRolloutEngine.generate`, bundled tool-call prompts, at most 24 greedy "
                 "tokens): `decode_gemm` off (F.linear), rule (the default: W @ x.T for 8-48 rows) and auto "
                 "(timed per process).\n\n"
                 + markdown_table(runs, list(runs[0])))
    write_results(args.out, args.stem, {"environment": env, "command": command, "gemms": gemms, "rollouts": runs},
                  text)


if __name__ == "__main__":
    main()
