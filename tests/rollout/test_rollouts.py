"""The batched rollout engine: same greedy tokens as model.generate per prompt, EOS per row, log-probs."""
import re

import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from sdft.rollout.engine import HFRolloutEngine, RolloutBatch, trim_completions

PROMPTS = ["add 1 2", "a much longer prompt here", "x"]


SYSTEM = [{"role": "system", "content": "You call tools. Answer in JSON only, one line, no prose."}]


def _setup(eos_bias=0.0, system=False):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).eval()
    if eos_bias:
        with torch.no_grad():  # make end-of-turn likely so rows stop at different steps
            model.get_output_embeddings().weight[tok.eos_token_id] *= eos_bias
    head = SYSTEM if system else []
    prompts = [tok.apply_chat_template(head + [{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"][0] for p in PROMPTS]
    return tok, model, prompts


@pytest.mark.parametrize("tree,system,pairs", [(True, False, None), (True, True, 1e9), (True, True, 1e-9),
                                               (False, True, None)],
                         ids=["prompt_trees", "shared_system_one_row", "shared_system_row_per_prompt",
                              "replicated_kv_fallback"])
def test_greedy_equals_generate_on_each_prompt_alone(tree, system, pairs, monkeypatch):
    import sdft.prefix.packed
    import sdft.rollout.engine

    monkeypatch.setattr(sdft.rollout.engine, "supports_tree", lambda model: tree)
    if pairs is not None:
        monkeypatch.setattr(sdft.prefix.packed, "pairs_per_token", lambda config: pairs)
    tok, model, prompts = _setup(system=system)
    batch = HFRolloutEngine(tok).generate(model, prompts, 2, 12, 1.0, greedy=True)
    assert isinstance(batch, RolloutBatch) and batch.completions.shape[0] == 2 * len(prompts)
    for b, prompt in enumerate(prompts):
        ref = model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]),
                             do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        ref, ref_mask = trim_completions(ref[:, prompt.numel():], {tok.eos_token_id}, tok.pad_token_id)
        for row in (2 * b, 2 * b + 1):
            got = batch.completions[row][batch.mask[row]]
            assert got.tolist() == ref[0][ref_mask[0]].tolist()


@pytest.mark.parametrize("attn,system", [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)])
def test_rows_stop_at_their_own_eos_and_logprobs_match_a_rescoring(attn, system):
    """The rescoring runs each row alone, causally: it checks the shared-prompt tree decoding."""
    torch.manual_seed(0)
    tok, model, prompts = _setup(eos_bias=40.0, system=system)
    model.config._attn_implementation = attn
    batch = HFRolloutEngine(tok).generate(model, prompts, 4, 10, 0.7)
    lengths = batch.mask.sum(1)
    assert batch.completions.shape[1] == int(lengths.max())
    assert len(set(lengths.tolist())) > 1  # rows ended at different steps
    for r in range(batch.completions.shape[0]):
        n = int(lengths[r])
        row = batch.completions[r]
        assert (row[n:] == tok.pad_token_id).all()
        eos_at = (row[:n] == tok.eos_token_id).nonzero()
        assert eos_at.numel() == 0 or (eos_at.numel() == 1 and int(eos_at[0]) == n - 1)
        prompt = prompts[r // 4]
        with torch.no_grad():
            logits = model(torch.cat([prompt, row[:n]])[None]).logits[0, prompt.numel() - 1: -1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(1, row[:n, None]).squeeze(1)
        torch.testing.assert_close(batch.logprobs[r, :n], expected, rtol=1e-4, atol=1e-4)
        assert (batch.logprobs[r, n:] == 0).all()


def test_sampling_is_seeded():
    tok, model, prompts = _setup()
    torch.manual_seed(3)
    a = HFRolloutEngine(tok).generate(model, prompts, 2, 6, 1.0)
    torch.manual_seed(3)
    b = HFRolloutEngine(tok).generate(model, prompts, 2, 6, 1.0)
    assert torch.equal(a.completions, b.completions)


def test_inverse_cdf_sampling_follows_the_distribution():
    from sdft.rollout.engine import sample

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(sample(probs.log()), minlength=4).double() / 20000
    # Binomial standard error at n=20000 is <= 0.0035; 5 sigma.
    torch.testing.assert_close(counts, probs[0].double(), rtol=0, atol=0.018)
    assert counts[1] == 0


def test_the_decoding_cache_is_freed_without_the_cycle_collector():
    """The reserved KV buffers are released when generate returns, not at some later gc pass."""
    import gc
    import weakref

    from tiny_model import tiny_llama

    import sdft.rollout.engine as ro

    model = tiny_llama()
    seen = []
    real = ro.reserve_room

    def spy(cache, room):
        real(cache, room)
        seen.extend(weakref.ref(layer.key_room) for layer in cache.layers)

    gc.disable()
    try:
        ro.reserve_room = spy
        prompts = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9])]
        ro.HFRolloutEngine(type("T", (), {"pad_token_id": 0, "eos_token_id": 2})()).generate(model, prompts, 2, 4, 1.0)
        assert seen and all(ref() is None for ref in seen)
    finally:
        ro.reserve_room = real
        gc.enable()


@pytest.mark.parametrize("tree", [True, False], ids=["prompt_trees", "replicated_kv_fallback"])
def test_the_cache_goes_by_the_library_s_own_name(tree, monkeypatch, recwarn):
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` and warns on the old name."""
    import sdft.rollout.engine

    monkeypatch.setattr(sdft.rollout.engine, "supports_tree", lambda model: tree)
    tok, model, prompts = _setup(system=True)
    HFRolloutEngine(tok).generate(model, prompts, 2, 4, 1.0, greedy=True)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_a_plugged_engine_s_answer_is_checked_against_the_seam():
    """A wrong RolloutBatch from another engine is one line before scoring, not a shape error inside it."""
    import dataclasses

    from sdft.rollout.checks import check_rollouts

    tok, model, prompts = _setup()
    good = HFRolloutEngine(tok).generate(model, prompts, 2, 5, 1.0, greedy=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert check_rollouts(good, len(prompts), 2, 5, vocab) is good
    bad = {"prompts": (dict(prompts=prompts[:1]), "1 prompts for 3 asked"),
           "rows": (dict(completions=good.completions[:-1]), "expected [6, <= 5]"),
           "too_long": (dict(completions=torch.zeros(6, 9, dtype=torch.long)), "above max 5"),
           "mask": (dict(mask=good.mask.float()), "mask must be a bool tensor"),
           "logprobs": (dict(logprobs=good.logprobs[:, :1]), "logprobs must be shaped"),
           "ids": (dict(completions=good.completions + vocab), "outside the vocabulary"),
           "negative_ids": (dict(completions=good.completions - vocab), "outside the vocabulary"),
           "float_ids": (dict(completions=good.completions.float()), "integer token ids"),
           "lists": (dict(mask=good.mask.tolist()), "mask are not tensors")}
    for name, (change, message) in bad.items():
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            check_rollouts(dataclasses.replace(good, **change), len(prompts), 2, 5, vocab)
    with pytest.raises(TypeError, match="not a RolloutBatch"):
        check_rollouts((good.completions, good.mask), len(prompts), 2, 5, vocab)


def test_an_engine_without_generate_is_refused_before_the_model_loads(monkeypatch):
    import sdft.run.trainer

    monkeypatch.setattr(sdft.run.trainer, "prepare", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(TypeError, match="has no generate"):
        sdft.run.trainer.train(engine=object())


def test_each_model_gets_the_cache_under_the_name_its_forward_takes():
    """A remote-code model that still takes ``past_key_values`` must not get ``cache`` (which its
    ``**kwargs`` would swallow: decoding would then run without the prompt)."""
    from dataclasses import dataclass

    from sdft.models.parts import kv_cache, passing_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    marker = object()
    assert passing_cache(Old(), marker) == {"past_key_values": marker}
    assert passing_cache(New(), marker) == {"cache": marker}

    @dataclass
    class OldOutput:
        logits: object = None
        past_key_values: object = None

    assert kv_cache(OldOutput(past_key_values=marker)) is marker and kv_cache(OldOutput()) is None
    assert kv_cache((1, 2)) is None
