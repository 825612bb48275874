"""The prefix tree's FlexAttention block mask: the same visibility as the dense mask, the same hidden
states and rollouts, and the rule that picks it.

FlexAttention has no backward on CPU (torch 2.13), so here the block-mask path is checked on passes
without gradient (teacher scoring, rollout prefill); gradients through it run only on a GPU
(``test_flex_student_gradients_equal_the_dense_tree_on_cuda``, skipped without one). The first flex
call compiles (tens of seconds on this CPU), so the module keeps to one tiny model.
"""
import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft.loss.teacher import Teacher
from sdft.prefix import attention as tree_attention
from sdft.prefix.packed import pack_rollouts, tree_hidden
from sdft.prefix.tree import pack_groups
from sdft.rollout.engine import HFRolloutEngine

PAD = 0
G = 3


def _tree_batch(seed, system=40, context_lengths=(3, 1, 9, 5), width=7):
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 97, (system,), generator=gen)
    contexts = [torch.cat([head, torch.randint(1, 97, (n,), generator=gen)]) for n in context_lengths]
    rows = G * len(contexts)
    completions = torch.randint(1, 97, (rows, width), generator=gen)
    completions[1, :3] = completions[0, :3]  # two rollouts that share their first tokens
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[0] = width
    mask = torch.arange(width)[None] < lengths[:, None]
    return contexts, torch.where(mask, completions, PAD), mask


def _dense_blocks(visible: torch.Tensor, block: int):
    """(partial, full) block maps of a dense [R, T, T] mask: any / all of a block visible."""
    rows, t, _ = visible.shape
    nb = -(-t // block)
    padded = torch.zeros(rows, nb * block, nb * block, dtype=torch.bool)
    padded[:, :t, :t] = visible
    blocks = padded.view(rows, nb, block, nb, block)
    real = torch.zeros(nb * block, dtype=torch.bool)
    real[:t] = True
    real = real.view(nb, block)
    counted = blocks.sum((2, 4))
    size = real.sum(1)[:, None] * real.sum(1)[None, :]
    return counted > 0, counted == size


@pytest.mark.parametrize("block", [4, 16, 128])
@pytest.mark.parametrize("pairs", [1e9, 1e-9], ids=["one_row", "row_per_group"])
def test_block_mask_sees_exactly_what_the_dense_mask_sees(block, pairs):
    """Odd widths, several rows with padding: the block mask's mask_mod over its blocks is the dense
    visibility, no visible block is skipped and no block marked full has an invisible pair."""
    contexts, completions, mask = _tree_batch(1)
    packed, _ = pack_rollouts(contexts, completions, mask, PAD, pairs)
    visible = packed.visible()[:, 0]
    bm = tree_attention.block_mask(packed.ends, block)
    t = packed.width
    assert bm.to_dense().shape[-1] * block >= t
    dense_of_blocks = bm.to_dense()[:, 0].bool()  # [R, Qb, KVb]: blocks computed (partial or full)
    partial, full = _dense_blocks(visible, block)
    assert not (partial & ~dense_of_blocks).any()  # nothing visible is skipped
    full_blocks = torch.zeros_like(dense_of_blocks)
    for r in range(visible.shape[0]):
        for q in range(dense_of_blocks.shape[1]):
            n = int(bm.full_kv_num_blocks[r, 0, q])
            full_blocks[r, q, bm.full_kv_indices[r, 0, q, :n].long()] = True
    assert not (full_blocks & ~full).any()  # a full block is entirely visible
    r, q, k = torch.meshgrid(torch.arange(visible.shape[0]), torch.arange(t), torch.arange(t), indexing="ij")
    assert torch.equal(bm.mask_mod(r, 0, q, k), visible)


def test_block_mask_skips_what_no_query_sees():
    """Rollouts of different prompts never see each other: most blocks of a wide tree are skipped."""
    groups = [([5] * 8 + [p], [[p + 10 + g] * 60 for g in range(4)]) for p in range(8)]
    packed = pack_groups(groups, PAD, float("inf"))
    bm = tree_attention.block_mask(packed.ends, 16)
    computed = bm.to_dense().float().mean().item()
    assert computed < 0.3


@pytest.fixture
def flex_calls(monkeypatch):
    """How many passes built a block mask (so a test knows the flex path really ran)."""
    calls = []
    build = tree_attention.block_mask
    monkeypatch.setattr(tree_attention, "block_mask", lambda *a, **k: calls.append(1) or build(*a, **k))
    return calls


def _flex_teacher_hidden(model, batch, mode):
    with torch.no_grad():
        return tree_hidden(model.get_decoder(), *batch, PAD, attention=mode)


def test_flex_teacher_pass_equals_the_dense_tree_pass(flex_calls):
    """Scoring without gradient (the teacher's pass): block mask and dense mask give the same hidden
    states, to float32 rounding of a different summation order (rows of ~60 keys: 64 ulps)."""
    model = tiny_llama().eval()
    batch = _tree_batch(2)
    dense = _flex_teacher_hidden(model, batch, "dense")
    assert not flex_calls
    flex = _flex_teacher_hidden(model, batch, "flex")
    assert len(flex_calls) == 1
    mask = batch[2]
    torch.testing.assert_close(flex[mask], dense[mask], rtol=64 * 2.0 ** -24, atol=64 * 2.0 ** -24)


def test_flex_teacher_with_lora_and_a_frozen_teacher_equals_dense(flex_calls):
    """A frozen teacher behind LoRA adapters (adapters switched off for the pass) and padding rows."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    teacher = Teacher(model, "frozen")
    contexts, completions, mask = _tree_batch(3, context_lengths=(2, 6))
    dense, _ = teacher.score(contexts, completions, mask, PAD, attention="dense")
    flex, _ = teacher.score(contexts, completions, mask, PAD, attention="flex")
    assert len(flex_calls) == 1
    torch.testing.assert_close(flex[mask], dense[mask], rtol=64 * 2.0 ** -24, atol=64 * 2.0 ** -24)


def test_flex_prefill_gives_the_dense_prefill_s_greedy_rollouts(flex_calls):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).eval()
    system = [{"role": "system", "content": "You call tools. Answer in JSON only, one line, no prose."}]
    prompts = [tok.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"][0]
               for p in ("add 1 2", "a much longer prompt here", "x")]
    runs = {mode: HFRolloutEngine(tok, tree_attention=mode).generate(model, prompts, 2, 10, 1.0, greedy=True)
            for mode in ("dense", "flex")}
    assert len(flex_calls) == 1
    assert torch.equal(runs["flex"].completions, runs["dense"].completions)
    torch.testing.assert_close(runs["flex"].logprobs, runs["dense"].logprobs, rtol=1e-4, atol=1e-4)


def test_the_rule_keeps_the_dense_mask_on_cpu_and_wherever_flex_cannot_run():
    model = tiny_llama()
    decoder = model.get_decoder()
    with torch.no_grad():
        assert not tree_attention.use_flex("auto", 10 ** 6, decoder)  # CPU: compile cost, dense
        assert tree_attention.use_flex("flex", 10, decoder)
        assert not tree_attention.use_flex("dense", 10 ** 6, decoder)
    assert not tree_attention.use_flex("flex", 10, decoder)  # CPU with gradient: flex has no backward
    decoder.config.attention_dropout = 0.1
    decoder.train()
    assert not tree_attention.may_use_flex("flex", decoder)  # dropout: transformers' flex refuses it


def test_on_cuda_a_row_narrower_than_one_block_keeps_the_dense_mask():
    """A query under 128 tokens would take inductor's flex-decoding kernel on CUDA, which older torch lets
    refuse GQA groups that are not a power of two; one block is nothing to skip. (A stand-in decoder.)"""

    from types import SimpleNamespace

    class OnCuda:
        _supports_flex_attn, training, config = True, False, tiny_llama().config

        def parameters(self):
            return iter([SimpleNamespace(device=torch.device("cuda"))])

    decoder = OnCuda()
    assert not tree_attention.use_flex("flex", tree_attention.BLOCK - 1, decoder)
    assert tree_attention.use_flex("flex", tree_attention.BLOCK, decoder)
    assert not tree_attention.use_flex("auto", tree_attention.FLEX_MIN_NODES - 1, decoder)
    assert tree_attention.use_flex("auto", tree_attention.FLEX_MIN_NODES, decoder)


def test_a_flex_mode_pass_with_gradient_on_cpu_falls_back_to_the_dense_mask(flex_calls):
    """``tree_attention=flex`` must not break CPU training: the student's pass takes the dense mask."""
    model = tiny_llama().train()
    batch = _tree_batch(4)
    hidden = tree_hidden(model.get_decoder(), *batch, PAD, attention="flex")
    hidden[batch[2]].square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not flex_calls


def test_the_model_keeps_its_own_attention_after_a_flex_pass():
    model = tiny_llama().eval()
    _flex_teacher_hidden(model, _tree_batch(5), "flex")
    assert model.config._attn_implementation == "sdpa"


def test_a_block_sparse_pass_packs_everything_in_one_tree():
    """The dense cost model splits weakly sharing groups; with the block mask only nodes cost."""
    from sdft.prefix.packed import pack_for

    model = tiny_llama()
    batch = _tree_batch(6, system=1)
    packs = {}
    for mode in ("dense", "flex"):
        with torch.no_grad():
            packs[mode] = pack_for(model.get_decoder(), mode, lambda pairs: pack_rollouts(*batch, PAD, pairs))[0]
    assert len(packs["flex"].row_sizes) == 1
    assert packs["flex"].num_nodes <= packs["dense"].num_nodes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_student_gradients_equal_the_dense_tree_on_cuda():
    model = tiny_llama().cuda().train()
    contexts, completions, mask = _tree_batch(7)
    contexts = [c.cuda() for c in contexts]
    completions, mask = completions.cuda(), mask.cuda()
    grads = {}
    for mode in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        hidden = tree_hidden(model.get_decoder(), contexts, completions, mask, PAD, attention=mode)
        hidden[mask].square().sum().backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["flex"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
