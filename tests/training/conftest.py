"""Fixtures of the trainer tests (helpers live in training_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import write_jsonl_corpus, write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    # The distillation target and the CPU sparse path run many small per-block ops: with two OpenMP
    # threads on a busy 2-core machine each op can wait for a descheduled thread (seen: 50x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of a tiny random Llama and its character tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory):
    """A JSON-lines file of 40 short documents (field "body")."""
    return write_jsonl_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
