"""The embedded default corpus: 39 Shakespeare plays from Project Gutenberg (public domain).

Four plays (Hamlet, Macbeth, The Tempest, Twelfth Night) form the held-out "test" split, the rest
the "train" split, so that evaluation never reads text the gates were trained on.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).with_name("shakespeare.jsonl.gz")
SPLITS = ("train", "test")


def load_default_corpus(split: str = "train") -> list[dict]:
    """The plays of one split as `{"title", "text", "split"}` records (no network needed)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, found {split!r}")
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    return [record for record in records if record["split"] == split]
