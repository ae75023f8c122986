"""Helpers of the trainer tests: a character tokenizer, random documents, tiny-run arguments.

Tiny models come from tests/model_factory.py (a plain module: several test folders hold a conftest.py).
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from model_factory import smollm2_folder, tiny_model  # noqa: F401  (tests/ is on sys.path)

WORDS = ("the king queen speaks night crown sword love death ghost castle storm fool letter ring "
         "Denmark Scotland island music wine grave forest").split()


def character_tokenizer():
    """A character-level fast tokenizer (BOS `<s>`, EOS `</s>`), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for character in string.printable:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_documents(count: int, seed: int, words: int = 120) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(words // 2, words)))
            for _ in range(count)]


def tiny_run_args(checkpoint, corpus, output_dir, **overrides) -> list[str]:
    """Command-line arguments of a short tiny-model run on CPU."""
    values = {"model_name_or_path": checkpoint, "data_files": corpus, "text_column": "body",
              "output_dir": output_dir, "seq_len": 128, "block_size": 16, "gate_hidden_size": 16,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
              "warmup_steps": 2, "max_steps": 6, "save_steps": 2, "eval_steps": 3, "eval_num_sequences": 2,
              "report_to": "none", "logging_steps": 1}
    values.update(overrides)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


def write_tiny_checkpoint(folder: Path, model_type: str = "llama") -> Path:
    """Save a tiny random model (2 layers, 4 heads, 2 KV heads, head_dim 16) and a character tokenizer."""
    tiny_model(model_type, vocab_size=128).save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl_corpus(path: Path, count: int = 40, seed: int = 0) -> Path:
    """A JSON-lines file of short random documents in field "body"."""
    path.write_text("".join(json.dumps({"body": text, "id": i}) + "\n"
                            for i, text in enumerate(random_documents(count, seed))), encoding="utf-8")
    return path
