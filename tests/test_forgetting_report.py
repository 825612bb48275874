"""The forgetting benchmark's report: seed means and spreads, the skills-by-stage heatmap."""
from types import SimpleNamespace

import pytest

from benchmarks.bench_forgetting import plot_heatmap, seed_rows

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
