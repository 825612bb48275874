"""Heads of other families (Gemma-2 soft cap, Cohere / Granite scales, a
biased head) give the loss of the model's own logits; a head sdft cannot express is refused."""
import pytest
import torch
from tiny_model import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)

from sdft import SDFTConfig, train
from sdft.loss.batch import BatchLoss
from sdft.loss.teacher import Teacher
from sdft.models.head import Head, head_of, verify_head
from sdft.rollout.engine import RolloutBatch
from sdft_kernels import reference_linear_divergence

ROTARY_TOL = 16 * 2.0 ** -24
SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def gemma2():
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=0.7, head_dim=8, **SIZES))


def cohere():
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(logit_scale=0.3, **SIZES))


def granite():
    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, **SIZES))


def biased_llama():
    model = tiny_llama(vocab=61)
    head = torch.nn.Linear(32, 61, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 2)
    model.config.tie_word_embeddings = False
    model.lm_head = head
    return model


FAMILIES = {"gemma2": gemma2, "cohere": cohere, "granite": granite, "biased_llama": biased_llama}
EXPECTED = {"gemma2": (1.0, 0.7, False), "cohere": (0.3, None, False), "granite": (0.25, None, False),
            "biased_llama": (1.0, None, True)}


def _batch(vocab, group=2):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (5, 3)]
    contexts = [torch.randint(3, vocab, (n,), generator=g) for n in (7, 4)]
    completions = torch.randint(3, vocab, (2 * group, 4), generator=g)
    mask = torch.ones_like(completions, dtype=torch.bool)
    mask[1, 3:] = False
    return RolloutBatch(prompts, completions.masked_fill(~mask, 0), mask, torch.zeros(mask.shape)), contexts


def _own_logits(model, ctx, row, n):
    ids = torch.cat([ctx, row[:n]])[None]
    return model(input_ids=ids).logits[0, ctx.numel() - 1: ctx.numel() - 1 + n].double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_is_read_and_verified(family):
    model = FAMILIES[family]().double()
    head = verify_head(model)
    scale, cap, bias = EXPECTED[family]
    assert head.logit_scale == pytest.approx(scale) and head.softcap == cap and (head.bias is not None) == bias


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("teacher_mode", ["live", "frozen"])
def test_batch_loss_is_the_loss_of_the_models_own_logits(family, teacher_mode):
    model = FAMILIES[family]().double()
    teacher = Teacher(model, teacher_mode)
    batch, contexts = _batch(61)
    config = SDFTConfig(divergence="jsd", distillation_alpha=0.3, distillation_temperature=1.4, device="cpu",
                        teacher_mode=teacher_mode)
    got = BatchLoss.from_config(config)(model, teacher, batch, contexts, pad_id=0)
    expected = 0.0
    t_model = teacher.copy if teacher.copy is not None else model
    for r in range(batch.completions.shape[0]):
        n = int(batch.mask[r].sum())
        s = _own_logits(model, batch.prompts[r // 2], batch.completions[r], n)
        with torch.no_grad():
            t = _own_logits(t_model, contexts[r // 2], batch.completions[r], n)
        # the reference with an identity head: logits in, the divergence out
        eye = torch.eye(61, dtype=torch.float64)
        expected = expected + reference_linear_divergence(s, t, eye, divergence="jsd", beta=0.3, temperature=1.4,
                                                          reduction="sum")
    # float64 models, but float32 rotary tables (see test_batch_prefix): ROTARY_TOL of the magnitude
    torch.testing.assert_close(got, expected, rtol=ROTARY_TOL, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got, params, allow_unused=True),
                    torch.autograd.grad(expected, params, allow_unused=True)):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=ROTARY_TOL * max(b.abs().max().item(), 1e-30))


class DoubledLogits(LlamaForCausalLM):
    """A family whose forward does something to the logits that no config field says."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_head_sdft_cannot_express_is_refused_before_training(tmp_path):
    base = tiny_llama(vocab=61)
    model = DoubledLogits(base.config)
    model.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match="DoubledLogits: its logits are not what sdft computes"):
        verify_head(model)
    tok = tiny_tokenizer()
    model = DoubledLogits(tiny_llama(vocab=len(tok)).config)
    steps = []
    with pytest.raises(ValueError, match="different loss, so it is refused"):
        train(model, [{"prompt": "a", "demonstration": "b"}], SDFTConfig(output_dir=str(tmp_path), device="cpu",
              progress_bar=False), tokenizer=tok, step_callback=lambda *a: steps.append(a))
    assert not steps


def test_a_wrong_head_description_is_refused():
    model = gemma2().double()
    with pytest.raises(ValueError, match="soft cap None"):
        verify_head(model, Head(model.lm_head.weight))
    assert head_of(model).softcap == 0.7
