"""A tiny random Llama for unit tests (no download)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab=97, hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()
