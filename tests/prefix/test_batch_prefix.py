"""Batched shared-prefix passes equal the unshared, unbatched computation: values and gradients.

Gradients are compared in float64. One input stays float32 there: transformers computes the rotary
cos/sin tables in float32 whatever the model dtype, and vectorised float32 cos/sin may differ by an
ulp (u = 2**-24) between batch shapes. That bounds the difference at a few u relative to the largest
gradient (``ROTARY_TOL``); any real difference (a wrong position, a leaked padding slot, a missing
cache expansion) is of order one. In float32 the same comparison
is made norm-wise with a bound derived from the arithmetic (see ``_fp32_bound``), independent of
this machine's SIMD width or thread count.
"""
from collections import Counter

import pytest
import torch
from rollout_groups import each_row_alone as _one_row_at_a_time
from rollout_groups import random_groups as _batch
from tiny_model import tiny_llama

from sdft.models import enable_checkpointing
from sdft.prefix.packed import (
    batched_prefix_hidden,
    batched_unshared_hidden,
    pack_rollouts,
    tokens_processed,
    tree_hidden,
)
from sdft_kernels import fused_linear_divergence

PAD = 0
G = 3
ROTARY_TOL = 16 * 2.0 ** -24  # see the module docstring


def _loss(model, hidden_fn, contexts, completions, mask, teacher_hidden):
    hidden = hidden_fn(model.get_decoder(), contexts, completions, mask)
    weight = model.get_output_embeddings().weight
    return fused_linear_divergence(hidden, teacher_hidden, weight, mask=mask, divergence="forward_kl",
                                   reduction="sum")


def _grads(model, hidden_fn, batch, teacher_hidden):
    model.zero_grad(set_to_none=True)
    _loss(model, hidden_fn, *batch, teacher_hidden).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


FNS = {
    "shared_batched": lambda d, c, x, m: batched_prefix_hidden(d, c, x, m, PAD),
    "tree": lambda d, c, x, m: tree_hidden(d, c, x, m, PAD),
    "unshared_batched": lambda d, c, x, m: batched_unshared_hidden(d, c, x, m, PAD),
    "row_at_a_time": _one_row_at_a_time,
}


@pytest.mark.parametrize("lengths", [(7, 2, 11), (5,), (3, 3), (1, 4), (1,)])  # 1: a one-token prompt
def test_hidden_states_match_one_row_at_a_time(lengths):
    model = tiny_llama().double().eval()
    contexts, completions, mask = _batch(1, lengths)
    with torch.no_grad():
        ref = _one_row_at_a_time(model.get_decoder(), contexts, completions, mask)
        for name in ("tree", "shared_batched", "unshared_batched"):
            got = FNS[name](model.get_decoder(), contexts, completions, mask)
            torch.testing.assert_close(got[mask], ref[mask], rtol=ROTARY_TOL, atol=ROTARY_TOL, msg=name)


def test_shared_pass_hands_the_cache_under_the_library_s_own_name(recwarn):
    model = tiny_llama().eval()
    with torch.no_grad():
        batched_prefix_hidden(model.get_decoder(), *_batch(2), PAD)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_hidden_state_predicts_next_completion_token():
    model = tiny_llama().eval()
    contexts, completions, mask = _batch(2, (4, 9))
    with torch.no_grad():
        h = batched_prefix_hidden(model.get_decoder(), contexts, completions, mask, PAD)
        for r in range(completions.shape[0]):
            n = int(mask[r].sum())
            ctx = contexts[r // G]
            logits = model(torch.cat([ctx, completions[r, :n]])[None]).logits[0, ctx.numel() - 1: -1]
            ours = h[r, :n] @ model.get_output_embeddings().weight.T
            torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)


def test_gradients_equal_the_unshared_unbatched_computation_float64():
    model = tiny_llama().double()
    batch = _batch(3)
    teacher_hidden = torch.randn(*batch[1].shape, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref = _grads(model, _one_row_at_a_time, batch, teacher_hidden)
    for name in ("tree", "shared_batched", "unshared_batched"):
        got = _grads(model, FNS[name], batch, teacher_hidden)
        for param, g in ref.items():
            scale = g.abs().max().item()
            torch.testing.assert_close(got[param], g, rtol=0, atol=ROTARY_TOL * max(scale, 1e-30),
                                       msg=f"{name}: {param}")


def _fp32_bound(reference: torch.Tensor, depth: int) -> float:
    """Norm-wise relative error bound of an fp32 computation against its float64 value.

    Each fp32 operation rounds with relative error u = 2**-24; a gradient of a depth-d network is a
    chain of about ``4 * depth + 4`` matmul / softmax / norm stages, each a reduction of length K that
    contributes at most about ``sqrt(K) * u`` in norm (random-walk rounding, Higham 3.5). With K <= 64
    here, a stage is below 8u, so the whole chain below (4d + 4) * 8u; a factor 10 covers the
    conditioning of the softmax and the norm layers.
    """
    u = 2.0 ** -24
    return 10 * (4 * depth + 4) * 8 * u * reference.norm().item()


def test_fp32_shared_and_unshared_gradients_agree_within_rounding():
    model64 = tiny_llama().double()
    model32 = tiny_llama()
    batch = _batch(4)
    teacher_hidden = torch.randn(*batch[1].shape, 32, generator=torch.Generator().manual_seed(9))
    exact = _grads(model64, _one_row_at_a_time, batch, teacher_hidden.double())
    for name in ("tree", "shared_batched", "row_at_a_time"):
        got = _grads(model32, FNS[name], batch, teacher_hidden)
        for param, g in exact.items():
            error = (got[param].double() - g).norm().item()
            assert error <= _fp32_bound(g, depth=2) + 1e-30, (name, param, error)


@pytest.mark.parametrize("fn", [batched_prefix_hidden, tree_hidden])
def test_empty_contexts_are_refused(fn):
    model = tiny_llama()
    contexts, completions, mask = _batch(5, (4, 1))
    contexts[1] = contexts[1][:0]
    with pytest.raises(ValueError, match="at least 1 token id"):
        fn(model.get_decoder(), contexts, completions, mask, PAD)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_pass_under_both_attention_implementations(attn):
    model = tiny_llama().double().eval()
    model.config._attn_implementation = attn
    contexts, completions, mask = _batch(6)
    with torch.no_grad():
        ref = _one_row_at_a_time(model.get_decoder(), contexts, completions, mask)
        got = tree_hidden(model.get_decoder(), contexts, completions, mask, PAD)
    torch.testing.assert_close(got[mask], ref[mask], rtol=ROTARY_TOL, atol=ROTARY_TOL)


def test_tokens_processed():
    assert tokens_processed([100, 50], 20, 4) == (150 + 2 * 4 * 20, 4 * (150 + 2 * 20))


def _shared_system_batch(seed, width=6):
    """Three contexts behind one 9-token system message; rollout 1 repeats rollout 0's first tokens."""
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(1, 97, (9,), generator=gen)
    contexts = [torch.cat([system, torch.randint(1, 97, (n,), generator=gen)]) for n in (3, 1, 5)]
    rows = G * len(contexts)
    completions = torch.randint(1, 97, (rows, width), generator=gen)
    completions[1, :3] = completions[0, :3]
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[:2] = width
    mask = torch.arange(width)[None] < lengths[:, None]
    return contexts, torch.where(mask, completions, PAD), mask


@pytest.mark.parametrize("pairs", [1e9, 1e-9], ids=["one_row", "one_row_per_group"])
def test_prefix_tree_across_prompts_gradients_float64(pairs, monkeypatch):
    """A system message shared by every prompt is one set of nodes; gradients still equal the
    one-row-at-a-time computation, whether the cost model packs one row or one row per group."""
    import sdft.prefix.packed

    monkeypatch.setattr(sdft.prefix.packed, "pairs_per_token", lambda config: pairs)
    model = tiny_llama().double()
    batch = _shared_system_batch(11)
    teacher_hidden = torch.randn(*batch[1].shape, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _grads(model, _one_row_at_a_time, batch, teacher_hidden)
    got = _grads(model, FNS["tree"], batch, teacher_hidden)
    for param, g in ref.items():
        torch.testing.assert_close(got[param], g, rtol=0, atol=ROTARY_TOL * max(g.abs().max().item(), 1e-30),
                                   msg=param)
    packed, _ = pack_rollouts(*batch, PAD, pairs)
    assert len(packed.row_sizes) == (1 if pairs > 1 else 3)


def test_prefix_tree_holds_each_distinct_prefix_once():
    contexts, completions, mask = _shared_system_batch(12)
    packed, _ = pack_rollouts(contexts, completions, mask, PAD, 1e9)
    sequences = set()
    for r in range(completions.shape[0]):
        n = int(mask[r].sum())
        seq = contexts[r // G].tolist() + completions[r, :n - 1].tolist()
        sequences.update(tuple(seq[:k]) for k in range(1, len(seq) + 1))
    assert packed.num_nodes == len(sequences)
    # ancestor relation: a node sees exactly the nodes of its own prefix
    visible = packed.visible()[0, 0]
    for r in range(completions.shape[0]):
        nodes = packed.sequence_nodes[r]
        assert visible[nodes[-1]].nonzero().squeeze(1).tolist() == nodes.tolist()
        assert packed.positions[0, nodes].tolist() == list(range(nodes.numel()))


def test_cost_model_keeps_unrelated_long_prompts_apart_and_shared_ones_together():
    from sdft.prefix.tree import pack_groups

    unrelated = [([b * 1000 + i for i in range(400)], [[1], [2]]) for b in range(3)]
    assert len(pack_groups(unrelated, PAD, 3000.0).row_sizes) == 3
    system = list(range(1000, 1600))
    shared = [(system + [b], [[1], [2]]) for b in range(3)]
    assert pack_groups(shared, PAD, 3000.0).row_sizes == [600 + 3 * 3]


def test_prompts_whose_rollouts_decode_long_share_a_row_only_for_a_long_common_prefix():
    """A row's rollouts attend over the whole row at every decoding step: prompts sharing a chat template's
    header decode in rows of their own (even where the block mask would put everything in one tree); a long
    common system message is still prefilled once when the decoding is short."""
    from sdft.prefix.tree import Decoding, pack_groups

    header = list(range(1000, 1020))
    prompts = [(header + [b * 100 + i for i in range(40)], []) for b in range(8)]
    long_decoding = Decoding(queries=4, steps=1024, pairs=3000.0)
    assert len(pack_groups(prompts, PAD, float("inf")).row_sizes) == 1
    assert len(pack_groups(prompts, PAD, float("inf"), decoding=long_decoding).row_sizes) == 8
    system = [(list(range(1000, 3000)) + [b], []) for b in range(8)]
    assert pack_groups(system, PAD, float("inf"), decoding=Decoding(4, 24, 3000.0)).row_sizes == [2000 + 8]


def test_the_rollout_rows_are_the_cheapest_layout_padding_included():
    """Rows pad to the fullest row's rollouts: four uneven rows of 16 prompts decode 20 slots a step for 16
    rollouts, so the engine takes a row per prompt there (16 slots, each over its own prompt only), and one
    row for prompts under a long common system message whose rollouts are short."""
    from sdft.prefix.tree import Decoding, decoding_cost, pack_apart, pack_groups
    from sdft.rollout.engine import pack_prompts

    config = tiny_llama().config
    header = list(range(1000, 1030))
    prompts = [header + [b * 100 + i for i in range(8 + b % 3)] for b in range(16)]
    uneven = pack_groups([(p, []) for p in prompts], PAD, 3000.0, decoding=Decoding(1, 128, 3000.0))
    assert max(Counter(uneven.sequence_row).values()) * len(uneven.row_sizes) > 16  # padding slots
    apart = pack_apart([(p, []) for p in prompts], PAD)
    decoding = Decoding(1, 128, 3000.0)
    assert decoding_cost(apart, 3000.0, decoding) < decoding_cost(uneven, 3000.0, decoding)
    assert len(pack_prompts(prompts, PAD, 3000.0, config, 1, 128).row_sizes) == 16
    system = [list(range(1000, 3000)) + [b] for b in range(8)]
    assert pack_prompts(system, PAD, 3000.0, config, 2, 8).row_sizes == [2000 + 8]


def test_kv_pass_under_gradient_checkpointing_falls_back_to_unshared():
    """transformers turns the KV cache off under gradient checkpointing in training: the KV-cache pass
    (for attention without tree masks) then runs every row in full, with a warning, instead of failing."""
    model = tiny_llama().double()
    enable_checkpointing(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, 97, (n,), generator=g) for n in (5, 8)]
    completions = torch.randint(3, 97, (4, 3), generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.warns(UserWarning, match="not shared"):
        got = batched_prefix_hidden(model.get_decoder(), contexts, completions, mask, PAD)
    torch.testing.assert_close(got, batched_unshared_hidden(model.get_decoder(), contexts, completions, mask, PAD))
