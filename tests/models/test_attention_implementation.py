"""attn_implementation: flash_attention_2 shares prompts through the KV cache and equals every row alone;
where it cannot run it is one line before the model loads; auto keeps the model's own attention.

flash-attn has no CPU build, so transformers' flash_attention_2 path runs here on a float64 stand-in of
its API (``tests/flash_reference.py``): the unpadding, varlen calls and causal alignment are transformers'
and flash-attn's semantics; only the kernel is replaced. A wrong cache expansion, position, padding slot or
query/key alignment is a difference of order one (the stand-in's top-left alignment gives 1.5).
"""
import functools
import sys

import pytest
import torch
from flash_reference import as_flash, stand_in_flash_attn
from rollout_groups import each_row_alone as _alone
from rollout_groups import random_groups
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft import SDFTConfig, train
from sdft.models import enable_checkpointing
from sdft.models.attention import check_implementation, use_implementation
from sdft.prefix.packed import batched_unshared_hidden, shared_prefix_hidden
from sdft.rollout.engine import HFRolloutEngine
from sdft_kernels import fused_linear_divergence

PAD = 0
ROTARY_TOL = 16 * 2.0 ** -24  # float32 rotary tables, as in tests/prefix/test_batch_prefix.py


def _grads(model, hidden_fn, batch, teacher):
    model.zero_grad(set_to_none=True)
    hidden = hidden_fn(model.get_decoder(), *batch)
    loss = fused_linear_divergence(hidden, teacher, model.get_output_embeddings().weight, mask=batch[2],
                                   divergence="forward_kl", reduction="sum")
    loss.backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def flash_calls(monkeypatch):
    """The stand-in flash-attn installed; the list names each kernel called (varlen where a batch holds
    padding, the plain one where it holds none), so a pass that silently left flash attention is seen."""
    with stand_in_flash_attn(monkeypatch):
        package, calls = sys.modules["flash_attn"], []
        for name in ("flash_attn_func", "flash_attn_varlen_func"):
            kernel = getattr(package, name)

            @functools.wraps(kernel)  # transformers reads the kernel's signature
            def counted(*args, _kernel=kernel, _name=name, **kwargs):
                calls.append(_name)
                return _kernel(*args, **kwargs)

            monkeypatch.setattr(package, name, counted)
        yield calls


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kv_cache_shared", "checkpointed_unshared"])
def test_flash_scoring_equals_every_row_alone_values_and_gradients_float64(flash_calls, checkpointing, recwarn):
    batch = random_groups(1)
    model = tiny_llama().double()
    teacher = torch.randn(*batch[1].shape, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_hidden, ref = _grads(model, _alone, batch, teacher)
    as_flash(model)
    if checkpointing:  # transformers turns the cache off: each row runs its prompt again, still varlen
        enable_checkpointing(model)
    model.train()
    hidden, got = _grads(model, lambda d, c, x, m: shared_prefix_hidden(d, c, x, m, PAD), batch, teacher)
    assert "flash_attn_varlen_func" in flash_calls, "the padded passes did not run flash-attn's varlen kernel"
    mask = batch[2][..., None]
    torch.testing.assert_close(hidden * mask, ref_hidden * mask, rtol=0, atol=ROTARY_TOL)
    scale = max(g.abs().max() for g in ref.values())
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=ROTARY_TOL * scale, msg=name)


def test_flash_unshared_pass_equals_every_row_alone(flash_calls):
    batch = random_groups(2)
    model = tiny_llama().double().eval()
    with torch.no_grad():
        ref = _alone(model.get_decoder(), *batch)
        got = batched_unshared_hidden(as_flash(model).get_decoder(), *batch, PAD)
    mask = batch[2][..., None]
    torch.testing.assert_close(got * mask, ref * mask, rtol=0, atol=ROTARY_TOL)
    assert "flash_attn_varlen_func" in flash_calls


def test_flash_rollouts_decode_the_same_greedy_tokens_as_sdpa(flash_calls):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).double().eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"][0]
               for p in ("add 1 2", "a much longer prompt here", "x")]
    ref = HFRolloutEngine(tok).generate(model, prompts, 2, 10, 1.0, greedy=True)
    got = HFRolloutEngine(tok).generate(as_flash(model), prompts, 2, 10, 1.0, greedy=True)
    assert flash_calls
    assert torch.equal(got.completions, ref.completions) and torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=1e-9)


def test_a_run_on_a_flash_model_takes_the_same_first_step_as_sdpa(tmp_path, flash_calls):
    tok = tiny_tokenizer()
    rows = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
    base = dict(max_steps=1, per_device_train_batch_size=2, num_generations=3, max_completion_length=6,
                save_steps=100, progress_bar=False, device="cpu", save_final_model=False)
    losses = []
    for name, prepare in (("sdpa", lambda m: m), ("flash", as_flash)):
        torch.manual_seed(0)
        model = prepare(tiny_llama(vocab=len(tok)).double())  # float64: the loss is small (near-uniform logits)
        result = train(model, rows, SDFTConfig(output_dir=str(tmp_path / name), **base), tokenizer=tok)
        assert result.model.config._attn_implementation == ("flash_attention_2" if name == "flash" else "sdpa")
        losses.append(result.metrics[0]["loss"])
    assert flash_calls
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)  # float64 but for the float32 rotary tables


def test_a_bf16_run_on_a_flash_model_computes_attention_in_bf16(tmp_path, flash_calls, monkeypatch):
    """mixed_precision=bf16 (autocast on fp32 weights): transformers hands flash-attn bf16 queries, as its
    kernels need, and the run trains."""
    import inspect

    import flash_reference
    from transformers.integrations import flash_attention

    if "get_autocast_gpu_dtype" in inspect.getsource(flash_attention):
        pytest.skip("transformers 4.x casts flash-attn's inputs under CUDA's autocast only (get_autocast_gpu_dtype): "
                    "a CPU run cannot show it")
    tok = tiny_tokenizer()
    dtypes = []
    attend = flash_reference._attend
    monkeypatch.setattr(flash_reference, "_attend", lambda q, *a: dtypes.append(q.dtype) or attend(q, *a))
    rows = [{"prompt": f"add {a} {b}", "demonstration": str(a + b)} for a, b in [(1, 2), (3, 4)]]
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=4, save_steps=100, progress_bar=False, device="cpu",
                        save_final_model=False, mixed_precision="bf16")
    result = train(as_flash(tiny_llama(vocab=len(tok))), rows, config, tokenizer=tok)
    assert flash_calls and set(dtypes) == {torch.bfloat16}  # the load-time head check too (on sdpa)
    assert result.metrics[0]["loss"] == result.metrics[0]["loss"]  # finite, not NaN


def test_flash_where_it_cannot_run_is_one_line(monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match=r"needs the flash-attn package .*pip install 'sdft\[flash\]'"):
        SDFTConfig(attn_implementation="flash_attention_2", device="cpu").check_device()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else
                        real(name, *a))
    with pytest.raises(ValueError, match="runs on CUDA only; this run's device is cpu"):
        SDFTConfig(attn_implementation="flash_attention_2", device="cpu").check_device()
    with pytest.raises(ValueError, match="computes in bf16 or fp16: set mixed_precision=bf16"):
        check_implementation("flash_attention_2", "cuda", "no", "float32")
    check_implementation("flash_attention_2", "cuda", "no", "bfloat16")  # bf16 weights run
    check_implementation("flash_attention_2", "cuda", "bf16", "float32")
    check_implementation("flash_attention_2", "cuda", "fp16", "float32")


@pytest.mark.parametrize("change,message", [
    (dict(tree_attention="flex"), "tree_attention=flex sets the prefix tree's mask"),
    (dict(share_teacher_prefix=True), "share_teacher_prefix packs prompts and teacher contexts"),
])
def test_tree_options_flash_cannot_take_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(attn_implementation="flash_attention_2", **change)


def test_auto_keeps_the_model_s_attention_and_a_name_switches_it_under_lora():
    from sdft.models.lora import LoraSettings, apply_lora

    model = tiny_llama()
    use_implementation(model, "auto")()
    assert model.config._attn_implementation == "sdpa"
    wrapped = apply_lora(model, LoraSettings.from_config(SDFTConfig(use_lora=True)))
    restore = use_implementation(wrapped, "eager")
    assert wrapped.get_base_model().config._attn_implementation == "eager"
    restore()
    assert wrapped.get_base_model().config._attn_implementation == "sdpa"


def test_the_run_s_attention_holds_for_the_run_only(tmp_path):
    tok = tiny_tokenizer()
    model, seen = tiny_llama(vocab=len(tok)), []
    rows = [{"prompt": "add 1 2", "demonstration": "3"}]
    config = SDFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, num_generations=2,
                        max_completion_length=4, progress_bar=False, device="cpu", save_final_model=False,
                        attn_implementation="eager")
    result = train(model, rows, config, tokenizer=tok,
                   step_callback=lambda step, record: seen.append(model.config._attn_implementation))
    assert seen == ["eager"] and result.model.config._attn_implementation == "sdpa"
