"""Per-family adapters: where a causal LM keeps its decoder stack, its repeated blocks and its head.

sdft needs three things from a model: the decoder that returns the final (normed) hidden states, the
LM head the fused op applies to them (``sdft.models.head``), and the list of repeated blocks (FSDP2 shards
each block as one unit). Families name these differently (``model.layers`` in Llama, ``transformer.h``
in GPT-2, ``gpt_neox`` + ``embed_out`` in GPT-NeoX), so each supported family is one small entry
here, checked on a tiny random config by ``tests/models/test_model_families.py`` (hidden @ head equals the
model's logits; the prefix-tree pass equals the unshared one). A model of another family is refused
with an error naming its ``model_type``, never run through guessed attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdft.models.parts import base_model


@dataclass(frozen=True)
class Family:
    """Attribute paths under the ``*ForCausalLM`` model (dotted)."""

    decoder: str = "model"  # returns last_hidden_state, after the final norm
    blocks: str = "layers"  # under the decoder: the repeated transformer blocks
    head: tuple[str, ...] = ("lm_head",)  # the output projection (a Linear): the first name present


LLAMA_LIKE = Family()
FAMILIES: dict[str, Family] = {
    **{t: LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                               "cohere", "granite", "olmo2", "smollm3", "phi", "stablelm", "starcoder2", "glm4",
                               "mixtral", "qwen2_moe", "qwen3_moe")},
    "gpt2": Family(decoder="transformer", blocks="h"),
    "gpt_neox": Family(decoder="gpt_neox", head=("lm_head", "embed_out")),  # embed_out before transformers 5
}


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _head(base, family: Family):
    for name in family.head:
        if hasattr(base, name):
            return getattr(base, name)
    raise AttributeError(f"no output layer named {' or '.join(family.head)}")


def model_type(model) -> str:
    config = base_model(model).config
    return getattr(config, "model_type", "") or type(base_model(model)).__name__


def check_model_type(kind: str, where: str) -> Family:
    """The family of ``model_type`` ``kind``; a one-line error naming it (and ``where``) for others."""
    family = FAMILIES.get(kind)
    if family is None:
        raise ValueError(f"model type {kind!r} ({where}) is not a family sdft supports (supported: "
                         f"{', '.join(sorted(FAMILIES))}); add an entry to sdft.models.families")
    return family


def family_of(model) -> Family:
    """The adapter of ``model``'s family (peft wrappers looked through); a clear error for others."""
    kind = model_type(model)
    family = check_model_type(kind, type(base_model(model)).__name__)
    base = base_model(model)
    try:
        _get(base, family.decoder), _head(base, family)
    except AttributeError as err:
        raise ValueError(f"{type(base).__name__} (model type {kind!r}) lacks the parts sdft expects of its "
                         f"family ({err})") from None
    return family


def decoder_of(model) -> torch.nn.Module:
    """The decoder stack returning final (normed) hidden states; LoRA layers live inside it."""
    return _get(base_model(model), family_of(model).decoder)


def output_layer(model) -> torch.nn.Module:
    """The LM head module (``nn.Linear``) of ``model``."""
    return _head(base_model(model), family_of(model))


def blocks_of(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks, in order (FSDP2's sharding units)."""
    return list(_get(decoder_of(model), family_of(model).blocks))
