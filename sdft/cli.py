"""``sdft`` command line: ``sdft train`` (defaults: embedded SmolLM2-135M-Instruct, bundled skill)."""
from __future__ import annotations

import argparse
import json
import sys

from .config import SDFTConfig


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sdft", description="Self-Distillation Fine-Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune a model with SDFT")
    tr.add_argument("--model", default=None, help="local model folder or .gguf (default: embedded SmolLM2)")
    tr.add_argument("--data", default=None, help="jsonl with prompt + demonstration (default: bundled skill)")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SDFTConfig overrides")
    tr.add_argument("--no-eval", action="store_true", help="skip skill accuracy before/after (bundled skill)")
    args = parser.parse_args(argv)

    overrides = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    try:
        config = SDFTConfig.from_dict(overrides)
        from . import load_model, skill_accuracy, train

        model, tokenizer = load_model(args.model)
        evaluate = not args.no_eval and args.data is None
        if evaluate:
            print("skill accuracy before:", skill_accuracy(model, tokenizer), flush=True)
        result = train(model, args.data, config, tokenizer=tokenizer)
        if evaluate:
            print("skill accuracy after:", skill_accuracy(result.model, tokenizer), flush=True)
        print(f"checkpoints and metrics.jsonl in {result.output_dir}")
    except (ValueError, FileNotFoundError) as err:
        print(f"sdft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
