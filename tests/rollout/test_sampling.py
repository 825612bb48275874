"""Top-k / top-p / min-p rollouts: the kept tokens are those transformers' logits processors keep, a rollout
samples only among them, and the log-probs it records are the whole tempered distribution's (TRL's)."""
import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sdft import SDFTConfig
from sdft.rollout.engine import HFRolloutEngine
from sdft.rollout.sampling import Sampling


def _hf_kept(logits, sampling):
    scores = logits.clone()
    for warper, value, on in ((TopKLogitsWarper, sampling.top_k, sampling.top_k > 0),
                              (TopPLogitsWarper, sampling.top_p, sampling.top_p < 1.0),
                              (MinPLogitsWarper, sampling.min_p, sampling.min_p > 0.0)):
        if on:
            scores = warper(value)(None, scores)
    return torch.isfinite(scores)


@pytest.mark.parametrize("sampling", [Sampling(top_k=5), Sampling(top_p=0.9), Sampling(top_p=0.3),
                                      Sampling(min_p=0.05), Sampling(top_k=20, top_p=0.8, min_p=0.02),
                                      Sampling(top_k=1), Sampling(top_k=500)])
def test_the_kept_tokens_are_transformers_choices(sampling):
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)) * 3
    kept = torch.isfinite(sampling.restrict(torch.log_softmax(logits, -1)))
    assert torch.equal(kept, _hf_kept(logits, sampling))
    assert bool(kept.any(-1).all())


def test_no_filter_leaves_the_distribution_alone():
    assert not Sampling().filters and Sampling(top_p=0.99).filters
    assert Sampling.from_config(SDFTConfig(top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.2)) == Sampling(
        3, 0.5, 0.1, 1.2)


@pytest.mark.parametrize("value,message", [(dict(top_p=1.5), "top_p must be in"), (dict(top_p=0.0), "top_p"),
                                           (dict(top_k=-1), "top_k"), (dict(min_p=1.0), "min_p"),
                                           (dict(repetition_penalty=0.0), "repetition_penalty must be positive")])
def test_out_of_range_sampling_settings_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        SDFTConfig(**value)


def _prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"][0] for p in ("add 1 2", "x")]


@pytest.mark.parametrize("sampling", [Sampling(top_k=1), Sampling(top_p=1e-6)])
def test_a_one_token_filter_samples_the_greedy_rollout_and_records_the_full_log_probs(sampling):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok)).eval()
    prompts = _prompts(tok)
    greedy = HFRolloutEngine(tok).generate(model, prompts, 2, 8, 0.7, greedy=True)
    torch.manual_seed(0)
    sampled = HFRolloutEngine(tok, sampling=sampling).generate(model, prompts, 2, 8, 0.7)
    assert torch.equal(sampled.completions, greedy.completions) and torch.equal(sampled.mask, greedy.mask)
    assert torch.equal(sampled.logprobs, greedy.logprobs) and bool((sampled.logprobs[sampled.mask] < 0).all())


def test_top_k_rollouts_draw_only_among_the_k_most_likely(monkeypatch):
    import sdft.rollout.engine as engine

    seen = []
    real = engine.sample

    def watch(log_p):
        token = real(log_p)
        seen.append(bool(torch.isfinite(log_p.gather(1, token[:, None])).all()) and
                    int(torch.isfinite(log_p).sum(-1).max()) <= 3)
        return token

    monkeypatch.setattr(engine, "sample", watch)
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    HFRolloutEngine(tok, sampling=Sampling(top_k=3)).generate(tiny_llama(vocab=len(tok)).eval(), _prompts(tok), 4,
                                                                 8, 1.0)
    assert seen and all(seen)


@pytest.mark.parametrize("draw", [0.0, 1.0 - 2.0 ** -53])
def test_inverse_cdf_sampling_never_lands_on_a_zero_mass_token(monkeypatch, draw):
    from sdft.rollout import engine

    log_p = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))  # ids 0, 2 and 4 carry no mass
    monkeypatch.setattr(engine.torch, "rand", lambda *shape, **kw: torch.full(shape, draw, dtype=torch.float64))
    assert int(engine.sample(log_p)) in (1, 3)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_the_repetition_penalty_is_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(1)) * 3
    ids = torch.tensor([[5, 9, 9, 40], [0, 1, 2, 3], [96, 50, 5, 7]])
    seen = torch.zeros(3, 97, dtype=torch.bool).scatter(1, ids, True)
    ours = Sampling(repetition_penalty=penalty).penalize(logits, seen)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))
    assert Sampling(repetition_penalty=penalty).penalizes and not Sampling().penalizes


def test_greedy_rollouts_with_a_repetition_penalty_equal_generate_on_each_prompt_alone():
    """The penalty covers each row's prompt and its tokens so far, as transformers' generate applies it."""
    from sdft.rollout.engine import trim_completions

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tok)).eval()
    prompts = _prompts(tok)
    batch = HFRolloutEngine(tok, sampling=Sampling(repetition_penalty=3.0)).generate(model, prompts, 2, 10, 1.0,
                                                                                    greedy=True)
    plain = HFRolloutEngine(tok).generate(model, prompts, 2, 10, 1.0, greedy=True)
    assert not torch.equal(batch.completions, plain.completions)  # the penalty changed what was picked
    for b, prompt in enumerate(prompts):
        ref = model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]), do_sample=False,
                             max_new_tokens=10, repetition_penalty=3.0, pad_token_id=tok.pad_token_id)
        ref, keep = trim_completions(ref[:, prompt.numel():], {tok.eos_token_id}, tok.pad_token_id)
        for row in (2 * b, 2 * b + 1):
            assert batch.completions[row][batch.mask[row]].tolist() == ref[0][keep[0]].tolist()
