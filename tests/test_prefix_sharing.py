"""Shared-prefix passes equal the unshared computation, values and gradients."""
import pytest
import torch

from sdft_kernels import fused_linear_divergence
from sdft_kernels.prefix_sharing import shared_prefix_hidden, split_for_scoring, tokens_processed, unshared_hidden
from tiny_model import tiny_llama


def _batch(seed, g=3, p=7, length=6):
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, 97, (p,), generator=gen)
    completions = torch.randint(0, 97, (g, length), generator=gen)
    lengths = torch.tensor([length, length - 2, 1][:g])
    mask = torch.arange(length)[None] < lengths[:, None]
    return context, completions, mask


@pytest.mark.parametrize("p", [1, 2, 7])
def test_hidden_states_match(p):
    model = tiny_llama().eval()
    context, completions, mask = _batch(1, p=p)
    with torch.no_grad():
        a = shared_prefix_hidden(model.get_decoder(), context, completions, mask)
        b = unshared_hidden(model.get_decoder(), context, completions, mask)
    keep = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1) & mask
    assert torch.allclose(a[keep], b[keep], atol=1e-5)


def test_hidden_state_predicts_next_completion_token():
    model = tiny_llama().eval()
    context, completions, _ = _batch(2, g=2)
    mask = torch.ones_like(completions, dtype=torch.bool)
    full = torch.cat([context.expand(2, -1), completions], 1)
    with torch.no_grad():
        logits = model(full).logits[:, context.numel() - 1:-1]
        h = shared_prefix_hidden(model.get_decoder(), context, completions, mask)
        ours = h @ model.get_output_embeddings().weight.T
    assert torch.allclose(ours, logits, atol=1e-4)


def test_gradients_equal_unshared():
    context, completions, mask = _batch(3)
    t_context = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(9))
    grads = []
    for fn in (shared_prefix_hidden, unshared_hidden):
        model = tiny_llama(seed=4).train()
        dec = model.get_decoder()
        with torch.no_grad():
            teacher = fn(dec, t_context, completions, mask)
        student = fn(dec, context, completions, mask)
        w = model.get_output_embeddings().weight
        loss = fused_linear_divergence(student, teacher, w, mask=mask)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    shared, plain = grads
    assert shared.keys() == plain.keys() and len(shared) > 5
    for name in shared:
        assert torch.allclose(shared[name], plain[name], atol=1e-6, rtol=1e-4), name


def test_split_and_token_counts():
    prefix, cont = split_for_scoring(torch.tensor([5, 6, 7]), torch.tensor([[1, 2], [3, 4]]))
    assert prefix.tolist() == [5, 6] and cont.tolist() == [[7, 1], [7, 3]]
    assert tokens_processed(100, 20, 4) == (180, 480)
    with pytest.raises(ValueError, match="non-empty"):
        split_for_scoring(torch.tensor([], dtype=torch.long), torch.tensor([[1]]))
