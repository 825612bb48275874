"""The held-out loss each evaluation records (TRL's eval_loss): the training step's own SDFT loss on the held-out
rows, without a gradient; it leaves the training's rollouts as they were; load_best_model_at_end ranks by it (lower is
better); the SFT baseline's is its token cross-entropy."""
import json
import math

import pytest
from dist_worker import FixedEngine
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.run.best import BestWeights
from sdft.run.sft import train_sft

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
BASE = dict(per_device_train_batch_size=3, num_generations=2, max_completion_length=4, progress_bar=False,
            device="cpu", save_final_model=False, save_strategy="no", learning_rate=1e-3, eval_steps=1)


def _evals(out) -> list[dict]:
    return json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize("normalization, teacher", [("token_mean", "frozen"), ("sequence_mean", "live")])
def test_the_first_held_out_loss_is_the_first_steps_training_loss_on_the_same_rows(tmp_path, normalization, teacher):
    """One step covers every row, the rollouts are the fixed engine's: the evaluation before training and the first
    step's loss (taken before its update) see the same weights, rows and rollouts."""
    tok = tiny_tokenizer()
    config = SDFTConfig(**BASE, max_steps=1, output_dir=str(tmp_path), loss_normalization=normalization,
                        teacher_mode=teacher)
    model = tiny_llama(vocab=len(tok)).double()  # a loss of 1e-5 from near-equal log-probs: float64 leaves no doubt
    result = train(model, ROWS, config, tokenizer=tok, engine=FixedEngine(), eval_dataset=ROWS)
    before = _evals(tmp_path)[0]
    assert before["step"] == 0
    assert before["loss"] == pytest.approx(result.metrics[0]["loss"], rel=1e-9)


def test_evaluating_leaves_the_training_rollouts_as_they_were(tmp_path):
    tok = tiny_tokenizer()
    runs = []
    for name, rows in (("with", ROWS[:2]), ("without", None)):
        config = SDFTConfig(**{**BASE, "eval_steps": 1 if rows else 0, "per_device_train_batch_size": 1}, max_steps=3,
                            output_dir=str(tmp_path / name))
        runs.append(train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=rows))
    assert [r["loss"] for r in runs[0].metrics] == [r["loss"] for r in runs[1].metrics]
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in _evals(tmp_path / "with"))


def test_two_evaluations_of_the_same_weights_give_the_same_loss(tmp_path):
    tok = tiny_tokenizer()
    config = SDFTConfig(**{**BASE, "learning_rate": 1e-30}, max_steps=1, output_dir=str(tmp_path))  # weights stay
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS[:2])
    first, last = _evals(tmp_path)
    assert first["loss"] == last["loss"]  # the same rollouts from the same seed, on the same weights


def test_load_best_ranks_by_the_lowest_loss(tmp_path):
    best = BestWeights(tmp_path, "loss", write=False)
    assert best.better(3, 0.5)
    best.step, best.value = 3, 0.5
    assert best.better(4, 0.4) and not best.better(4, 0.6)
    tok = tiny_tokenizer()
    config = SDFTConfig(**BASE, max_steps=2, output_dir=str(tmp_path / "run"), load_best_model_at_end=True,
                        metric_for_best_model="loss")
    result = train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS[:2])
    losses = {r["step"]: r["loss"] for r in _evals(tmp_path / "run")}
    assert result.best_step == min(losses, key=lambda s: (losses[s], s))


def test_the_sft_baselines_held_out_loss_is_its_token_cross_entropy(tmp_path):
    tok = tiny_tokenizer()
    config = SDFTConfig(**BASE, max_steps=1, output_dir=str(tmp_path))
    train_sft(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=ROWS[:2])
    for record in _evals(tmp_path):
        assert record["loss"] == pytest.approx(math.log(record["perplexity"]))


def test_held_out_rows_too_long_for_a_training_step_are_left_out_of_the_loss_with_a_line(tmp_path, capsys):
    tok = tiny_tokenizer()
    config = SDFTConfig(**BASE, max_steps=1, output_dir=str(tmp_path), max_prompt_length=80)
    long = {"prompt": "add 1 2", "demonstration": "3" * 100}  # answered (its prompt fits), no teacher context fits
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, eval_dataset=[ROWS[0], long])
    assert "the held-out loss leaves out 1 of 2 rows" in capsys.readouterr().err
    assert all(math.isfinite(r["loss"]) for r in _evals(tmp_path))


def test_num_generations_eval_sets_the_rollouts_per_held_out_prompt(tmp_path):
    tok = tiny_tokenizer()
    seen = []

    class Counting(FixedEngine):
        def generate(self, model, prompts, num_generations, *args, **kwargs):
            seen.append(num_generations)
            return super().generate(model, prompts, num_generations, *args, **kwargs)

    config = SDFTConfig(**BASE, max_steps=1, output_dir=str(tmp_path), num_generations_eval=1)
    train(tiny_llama(vocab=len(tok)), ROWS, config, tokenizer=tok, engine=Counting(), eval_dataset=ROWS[:2])
    assert seen == [1, 2, 1]  # before training, the step (num_generations), after it
