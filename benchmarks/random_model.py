"""The embedded model's shape with seeded random weights, for a machine that cannot carry its weights.

The device machine takes 64 MiB of files; SmolLM2-135M's weights are 540 MB. Its config and tokenizer
(3.5 MB) travel instead and the weights are drawn there, seeded: timings and memory depend on the
shapes, not on the values (rollouts of random weights run to the completion budget, the worst case).

    python benchmarks/random_model.py pack .gpu_model          # here: config + tokenizer, no weights
    python benchmarks/random_model.py init .gpu_model DIR      # there: seed-0 weights -> an HF folder DIR

Point the benchmarks at DIR with ``SDFT_BENCH_MODEL=DIR`` (``bench_trl.model_dir``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "sdft_export.json")


def pack(out: Path) -> Path:
    """Copy the embedded model's HF folder without its weights to ``out``."""
    from benchmarks.bench_trl import model_dir

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir()).iterdir():
        if f.is_file() and f.name not in WEIGHTS:
            shutil.copy2(f, out / f.name)
    return out


def init(packed: Path, out: Path, seed: int = 0) -> Path:
    """An HF folder at ``out``: ``packed``'s config and tokenizer, weights drawn with ``seed``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(packed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in packed.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("pack").add_argument("out", type=Path)
    i = sub.add_parser("init")
    i.add_argument("packed", type=Path)
    i.add_argument("out", type=Path)
    i.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(pack(args.out) if args.verb == "pack" else init(args.packed, args.out, args.seed))


if __name__ == "__main__":
    main()
