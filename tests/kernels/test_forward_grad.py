"""The CPU backend computes dH and dW during the forward pass for scalar losses.

The one-pass gradients are compared with the float64 reference and with the recompute path
(reduction "none", which keeps the old forward + recomputing backward), for sum, mean and none,
masked rows, several chunks, and gradient accumulation over several calls.
"""
import pytest
import torch
from divergence_cases import assert_close, make_inputs, run_both

from sdft_kernels import fused_linear_divergence, logit_blocks
from sdft_kernels.chunked import ChunkedObjective

KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]


@pytest.mark.parametrize("divergence,beta", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_one_pass_gradients_match_reference_and_recompute(divergence, beta, reduction, monkeypatch):
    monkeypatch.setattr(logit_blocks, "CHUNK_BYTES", 4 * 211 * 7)  # 7 rows per chunk: several chunks
    monkeypatch.setattr(logit_blocks, "MIN_CHUNK_ROWS", 1)
    s, t, w, tw, mask = make_inputs(40, 24, 211, h_teacher=16, seed=7, device="cpu")
    kw = dict(mask=mask, divergence=divergence, beta=beta, temperature=1.3, reduction=reduction,
              backend="torch")
    ours, ref = run_both(s, t, w, tw, **kw)
    assert_close(ours, ref, tol=1e-5)
    rows = fused_linear_divergence(s, t, w, tw, **{**kw, "reduction": "none"})
    total = rows.sum() if reduction != "mean" else rows.sum() / mask.sum()
    recompute = torch.autograd.grad(total, (s, w))
    for one_pass, again in zip(ours[1], recompute):
        torch.testing.assert_close(one_pass, again, rtol=1e-5, atol=1e-7)


def test_the_one_pass_is_used_only_when_a_scalar_gradient_is_needed(monkeypatch):
    calls = []
    real = ChunkedObjective.forward_with_grad
    monkeypatch.setattr(ChunkedObjective, "forward_with_grad", lambda *a: calls.append(1) or real(*a))
    s, t, w, _, _ = make_inputs(6, 8, 30, device="cpu")
    with torch.no_grad():
        fused_linear_divergence(s, t, w, reduction="sum")
    fused_linear_divergence(s.detach(), t, w.detach(), reduction="sum")
    fused_linear_divergence(s, t, w, reduction="none").sum().backward()
    assert calls == []
    fused_linear_divergence(s, t, w, reduction="sum").backward()
    assert calls == [1]


def test_gradient_accumulation_over_calls_and_scaled_upstream():
    s, t, w, _, mask = make_inputs(30, 16, 90, seed=3, device="cpu")
    parts = [slice(0, 11), slice(11, 30)]
    (3.0 * sum(fused_linear_divergence(s[p], t[p], w, mask=mask[p], reduction="sum") for p in parts)).backward()
    acc = (s.grad.clone(), w.grad.clone())
    s.grad = w.grad = None
    (3.0 * fused_linear_divergence(s, t, w, mask=mask, reduction="sum")).backward()
    for a, b in zip(acc, (s.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_double_backward_is_refused():
    s, t, w, _, _ = make_inputs(5, 8, 20, dtype=torch.float64, device="cpu")
    loss = fused_linear_divergence(s, t, w, reduction="sum")
    (g_s,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        torch.autograd.grad(g_s.sum(), w)


@pytest.mark.parametrize("divergence,beta", KINDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("extra", [{}, {"topk": 5}, {"weights": True}])
def test_reused_logit_blocks_poisoned_and_a_short_last_chunk(divergence, beta, reduction, extra, monkeypatch):
    """The [chunk, V] blocks are reused from chunk to chunk: NaN-filled storage and a last chunk
    shorter than the others (29 selected rows, 7 a chunk) must not leak into any result."""
    monkeypatch.setattr(logit_blocks, "CHUNK_BYTES", 4 * 211 * 7)
    monkeypatch.setattr(logit_blocks, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(
        logit_blocks, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype)
    )
    s, t, w, tw, mask = make_inputs(40, 24, 211, h_teacher=16, seed=13, device="cpu")
    kw = dict(mask=mask, divergence=divergence, beta=beta, temperature=0.7, reduction=reduction, backend="torch")
    if extra.get("weights"):
        kw["weights"] = torch.rand(40, generator=torch.Generator().manual_seed(2)) + 0.5
    elif extra:
        kw.update(extra)
    assert_close(*run_both(s, t, w, tw, **kw), tol=1e-5)
