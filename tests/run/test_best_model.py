"""load_best_model_at_end: a run ends on the weights of its best evaluation (the earliest on ties), through a
resume too, and says so before the model loads when there is nothing to rank by."""
import json

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train, train_sequence
from sdft.models.loading import load_trained
from sdft.run.best import BestWeights

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]


def scripted(scores):
    """A scorer whose n-th call returns scores[n] (one held-out row: one call per evaluation)."""
    calls = iter(scores)
    return lambda answer, demonstration: next(calls)


def _run(out, scores, steps=4, **change):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    values = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1, num_generations=2,
                  max_completion_length=4, save_steps=1, eval_steps=1, progress_bar=False, device="cpu",
                  learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0, load_best_model_at_end=True)
    config = SDFTConfig(**{**values, **change})
    return train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_scorer=scripted(scores),
                 eval_dataset=ROWS[:1])


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_the_run_ends_on_the_best_evaluation_and_the_earliest_of_a_tie(tmp_path):
    # evaluations at steps 0..4; best 0.9 at step 1 and again at step 3: step 1 wins
    result = _run(tmp_path / "best", [0.2, 0.9, 0.5, 0.9, 0.1])
    assert result.best_step == 1
    at_step_1 = _run(tmp_path / "one", [0.0, 0.0], steps=1, load_best_model_at_end=False)
    assert _same(result.model, at_step_1.model)
    final, _ = load_trained(tmp_path / "best" / "final_model")
    assert _same(final, at_step_1.model)
    assert json.loads((tmp_path / "best" / "best_weights.json").read_text())["step"] == 1
    assert [r["score"] for r in result.evaluations] == [0.2, 0.9, 0.5, 0.9, 0.1]


def test_the_last_step_is_kept_when_it_is_the_best(tmp_path):
    result = _run(tmp_path / "last", [0.1, 0.2, 0.3, 0.4, 0.5])
    assert result.best_step == 4
    assert not _same(result.model, _run(tmp_path / "one", [0.0, 0.0], steps=1, load_best_model_at_end=False).model)


def test_a_resumed_run_ends_on_the_same_best_weights(tmp_path):
    whole = _run(tmp_path / "whole", [0.2, 0.9, 0.5, 0.9, 0.1])
    _run(tmp_path / "cut", [0.2, 0.9, 0.5], steps=2)
    (tmp_path / "cut" / "best_weights.pt.tmp").write_bytes(b"half written")  # a crash while writing a pick
    resumed = _run(tmp_path / "cut", [0.9, 0.1], resume_from_checkpoint=True)
    assert resumed.best_step == 1
    assert _same(resumed.model, whole.model)
    assert not (tmp_path / "cut" / "best_weights.pt.tmp").exists()


def test_perplexity_ranks_lowest_first_and_nan_never_wins(tmp_path):
    best = BestWeights(tmp_path, "perplexity", write=False)
    assert best.better(0, 9.0)
    best.step, best.value = 0, 9.0
    assert best.better(2, 8.0) and not best.better(2, 10.0) and not best.better(2, float("nan"))
    scored = BestWeights(tmp_path, "score", write=False)
    scored.step, scored.value = 3, 0.5
    assert scored.better(1, 0.5) and not scored.better(4, 0.5) and scored.better(4, 0.6)


@pytest.mark.parametrize("change,message", [
    (dict(), "load_best_model_at_end ranks the evaluations on eval_data by score: give eval_data"),
    (dict(eval_data="", metric_for_best_model="retention_score"), "metric_for_best_model=retention_score needs"),
])
def test_nothing_to_rank_by_is_one_line_before_the_model_loads(tmp_path, change, message):
    config = SDFTConfig(output_dir=str(tmp_path), load_best_model_at_end=True, device="cpu", **change)
    with pytest.raises(ValueError, match=message):
        train("/nonexistent/model", ROWS, config)


def test_fsdp_is_refused_with_load_best():
    with pytest.raises(ValueError, match="not supported with parallel=fsdp"):
        SDFTConfig(load_best_model_at_end=True, parallel="fsdp")


def test_a_sequence_selects_each_stage_on_its_validation_rows(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = SDFTConfig(output_dir=str(tmp_path / "seq"), max_steps=2, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=4, save_steps=1, eval_steps=1, progress_bar=False,
                        device="cpu", load_best_model_at_end=True, retention_data="", retention_text="")
    # stage 1 evaluates at steps 0, 1, 2 and its best is step 1; stage 2's best is step 0 (its start)
    stage_scores = [scripted([0.1, 0.8, 0.3]), scripted([0.7, 0.2, 0.2])]
    result = train_sequence(tiny_llama(vocab=len(tok)), [ROWS, ROWS], config, tok, validation_stages=[ROWS[:1]] * 2,
                            eval_scorer=stage_scores)
    assert [row.get("selected_step") for row in result.matrix] == [None, 1, 0]
    assert all(s is not None and s > 0 for s in result.train_seconds)
    with pytest.raises(ValueError, match="give validation_stages"):
        train_sequence(None, [ROWS], config)


def test_best_weights_keep_the_earliest_best_and_restore_them(tmp_path):
    model = torch.nn.Linear(2, 2)
    best = BestWeights(tmp_path, "score")
    snapshots = {}
    for step, score in ((0, 0.0), (10, 0.5), (20, 0.5), (30, 0.25)):
        with torch.no_grad():
            model.weight.fill_(step)
        snapshots[step] = model.weight.detach().clone()
        best.offer(step, {"score": score}, model)
    assert best.step == 10 and best.value == 0.5  # ties keep the earlier point
    assert BestWeights(tmp_path, "score").step == 10  # read back from disk, as a resumed run does
    assert best.restore(model, last_step=30) == 10
    assert torch.equal(model.weight, snapshots[10])


def test_best_weights_leave_the_last_weights_when_they_are_the_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    best = BestWeights(tmp_path, "score")
    best.offer(0, {"score": 0.0}, model)
    with torch.no_grad():
        model.weight.fill_(7.0)
    best.offer(40, {"score": 1.0}, model)
    with torch.no_grad():
        model.weight.fill_(9.0)  # changed after the last evaluation: restore must not touch the model
    assert best.restore(model, last_step=40) == 40
    assert torch.all(model.weight == 9.0)


def _checkpoints(out) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def test_save_strategy_best_checkpoints_each_new_best_evaluation_during_training(tmp_path):
    """Evaluations at steps 0..4: 0.2 (before training: never a checkpoint, as HF's), 0.1 (the first during
    training), 0.5, 0.5 (a tie: not better), 0.3. The checkpoints: steps 1 and 2, none at the last step."""
    result = _run(tmp_path / "run", [0.2, 0.1, 0.5, 0.5, 0.3], save_strategy="best", load_best_model_at_end=False,
                  save_total_limit=0)
    assert _checkpoints(tmp_path / "run") == [1, 2]
    assert [r["score"] for r in result.evaluations] == [0.2, 0.1, 0.5, 0.5, 0.3]


def test_save_strategy_best_resumes_with_its_ranking(tmp_path):
    """Cut after step 2 (best 0.5 at step 2); the resumed steps 3 and 4 score 0.4 and 0.6: only step 4 beats it."""
    _run(tmp_path / "run", [0.2, 0.1, 0.5], steps=2, save_strategy="best", load_best_model_at_end=False,
         save_total_limit=0)
    assert _checkpoints(tmp_path / "run") == [1, 2]
    _run(tmp_path / "run", [0.4, 0.6], save_strategy="best", load_best_model_at_end=False, save_total_limit=0,
         resume_from_checkpoint=True)
    assert _checkpoints(tmp_path / "run") == [1, 2, 4]


def test_save_strategy_best_with_load_best_ends_on_the_best_weights(tmp_path):
    result = _run(tmp_path / "run", [0.2, 0.1, 0.9, 0.5, 0.3], save_strategy="best", save_total_limit=1)
    assert result.best_step == 2 and _checkpoints(tmp_path / "run") == [2]


@pytest.mark.parametrize("change,message", [
    (dict(eval_steps=0), "save_strategy=best checkpoints after an evaluation during training that beats the earlier "
                         "ones: set eval_steps"),
    (dict(eval_steps=1, retention_data="kept.jsonl"), "save_strategy=best ranks the evaluations on eval_data by "
                                                      "score: give eval_data"),
])
def test_save_strategy_best_without_evaluations_to_rank_is_one_line_before_the_model_loads(tmp_path, change,
                                                                                          message):
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    change = {**change, "retention_data": str(tmp_path / change["retention_data"])} if "retention_data" in change \
        else change
    config = SDFTConfig(**{"output_dir": str(tmp_path / "run"), "save_strategy": "best", "device": "cpu",
                           "retention_data": "", "retention_text": "", **change})
    with pytest.raises(ValueError, match=message):
        train("/nonexistent/model", ROWS, config)
