"""A pure-torch stand-in for the ``flash_attn`` package, so that transformers' ``flash_attention_2`` code path
(unpadding, varlen calls, bottom-right causal alignment, re-padding) runs on this CPU.

flash-attn has no CPU build; its API is small, and its semantics are what matter to sdft: which tokens see
which. ``flash_attn_varlen_func`` here computes each packed sequence's attention in float64 with flash-attn
2.1+'s causal rule (query i of ``Lq`` sees key j iff ``j <= i + Lk - Lq``) and grouped-query heads. It
is a reference, not a kernel: nothing is claimed about flash-attn's speed from it.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch


def _attend(q, k, v, softmax_scale, causal):
    """Attention of one sequence: q [Lq, Hq, D], k/v [Lk, Hk, D] -> [Lq, Hq, D], in float64."""
    heads = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(heads, 1), v.repeat_interleave(heads, 1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~seen.to(scores.device), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())
    return out.to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and window_size == (-1, -1) and not softcap and alibi_slopes is None
    parts = []
    for i in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        parts.append(_attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal))
    return torch.cat(parts)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and window_size == (-1, -1) and not softcap and alibi_slopes is None
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


@contextlib.contextmanager
def stand_in_flash_attn(monkeypatch):
    """transformers' flash_attention_2 path on this CPU, through the functions above (for the test's duration)."""
    import pytest
    from transformers import modeling_flash_attention_utils as fa_utils

    # the loader's cache: transformers 5's names what it loaded, 4.x's keeps the functions it imported
    cached = ("_loaded_implementation",) if hasattr(fa_utils, "_loaded_implementation") else (
        "_flash_fn", "_flash_varlen_fn", "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn")
    if not all(hasattr(fa_utils, name) for name in ("_pad_input", "_unpad_input", *cached)):
        import transformers

        pytest.skip(f"the stand-in does not know transformers {transformers.__version__}'s flash-attn loader")
    package = types.ModuleType("flash_attn")
    package.flash_attn_func = flash_attn_func
    package.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_with_kvcache = None
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = fa_utils._pad_input, fa_utils._unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    for name in cached:
        monkeypatch.setattr(fa_utils, name, None)
    try:
        yield
    finally:
        for name in cached:
            setattr(fa_utils, name, None)


def as_flash(model):
    """``model`` switched to transformers' flash_attention_2 without its CUDA check (the stand-in runs on CPU)."""
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config._attn_implementation = "flash_attention_2"
    return model
