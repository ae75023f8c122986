"""Fixtures of the trainer tests (helpers live in training_helpers.py)."""

from __future__ import annotations

import pytest
from training_helpers import write_jsonl_corpus, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of a tiny random Llama and its character tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def jsonl_corpus(tmp_path_factory):
    """A JSON-lines file of 40 short documents (field "body")."""
    return write_jsonl_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
