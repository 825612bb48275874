"""Skills in sequence: train stage after stage from the previous stage's weights, and after every stage
score every stage's held-out set and what the model must keep (``retention_data`` / ``retention_text``),
into a stage x skill matrix: the picture of what continual learning kept and lost.

    result = sdft.train_sequence(None, ["a.jsonl", "b.jsonl"], config, eval_stages=["a_eval.jsonl", ...])
    result.matrix   # rows: "base", then each stage; columns: each stage's skill, then retention

Each stage is an ordinary run (``sdft.train``, or ``sdft.train_sft`` for the baseline) in
``output_dir/stage-K-NAME`` with a fresh optimizer; the next stage starts from its weights. The matrix
is written after every stage (``sequence.json``, ``sequence.md``, ``sequence.png``), so a crash loses
at most the stage it interrupted: with ``resume_from_checkpoint=true`` the sequence skips the stages
the matrix holds, starts the next from the last finished stage's ``final_model`` and resumes that
stage from its newest checkpoint (a seed fixes the rest, so the matrix equals an uninterrupted run's).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdft.config import SDFTConfig
from sdft.data.chat import with_template_kwargs
from sdft.data.examples import load_examples
from sdft.data.sources import HELD_OUT_SPLIT
from sdft.eval import retention
from sdft.eval.evaluation import evaluate
from sdft.eval.scorers import get_scorer
from sdft.models import load_model
from sdft.models.loading import is_embedded, load_tokenizer
from sdft.models.positions import position_limit
from sdft.run.prepare import as_config
from sdft.run.run_dir import FINAL_MODEL, replace_file, report_line
from sdft.run.schedule import LRSchedule

SEQUENCE_FILE = "sequence.json"
OUTPUTS = (SEQUENCE_FILE, "sequence.md", "sequence.png")  # what a sequence writes in output_dir, beside its stages
KEPT, TEXT_PPL = "retention", "text_perplexity"


@dataclass
class SequenceResult:
    model: object
    tokenizer: object
    stages: list[str]  # the stages' names, in training order
    matrix: list[dict] = field(default_factory=list)  # {"after": "base" | stage, skill: score, ..., retention}
    output_dir: Path | None = None
    train_seconds: list = field(default_factory=list)  # per stage, trained by this call (None: done before)


def stage_names(stages, given=None) -> list[str]:
    """A name per stage: ``given``'s, else its file's stem, else ``stage-K``; made unique."""
    if given is not None and len(given) != len(stages):
        raise ValueError(f"{len(given)} names for {len(stages)} stages: give one name per stage")
    names = []
    for k, stage in enumerate(stages, 1):
        if given is not None:
            raw = Path(str(given[k - 1])).name
        else:
            raw = Path(stage).stem if isinstance(stage, (str, Path)) else None
        name = re.sub(r"[^\w.-]+", "-", raw) if raw is not None else f"stage-{k}"
        names.append(name if name not in names else f"{name}-{k}")
    return names


def stage_dir(root: Path, k: int, name: str) -> Path:
    """The output_dir of stage ``k`` (from 1) named ``name``: its checkpoints, eval.json, final_model."""
    return Path(root) / f"stage-{k}-{name}"


def check_stages(stages, eval_stages, validation_stages=None, load_best: bool = False,
                 during: str | None = None, column_map: dict | None = None) -> tuple[list, list, list]:
    """Every stage's rows (held-out and validation rows too, read through ``column_map``) read and checked now,
    before any model loads; ``load_best`` (``load_best_model_at_end``) and ``during``
    (``SDFTConfig.evaluation_rule``: evaluations as a stage trains) need the validation sets a stage's run
    evaluates."""
    if not stages:
        raise ValueError("train_sequence needs at least one stage")
    if during and validation_stages is None:
        raise ValueError(f"{during} in a sequence evaluates each stage's validation set as it trains "
                         "(held-out sets are scored between the stages): give validation_stages "
                         "(--validation-stages), or set eval_steps=0 and eval_strategy=steps")
    if load_best and validation_stages is None:
        raise ValueError("load_best_model_at_end in a sequence ends each stage on its best validation point: "
                         "give validation_stages (--validation-stages), one set per stage")
    found = []
    for what, sets in (("eval", eval_stages), ("validation", validation_stages)):
        if sets is not None and len(sets) != len(stages):
            kind = "held-out" if what == "eval" else what
            raise ValueError(f"{len(sets)} {what} stages for {len(stages)} stages: give one {kind} set per stage")
        found.append([load_examples(s, split=HELD_OUT_SPLIT, column_map=column_map) for s in sets]
                     if sets is not None else [None] * len(stages))
    return [load_examples(s, column_map=column_map) for s in stages], *found


def check_stage_rows(names, rows, configs, tokenizer, encode, done: int, positions: int | None = None) -> None:
    """The rows of every stage still to train (after the first ``done``) measured with ``tokenizer`` by the
    method's ``encode`` under the stage's own config (and the model's ``positions``): a row over a length
    limit in a late stage is one line naming that stage before the first one trains."""
    for k in range(done, len(names)):
        try:
            encode(rows[k], tokenizer, configs[k], positions=positions)
        except ValueError as err:
            raise ValueError(f"stage {k + 1} ({names[k]}): {err}") from None


def _stage_config(config: SDFTConfig, root: Path, k: int, name: str, resume: bool, overrides: dict) -> SDFTConfig:
    """Stage k's run: ``config`` and the stage's own ``overrides`` in its folder; the sequence scores
    held-out sets and retention itself, so the stage evaluates only its validation rows."""
    values = {**config.to_dict(), **overrides, "output_dir": str(stage_dir(root, k, name)), "eval_data": "",
              "retention_data": "", "retention_text": "", "resume_from_checkpoint": resume and
              stage_dir(root, k, name).exists(), "save_final_model": True}
    try:
        return SDFTConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"stage {k} ({name}): {err}") from None


def _read_matrix(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err}); move it away to start the sequence afresh") from None
    if not isinstance(record, dict) or record.get("written_by") != "sdft.train_sequence":
        raise ValueError(f"{path} was not written by sdft.train_sequence: it is left alone; choose another "
                         "output_dir")
    return record["matrix"]


def score_row(model, tokenizer, after: str, names, eval_rows, scorers, kept, max_new_tokens: int) -> dict:
    """One row of the matrix: every stage's held-out score (with that stage's scorer) and what the model
    kept, after ``after``."""
    row = {"after": after}
    for name, rows, scorer in zip(names, eval_rows, scorers):
        if rows is not None:
            row[name] = evaluate(model, tokenizer, rows, scorer, max_new_tokens)["score"]
    if kept is not None:
        found = retention.score(model, tokenizer, kept)
        if "retention_score" in found:
            row[KEPT] = found["retention_score"]
        if "retention_text_perplexity" in found:
            row[TEXT_PPL] = found["retention_text_perplexity"]
    return row


def check_sequence_folder(root: Path, resume: bool) -> None:
    """A sequence that does not resume never writes over an earlier sequence's files (or a user's of the
    same names) in ``root``; ``sdft continual`` asks this before the model loads."""
    for name in OUTPUTS if not resume else ():
        if (root / name).exists():
            raise ValueError(f"{root / name} exists: set resume_from_checkpoint=true to continue that sequence, "
                             "or choose another output_dir")


def train_sequence(model=None, stages=(), config: SDFTConfig | dict | None = None, tokenizer=None, *,
                   eval_stages=None, method: str = "sdft", eval_scorer=None, validation_stages=None,
                   stage_overrides=None, names=None) -> SequenceResult:
    """Train ``stages`` (datasets, as ``sdft.train`` takes them) one after another; see the module doc.

    ``eval_stages``: one held-out set per stage (None: only retention is scored). ``method``: ``sdft``
    or ``sft`` (the same stages with plain SFT: the paper's comparison). ``eval_scorer``: a scorer as
    ``sdft.train`` takes it, or a list of one per stage (default ``config.eval_scorer``).
    ``validation_stages``: one set per stage that its run evaluates (before training, every
    ``eval_steps``, at the end; the stage's ``eval.json``); with ``load_best_model_at_end`` each stage
    ends on its best validation point and the next starts there (the paper's model selection).
    ``stage_overrides``: one dict of config values per stage (a seed, steps, a learning rate).
    ``names``: one name per stage, for the matrix and the stage folders (default: the files' stems).
    """
    from sdft.run.sft import encode_demonstrations, train_sft
    from sdft.run.trainer import encode_examples, train

    config = as_config(config)
    if method not in ("sdft", "sft"):
        raise ValueError(f"method={method!r}: expected sdft or sft")
    if config.use_lora:
        raise ValueError("train_sequence trains full weights from stage to stage; use_lora is not supported here")
    names = stage_names(stages, names)
    train_rows, eval_rows, validation_rows = check_stages(stages, eval_stages, validation_stages,
                                                          config.load_best_model_at_end, config.evaluation_rule,
                                                          config.column_map)
    overrides = list(stage_overrides) if stage_overrides is not None else [{}] * len(names)
    if len(overrides) != len(names) or not all(isinstance(o, dict) for o in overrides):
        raise ValueError(f"stage_overrides: give one dict of config values per stage ({len(names)})")
    scorers = stage_scorers(eval_scorer if eval_scorer is not None else config.eval_scorer, len(names))
    kept = retention.resolve(config.retention_data, config.retention_text, config.retention_scorer,
                             is_embedded(model), evaluating=True, report=report_line)
    if eval_stages is None and kept is None:
        report_line("sdft: no eval_stages and no retention check: nothing is scored between the stages, so the "
                    "matrix holds no scores; give a held-out set per stage (--eval-stages) to see what each kept")
    root = Path(config.output_dir)
    matrix_path = root / SEQUENCE_FILE
    resume = bool(config.resume_from_checkpoint)
    stage_configs = [_stage_config(config, root, k, names[k - 1], resume, overrides[k - 1])
                     for k in range(1, len(names) + 1)]  # a bad override is one line now, not at its stage
    for stage_config in stage_configs:
        LRSchedule.from_config(stage_config).check()
    matrix = _read_matrix(matrix_path) if resume else []
    check_sequence_folder(root, resume)
    done = max(0, len(matrix) - 1)  # row 0 is the base model
    dtype = getattr(torch, config.dtype)
    encode = encode_examples if method == "sdft" else encode_demonstrations
    source = stage_dir(root, done, names[done - 1]) / FINAL_MODEL if done else model
    if isinstance(model, torch.nn.Module) and not done and tokenizer is None:
        raise ValueError("pass the tokenizer together with a model object")
    measured = tokenizer if not done and tokenizer is not None else (
        load_tokenizer(source) if source is None or isinstance(source, (str, Path)) else None)
    positions = position_limit(source)
    if measured is not None:  # every stage's rows against the length limits, before the model loads
        measured = with_template_kwargs(measured, config.chat_template_kwargs)
        check_stage_rows(names, train_rows, stage_configs, measured, encode, done, positions)
    if done or model is None or isinstance(model, (str, Path)):
        model, tokenizer = load_model(source, dtype)
    tokenizer = with_template_kwargs(tokenizer, config.chat_template_kwargs)  # the matrix's scoring too
    if measured is None:  # the embedded model's first load: its tokenizer comes with it
        check_stage_rows(names, train_rows, stage_configs, tokenizer, encode, done, positions)
    root.mkdir(parents=True, exist_ok=True)
    if not matrix:
        matrix = [score_row(model, tokenizer, "base", names, eval_rows, scorers, kept, config.eval_tokens)]
        _write(root, names, matrix, method)
    run = train if method == "sdft" else train_sft
    seconds = [None] * len(names)
    for k in range(done + 1, len(stages) + 1):
        stage_config = stage_configs[k - 1]
        report_line(f"sdft: stage {k}/{len(stages)} ({names[k - 1]}, {method}) in {stage_config.output_dir}")
        t0 = time.perf_counter()  # kept beside the matrix: a resumed matrix equals an uninterrupted one
        result = run(model, train_rows[k - 1], stage_config, tokenizer=tokenizer, eval_scorer=scorers[k - 1],
                     eval_dataset=validation_rows[k - 1])
        seconds[k - 1] = time.perf_counter() - t0
        model = result.model
        row = score_row(model, tokenizer, names[k - 1], names, eval_rows, scorers, kept, config.eval_tokens)
        if result.best_step is not None:
            row["selected_step"] = result.best_step
        matrix.append(row)
        _write(root, names, matrix, method)
        scores = format_row(matrix[-1], names)
        if scores:
            report_line("sdft: after " + names[k - 1] + ": " + scores)
    return SequenceResult(model, tokenizer, names, matrix, root, seconds)


def stage_scorers(spec, count: int) -> list:
    """One scorer per stage from one spec for all or a list of one per stage."""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    specs = specs * count if len(specs) == 1 else specs
    if len(specs) != count:
        raise ValueError(f"{len(specs)} scorers for {count} stages: give one for all or one per stage")
    return [get_scorer(s) for s in specs]


def format_row(row: dict, names) -> str:
    parts = [f"{n} {row[n]:.0%}" for n in names if n in row]
    if KEPT in row:
        parts.append(f"kept {row[KEPT]:.0%}")
    if TEXT_PPL in row:
        parts.append(f"text perplexity {row[TEXT_PPL]:.2f}")
    return ", ".join(parts)


def matrix_markdown(matrix: list[dict], names, title: str) -> str:
    """The stage x skill matrix as a markdown table (scores as percentages, perplexity as is)."""
    columns = [n for n in names if any(n in r for r in matrix)] + [c for c in (KEPT, TEXT_PPL)
                                                                   if any(c in r for r in matrix)]
    lines = [f"### {title}", "", "| after | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in matrix:
        cells = [f"{row[c]:.2f}" if c == TEXT_PPL else f"{row[c]:.0%}" if c in row else "-" for c in columns]
        lines.append(f"| {row['after']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(root: Path, names, matrix: list[dict], method: str):
    """sequence.json / .md / .png, each through a temporary file and a rename."""
    record = {"written_by": "sdft.train_sequence", "method": method, "stages": names, "matrix": matrix}
    replace_file(root / SEQUENCE_FILE, json.dumps(record, indent=1))
    replace_file(root / "sequence.md", matrix_markdown(matrix, names, f"{method.upper()}: score after each stage"))
    plot_matrices({method: matrix}, names, root / "sequence.png")


def plot_matrices(matrices: dict[str, list[dict]], names, path: Path):
    """One heatmap per method (rows: after each stage; columns: skills, then retention), side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the JSON and markdown hold the same figures
    columns = list(names) + [KEPT]
    size = (1.3 * len(columns) * len(matrices) + 1, 0.6 * (len(names) + 2))
    fig, axes = plt.subplots(1, len(matrices), figsize=size, squeeze=False)
    for ax, (method, matrix) in zip(axes[0], matrices.items()):
        values = [[row.get(c, float("nan")) for c in columns] for row in matrix]
        ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(matrix)), [r["after"] for r in matrix])
        ax.set_title(method.upper())
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="white" if v < 0.6 else "black")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


