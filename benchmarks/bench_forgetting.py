"""Forgetting benchmark: SDFT vs SFT on SmolLM2-135M-Instruct, learning three skills one after another.

    python benchmarks/bench_forgetting.py                   # both methods, three skills
    python benchmarks/bench_forgetting.py --skills 1 --steps 20   # a quick single-skill run
    python benchmarks/bench_forgetting.py --only hashtags --validation 12   # one skill, model selection

Both methods get the same demonstrations, optimizer, learning rate, batch and number of steps per
skill. A thin caller of ``sdft.train_sequence`` (what ``sdft continual`` runs): after every stage the
sequence scores every skill's held-out accuracy and the retention check (the bundled general probe and
held-out text perplexity); during a stage the run evaluates the current skill every few steps (its
validation split with ``--validation``, then ending on the best point). Writes
benchmarks/results/forgetting.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.forgetting_skills import all_skills  # noqa: E402
from benchmarks.measure import environment, markdown_table, write_results  # noqa: E402
from sdft import SDFTConfig, train_sequence  # noqa: E402
from sdft.run.sequence import stage_dir  # noqa: E402

# name -> (train_sequence's method, config overrides)
# The paper's recipe (../shared/paper-facts.md): EMA teacher at rate 0.01, its template, 3 skipped loss
# tokens, one rollout, per-sequence means, sequence-level IS capped at 2, cosine schedule with warmup.
PAPER = {k: v for k, v in SDFTConfig.paper().to_dict().items()
         if k in ("teacher_mode", "ema_decay", "teacher_template", "num_loss_tokens_to_skip", "num_generations",
                  "loss_normalization", "distillation_is_clip", "distillation_is_level", "lr_scheduler_type",
                  "warmup_ratio")}
METHODS = {"sft": ("sft", {}), "sdft": ("sdft", {"teacher_mode": "frozen"}),
           "sdft_live_teacher": ("sdft", {"teacher_mode": "live"}),
           "sdft_ema": ("sdft", {"teacher_mode": "ema", "ema_decay": 0.99}),
           "sdft_paper": ("sdft", PAPER)}
# how plots name the methods (all use the fewshot teacher template except the paper recipe)
LABELS = {"sft": "SFT", "sdft": "SDFT, frozen teacher", "sdft_live_teacher": "SDFT, live teacher",
          "sdft_ema": "SDFT, EMA teacher", "sdft_paper": "SDFT, paper recipe"}
ANSWER_TOKENS = 48  # greedy tokens per held-out answer (skill_accuracy's default, which the results used)


def split_validation(rows: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """The last ``size`` training rows become the validation split (never trained on); the rest train."""
    if size <= 0:
        return rows, []
    if size >= len(rows):
        raise SystemExit(f"--validation {size} leaves no training rows (the skill has {len(rows)})")
    return rows[:-size], rows[-size:]


def exact_of(skill):
    """The skill's scorer as train_sequence takes one: the exact-match share of one answer."""
    return lambda answer, demonstration: skill.score(answer, demonstration)["exact"]


def _stage_records(folder: Path) -> tuple[list[dict], dict]:
    """A stage's evaluations (eval.json) and losses by step (metrics.jsonl)."""
    evals = json.loads((folder / "eval.json").read_text())
    losses = {r["step"]: r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}
    return evals, losses


def run_method(method: str, skills, args, work: Path, lr: float) -> dict:
    """One method through all skills in order (``sdft.train_sequence``); every stage's scores and the curve.

    Each stage evaluates the skill being learned every ``--curve-every`` steps: with ``--validation``
    on a validation split of its training rows (never trained on), ending at the best point
    (``load_best_model_at_end``, the earliest on ties), else on its first ``--curve-limit`` test
    prompts, ending at the last step. After each stage the sequence scores every skill's held-out
    test prompts and the bundled retention probe and text (the embedded model's).
    """
    kind, overrides = METHODS[method]
    splits = [split_validation(skill.train, args.validation) for skill in skills]
    config = SDFTConfig(**{
        **dict(output_dir=str(work), max_steps=args.steps, learning_rate=lr, per_device_train_batch_size=args.batch,
               num_generations=args.generations, max_completion_length=args.completion_length,
               divergence=args.divergence, save_steps=10**9, save_total_limit=1, progress_bar=False,
               eval_steps=args.curve_every, eval_max_new_tokens=ANSWER_TOKENS,
               load_best_model_at_end=bool(args.validation)),
        **overrides})  # the method's own settings win
    result = train_sequence(
        None, [rows for rows, _ in splits], config, names=[s.name for s in skills], method=kind,
        eval_stages=[s.eval[:args.eval_limit] for s in skills], eval_scorer=[exact_of(s) for s in skills],
        validation_stages=[val or s.eval[:args.curve_limit] for (_, val), s in zip(splits, skills)],
        stage_overrides=[{"seed": args.seed + k} for k in range(1, len(skills) + 1)])
    stages, curve = [], []
    for k, row in enumerate(result.matrix):
        stage = {"stage": k, "after": "base model" if k == 0 else row["after"],
                 **{s.name: row[s.name] for s in skills}, "general_questions": row["retention"],
                 "heldout_perplexity": row["text_perplexity"]}
        if k:
            folder = stage_dir(result.output_dir, k, row["after"])
            evals, losses = _stage_records(folder)
            stage["train_seconds"] = result.train_seconds[k - 1]
            if "selected_step" in row:
                stage["selected_step"] = row["selected_step"]
                stage["validation_accuracy"] = next(e["score"] for e in evals if e["step"] == row["selected_step"])
            curve += [{"step": (k - 1) * args.steps + e["step"], "skill": row["after"], "accuracy": e["score"],
                       "split": "validation" if args.validation else "test", "loss": losses.get(e["step"])}
                      for e in evals if e["step"] > 0]
        stages.append(stage)
        print(method, stage, flush=True)
    return {"stages": stages, "curve": curve, "method": method, "learning_rate": lr, "seed": args.seed}


def choose_skills(skills, count: int, only: list[str] | None):
    """The first ``count`` skills, or the ones named in ``only`` in that order."""
    if not only:
        return skills[:count]
    by_name = {s.name: s for s in skills}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise SystemExit(f"--only: unknown skill(s) {unknown}; choose from {sorted(by_name)}")
    return [by_name[name] for name in only]


def summary_rows(results: dict, skills) -> list[dict]:
    rows = []
    for method, res in results.items():
        base = res["stages"][0]
        for st in res["stages"]:
            row = {"method": method, "after": st["after"]}
            for s in skills:
                row[s.name] = st[s.name]
            row["general_questions"] = st["general_questions"]
            row["general_drop"] = base["general_questions"] - st["general_questions"]
            row["heldout_perplexity"] = st["heldout_perplexity"]
            row["perplexity_rise"] = st["heldout_perplexity"] - base["heldout_perplexity"]
            row["train_seconds"] = st.get("train_seconds")
            if "selected_step" in st:
                row["selected_step"] = st["selected_step"]
            rows.append(row)
    return rows


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (n is 1-3, too few for a standard deviation)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def seed_rows(results: dict, skills) -> list[dict]:
    """Mean and spread over the runs of each (method, learning rate), i.e. over its seeds, of the last
    stage: the learned skills' mean accuracy and the general questions kept."""
    groups: dict[tuple, list[dict]] = {}
    for res in results.values():
        groups.setdefault((res.get("method", "?"), res.get("learning_rate")), []).append(res)
    rows = []
    for (method, lr), runs in groups.items():
        learned = [sum(r["stages"][-1][s.name] for s in skills) / len(skills) for r in runs]
        kept = [r["stages"][-1]["general_questions"] for r in runs]
        row = {"method": method, "learning_rate": lr, "seeds": len(runs)}
        for key, values in (("new_skill", learned), ("general_questions", kept)):
            row[f"{key}_mean"], row[f"{key}_spread"] = mean_and_spread(values)
        rows.append(row)
    return rows


def plot_heatmap(results: dict, skills, path: Path):
    """One panel per run: rows the stages (base model, then each skill learned in turn), columns every
    skill's held-out accuracy and the general questions kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [s.name for s in skills] + ["general_questions"]
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results) + 0.8, 0.6 * len(skills) + 2.2),
                             squeeze=False, constrained_layout=True)
    for ax, (name, res) in zip(axes[0], results.items()):
        grid = [[st[c] for c in columns] for st in res["stages"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.5 else "white")
        ax.set_xticks(range(len(columns)), [c.replace("_", "\n") for c in columns], fontsize=7)
        labels = [st["after"] if st["stage"] == 0 else f"after {st['after']}" for st in res["stages"]]
        ax.set_yticks(range(len(grid)), labels if ax is axes[0][0] else [], fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="held-out accuracy")
    fig.suptitle("Every skill and the general questions after each stage (skills learned in turn)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, res in results.items():
        for name in dict.fromkeys(c["skill"] for c in res["curve"]):  # skills in the order learned
            pts = [c for c in res["curve"] if c["skill"] == name]
            ax.plot([p["step"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                    linestyle="--" if method.startswith("sft") else "-", label=f"{method}: {name}")
    ax.set_xlabel("optimizer step (skills learned one after another)")
    ax.set_ylabel("held-out accuracy of the skill being learned")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("SDFT vs SFT on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def draw_pareto(ax, by_method: dict[str, list[tuple]]):
    """One line per method through its (general kept, new-skill accuracy, learning rate[, x spread, y
    spread]) points in order of rate, each point labelled with its rate, spreads (over seeds) as error
    bars; both axes 0-1."""
    for method, points in by_method.items():
        points = sorted(points, key=lambda p: p[2] or 0)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=LABELS.get(method, method))
        for x, y, lr, *spread in points:
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if any(spread):
                ax.errorbar(x, y, xerr=spread[0], yerr=spread[1], color=line.get_color(), capsize=2, lw=0.8)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)


def plot_pareto(results: dict, skills, path: Path):
    """New-skill accuracy vs kept general answers after the last stage, one point per learning rate,
    one line per method (the paper's Pareto picture): up and to the right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_method: dict[str, list] = {}
    for res in results.values():
        last = res["stages"][-1]
        new = sum(last[s.name] for s in skills) / len(skills)
        by_method.setdefault(res.get("method", "?"), []).append((last["general_questions"], new,
                                                                 res.get("learning_rate")))
    draw_pareto(ax, by_method)
    ax.set_xlabel("general questions still answered right (prior capability)")
    ax.set_ylabel(f"held-out accuracy on the learned skill{'s' if len(skills) > 1 else ''}")
    ax.set_title("Learning vs forgetting, one point per learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["sft", "sdft"], choices=list(METHODS))
    p.add_argument("--skills", type=int, default=3, help="how many of the three skills to learn in turn")
    p.add_argument("--only", nargs="+", default=None, metavar="SKILL",
                   help="learn these skills, in this order, instead of the first --skills")
    p.add_argument("--validation", type=int, default=0,
                   help="hold out this many training rows per skill and end each stage at the curve point "
                        "with the best validation accuracy (model selection); 0: end at the last step")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per skill")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="a learning-rate sweep: every method at each (runs named method@lr; adds a Pareto plot)")
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--completion-length", type=int, default=24)
    p.add_argument("--divergence", default="forward_kl",
                   help="SDFT's divergence (forward KL learns fastest at this budget, see the README)")
    p.add_argument("--eval-limit", type=int, default=24, help="held-out prompts per skill at each stage")
    p.add_argument("--curve-every", type=int, default=10)
    p.add_argument("--curve-limit", type=int, default=12, help="held-out prompts per curve point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds: runs named method@lr#seed; adds mean and spread per method and rate")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="forgetting")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="earlier result JSON files whose methods join this table and plot")
    args = p.parse_args(argv)

    skills = choose_skills(all_skills(), args.skills, args.only)
    if args.validation and args.steps % args.curve_every:
        raise SystemExit(f"--validation selects among curve points: --steps {args.steps} must be a multiple "
                         f"of --curve-every {args.curve_every}")
    for skill in skills:  # a validation split too large for a skill is refused before any run starts
        split_validation(skill.train, args.validation)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for path in args.merge:
            results.update(json.loads(path.read_text())["results"])
        for seed in args.seeds or [args.seed]:
            for method in args.methods:
                for lr in args.lrs or [args.lr]:
                    name = (f"{method}@{lr:g}" if args.lrs else method) + (f"#{seed}" if args.seeds else "")
                    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
                    results[name] = run_method(method, skills, run_args, Path(work) / name, lr)
    rows = summary_rows(results, skills)
    env = environment(device)
    header = (f"# Forgetting: SDFT vs SFT, SmolLM2-135M-Instruct\n\nEnvironment: {env}. Settings: {vars(args)}. "
              "Skill columns: exact-match accuracy on held-out prompts; general_questions: share of general "
              "questions answered right; heldout_perplexity: plain text no run trains on.\n\n")
    columns = (
        ["method", "after"]
        + [s.name for s in skills]
        + ["general_questions", "general_drop", "heldout_perplexity", "perplexity_rise", "train_seconds"]
    )
    if args.validation:
        columns.append("selected_step")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
               "summary": rows}
    text = header + markdown_table(rows, columns)
    if args.seeds or any("#" in name for name in results):
        payload["seed_summary"] = seed_rows(results, skills)
        text += ("\n\nLast stage over seeds (mean, and half the range as spread): new_skill is the mean held-out "
                 "accuracy over the learned skills.\n\n" + markdown_table(
                     payload["seed_summary"], list(payload["seed_summary"][0])))
    write_results(args.out, args.tag, payload, text)
    plot(results, args.out / f"{args.tag}.png")
    if len(skills) > 1:
        plot_heatmap(results, skills, args.out / f"{args.tag}_heatmap.png")
    if args.lrs or any("@" in name for name in results):
        plot_pareto(results, skills, args.out / f"{args.tag}_pareto.png")


if __name__ == "__main__":
    main()
