"""Fixtures of the evaluation tests: a saved tiny model with a small BPE tokenizer (scripts load it
from a folder in well under a second), and short text documents."""

from __future__ import annotations

import json

import pytest
from model_factory import tiny_model  # tests/ is on sys.path

from seerattn_hf.data import load_default_corpus


def bpe_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts` in a fraction of a second, with BOS/EOS tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of a tiny random Llama (2 layers, 4 heads, 2 KV heads, head_dim 16) and a BPE tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-eval-llama")
    tokenizer = bpe_tokenizer([load_default_corpus("train")[0]["text"][:200_000]])
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """A .txt document and a JSON-lines file of two documents (field "body"), cut from the plays."""
    folder = tmp_path_factory.mktemp("eval-texts")
    plays = load_default_corpus("test")
    (folder / "play.txt").write_text(plays[0]["text"][:20_000], encoding="utf-8")
    (folder / "plays.jsonl").write_text("".join(json.dumps({"body": p["text"][:20_000], "title": p["title"]}) + "\n"
                                                for p in plays[1:3]), encoding="utf-8")
    return folder
