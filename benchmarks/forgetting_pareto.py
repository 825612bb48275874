"""Learning vs forgetting across skills: one Pareto panel per skill, and whether each SDFT variant's
selected setting dominates SFT's on each skill (the forgetting issue's target).

    python benchmarks/forgetting_pareto.py \
        benchmarks/results/forgetting_lr_sweep_{tool_calls,shopping_list,hashtags}.json

Each input is a ``bench_forgetting.py --only SKILL`` result (a learning-rate sweep, seeds, or both);
files of the same skill are merged, each (method, rate, seed) counted once (the first file's run). A
setting is a (method, learning rate): its accuracy and general questions kept are means over its
seeds, with half the range as spread. A method's selected setting is the one with the best mean
validation accuracy, then the most general questions kept (the paper selects on a validation split,
never on the test prompts); runs without a validation split fall back to their held-out accuracy.
SDFT dominates on a skill when its selected setting learns no less and keeps more, on the means.
Writes benchmarks/results/forgetting_pareto_skills.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_forgetting import draw_pareto, mean_and_spread  # noqa: E402
from benchmarks.measure import markdown_table, write_results  # noqa: E402

SFT = "sft"


def sweep_points(payload: dict) -> tuple[str, list[dict]]:
    """(skill, a point per run after its last stage) of a single-skill result."""
    skills = {st["after"] for res in payload["results"].values() for st in res["stages"][1:]}
    if len(skills) != 1:
        raise SystemExit(f"expected a single-skill sweep, found skills {sorted(skills)}")
    skill = skills.pop()
    points = []
    for name, res in payload["results"].items():
        last = res["stages"][-1]
        points.append({"method": res.get("method", name), "run": name, "learning_rate": res.get("learning_rate"),
                       "seed": res.get("seed", 0), "new_skill": last[skill],
                       "general_kept": last["general_questions"], "validation": last.get("validation_accuracy"),
                       "selected_step": last.get("selected_step"), "train_seconds": last.get("train_seconds")})
    return skill, points


def merge_by_skill(sweeps: list[tuple[str, list[dict]]]) -> dict[str, list[dict]]:
    """skill -> its runs from every file, each (method, rate, seed) once: a seed file that re-ran the
    sweep's seed 0 does not count it twice."""
    merged: dict[str, dict[tuple, dict]] = {}
    for skill, points in sweeps:
        runs = merged.setdefault(skill, {})
        for pt in points:
            runs.setdefault((pt["method"], pt["learning_rate"], pt["seed"]), pt)
    return {skill: list(runs.values()) for skill, runs in merged.items()}


def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    """``mean_and_spread``, with no spread from one seed."""
    mean, spread = mean_and_spread(values)
    return mean, spread if len(values) > 1 else None


def settings(points: list[dict]) -> dict[str, list[dict]]:
    """method -> a row per learning rate: means over its seeds, half the range as spread."""
    groups: dict[tuple, list[dict]] = {}
    for pt in points:
        groups.setdefault((pt["method"], pt["learning_rate"]), []).append(pt)
    out: dict[str, list[dict]] = {}
    for (method, lr), runs in groups.items():
        row = {"method": method, "learning_rate": lr, "seeds": len(runs)}
        for key in ("new_skill", "general_kept"):
            row[key], row[f"{key}_spread"] = _mean_spread([r[key] for r in runs])
        validation = [r["validation"] for r in runs if r["validation"] is not None]
        row["validation"] = statistics.fmean(validation) if len(validation) == len(runs) else None
        seconds = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        row["train_seconds"] = statistics.fmean(seconds) if seconds else None
        out.setdefault(method, []).append(row)
    return out


def selected(rows: list[dict]) -> dict:
    """The setting a practitioner would pick: best validation accuracy, then most general questions kept."""
    return max(rows, key=lambda r: (r["new_skill"] if r["validation"] is None else r["validation"],
                                    r["general_kept"]))


def dominance_rows(by_skill: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """Per skill and SDFT variant: both selected settings and whether SDFT's dominates SFT's."""
    rows = []
    for skill, methods in by_skill.items():
        if SFT not in methods:
            continue
        b = selected(methods[SFT])
        for method in sorted(m for m in methods if m != SFT):
            a = selected(methods[method])
            row = {"skill": skill, "sdft": method}
            for side, pick in ((SFT, b), ("sdft", a)):
                row.update({f"{side}_lr": pick["learning_rate"], f"{side}_seeds": pick["seeds"],
                            f"{side}_new_skill": pick["new_skill"], f"{side}_general_kept": pick["general_kept"]})
            row["sdft_dominates"] = a["new_skill"] >= b["new_skill"] and a["general_kept"] > b["general_kept"]
            rows.append(row)
    return rows


def plot_panels(by_skill: dict[str, dict[str, list[dict]]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_skill), figsize=(4.2 * len(by_skill), 4), squeeze=False,
                             constrained_layout=True)
    for ax, (skill, methods) in zip(axes[0], by_skill.items()):
        draw_pareto(ax, {method: [(r["general_kept"], r["new_skill"], r["learning_rate"], r["general_kept_spread"],
                                   r["new_skill_spread"]) for r in rows] for method, rows in methods.items()})
        ax.set_title(skill, fontsize=10)
        ax.set_xlabel("general questions kept")
    axes[0][0].set_ylabel("held-out accuracy on the skill")
    fig.suptitle("Learning vs forgetting per skill, one point per learning rate (means over seeds; up and "
                 "right is better)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="forgetting_pareto_skills")
    args = p.parse_args(argv)
    merged = merge_by_skill([sweep_points(json.loads(path.read_text())) for path in args.sweeps])
    by_skill = {skill: settings(points) for skill, points in merged.items()}
    rows = dominance_rows(by_skill)
    table = [{"skill": skill, **row} for skill, methods in by_skill.items() for rows_ in methods.values()
             for row in rows_]
    wins = {}
    for r in rows:
        wins.setdefault(r["sdft"], []).append(r["sdft_dominates"])
    verdict = "; ".join(f"{method} dominates SFT on {sum(v)} of {len(v)} skills" for method, v in wins.items())
    sources = ", ".join(f"`{path.name}`" for path in args.sweeps)
    text = (f"# Learning vs forgetting per skill\n\nFrom {sources}. A setting is a method at one learning rate; "
            "its numbers are means over its seeds (spread: half the range). Selected setting of a method: best "
            "mean validation accuracy, then most general questions kept (held-out accuracy where a run had no "
            "validation split). SDFT dominates when its selected setting learns no less and keeps more.\n\n"
            + markdown_table(rows, list(rows[0]) if rows else ["skill"]) + f"\n\n{verdict or 'no SDFT runs'}.\n\n"
            "Every setting:\n\n" + markdown_table(table, list(table[0])))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, args.stem, {"sources": [str(p) for p in args.sweeps], "selected": rows,
                                        "settings": table, "runs": merged}, text)
    plot_panels(by_skill, args.out / f"{args.stem}.png")


if __name__ == "__main__":
    main()
