"""LM heads of other families (bias, logit scale, soft cap) inside the fused op,
against the float64 reference on values and on the gradients of hidden states, head and bias."""
import pytest
import torch

import sdft_kernels.logit_blocks as logit_blocks
from sdft_kernels import fused_linear_divergence, reference_linear_divergence

TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(logit_blocks, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(logit_blocks, "CHUNK_BYTES", 4 * 4 * 29)


def _inputs(seed=0, n=11, h=6, v=29, separate=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    wt = torch.randn(v, h, generator=g, dtype=torch.float64) if separate else None
    bt = torch.randn(v, generator=g, dtype=torch.float64) if separate else None
    y = torch.randint(0, v, (n,), generator=g)
    return hs, ht, w, b, wt, bt, y


HEADS = {
    "bias": dict(use_bias=True),
    "scale": dict(logit_scale=0.25),  # Granite logits_scaling=4
    "softcap": dict(softcap=3.0),
    "all": dict(use_bias=True, logit_scale=1.7, softcap=2.5),
}
OBJECTIVES = {
    "full_rkl": dict(divergence="reverse_kl"),
    "full_jsd": dict(divergence="jsd", beta=0.3),
    "topk": dict(divergence="forward_kl", topk=5, add_tail=True),
    "sampled": dict(divergence="reverse_kl", mode="sampled_token"),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("separate", [False, True])
def test_heads_match_the_reference(head, objective, separate):
    hs, ht, w, b, wt, bt, y = _inputs(seed=len(head) + len(objective), separate=separate)
    spec = dict(HEADS[head])
    use_bias = spec.pop("use_bias", False)
    kw = dict(OBJECTIVES[objective], temperature=1.3, reduction="sum", **spec)
    if use_bias:
        kw.update(bias=b, teacher_bias=bt)
    if objective == "sampled":
        kw["targets"] = y
    mask = torch.arange(11) % 3 != 2
    got = fused_linear_divergence(hs, ht, w, wt, mask=mask, **kw)
    ref = reference_linear_divergence(hs, ht, w, wt, mask=mask, **kw)
    torch.testing.assert_close(got, ref, **TOL)
    inputs = (hs, w, b) if use_bias else (hs, w)
    for a, r in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, r, **TOL)


def test_logit_scale_is_a_temperature():
    hs, ht, w, _, _, _, _ = _inputs(seed=3)
    a = fused_linear_divergence(hs, ht, w, logit_scale=0.5, temperature=2.0, reduction="none")
    b = fused_linear_divergence(hs, ht, w, temperature=4.0, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(logit_scale=0.0), "logit_scale must be a positive"),
    (dict(softcap=-1.0), "softcap must be a positive"),
    (dict(bias="short"), r"bias must be a \[29\] tensor"),
    (dict(teacher_bias="ok"), "teacher_bias needs teacher_weight"),
])
def test_head_errors(kwargs, message):
    hs, ht, w, b, _, _, _ = _inputs(seed=4)
    values = {"short": b[:5], "ok": b}
    kwargs = {k: values.get(v, v) if isinstance(v, str) and k.endswith("bias") else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        fused_linear_divergence(hs, ht, w, **kwargs)
