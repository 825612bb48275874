"""``sdft`` command line.

``sdft train``: fine-tune (defaults: embedded SmolLM2-135M-Instruct, bundled tool-call skill).
``sdft config --show``: print the resolved config of ``--set`` overrides, or of a run / checkpoint.
``sdft export CHECKPOINT OUT``: write a checkpoint as a Hugging Face folder (LoRA: adapter or merged).
``sdft generate [MODEL] --prompt TEXT``: try a (trained) model in the terminal.
``sdft teacher-check``: before a run, how often the teacher (the model with the demonstration in its
context) writes the demonstrated answer, per template: whether SDFT has anything to distil.
Config keys, types, defaults and meanings in ``--help`` come from ``SDFTConfig`` itself. Every
check that needs no model (config, data, output_dir) runs before the model loads; bad input is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from sdft.config import SDFTConfig, describe_fields
from sdft.data.chat import parse_template_kwargs
from sdft.run.checkpoint import CheckpointError, checkpoint_state
from sdft.run.prepare import check_run, check_settings
from sdft.run.run_dir import (
    CONFIG_FILE,
    check_model_folder,
    is_checkpoint_folder,
    replace_file,
)
from sdft.runtime.distributed import check_launcher, launched_size, leave

# The demo (no --model, no --data) keeps one checkpoint: each is ~1.6 GB for full fine-tuning of
# SmolLM2-135M (weights + AdamW state), and the demo only needs the final one.
DEMO_SAVE_TOTAL_LIMIT = 1
REVISION_HELP = "with a Hugging Face Hub id as the model: its branch, tag or commit (default: main)"
MODEL_HELP = "local model folder, Hugging Face Hub id (Qwen/Qwen2.5-0.5B-Instruct) or .gguf (default: embedded SmolLM2)"
COLUMN_MAP_HELP = ("the dataset's column for each column sdft reads, e.g. '{\"prompt\": \"question\", "
                   "\"demonstration\": \"answer\"}' (as a run's column_map)")
DATA_HELP = ("prompt + demonstration rows: a .jsonl/.json/.parquet/.csv file, a saved dataset folder, or a Hub "
             "dataset id ORG/NAME[@REVISION][:CONFIG][:SPLIT] (split train)")


def _overrides(parser, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key.strip()] = value
    return pairs


def _config_file(path: str) -> dict:
    """The settings of a config file: JSON or YAML, a mapping of the keys ``--set`` takes (TRL's names too), or
    a run's output_dir / a checkpoint folder (the config it ran with); checked here, one line naming the
    file if not."""
    file = Path(path).expanduser()
    if file.is_dir():
        return _saved_config(str(file)).to_dict()
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file or run folder")
    text = file.read_text(encoding="utf-8-sig")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    except Exception as err:  # noqa: BLE001  # yaml.YAMLError names the line
        raise ValueError(f"{file}: not valid YAML ({one_line(err)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file}: a config file holds a mapping of option names to values, got "
                         f"{type(values).__name__}")
    text_values = {k: v for k, v in values.items() if isinstance(v, str)}  # YAML reads 1e-4 as text: parse it
    try:
        typed = SDFTConfig.from_dict({k: v for k, v in values.items() if k not in text_values}).to_dict()
        return SDFTConfig.from_strings(text_values, typed).to_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def _run_settings(path: str | None) -> dict | None:
    """What ``--config`` gives a new run (None: nothing): the file's settings; a run folder's as that run
    trained, not as it started (its resume or overwrite is not carried over)."""
    if path is None:
        return None
    settings = _config_file(path)
    if Path(path).expanduser().is_dir():
        settings.update(resume_from_checkpoint=False, overwrite_output_dir=False)
    return settings


def _saved_config(path: str) -> SDFTConfig:
    """The config a run (output_dir/config.json) or a checkpoint (state.json) was made with."""
    folder = Path(path)
    if (folder / CONFIG_FILE).is_file():
        try:
            values = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{folder / CONFIG_FILE} is unreadable ({err})") from None
        return SDFTConfig.from_dict(values)
    if (folder / "state.json").is_file():
        return SDFTConfig.from_dict(checkpoint_state(folder)["config"])
    raise FileNotFoundError(f"{folder} holds neither {CONFIG_FILE} (a run) nor state.json (a checkpoint)")


def _build_parser():
    keys = "config keys for --set KEY=VALUE (lists comma-separated, booleans true/false):\n" + describe_fields()
    parser = argparse.ArgumentParser(prog="sdft", description="Self-Distillation Fine-Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune a model with SDFT", epilog=keys,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--model", default=None, help=MODEL_HELP)
    tr.add_argument("--revision", default=None, help=REVISION_HELP)
    tr.add_argument("--data", default=None, help=DATA_HELP + "; default: the bundled skill")
    tr.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="SDFTConfig overrides (below); --set may repeat")
    tr.add_argument("--eval-data", default=None, metavar="DATA",
                    help="held-out rows, as --data takes them (a Hub id's split: test): answers scored before/after "
                         "training (eval_data)")
    tr.add_argument("--scorer", default=None, help="exact | normalized | json | regex:PATTERN (eval_scorer)")
    tr.add_argument("--no-eval", action="store_true", help="skip the evaluation before/after training")
    tr.add_argument("--dry-run", action="store_true",
                    help="check everything a run checks before its weights load, measure every row with the "
                         "model's tokenizer, print the plan (rows, steps, model size, the memory its training "
                         "state takes, output_dir) and stop: no "
                         "weights load, nothing is written")
    tr.add_argument("--config", default=None, metavar="FILE",
                    help="settings from a JSON or YAML file (the keys --set takes), or a run's output_dir to train "
                         "as it did; --set and the flags above override them")
    cf = sub.add_parser("config", help="print a resolved config", epilog=keys,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cf.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    cf.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="SDFTConfig overrides; --set may repeat")
    cf.add_argument("--from", "--config", dest="source", default=None, metavar="DIR|FILE",
                    help="a run's output_dir or a checkpoint folder (the config it ran with), or a JSON or YAML "
                         "config file, as --config takes it")
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    ex.add_argument("checkpoint", help="a checkpoint-N folder")
    ex.add_argument("out", help="the folder to write")
    ex.add_argument("--model", default=None, help="the base model's path (default: the one the checkpoint records)")
    ex.add_argument("--merge", action="store_true", help="LoRA: write the merged full model, not the adapter")
    ex.add_argument("--force", action="store_true",
                    help="write OUT even when it is not an earlier sdft export (the folder there is kept as "
                         "OUT.replaced-DATE)")
    ge = sub.add_parser("generate", help="answer prompts with a (trained) model, greedy unless --temperature")
    ge.add_argument("model", nargs="?", default=None,
                    help="a model folder (e.g. OUTPUT_DIR/final_model), an sdft checkpoint (OUTPUT_DIR/checkpoint-N), "
                         "a Hugging Face Hub id, a LoRA adapter folder or a .gguf (default: the embedded SmolLM2)")
    ge.add_argument("--revision", default=None, help=REVISION_HELP)
    ge.add_argument("--base", default=None, metavar="PATH",
                    help="the base model folder of a LoRA adapter or a checkpoint (default: the one it names)")
    ge.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ge.add_argument("--prompts", default=None, metavar="DATA",
                    help="a dataset with a 'prompt' column, as train --data takes it (e.g. your eval data; a Hub "
                         "id's split: test), or a text file, one prompt a line")
    ge.add_argument("--column-map", default=None, metavar="JSON", help=COLUMN_MAP_HELP)
    ge.add_argument("--system", default=None, help="a system message put before every prompt")
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ge.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling (1: off)")
    ge.add_argument("--top-k", type=int, default=0, help="with --temperature: the k most likely tokens (0: off)")
    ge.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                    help="extra chat template variables, e.g. '{\"enable_thinking\": false}' (default: those the run "
                         "trained with, for an sdft export or checkpoint)")
    _placement_arguments(ge)
    tc = sub.add_parser("teacher-check", help="how often the teacher context reproduces the demonstration, "
                        "per template: is there anything for SDFT to distil?")
    tc.add_argument("--model", default=None,
                    help="local model folder, Hub id, LoRA adapter folder or .gguf (default: embedded SmolLM2)")
    tc.add_argument("--revision", default=None, help=REVISION_HELP)
    tc.add_argument("--data", default=None, help=DATA_HELP + "; default: the bundled skill")
    tc.add_argument("--column-map", default=None, metavar="JSON", help=COLUMN_MAP_HELP)
    tc.add_argument("--templates", nargs="+", default=["fewshot", "paper"], metavar="TEMPLATE",
                    help="fewshot | paper | a format string with {prompt} and {demonstration}")
    tc.add_argument("--scorer", default="normalized", help="exact | normalized | json | regex:PATTERN")
    tc.add_argument("--limit", type=int, default=16, help="rows of --data to score (its first ones)")
    tc.add_argument("--max-new-tokens", type=int, default=64)
    tc.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                    help="extra chat template variables, e.g. '{\"enable_thinking\": false}' (as the run will use; "
                         "default: those an sdft export trained with)")
    _placement_arguments(tc)
    co = sub.add_parser("continual", help="train skills one after another and score what each stage kept",
                        epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("--stages", nargs="+", required=True, metavar="DATA",
                    help="a dataset per stage, in order, as train --data takes them")
    co.add_argument("--eval-stages", nargs="+", default=None, metavar="DATA",
                    help="a held-out dataset per stage (a Hub id's split: test), scored after every stage")
    co.add_argument("--validation-stages", nargs="+", default=None, metavar="DATA",
                    help="a validation dataset per stage (a Hub id's split: test), evaluated during that stage "
                         "(every eval_steps); with "
                         "--set load_best_model_at_end=true each stage ends on its best point")
    co.add_argument("--model", default=None, help=MODEL_HELP)
    co.add_argument("--revision", default=None, help=REVISION_HELP)
    co.add_argument("--baseline", choices=["sft"], default=None,
                    help="also run the same stages with plain SFT and put both matrices side by side")
    co.add_argument("--scorer", nargs="+", default=None,
                    help="exact | normalized | json | regex:PATTERN: one for every stage, or one per stage")
    co.add_argument("--config", default=None, metavar="FILE",
                    help="settings from a JSON or YAML file (the keys --set takes); --set overrides them")
    co.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides, applied to every stage")
    return parser


def _continual(args, parser) -> int:
    """``sdft continual``: ``train_sequence`` for SDFT (and the SFT baseline) into output_dir/{sdft,sft}."""
    from sdft.run.sequence import (
        check_sequence_folder,
        check_stages,
        matrix_markdown,
        plot_matrices,
        stage_names,
        stage_scorers,
        train_sequence,
    )

    base = _run_settings(args.config)
    config = SDFTConfig.from_strings(_overrides(parser, args.set), base)
    check_settings(config)
    # every file checked before the model loads
    check_stages(args.stages, args.eval_stages, args.validation_stages, config.load_best_model_at_end,
                 config.evaluation_rule, config.column_map)
    stage_scorers(args.scorer or config.eval_scorer, len(args.stages))
    check_launcher()

    methods = ["sdft"] + ([args.baseline] if args.baseline else [])
    root, matrices = Path(config.output_dir), {}
    compared = [root / "sdft-vs-sft.md", root / "sdft-vs-sft.png"]
    if len(methods) > 1 and not config.resume_from_checkpoint and any(p.exists() for p in compared):
        raise ValueError(f"{compared[0]} exists: set resume_from_checkpoint=true to continue that comparison, "
                         "or choose another output_dir")
    for method in methods:
        check_sequence_folder(root / method, bool(config.resume_from_checkpoint))
    for method in methods:
        method_config = SDFTConfig.from_dict({**config.to_dict(), "output_dir": str(root / method)})
        result = train_sequence(args.model, args.stages, method_config, eval_stages=args.eval_stages,
                                method=method, eval_scorer=args.scorer, validation_stages=args.validation_stages)
        matrices[method] = result.matrix
    names = stage_names(args.stages)
    tables = "\n".join(matrix_markdown(m, names, f"{method.upper()}: score after each stage")
                        for method, m in matrices.items())
    print(tables, flush=True)
    if len(matrices) > 1:
        replace_file(compared[0], tables)
        plot_matrices(matrices, names, compared[1])
    print(f"matrices in {', '.join(str(root / m / 'sequence.json') for m in matrices)}", flush=True)
    return 0


def _column_map(args) -> dict:
    """``--column-map``, read and checked as a run's ``column_map`` field is."""
    return SDFTConfig.from_strings({"column_map": args.column_map or "{}"}).column_map


def _teacher_check(args, parser) -> int:
    from sdft.data.examples import load_examples
    from sdft.eval.teacher_check import check_inputs, format_rows, teacher_check, verdict

    check_inputs(args.templates, args.scorer, args.limit, args.max_new_tokens)
    template_kwargs = _template_kwargs(args)
    if args.column_map is not None and args.data is None:
        raise ValueError("--column-map names the columns of --data: give --data")
    if args.data is None:
        from sdft.data.skill import load_skill

        data = load_skill("train")
    else:
        data = load_examples(args.data, column_map=_column_map(args))
    from sdft.models import load_trained

    device, dtype = _placed(args)
    model, tokenizer = load_trained(args.model, dtype)  # a LoRA adapter folder too: what is left to distil after a run?
    model.to(device=device, dtype=dtype)  # as generate: an adapter's layers too (peft makes them in float32)
    tokenizer = _render_with(tokenizer, template_kwargs)
    rows = teacher_check(model, tokenizer, data, args.templates, args.scorer, args.limit, args.max_new_tokens)
    print(f"greedy answers on the first {rows[0]['examples']} rows, scored ({args.scorer}) against their "
          "demonstrations:")
    print(format_rows(rows))
    print(verdict(rows))
    return 0


def _placement_arguments(parser):
    """--device and --dtype of a command that answers prompts (``sdft.runtime.inference``)."""
    from sdft.runtime.inference import DTYPES

    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU where there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="the weights' dtype: auto is bfloat16 on a GPU that has it, float32 elsewhere")


def _placed(args):
    """(device, dtype) the command's model answers on, checked before it loads."""
    from sdft.runtime.inference import check_device, inference_dtype

    device = check_device(args.device, "--device")
    return device, inference_dtype(args.dtype, device)


def _template_kwargs(args) -> dict | None:
    """``--chat-template-kwargs`` JSON as the config's ``chat_template_kwargs`` takes it (one line if not);
    None when not given."""
    if args.chat_template_kwargs is None:
        return None
    return parse_template_kwargs("--chat-template-kwargs", args.chat_template_kwargs)


def _render_with(tokenizer, given: dict | None):
    """The tokenizer a command answers with: ``given`` template variables, else those the loaded export or
    checkpoint trained with (said in one line)."""
    from sdft.data.chat import template_kwargs_of, with_template_kwargs

    if given is not None:
        return with_template_kwargs(tokenizer, given)
    kept = template_kwargs_of(tokenizer)
    if kept:
        print(f"sdft: chats render with the run's chat_template_kwargs {json.dumps(kept)} (--chat-template-kwargs "
              "'{}' renders without them)", file=sys.stderr, flush=True)
    return tokenizer


def _read_prompts(args) -> list[dict]:
    """Rows {"prompt": ...} from --prompt and --prompts (jsonl rows, or plain lines)."""
    rows = [{"prompt": p} for p in args.prompt]
    for k, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            raise ValueError(f"--prompt {k} of {len(args.prompt)} is empty" if len(args.prompt) > 1 else
                             "--prompt is empty")
    if args.prompts is not None:
        from sdft.data.examples import load_prompts
        from sdft.data.sources import DATA_SUFFIXES, read_text

        path = Path(args.prompts).expanduser()
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:  # a text file: a prompt a line
            lines = [line for line in read_text(path).splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"--prompts {path} holds no prompts")
            rows += [{"prompt": line} for line in lines]
        else:
            rows += [{"prompt": prompt} for prompt in load_prompts(args.prompts, column_map=_column_map(args))]
    if not rows:
        raise ValueError("sdft generate: give --prompt TEXT or --prompts FILE")
    if args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf:  # nan fails both comparisons
        raise ValueError("--max-new-tokens must be >= 1 and --temperature a finite number >= 0")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("--top-p must be in (0, 1] and --top-k >= 0")
    if args.temperature == 0 and (args.top_p < 1 or args.top_k):
        raise ValueError("--top-p and --top-k narrow what is sampled: give --temperature too (0 is greedy)")
    if args.system is not None:
        for row in rows:
            prompt = row["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            row["prompt"] = [{"role": "system", "content": args.system}] + prompt
    return rows


def _generate(args, parser) -> int:
    from sdft.data.examples import load_examples
    from sdft.eval.evaluation import generate_answers, sample_answers
    from sdft.models import load_trained
    from sdft.rollout.sampling import Sampling

    checkpoint = is_checkpoint_folder(args.model)
    if not checkpoint:
        check_model_folder(args.model, adapter_ok=True)
    examples = load_examples([{**row, "demonstration": "-"} for row in _read_prompts(args)])
    template_kwargs = _template_kwargs(args)
    device, dtype = _placed(args)
    if checkpoint:
        from sdft.run.export import load_checkpoint_model

        model, tokenizer = load_checkpoint_model(args.model, args.base, dtype)
    else:
        model, tokenizer = load_trained(args.model, dtype, base=args.base)
    model.to(device=device, dtype=dtype)
    tokenizer = _render_with(tokenizer, template_kwargs)
    if args.temperature > 0:
        answers = sample_answers(model, tokenizer, examples, args.max_new_tokens, args.temperature,
                                 Sampling(top_k=args.top_k, top_p=args.top_p))
    else:
        answers = generate_answers(model, tokenizer, examples, args.max_new_tokens)
    for ex, answer in zip(examples, answers):
        print(f"> {ex.prompt[-1][1]}\n{answer}\n", flush=True)
    return 0


def _export(args, parser) -> int:
    from sdft.run.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.model, args.merge, args.force)
    print(f"wrote {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})"
          if not (Path(out) / "adapter_config.json").exists() else
          f"wrote the LoRA adapter to {out}; load it with peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _train(args, parser) -> int:
    pairs = _overrides(parser, args.set)
    base = _run_settings(args.config)
    demo = args.model is None and args.data is None
    if demo and "save_total_limit" not in pairs and base is None:
        pairs["save_total_limit"] = str(DEMO_SAVE_TOTAL_LIMIT)
    for key, value in (("eval_data", args.eval_data), ("eval_scorer", args.scorer)):
        if value is not None:
            pairs[key] = value
    if args.no_eval:
        pairs["eval_data"] = ""
    config = SDFTConfig.from_strings(pairs, base)
    if args.scorer is not None and not config.eval_data:
        raise ValueError(f"--scorer {args.scorer} scores the answers to --eval-data: give --eval-data FILE")
    said = []  # what the run says once it starts; a dry run says it now
    # the rows are read once, here, before the model, and handed to the run (a Hub dataset is not fetched twice)
    checked = check_run(args.model, args.data, config, report=said.append)
    config, eval_examples = checked.config, checked.eval_examples
    check_launcher()  # before the model loads
    if args.dry_run:
        from sdft.run.dry_run import dry_run
        from sdft.run.prepare import data_notes

        processes = launched_size()
        print("\n".join(dry_run(checked.model, checked.examples, eval_examples, config, checked.resume, processes)
                        + said + [n for n in data_notes(checked.examples, eval_examples, config, processes) if n]),
              flush=True)
        return 0

    import torch

    from sdft import models
    from sdft.data.chat import with_template_kwargs
    from sdft.eval.evaluation import eval_table, skill_accuracy
    from sdft.eval.retention import summary as retention_summary
    from sdft.run.trainer import train
    from sdft.runtime.inference import run_device

    processes, rank = launched_size(), int(os.environ.get("RANK", "0"))
    # the bundled skill's before/after check is a one-process convenience; eval_data works on any number
    bundled_eval = not args.no_eval and args.data is None and not config.eval_data and processes == 1
    if bundled_eval:
        model, tokenizer = models.load_model(checked.model, getattr(torch, config.dtype))
        model.to(run_device(config.device))  # where the run trains it: both accuracies on the same device
        tokenizer = with_template_kwargs(tokenizer, config.chat_template_kwargs)
        print("skill accuracy before:", skill_accuracy(model, tokenizer), flush=True)
        result = train(model, None, config, tokenizer=tokenizer)  # the bundled skill
        print("skill accuracy after:", skill_accuracy(result.model, tokenizer), flush=True)
    else:  # train loads the model itself, once every row has been measured with its tokenizer
        result = train(checked.model, checked.examples, config, eval_dataset=eval_examples)
    if rank != 0:
        return 0
    if result.evaluations:
        print(f"evaluation on {config.eval_data or 'the retention data'} ({config.eval_scorer}):")
        print(eval_table(result.evaluations, eval_examples or []), flush=True)
        kept = retention_summary(result.evaluations)
        if kept:
            print(kept, flush=True)
    print(f"checkpoints and metrics.jsonl in {result.output_dir}"
          + (f"; the model in {result.output_dir / 'final_model'}" if config.save_final_model else ""))
    return 0


def _config(args, parser) -> int:
    if not args.show:
        parser.error("sdft config: pass --show")
    base = _config_file(args.source) if args.source is not None else None
    config = SDFTConfig.from_strings(_overrides(parser, args.set), base)
    print(config.to_json())
    return 0


def one_line(err: BaseException) -> str:
    """An error's text on one line (a library's message may span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _at_revision(args) -> None:
    """``--revision``: the Hub id given as the model, at that revision (its snapshot folder from here on)."""
    from sdft.models import hub

    revision = getattr(args, "revision", None)
    if revision is None:
        return
    if not hub.is_repo_id(args.model):
        raise ValueError(f"--revision {revision}: a revision goes with a Hugging Face Hub id as the model, not "
                         f"{args.model or 'the embedded model'}")
    args.model = hub.at_revision(args.model, revision)


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    from sdft.run.errors import NonFiniteError, OutOfMemory

    try:
        _at_revision(args)
        if args.command != "generate":  # generate also reads checkpoints: it checks its own model
            check_model_folder(getattr(args, "model", None), adapter_ok=args.command == "teacher-check")
        command = {"train": _train, "config": _config, "export": _export, "generate": _generate,
                   "teacher-check": _teacher_check, "continual": _continual}[args.command]
        return command(args, parser)
    except (ValueError, OSError, CheckpointError, NonFiniteError, OutOfMemory, TypeError) as err:
        print(f"sdft: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line (a run's says what it leaves), no traceback
        if not getattr(err, "sdft_reported", False):
            print("sdft: interrupted", file=sys.stderr)
        return 130


def entry():
    """The ``sdft`` command and ``python -m sdft.cli``: ``main``'s status as the process's exit status."""
    leave(main())


if __name__ == "__main__":
    entry()
