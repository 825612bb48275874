"""``sdft`` command line.

``sdft train``: fine-tune (defaults: embedded SmolLM2-135M-Instruct, bundled tool-call skill).
``sdft config --show``: print the resolved config of ``--set`` overrides, or of a run / checkpoint.
``sdft export CHECKPOINT OUT``: write a checkpoint as a Hugging Face folder (LoRA: adapter or merged).
Config keys, types, defaults and meanings in ``--help`` come from ``SDFTConfig`` itself. Every
check that needs no model (config, data, output_dir) runs before the model loads; bad input is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import SDFTConfig, describe_fields
from .run_dir import CONFIG_FILE, plan_run

# The demo (no --model, no --data) keeps one checkpoint: each is ~1.6 GB for full fine-tuning of
# SmolLM2-135M (weights + AdamW state), and the demo only needs the final one.
DEMO_SAVE_TOTAL_LIMIT = 1


def _overrides(parser, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value
    return pairs


def _saved_config(path: str) -> SDFTConfig:
    """The config a run (output_dir/config.json) or a checkpoint (state.json) was made with."""
    folder = Path(path)
    for name, pick in ((CONFIG_FILE, lambda d: d), ("state.json", lambda d: d["config"])):
        if (folder / name).is_file():
            return SDFTConfig.from_dict(pick(json.loads((folder / name).read_text())))
    raise FileNotFoundError(f"{folder} holds neither {CONFIG_FILE} (a run) nor state.json (a checkpoint)")


def _build_parser():
    keys = "config keys for --set KEY=VALUE (lists comma-separated, booleans true/false):\n" + describe_fields()
    parser = argparse.ArgumentParser(prog="sdft", description="Self-Distillation Fine-Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune a model with SDFT", epilog=keys,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--model", default=None, help="local model folder or .gguf (default: embedded SmolLM2)")
    tr.add_argument("--data", default=None, help="jsonl with prompt + demonstration (default: bundled skill)")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SDFTConfig overrides (below)")
    tr.add_argument("--no-eval", action="store_true", help="skip skill accuracy before/after (bundled skill)")
    cf = sub.add_parser("config", help="print a resolved config", epilog=keys,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cf.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    cf.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SDFTConfig overrides")
    cf.add_argument("--from", dest="source", default=None, metavar="DIR",
                    help="a run's output_dir or a checkpoint folder: show the config it ran with")
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    ex.add_argument("checkpoint", help="a checkpoint-N folder")
    ex.add_argument("out", help="the folder to write")
    ex.add_argument("--model", default=None, help="the base model's path (default: the one the checkpoint records)")
    ex.add_argument("--merge", action="store_true", help="LoRA: write the merged full model, not the adapter")
    return parser


def _export(args, parser) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.model, args.merge)
    print(f"wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})"
          if not (Path(out) / "adapter_config.json").exists() else
          f"wrote the LoRA adapter to {out}; load it with peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _train(args, parser) -> int:
    from .data import load_examples

    pairs = _overrides(parser, args.set)
    demo = args.model is None and args.data is None
    if demo and "save_total_limit" not in pairs:
        pairs["save_total_limit"] = str(DEMO_SAVE_TOTAL_LIMIT)
    config = SDFTConfig.from_strings(pairs)
    if args.data is not None:
        load_examples(args.data)
    plan_run(config, report=lambda message: None)

    from . import models, skill_accuracy, train

    model, tokenizer = models.load_model(args.model)
    evaluate = not args.no_eval and args.data is None
    if evaluate:
        print("skill accuracy before:", skill_accuracy(model, tokenizer), flush=True)
    result = train(model, args.data, config, tokenizer=tokenizer)
    if evaluate:
        print("skill accuracy after:", skill_accuracy(result.model, tokenizer), flush=True)
    print(f"checkpoints and metrics.jsonl in {result.output_dir}")
    return 0


def _config(args, parser) -> int:
    if not args.show:
        parser.error("sdft config: pass --show")
    base = _saved_config(args.source).to_dict() if args.source is not None else None
    config = SDFTConfig.from_strings(_overrides(parser, args.set), base)
    print(config.to_json())
    return 0


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    from .trainer import NonFiniteError

    try:
        command = {"train": _train, "config": _config, "export": _export}[args.command]
        return command(args, parser)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteError, TypeError) as err:
        print(f"sdft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
