"""Measuring a run's rows before the weights load: templated chats a batch at a time against one by one.

Every run (and ``--dry-run``) turns each row's prompt and teacher context into token ids before training,
so that a row over the length limits is one line before a large model loads. ``batched`` is sdft's
``encode_examples`` (``sdft.data.chat.chat_ids_many``: ``apply_chat_template`` on a batch of chats, one
tokenizer call a batch); ``per_chat`` is the same loop with ``chat_ids`` called chat by chat, as before.
Both must give the same ids (checked here on every row). Tokenizer: SmolLM2-135M-Instruct's and its chat
template (``--tokenizer``, default ``.gpu_model``, the config and tokenizer ``gpu_suite.sh prepare`` keeps);
rows: arithmetic questions with short answers. Median of ``--reps`` after one warm-up, one process.

    python benchmarks/bench_encode_rows.py --rows 20000     # results/encode_rows_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.measure import write_report  # noqa: E402


def per_chat(examples, tokenizer, config) -> list:
    """The encoding before batching: ``chat_ids`` per prompt and per teacher context."""
    from sdft.data.chat import chat_ids
    from sdft.data.templates import teacher_messages

    return [(chat_ids(tokenizer, ex.messages(), "cpu"),
             chat_ids(tokenizer, teacher_messages(ex.messages(), ex.demonstration, config.teacher_template), "cpu"))
            for ex in examples]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokenizer", default=str(ROOT / ".gpu_model"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--stem", default="encode_rows_cpu")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sdft.config import SDFTConfig
    from sdft.data.examples import load_examples
    from sdft.run.trainer import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = SDFTConfig(device="cpu")
    table = []
    for n in args.rows:
        examples = load_examples([{"prompt": f"What is {i} plus {i + 1}? Answer with a number.",
                                   "demonstration": str(2 * i + 1)} for i in range(n)])
        seconds = {}
        for side, encode in (("per_chat", per_chat), ("batched", encode_examples)):
            encode(examples[:64], tokenizer, config)  # warm-up: the template compiles once
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                out = encode(examples, tokenizer, config)
                times.append(time.perf_counter() - start)
            seconds[side] = statistics.median(times)
            ids = [(a.tolist(), b.tolist()) for a, b in
                   ((e.prompt_ids, e.teacher_ids) if side == "batched" else e for e in out)]
            if side == "per_chat":
                reference = ids
            elif ids != reference:
                raise SystemExit(f"batched ids differ from per-chat ids at {n} rows")
        table.append({"rows": n, "per_chat_s": seconds["per_chat"], "batched_s": seconds["batched"],
                      "speedup": seconds["per_chat"] / seconds["batched"], "same_ids": True})
        print(table[-1], flush=True)
    command = "python benchmarks/bench_encode_rows.py " + " ".join(sys.argv[1:])
    write_report(Path(args.out), args.stem, "Measuring a run's rows: batched chat templates vs one chat at a time",
                 f"SmolLM2-135M-Instruct's tokenizer and chat template, prompt + teacher context per row, median of "
                 f"{args.reps} after a warm-up.", command.strip(), {"rows": table}, table)


if __name__ == "__main__":
    main()
