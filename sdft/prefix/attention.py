"""The prefix tree's visibility as a FlexAttention ``BlockMask``, and which attention a tree pass uses.

In the packed preorder layout (``sdft.prefix.tree``) query i sees key j iff ``j <= i < end[j]``: a
``mask_mod`` of one index lookup. The block structure is built from the same intervals in
O((T / block)**2) work, never as a [T, T] mask: the keys of block kb are seen by the queries in
``[kb_start, max(end over the block))`` (a partial block wherever that range meets a query block),
and a query block sees the whole key block when every key starts before it and every key's
subtree ends after it (a full block: no mask_mod evaluated there). Rollouts of different prompts,
or of one prompt after they branch, never see each other, so most blocks are skipped.

Which attention a tree pass takes (``tree_attention`` in the config):

* ``dense``: the [R, 1, T, T] mask through the model's own attention (sdpa / eager);
* ``flex``: the block mask through ``torch.nn.attention.flex_attention`` wherever it runs (on CPU
  only passes without gradient: it has no CPU backward; on CUDA rows of at least one block, ``use_flex``);
* ``auto``: flex on CUDA for packed rows of at least ``FLEX_MIN_NODES`` tokens (an arbitrary dense
  mask takes SDPA off its flash kernels there, and its memory grows with T**2), dense elsewhere: on
  this CPU the first flex call compiles for tens of seconds (about 24 s in a probe; the comparison is
  ``benchmarks/bench_tree_attention.py``), more than a whole step at the sizes a CPU trains, and the
  student's pass cannot take it. The 1024-token threshold is not measured on a GPU yet.
"""
from __future__ import annotations

import torch

from sdft.models.attention import attention_as

MODES = ("auto", "dense", "flex")
FLEX_MIN_NODES = 1024
BLOCK = 128


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def model_allows_flex(supports: bool, dropout: float, training: bool) -> bool:
    """Whether a model can run its attention through FlexAttention: its class declares flex support
    (``supports``) and it is not training with attention dropout (transformers' flex path refuses it)."""
    return supports and not (training and dropout)


def device_allows_flex(mode: str, device_type: str, grad: bool) -> bool:
    """Whether a pass on ``device_type`` (with gradient or not) may take the block mask under ``mode``:
    never for ``dense``; on CPU only ``flex`` passes without gradient (FlexAttention has no CPU backward in
    torch 2.13, and ``auto`` keeps the dense mask there altogether); elsewhere always."""
    if mode == "dense":
        return False
    if device_type == "cpu":
        return mode == "flex" and not grad
    return True


def width_takes_flex(mode: str, width: int, device_type: str) -> bool:
    """Whether a tree pass that may take the block mask takes it at packed width ``width``.

    On CUDA never for a row narrower than one block: there the block mask skips nothing, and a query
    shorter than 128 takes inductor's flex-decoding kernel, which in torch releases the package admits
    (>= 2.6) may refuse query-head groups that are not a power of two (Qwen2.5-0.5B's 7 query heads per KV
    head; the pinned 2.13 falls back to the main kernel by itself). ``auto`` asks for ``FLEX_MIN_NODES``."""
    if width < BLOCK and device_type == "cuda":
        return False
    return mode == "flex" or width >= FLEX_MIN_NODES


def device_type_of(model) -> str:
    """The device type ``model``'s weights are on."""
    return next(model.parameters()).device.type


def flex_rule(mode: str, model, device_type: str, training: bool, grad: bool):
    """(may a tree pass of ``model`` take the block mask under ``mode``, ``takes(width)``: does it at that
    packed width): a torch with FlexAttention, ``model_allows_flex`` (its class's flex support, its attention
    dropout while ``training``), ``device_allows_flex`` (``device_type``, with gradient or not) and
    ``width_takes_flex``. The run asks for the model as it is now (``flex_rule_now``), the dry run's plan
    for a training pass on its device."""
    may = (mode != "dense" and flex_available()
           and model_allows_flex(getattr(model, "_supports_flex_attn", False),
                                 getattr(model.config, "attention_dropout", 0.0), training)
           and device_allows_flex(mode, device_type, grad))
    return may, lambda width: may and width_takes_flex(mode, width, device_type)


def flex_rule_now(mode: str, model):
    """``flex_rule`` for a pass of ``model`` as it is now: its device, train mode, and this grad mode."""
    return flex_rule(mode, model, device_type_of(model), model.training, torch.is_grad_enabled())


def may_use_flex(mode: str, model) -> bool:
    """Whether a tree pass of ``model`` now may take the block mask under ``mode``, at some width."""
    return flex_rule_now(mode, model)[0]


def use_flex(mode: str, width: int, model) -> bool:
    """The rule: does a tree pass of ``model`` at packed width ``width`` take the block mask?"""
    return flex_rule_now(mode, model)[1](width)


def block_mask(ends: torch.Tensor, block: int = BLOCK):
    """The ``BlockMask`` of packed rows whose preorder subtree ends are ``ends`` ``[R, T]``."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, width = ends.shape
    nb = -(-width // block)
    padded = torch.arange(1, nb * block + 1, device=ends.device).repeat(rows, 1)
    padded[:, :width] = ends
    per_block = padded.view(rows, nb, block)
    max_end, min_end = per_block.max(-1).values, per_block.min(-1).values  # [R, KVb]
    starts = torch.arange(nb, device=ends.device) * block
    q0, q1 = starts[:, None], starts[:, None] + block  # query block bounds [Qb, 1]
    k0, k1 = starts[None, :], starts[None, :] + block  # key block bounds [1, KVb]
    any_seen = (k0 < q1) & (q0 < max_end[:, None, :])  # [R, Qb, KVb]
    full = (k1 - 1 <= q0) & (min_end[:, None, :] >= q1)
    partial = any_seen & ~full

    def indices(blocks: torch.Tensor):
        count = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count[:, None], order[:, None]

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q < ends[b, kv])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(width, width))


def flex_attention_of(model):
    """Run ``model``'s attention through transformers' flex_attention for the duration (the block mask
    is a ``BlockMask``, which only that implementation reads); restored afterwards."""
    return attention_as(model, "flex_attention")
