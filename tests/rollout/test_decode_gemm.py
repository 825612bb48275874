"""Decoding's small-batch linear layers: either layout equals F.linear up to fp32 summation order."""
import pytest
import torch
import torch.nn.functional as F

from sdft.rollout import decode_gemm
from sdft.rollout.decode_gemm import small_batch_linears


def _bound(x, layer):
    """|error| of a length-K fp32 dot product in any order: K * eps * sum |x_k w_k| (plus the bias add)."""
    k = x.shape[-1]
    mag = F.linear(x.abs(), layer.weight.abs())
    if layer.bias is not None:
        mag = mag + layer.bias.abs()
    return (k + 1) * torch.finfo(torch.float32).eps * mag


@pytest.mark.parametrize("prefers_w_x", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (3, 1, 7), (2, 4, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_both_layouts_equal_f_linear(prefers_w_x, shape, bias, monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 11, bias=bias)
    x = torch.randn(shape)
    rows = x.numel() // 7
    monkeypatch.setitem(decode_gemm._choice, (11, 7, torch.float32, rows), prefers_w_x)
    model = torch.nn.Sequential(layer)
    with torch.no_grad(), small_batch_linears(model, "auto"):
        got = model(x)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - ref).abs() <= _bound(x, layer).double()).all()


def test_grad_mode_large_batches_and_other_dtypes_keep_f_linear(monkeypatch):
    layer = torch.nn.Linear(7, 11)
    monkeypatch.setitem(decode_gemm._choice, (11, 7, torch.float32, 4), True)
    x = torch.randn(4, 7)
    big = torch.randn(decode_gemm.MAX_ROWS + 1, 7)
    model = torch.nn.Sequential(layer)
    with small_batch_linears(model, "auto"):
        assert torch.equal(model(x), F.linear(x, layer.weight, layer.bias))  # grad mode on
        with torch.no_grad():
            assert torch.equal(model(big), F.linear(big, layer.weight, layer.bias))
            with pytest.raises(RuntimeError):  # a dtype mismatch still fails as F.linear does
                model(x.double())


def test_the_patch_is_undone_and_foreign_forwards_are_kept():
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    foreign = second.forward
    second.forward = foreign  # an instance forward, as hook libraries install
    model = torch.nn.Sequential(first, second)
    with pytest.raises(ValueError), small_batch_linears(model):
        assert "forward" in first.__dict__ and second.forward is foreign
        raise ValueError("an error inside the block")
    assert "forward" not in first.__dict__ and second.__dict__["forward"] is foreign


def test_the_rule_is_a_function_of_the_row_count_alone_never_of_timing(monkeypatch):
    """The default policy never reads a clock: a busy machine cannot change which layout (and so
    which rounding) a decoding step gets."""
    def no_clock():
        raise AssertionError("the rule policy timed something")

    monkeypatch.setattr(decode_gemm.time, "perf_counter", no_clock)
    layer = torch.nn.Linear(7, 11)
    model = torch.nn.Sequential(layer)
    seen = []
    real = decode_gemm._w_x
    monkeypatch.setattr(decode_gemm, "_w_x", lambda x2, w: seen.append(x2.shape[0]) or real(x2, w))
    with torch.no_grad(), small_batch_linears(model):
        for rows in (2, 7, 8, 30, 48, 49, 64):
            model(torch.randn(rows, 7))
    assert seen == [8, 30, 48]
    with torch.no_grad(), small_batch_linears(model, "off"):
        model(torch.randn(16, 7))
    assert seen == [8, 30, 48] and "forward" not in layer.__dict__
    with pytest.raises(ValueError, match="decode_gemm must be one of rule, auto, off"):
        with small_batch_linears(model, "fast"):
            pass


def test_the_choice_is_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(decode_gemm, "_choice", {})
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    with torch.no_grad(), small_batch_linears(model, "auto"):
        model(torch.randn(3, 6))
        model(torch.randn(3, 6))
        model(torch.randn(1, 6))  # a single row keeps F.linear, untimed
    assert list(decode_gemm._choice) == [(5, 6, torch.float32, 3)]


def test_decode_gemm_benchmark_rows_time_both_layouts():
    from benchmarks.bench_decode_gemm import gemm_rows

    rows = gemm_rows({"tiny": (8, 4)}, [2, 3], reps=1, stream_bytes=0)
    assert [(r["weight"], r["shape"], r["rows"]) for r in rows] == [("tiny", "8x4", 2), ("tiny", "8x4", 3)]
    assert all(r["f_linear_ms"] > 0 and r["w_x_ms"] > 0 and r["w_x_speedup"] > 0 for r in rows)
