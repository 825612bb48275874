"""Where a command that answers prompts runs its model: a GPU where there is one, in bf16 where it has it;
float32 on the CPU, as before; a device this machine lacks is one line."""
import pytest
import torch

from sdft.runtime import inference


def _gpus(monkeypatch, count, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_the_gpu_in_bf16_where_there_is_one_and_the_cpu_in_fp32_elsewhere(monkeypatch):
    _gpus(monkeypatch, 2)
    device = inference.check_device("auto")
    assert device.type == "cuda" and inference.inference_dtype("auto", device) == torch.bfloat16
    _gpus(monkeypatch, 1, bf16=False)  # a V100: fp32, never fp16 unasked
    assert inference.inference_dtype("auto", inference.check_device("auto")) == torch.float32
    _gpus(monkeypatch, 0)
    device = inference.check_device("auto")
    assert device.type == "cpu" and inference.inference_dtype("auto", device) == torch.float32
    assert inference.inference_dtype("float16", device) == torch.float16


@pytest.mark.parametrize("name,count,message", [
    ("cuda", 0, "device=cuda but no CUDA device is available; use device=cpu"),
    ("cuda:1", 1, "device=cuda:1 but this machine has 1 CUDA device (cuda:0)"),
    ("cuda:4", 4, "device=cuda:4 but this machine has 4 CUDA devices (cuda:0..cuda:3)"),
    ("gpu", 1, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, name, count, message):
    _gpus(monkeypatch, count)
    with pytest.raises(ValueError) as err:
        inference.check_device(name)
    assert str(err.value) == message


def test_a_training_run_on_a_gpu_index_the_machine_lacks_is_refused_before_the_model_loads(monkeypatch):
    from sdft import SDFTConfig

    _gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"device=cuda:1 but this machine has 1 CUDA device \(cuda:0\)"):
        SDFTConfig(device="cuda:1").check_device()


def _answered_with(tmp_path, monkeypatch, *flags) -> list:
    """The first parameter of the model each ``sdft generate ... FLAGS`` answered with (a tiny model)."""
    from tiny_model import tiny_llama
    from tiny_tokenizer import tiny_tokenizer

    from sdft.cli import main as cli
    from sdft.eval import evaluation
    from sdft.run.export import save_hf_folder

    tok = tiny_tokenizer()
    folder = save_hf_folder(tiny_llama(vocab=len(tok)), tok, tmp_path / "model")
    seen, answer = [], evaluation.generate_answers
    monkeypatch.setattr(evaluation, "generate_answers",
                        lambda model, *a: seen.append(next(model.parameters())) or answer(model, *a))
    assert cli(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2", *flags]) == 0
    return seen


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_generate_answers_on_the_cpu_in_the_dtype_asked_for(tmp_path, monkeypatch, dtype, expected):
    """auto: float32 on the CPU, as before."""
    (weight,) = _answered_with(tmp_path, monkeypatch, "--device", "cpu", "--dtype", dtype)
    assert weight.device.type == "cpu" and weight.dtype == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_answers_on_the_gpu_in_bf16_by_default(tmp_path, monkeypatch):
    (weight,) = _answered_with(tmp_path, monkeypatch)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert weight.is_cuda and weight.dtype == expected
