"""One adapter per model family (sdft.models.families), each checked on a tiny random config
in float64: the head sdft reads reproduces the model's logits, and the prefix-tree pass (and the KV
cache pass) through the adapter's decoder equals the unshared computation. Unknown families are refused."""
import pytest
import torch
import transformers

from sdft.models import FAMILIES, blocks_of, decoder_of, family_of
from sdft.models.head import verify_head
from sdft.prefix.packed import batched_prefix_hidden, batched_unshared_hidden, supports_tree, tree_hidden

ROTARY_TOL = 16 * 2.0 ** -24  # float32 rotary tables (see test_batch_prefix)
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0,
                                                         attn_implementation="eager")),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0,
                                                                  attn_implementation="eager")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=97,
                                                   attn_implementation="sdpa", bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(bos_token_id=1, eos_token_id=2)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(moe_intermediate_size=16, num_experts=4,
                                                               num_experts_per_tok=2,
                                                               shared_expert_intermediate_size=32)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=8, moe_intermediate_size=16, num_experts=4,
                                                               num_experts_per_tok=2)),
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}  # their experts' grouped products take no float64: the eager ones do


def tiny(kind: str):
    config_name, model_name, extra = CONFIGS[kind]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    kwargs = extra if kind == "gpt2" else {**SMALL, **extra}
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).double().eval()
    if kind in MOE and hasattr(model, "set_experts_implementation"):  # transformers 5; 4.x's experts are eager
        model.set_experts_implementation("eager")
    assert model.config.model_type == kind
    return model


def _batch(group=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 97, (9,), generator=g)
    contexts = [torch.cat([system, torch.randint(3, 97, (n,), generator=g)]) for n in (4, 7)]
    completions = torch.randint(3, 97, (2 * group, 6), generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 6, 2, 5, 6])[:, None]
    return contexts, completions.masked_fill(~mask, 0), mask


def test_every_registered_family_is_tested():
    assert set(FAMILIES) <= set(CONFIGS)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_family_head_and_prefix_sharing(kind):
    model = tiny(kind)
    family_of(model)
    assert len(blocks_of(model)) == 2
    verify_head(model)  # hidden @ head (+ bias, scale, cap) equals the model's logits
    decoder = decoder_of(model)
    contexts, completions, mask = _batch()
    ref = batched_unshared_hidden(decoder, contexts, completions, mask, 0)
    fns = [batched_prefix_hidden] + ([tree_hidden] if supports_tree(decoder) else [])
    for fn in fns:
        got = fn(decoder, contexts, completions, mask, 0)
        torch.testing.assert_close(got[mask], ref[mask], rtol=0,
                                   atol=ROTARY_TOL * max(ref[mask].abs().max().item(), 1.0), msg=fn.__name__)


def test_unknown_family_is_refused_by_name():
    config = transformers.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config)
    with pytest.raises(ValueError, match="model type 'opt'.*not a family sdft supports"):
        family_of(model)


def test_unknown_family_folder_is_refused_before_loading(tmp_path):
    from sdft.models import load_model

    (tmp_path / "config.json").write_text('{"model_type": "opt", "architectures": ["OPTForCausalLM"]}')
    with pytest.raises(ValueError, match=f"model type 'opt' \\({tmp_path}\\) is not a family"):
        load_model(tmp_path)
