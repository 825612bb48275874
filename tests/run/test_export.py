"""A run ends with a folder transformers / peft load with the trained logits."""
import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM

from sdft import SDFTConfig, train
from sdft.cli import main as cli
from sdft.run.export import export_checkpoint

ROWS = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
IDS = torch.tensor([[5, 9, 14, 3, 22, 7]])


def _train(tmp_path, model_dir, **change):
    tok = tiny_tokenizer()
    config = SDFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=4, learning_rate=1e-2, progress_bar=False,
                        device="cpu", **change)
    return train(str(model_dir), ROWS, config), tok


@pytest.fixture
def model_dir(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    from sdft.run.export import save_hf_folder

    return save_hf_folder(model, tok, tmp_path / "base")


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_final_model_and_export_load_with_identical_logits(tmp_path, model_dir, capsys):
    result, _ = _train(tmp_path, model_dir)
    trained = _logits(result.model)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    assert final.config.architectures == ["LlamaForCausalLM"]
    torch.testing.assert_close(_logits(final), trained, rtol=0, atol=0)
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(model_dir)), trained)
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(tmp_path / "exported")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(tmp_path / "merged"), "--merge"]) == 0
    assert "no LoRA adapters to merge (a full fine-tune)" in capsys.readouterr().err
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported")), trained,
                               rtol=0, atol=0)


def test_lora_exports_the_adapter_or_the_merged_model(tmp_path, model_dir):
    from peft import AutoPeftModelForCausalLM

    result, _ = _train(tmp_path, model_dir, use_lora=True, lora_target_modules=["q_proj", "v_proj"])
    trained = _logits(result.model)
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    torch.testing.assert_close(_logits(adapter), trained, rtol=1e-5, atol=1e-6)
    merged = export_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "merged", merge_lora=True)
    # Merging folds B @ A into the base weight: one rounding per weight, so fp32-close, not bitwise.
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), trained,
                               rtol=1e-5, atol=1e-5)


def test_a_peft_model_object_trains_its_own_adapters_and_its_checkpoints_export(tmp_path, model_dir, capsys):
    """A model passed with get_peft_model's adapters: the run records them, so a checkpoint rebuilds it."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), adapters)
    config = SDFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=1,
                        num_generations=2, max_completion_length=4, learning_rate=1e-2, progress_bar=False,
                        device="cpu")  # use_lora not set: the model's adapters are what trains
    result = train(peft_model, ROWS, config, tokenizer=tok)
    assert "peft LoRA adapters, which train as use_lora=True lora_r=4 lora_alpha=8" in capsys.readouterr().err
    assert sum(p.numel() for p in result.model.parameters() if p.requires_grad) == sum(
        p.numel() for n, p in result.model.named_parameters() if "lora_" in n)
    out = export_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "exported", model=str(model_dir))
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(out)), _logits(result.model),
                               rtol=1e-5, atol=1e-6)


def test_an_adapter_names_its_base_by_absolute_path_and_a_missing_base_is_one_line(tmp_path, model_dir,
                                                                                  monkeypatch):
    import json

    from sdft.models import load_trained

    monkeypatch.chdir(tmp_path)
    _train(tmp_path, model_dir.relative_to(tmp_path), use_lora=True)  # a relative path, as a user types it
    adapter = tmp_path / "run" / "final_model"
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(model_dir.resolve())
    monkeypatch.chdir(adapter)  # from any folder the adapter finds its base
    load_trained(adapter)
    moved = model_dir.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=rf"is a LoRA adapter of {model_dir.resolve()}, which is not here: "
                                                r"pass its folder on this machine \(sdft generate --base PATH\)"):
        load_trained(adapter)  # never the embedded model in its place
    assert cli(["generate", str(adapter), "--base", str(moved), "--prompt", "add 1 2", "--max-new-tokens", "2"]) == 0
    assert cli(["generate", str(moved), "--base", str(moved), "--prompt", "x"]) == 2  # not an adapter


def test_export_of_a_damaged_checkpoint_is_a_one_line_error(tmp_path, model_dir, capsys):
    _train(tmp_path, model_dir)
    (tmp_path / "run" / "checkpoint-2" / "trainable.safetensors").write_bytes(b"x")
    capsys.readouterr()
    assert cli(["export", str(tmp_path / "run" / "checkpoint-2"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trainable.safetensors has 1 bytes" in err


def test_a_run_folder_or_a_model_folder_given_as_the_checkpoint_says_what_to_pass(tmp_path, model_dir, capsys):
    _train(tmp_path, model_dir)
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli(["export", str(run), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdft: error: {run} is an sdft run folder, not a checkpoint: export one of its checkpoint-N folders (the "
        f"newest is {run / 'checkpoint-2'}); its final model, {run / 'final_model'}, is a model folder already")
    assert cli(["export", str(run / "final_model"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdft: error: {run / 'final_model'} is a model folder, not an sdft checkpoint: it loads as it is "
        "(AutoModelForCausalLM.from_pretrained, or sdft generate)")
    config = SDFTConfig(output_dir=str(tmp_path / "again"), max_steps=3, resume_from_checkpoint=str(run))
    with pytest.raises(ValueError, match=f"^{run} is an sdft run folder, not a checkpoint: resume from one of its "
                                         f"checkpoint-N folders \\(the newest is {run / 'checkpoint-2'}\\)$"):
        train(model_dir, ROWS, config)
    assert not (tmp_path / "x").exists() and not (tmp_path / "again" / "metrics.jsonl").exists()


def test_an_export_never_replaces_a_runs_final_model_with_an_older_checkpoint(tmp_path, model_dir, capsys):
    _train(tmp_path, model_dir, save_steps=1)
    run = tmp_path / "run"
    final = (run / "final_model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(["export", str(run / "checkpoint-1"), str(run / "final_model")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdft: error: export target {run / 'final_model'} is the model the run in {run} ended with; "
        f"{run / 'checkpoint-1'} is not that run's newest checkpoint ({run / 'checkpoint-2'}), so the export would "
        "replace the run's result with other weights: choose another folder")
    assert (run / "final_model" / "model.safetensors").read_bytes() == final
    assert cli(["export", str(run / "checkpoint-2"), str(run / "final_model")]) == 0  # what a failed final write says
