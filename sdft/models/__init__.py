"""Models: loading (a local folder, a .gguf, the embedded SmolLM2) and the per-family adapters."""
from sdft.models.families import FAMILIES, Family, blocks_of, decoder_of, family_of, output_layer
from sdft.models.loading import EMBEDDED_GGUF, EMBEDDED_NAME, embedded_model_dir, load_model, load_trained
from sdft.models.parts import base_model, enable_checkpointing, eval_mode, kv_cache, passing_cache

__all__ = ["FAMILIES", "Family", "blocks_of", "decoder_of", "family_of", "output_layer", "EMBEDDED_GGUF",
           "EMBEDDED_NAME", "embedded_model_dir", "load_model", "load_trained", "base_model", "enable_checkpointing",
           "eval_mode", "kv_cache", "passing_cache"]
