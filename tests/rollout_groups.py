"""Random micro-batches of G rollouts per context, and their reference: each rollout alone (the shared,
packed and flash passes are all compared against it)."""
import torch

PAD = 0


def random_groups(seed, context_lengths=(7, 2, 11), width=6, group=3, vocab=97):
    """(contexts, completions ``[B*G, width]`` right padded with PAD, mask); row 0 fills the width."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(1, vocab, (n,), generator=gen) for n in context_lengths]
    rows = group * len(contexts)
    completions = torch.randint(1, vocab, (rows, width), generator=gen)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[0] = width
    mask = torch.arange(width)[None] < lengths[:, None]
    return contexts, torch.where(mask, completions, PAD), mask


def each_row_alone(decoder, contexts, completions, mask):
    """Reference: each rollout alone, its whole context, no padding, no cache."""
    group = completions.shape[0] // len(contexts)
    out = []
    for r in range(completions.shape[0]):
        ctx = contexts[r // group]
        n = int(mask[r].sum())
        ids = torch.cat([ctx, completions[r, : n - 1]])[None]
        hidden = decoder(input_ids=ids).last_hidden_state[0, ctx.numel() - 1:]
        out.append(torch.nn.functional.pad(hidden, (0, 0, 0, completions.shape[1] - n)))
    return torch.stack(out)
