"""A prefix tree (trie on token ids) over a micro-batch's sequences, packed for one decoder pass.

Every distinct prefix becomes one node, so a system message repeated in every prompt, a prompt
shared by its G rollouts, or rollouts that sampled the same first tokens are each computed once.
Causal attention makes a prefix's keys and values independent of what follows, so reading a shared
node is exact.

Nodes are laid out in depth-first preorder: node j is an ancestor-or-self of node i exactly when
``j <= i < end[j]`` (``end`` = one past the last node of j's subtree), which gives the attention
mask without any per-pair bookkeeping. A node's position id is its depth.

A single packed row pays attention over all its node pairs (a custom mask has no causal shortcut),
so groups are packed into several rows ("bins") when sharing would save less than it costs:
``pack_groups`` adds a group to the current row only if the merged row's cost ``n + n**2 / R``
(``R``: how many attention pairs cost as much as one token's matmuls, see ``pairs_per_token``)
is no more than the two rows apart. A group (a context and its continuations) never splits.

Rollout decoding (``Decoding``) adds what a row costs over the steps that follow its prefill: every
sampled token of a row attends over the whole row (its prompt nodes and every rollout's tokens so far,
a dense mask), so a row of Q rollouts over n nodes pays ``Q*n*L + Q**2 * L**2 / 2`` pairs in L steps.
Prompts then share a row only where the nodes they share save more than that: a long common system
message, not a chat template's header. Rows are padded to the widest and to the most rollouts, and padding
slots pass through the model too, so the rollout packing (``sdft.rollout.engine.pack_prompts``) takes the
cheapest by ``decoding_cost`` of a few layouts: the prefill's own packing, the one above, a row per prompt.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


class _Node:
    __slots__ = ("token", "children", "index")

    def __init__(self, token: int):
        self.token = token
        self.children: dict[int, _Node] = {}
        self.index = -1


def _insert(root: _Node, tokens: list[int]) -> list[_Node]:
    """Walk/extend the trie along ``tokens``; the node of each token."""
    path, node = [], root
    for tok in tokens:
        child = node.children.get(tok)
        if child is None:
            child = node.children[tok] = _Node(tok)
        path.append(child)
        node = child
    return path


def _common(a: _Node, b: _Node) -> int:
    """Number of nodes the tries under ``a`` and ``b`` have in common."""
    count, stack = 0, [(a, b)]
    while stack:
        x, y = stack.pop()
        for tok, cx in x.children.items():
            cy = y.children.get(tok)
            if cy is not None:
                count += 1
                stack.append((cx, cy))
    return count


def _preorder(root: _Node) -> tuple[list[_Node], list[int], list[int]]:
    """Nodes in depth-first preorder with their depths and subtree ends; sets ``node.index``."""
    order, depths, ends = [], [], []
    stack = [(child, 0, False) for child in reversed(list(root.children.values()))]
    while stack:
        node, depth, closing = stack.pop()
        if closing:
            ends[node.index] = len(order)
            continue
        node.index = len(order)
        order.append(node)
        depths.append(depth)
        ends.append(-1)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in reversed(list(node.children.values())))
    return order, depths, ends


def pairs_per_token(config) -> float:
    """R: attention score pairs that cost as much as one token through a layer's matmuls.

    One token: 2 FLOPs per weight of the layer. One (query, key) pair: 4 FLOPs per query-head dim
    (scores and weighted values). Falls back to 2000 when the config lacks the sizes.
    """
    try:
        hidden, inter = config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
    except AttributeError:
        return 2000.0
    weights = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter
    return 2 * weights / (4 * heads * head_dim)


@dataclass(frozen=True)
class Decoding:
    """The decoding that follows a prefill of prompts: ``queries`` rollouts of each prompt, ``steps`` tokens
    each at most, every step's attention paid at ``pairs`` pairs a token (``pairs_per_token``)."""

    queries: int
    steps: int
    pairs: float


def _cost(nodes: int, pairs: float, groups: int = 1, decoding: Decoding | None = None) -> float:
    """A row's cost in token passes: its prefill (nodes and, under a dense mask, their pairs), and under
    ``decoding`` the attention of its ``groups`` prompts' rollouts over the row in every step."""
    cost = nodes + nodes * nodes / pairs
    if decoding is not None:
        q, steps = groups * decoding.queries, decoding.steps
        cost += (q * nodes * steps + q * q * steps * steps / 2) / decoding.pairs
    return cost


@dataclass
class PackedTrees:
    """Bins of tries packed as ``[R, T]`` rows (right padded), and where each sequence's tokens sit."""

    ids: torch.Tensor  # [R, T] token ids, pad_id after the row's nodes
    positions: torch.Tensor  # [R, T] depth of each node (0 on padding)
    ends: torch.Tensor  # [R, T] preorder subtree end of each node (j + 1 on padding: sees only itself)
    sequence_row: list[int]  # bin of each sequence
    sequence_nodes: list[torch.Tensor]  # node indices of each sequence's tokens, within its row
    row_sizes: list[int]  # real nodes in each row

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def num_nodes(self) -> int:
        """Real (non-padding) tokens in the pass: what the tree costs in token passes."""
        return sum(self.row_sizes)

    @property
    def fullest_row(self) -> int:
        """How many sequences the row holding the most has (every row has that many slots when decoding)."""
        return max(Counter(self.sequence_row).values())

    def visible(self) -> torch.Tensor:
        """[R, 1, T, T] bool: query i sees key j when j is an ancestor of i or i itself."""
        t = self.width
        i = torch.arange(t, device=self.ids.device)
        return ((i[None, None, :] <= i[None, :, None]) & (i[None, :, None] < self.ends[:, None, :]))[:, None]

    def flat_index(self, sequence: int, nodes: torch.Tensor) -> torch.Tensor:
        """Indices into the flattened ``[R*T]`` packing of a sequence's given token slots."""
        return self.sequence_row[sequence] * self.width + nodes


def decoding_cost(packed: PackedTrees, pairs: float, decoding: Decoding) -> float:
    """What prefilling ``packed`` (under ``pairs``, see ``_cost``) and decoding over its rows costs in token
    passes, padding included: every row is as wide as the widest and decodes as many rollout slots as the
    fullest, each slot attending over the whole row at every step."""
    rows, width = packed.ids.shape
    slots = packed.fullest_row * decoding.queries
    steps = decoding.steps
    prefill = rows * (width + width * width / pairs)
    decode = rows * slots * steps * (1 + (width + slots * steps / 2) / decoding.pairs)
    return prefill + decode


def pack_apart(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, device=None) -> PackedTrees:
    """``pack_groups``'s layout with every group in a row of its own."""
    return _layout(groups, [[g] for g in range(len(groups))], pad_id, device)


def pack_groups(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, pairs: float,
                device=None, decoding: Decoding | None = None) -> PackedTrees:
    """Pack ``groups`` of (context, continuations) into tries, one row per bin.

    Sequence ``k`` (in group order, then continuation order) is ``context + continuation``; a group
    without continuations contributes its context alone as one sequence. ``decoding``: the groups are
    prompts whose rollouts decode over their rows next (``Decoding``), which the bins' costs include.
    """
    tries = []
    for context, conts in groups:
        root = _Node(-1)
        for cont in conts or [[]]:
            _insert(root, context + cont)
        tries.append(root)
    sizes = [_count(t) for t in tries]
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    bins: list[list[int]] = []
    bin_root, bin_size = None, 0
    for g in order:
        if bin_root is not None:
            merged = bin_size + sizes[g] - _common(bin_root, tries[g])
            held = len(bins[-1])
            if (_cost(merged, pairs, held + 1, decoding)
                    <= _cost(bin_size, pairs, held, decoding) + _cost(sizes[g], pairs, 1, decoding)):
                bins[-1].append(g)
                _merge(bin_root, tries[g])
                bin_size = merged
                continue
        bins.append([g])
        bin_root, bin_size = _Node(-1), sizes[g]
        _merge(bin_root, tries[g])
    return _layout(groups, bins, pad_id, device)


def _count(root: _Node) -> int:
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += len(node.children)
        stack.extend(node.children.values())
    return count


def _merge(into: _Node, other: _Node) -> None:
    """Insert every path of ``other`` into ``into``."""
    stack = [(into, other)]
    while stack:
        x, y = stack.pop()
        for tok, cy in y.children.items():
            cx = x.children.get(tok)
            if cx is None:
                cx = x.children[tok] = _Node(tok)
            stack.append((cx, cy))


def _layout(groups, bins, pad_id, device) -> PackedTrees:
    """Build each bin's trie again with every sequence's path recorded, and lay the rows out."""
    paths: dict[int, list[_Node]] = {}
    rows: list[tuple[list[int], list[int], list[int]]] = []
    sequence_row: dict[int, int] = {}
    starts, k = [], 0
    for context, conts in groups:
        starts.append(k)
        k += max(len(conts), 1)
    for r, members in enumerate(bins):
        root = _Node(-1)
        for g in members:
            context, conts = groups[g]
            for j, cont in enumerate(conts or [[]]):
                paths[starts[g] + j] = _insert(root, context + cont)
                sequence_row[starts[g] + j] = r
        order, depths, ends = _preorder(root)
        rows.append(([n.token for n in order], depths, ends))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    ends = torch.arange(1, width + 1).repeat(len(rows), 1)
    for r, (tok, depth, end) in enumerate(rows):
        n = len(tok)
        ids[r, :n] = torch.tensor(tok)
        positions[r, :n] = torch.tensor(depth)
        ends[r, :n] = torch.tensor(end)
    # one host-to-device copy for every sequence's nodes (a copy each costs ~10 us of launch on a GPU)
    flat = torch.tensor([n.index for s in range(k) for n in paths[s]], dtype=torch.long).to(device)
    nodes = list(flat.split([len(paths[s]) for s in range(k)]))
    return PackedTrees(ids.to(device), positions.to(device), ends.to(device),
                       [sequence_row[s] for s in range(k)], nodes, [len(r[0]) for r in rows])
