"""Learning vs forgetting across skills: one Pareto panel per single-skill sweep, and whether SDFT's best
point dominates SFT's on each skill (the forgetting issue's target).

    python benchmarks/forgetting_pareto.py benchmarks/results/forgetting_lr_sweep_{tool_calls,shopping_list,hashtags}.json

Each input is a ``bench_forgetting.py --lrs ... --only SKILL`` result. A method's best point is its run
with the highest held-out accuracy on the skill, the most general questions kept on ties. SDFT
dominates on a skill when its best point learns no less and keeps more. Writes
benchmarks/results/forgetting_pareto_skills.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_forgetting import draw_pareto  # noqa: E402
from benchmarks.measure import markdown_table, write_results  # noqa: E402


def sweep_points(payload: dict) -> tuple[str, dict[str, list[dict]]]:
    """(skill, method -> points) of one single-skill result: a point per run after its last stage."""
    skills = {st["after"] for res in payload["results"].values() for st in res["stages"][1:]}
    if len(skills) != 1:
        raise SystemExit(f"expected a single-skill sweep, found skills {sorted(skills)}")
    skill = skills.pop()
    methods: dict[str, list[dict]] = {}
    for name, res in payload["results"].items():
        last = res["stages"][-1]
        methods.setdefault(res.get("method", name), []).append(
            {"run": name, "learning_rate": res.get("learning_rate"), "new_skill": last[skill],
             "general_kept": last["general_questions"], "selected_step": last.get("selected_step"),
             "train_seconds": last.get("train_seconds")})
    return skill, methods


def best_point(points: list[dict]) -> dict:
    return max(points, key=lambda p: (p["new_skill"], p["general_kept"]))


def dominance_rows(sweeps: list[tuple[str, dict]], sdft: str = "sdft_ema", sft: str = "sft") -> list[dict]:
    """Per skill: both methods' best points and whether SDFT's dominates SFT's."""
    rows = []
    for skill, methods in sweeps:
        if sdft not in methods or sft not in methods:
            continue
        a, b = best_point(methods[sdft]), best_point(methods[sft])
        rows.append({"skill": skill, "sft_lr": b["learning_rate"], "sft_new_skill": b["new_skill"],
                     "sft_general_kept": b["general_kept"], "sdft_lr": a["learning_rate"],
                     "sdft_new_skill": a["new_skill"], "sdft_general_kept": a["general_kept"],
                     "sdft_dominates": a["new_skill"] >= b["new_skill"] and a["general_kept"] > b["general_kept"]})
    return rows


def plot_panels(sweeps: list[tuple[str, dict]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 4), squeeze=False, constrained_layout=True)
    for ax, (skill, methods) in zip(axes[0], sweeps):
        draw_pareto(ax, {method: [(p["general_kept"], p["new_skill"], p["learning_rate"]) for p in points]
                         for method, points in methods.items()})
        ax.set_title(skill, fontsize=10)
        ax.set_xlabel("general questions kept")
    axes[0][0].set_ylabel("held-out accuracy on the skill")
    fig.suptitle("Learning vs forgetting per skill, one point per learning rate (up and right is better)",
                 fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default="forgetting_pareto_skills")
    args = p.parse_args(argv)
    sweeps = [sweep_points(json.loads(path.read_text())) for path in args.sweeps]
    rows = dominance_rows(sweeps)
    points = [{"skill": skill, "method": method, **pt} for skill, methods in sweeps
              for method, pts in methods.items() for pt in pts]
    sources = ", ".join(f"`{path.name}`" for path in args.sweeps)
    text = (f"# Learning vs forgetting per skill\n\nFrom {sources}. Best point of a method: highest held-out "
            "accuracy on the skill, then most general questions kept. SDFT dominates when its best point learns "
            "no less and keeps more.\n\n" + markdown_table(rows, list(rows[0]) if rows else ["skill"])
            + f"\n\nSDFT dominates on {sum(r['sdft_dominates'] for r in rows)} of {len(rows)} skills.\n\n"
            "Every point:\n\n" + markdown_table(points, list(points[0])))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, args.stem, {"sources": [str(p) for p in args.sweeps], "best": rows, "points": points},
                  text)
    plot_panels(sweeps, args.out / f"{args.stem}.png")


if __name__ == "__main__":
    main()
