"""The embedded corpora: the extended one adds public-domain texts to training only; no held-out play text
reaches any training split; the test split is the same four plays in both; unknown names fail clearly."""

from __future__ import annotations

import configparser
import fnmatch
import re
from functools import cache
from pathlib import Path

import pytest

from seerattn_hf.data import CORPORA, DATA, load_default_corpus
from seerattn_hf.documents import load_document_dataset, load_document_records

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("Hamlet", "Macbeth", "Tempest", "Twelfth Night")
# Lines every reader knows, three from each held-out play.
DISTINCTIVE = {
    "Hamlet": ["To be, or not to be, that is the question", "Something is rotten in the state of Denmark",
               "Alas, poor Yorick"],
    "Macbeth": ["Tomorrow, and tomorrow, and tomorrow", "Out, damned spot", "Double, double toil and trouble"],
    "Tempest": ["We are such stuff as dreams are made on", "O brave new world", "Full fathom five thy father lies"],
    "Twelfth Night": ["If music be the food of love, play on", "Some are born great, some achieve greatness",
                      "present mirth hath present laughter"],
}
EXTRA_TITLES = ["A Lover's Complaint", "The Passionate Pilgrim", "The Phoenix and the Turtle", "Paradise Lost",
                "Paradise Regained", "The Poetical Works of John Milton", "Areopagitica", "Poemata"]


def words(text: str) -> list[str]:
    """Lower-case words, apostrophes and hyphens dropped ("To-morrow" and "tomorrow" alike)."""
    return re.findall(r"[a-z]+", text.lower().replace("-", "").replace("'", ""))


@cache
def corpus(split: str, name: str) -> tuple[dict, ...]:
    return tuple(load_default_corpus(split, name))


@cache
def held_out_runs(n: int) -> frozenset:
    runs = set()
    for record in corpus("test", "shakespeare"):
        tokens = words(record["text"])
        runs.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return frozenset(runs)


def shared_runs(text: str, n: int) -> list[str]:
    tokens, held = words(text), held_out_runs(n)
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) in held]


def test_the_extended_training_split_adds_the_new_texts_to_the_plays():
    plays, extended = corpus("train", "shakespeare"), corpus("train", "extended")
    assert list(extended[:len(plays)]) == list(plays)
    extra = extended[len(plays):]
    titles = [record["title"] for record in extra]
    assert titles[:len(EXTRA_TITLES)] == EXTRA_TITLES
    bible = titles[len(EXTRA_TITLES):]
    assert len(bible) == 66 and bible[0] == "The King James Bible: Genesis" and bible[-1].endswith("Revelation")
    assert all(record["split"] == "train" and record["source"] and record["text"].strip() for record in extra)
    assert not set(titles) & {record["title"] for record in plays}
    assert "Of Mans First Disobedience" in extra[EXTRA_TITLES.index("Paradise Lost")]["text"]
    assert "1:1 In the beginning God created the heaven and the earth." in extra[len(EXTRA_TITLES)]["text"]
    assert 5.0e6 < sum(len(record["text"]) for record in extra) < 6.0e6


def test_the_test_split_is_the_four_held_out_plays_in_both_corpora():
    default = corpus("test", "shakespeare")
    assert [record["title"] for record in default] == list(HELD_OUT)
    assert corpus("test", "extended") == default
    assert load_default_corpus("test", "embedded:extended") == list(default)


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_no_held_out_play_text_in_any_training_record(name):
    train = [(record["title"], " ".join(words(record["text"]))) for record in corpus("train", name)]
    test = {record["title"]: " ".join(words(record["text"])) for record in corpus("test", name)}
    for play, lines in DISTINCTIVE.items():
        for line in lines:
            phrase = " ".join(words(line))
            assert phrase in test[play]
            assert [title for title, text in train if phrase in text] == [], line
    # No verbatim passage: the plays share only stage directions ("Act I. Scene I. An apartment in the
    # Duke's palace. Enter Duke, ...") of under 16 words with the held-out ones.
    assert {record["title"]: shared_runs(record["text"], 16)[:1] for record in corpus("train", name)
            if shared_runs(record["text"], 16)} == {}


def test_the_extra_texts_share_no_eight_word_run_with_a_held_out_play():
    extra = corpus("train", "extended")[len(corpus("train", "shakespeare")):]
    assert {record["title"]: shared_runs(record["text"], 8)[:1] for record in extra
            if shared_runs(record["text"], 8)} == {}


def test_unknown_corpus_names_and_splits_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown embedded corpus 'bible'; known: \['embedded:shakespeare', "):
        load_default_corpus("train", "bible")
    with pytest.raises(ValueError, match="unknown embedded corpus 'embedded:nope'"):
        load_document_dataset(dataset_name="embedded:nope")
    with pytest.raises(ValueError, match="unknown embedded corpus 'embedded:nope'"):
        load_document_records(dataset_name="embedded:nope")
    with pytest.raises(ValueError, match="split of the embedded corpus 'extended'"):
        load_document_dataset(dataset_name="embedded:extended", split="validation")
    with pytest.raises(ValueError, match="split: expected one of"):
        load_default_corpus("validation", "extended")


def test_evaluation_reads_the_held_out_plays_of_an_embedded_corpus():
    records = load_document_records(dataset_name="embedded:extended")
    assert [record["title"] for record in records] == list(HELD_OUT)
    assert records == load_document_records()


def test_every_corpus_file_is_package_data():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["seerattn_hf"].split()
    files = {path for paths in CORPORA.values() for path in paths}
    assert files == set(DATA.glob("*.jsonl.gz"))
    for path in files:
        assert any(fnmatch.fnmatch(f"data/{path.name}", pattern) for pattern in patterns), path.name
