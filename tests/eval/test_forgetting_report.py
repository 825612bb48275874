"""The forgetting benchmark's report (seed means and spreads, the skills-by-stage heatmap) and its
model selection (validation split, best checkpoint, chosen skills)."""
import json
from types import SimpleNamespace

import pytest

from benchmarks.bench_forgetting import choose_skills, plot_heatmap, seed_rows, split_validation

SKILLS = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]


def _run(method, lr, seed, a, b, general):
    base = {"stage": 0, "after": "base model", "a": 0.0, "b": 0.0, "general_questions": 1.0}
    return {"method": method, "learning_rate": lr, "seed": seed,
            "stages": [base, {"stage": 1, "after": "a", "a": a, "b": 0.0, "general_questions": 0.5},
                       {"stage": 2, "after": "b", "a": a, "b": b, "general_questions": general}]}


def test_seed_rows_average_each_method_and_rate_over_seeds():
    results = {"sft@1e-4#0": _run("sft", 1e-4, 0, 1.0, 0.5, 0.2), "sft@1e-4#1": _run("sft", 1e-4, 1, 0.5, 0.5, 0.4),
               "sdft@1e-4#0": _run("sdft", 1e-4, 0, 0.25, 0.25, 0.9)}
    rows = {r["method"]: r for r in seed_rows(results, SKILLS)}
    assert rows["sft"]["seeds"] == 2 and rows["sdft"]["seeds"] == 1
    assert rows["sft"]["new_skill_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert rows["sft"]["new_skill_spread"] == pytest.approx(0.125)
    assert rows["sft"]["general_questions_mean"] == pytest.approx(0.3)
    assert rows["sdft"]["general_questions_spread"] == 0


def test_heatmap_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = {"sft": _run("sft", 1e-4, 0, 1.0, 0.5, 0.2), "sdft": _run("sdft", 1e-4, 0, 0.25, 0.25, 0.9)}
    plot_heatmap(results, SKILLS, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_validation_split_is_the_last_rows_and_never_trained_on():
    rows = [{"i": i} for i in range(10)]
    train, val = split_validation(rows, 3)
    assert train == rows[:7] and val == rows[7:]
    assert split_validation(rows, 0) == (rows, [])
    with pytest.raises(SystemExit, match="leaves no training rows"):
        split_validation(rows, 10)


def test_only_chooses_skills_by_name_in_order_and_refuses_unknown_ones():
    skills = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    assert [s.name for s in choose_skills(skills, 2, None)] == ["a", "b"]
    assert [s.name for s in choose_skills(skills, 3, ["c", "a"])] == ["c", "a"]
    with pytest.raises(SystemExit, match="unknown skill"):
        choose_skills(skills, 3, ["d"])


def _sweep(skill, points):
    """A single-skill payload: points are (method, lr, new_skill, general_kept[, seed, validation])."""
    results = {}
    for method, lr, new, kept, *more in points:
        seed, validation = [*more, *(0, None)[len(more):]]
        base = {"stage": 0, "after": "base model", skill: 0.0, "general_questions": 1.0}
        last = {"stage": 1, "after": skill, skill: new, "general_questions": kept, "selected_step": 10}
        if validation is not None:
            last["validation_accuracy"] = validation
        results[f"{method}@{lr:g}#{seed}"] = {"method": method, "learning_rate": lr, "seed": seed,
                                              "stages": [base, last]}
    return {"results": results}


def _by_skill(*payloads):
    from benchmarks.forgetting_pareto import merge_by_skill, settings, sweep_points

    merged = merge_by_skill([sweep_points(p) for p in payloads])
    return {skill: settings(points) for skill, points in merged.items()}


def test_pareto_best_points_and_dominance_per_skill(tmp_path):
    from benchmarks.forgetting_pareto import dominance_rows, main

    a = _sweep("a", [("sft", 1e-4, 1.0, 0.2), ("sft", 3e-5, 1.0, 0.3), ("sdft_ema", 3e-5, 1.0, 0.5)])
    b = _sweep("b", [("sft", 1e-4, 0.9, 0.2), ("sdft_ema", 1e-4, 0.5, 0.9), ("sdft_ema", 3e-4, 0.8, 0.95)])
    rows = {r["skill"]: r for r in dominance_rows(_by_skill(a, b))}
    assert rows["a"]["sft_lr"] == 3e-5 and rows["a"]["sdft_dominates"]  # ties on skill: more kept wins
    assert rows["b"]["sdft_new_skill"] == 0.8 and not rows["b"]["sdft_dominates"]  # learns less
    paths = []
    for name, payload in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    pytest.importorskip("matplotlib")
    main([str(p) for p in paths] + ["--out", str(tmp_path), "--stem", "p"])
    assert "sdft_ema dominates SFT on 1 of 2 skills" in (tmp_path / "p.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_pareto_averages_seeds_and_counts_a_rerun_seed_once():
    sweep = _sweep("a", [("sft", 1e-4, 1.0, 0.2, 0), ("sdft", 1e-4, 0.5, 0.6, 0)])
    seeds = _sweep("a", [("sft", 1e-4, 0.0, 0.0, 0), ("sft", 1e-4, 0.5, 0.4, 1), ("sft", 1e-4, 0.75, 0.3, 2)])
    rows = {r["method"]: r for r in _by_skill(sweep, seeds)["a"]["sft"] + _by_skill(sweep, seeds)["a"]["sdft"]}
    assert rows["sft"]["seeds"] == 3  # seed 0 from the first file only
    assert rows["sft"]["new_skill"] == pytest.approx(0.75) and rows["sft"]["new_skill_spread"] == 0.25
    assert rows["sft"]["general_kept"] == pytest.approx(0.3) and rows["sft"]["general_kept_spread"] == 0.1
    assert rows["sdft"]["seeds"] == 1 and rows["sdft"]["new_skill_spread"] is None


def test_pareto_selects_on_validation_not_on_the_test_prompts():
    from benchmarks.forgetting_pareto import dominance_rows

    payload = _sweep("a", [("sft", 1e-4, 1.0, 0.1, 0, 0.5), ("sft", 3e-5, 0.5, 0.4, 0, 1.0),
                           ("sdft_ema", 3e-5, 0.5, 0.6, 0, 0.75)])
    (row,) = dominance_rows(_by_skill(payload))
    assert row["sft_lr"] == 3e-5 and row["sft_new_skill"] == 0.5  # best validation, not best test accuracy
    assert row["sdft_dominates"]


def test_pareto_refuses_a_multi_skill_run():
    from benchmarks.forgetting_pareto import sweep_points

    payload = _sweep("a", [("sft", 1e-4, 1.0, 0.2)])
    payload["results"]["sft@0.0001#0"]["stages"].append({"stage": 2, "after": "b", "general_questions": 0.1})
    with pytest.raises(SystemExit, match="single-skill"):
        sweep_points(payload)
