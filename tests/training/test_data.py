"""Data: packing, local files of each kind (read alike by training and evaluation), the embedded corpus,
held-out evaluation, clear errors."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
import torch
from training_helpers import character_tokenizer, random_documents

from seerattn_hf.documents import expand_data_files, load_document_records
from seerattn_hf.training.arguments import DataArguments
from seerattn_hf.training.data import (
    PackedSequences,
    epoch_order,
    load_documents,
    pack_token_stream,
    prepare_packed_data,
)

EOS, BOS = 2, 1


def test_packing_exact_lengths_bos_and_eos_between_documents():
    documents = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]
    rows = list(pack_token_stream(documents, seq_len=5, eos_id=EOS, bos_id=BOS))
    assert rows == [[BOS, 10, 11, 12, EOS], [BOS, 20, 21, EOS, 30], [BOS, 31, 32, 33, 34]]
    assert all(len(row) == 5 for row in rows)
    # The content after each BOS is the document stream, each document followed by EOS; the tail is dropped.
    stream = [token for row in rows for token in row[1:]]
    assert stream == [10, 11, 12, EOS, 20, 21, EOS, 30, 31, 32, 33, 34]


def test_packing_without_bos_and_with_a_cap():
    documents = [list(range(100, 110)), list(range(200, 207))]
    rows = list(pack_token_stream(documents, seq_len=4, eos_id=EOS))
    assert [len(row) for row in rows] == [4, 4, 4, 4]
    assert [t for row in rows for t in row] == list(range(100, 110)) + [EOS] + list(range(200, 205))
    assert len(list(pack_token_stream(documents, seq_len=4, eos_id=EOS, max_sequences=2))) == 2
    with pytest.raises(ValueError, match="seq_len must exceed"):
        list(pack_token_stream(documents, seq_len=1, eos_id=EOS, bos_id=BOS))


def test_epoch_order_is_a_fresh_permutation_per_epoch():
    order = epoch_order(5, 12, seed=3)
    assert len(order) == 12
    assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order[5:10].tolist()) == list(range(5))
    assert torch.equal(order, epoch_order(5, 12, seed=3))
    dataset = PackedSequences(torch.arange(10, dtype=torch.int32).view(5, 2), order)
    assert dataset[0]["input_ids"].dtype == torch.long and len(dataset) == 12


def _write_files(tmp_path, kind: str, texts: list[str]):
    if kind == "txt":
        for i, text in enumerate(texts):
            (tmp_path / f"doc{i}.txt").write_text(text + "\nsecond line", encoding="utf-8")
        return [str(tmp_path / "*.txt")], "text"
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts), encoding="utf-8")
        return [str(path)], "content"
    import datasets

    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"content": texts}).to_parquet(str(path))
    return [str(path)], "content"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_of_each_kind(tmp_path, kind):
    files, column = _write_files(tmp_path, kind, random_documents(12, seed=1, words=40))
    data = DataArguments(data_files=files, text_column=column, seq_len=64, eval_num_sequences=2)
    packed = prepare_packed_data(data, character_tokenizer(), num_train_sequences=5, seed=0)
    assert packed.train.shape == (5, 64) and packed.eval.shape == (2, 64)
    assert (packed.train[:, 0] == BOS).all() and (packed.train == EOS).any()
    # Held-out sequences are never trained on.
    assert not any(torch.equal(e, t) for e in packed.eval for t in packed.train)
    if kind == "txt":  # one document per file, not per line
        assert len(load_documents(data, "train")) == 12


def test_streamed_files_and_a_wrong_column_when_streaming(tmp_path):
    files, column = _write_files(tmp_path, "jsonl", random_documents(12, seed=2, words=40))
    data = DataArguments(data_files=files, text_column=column, seq_len=64, eval_num_sequences=1, streaming=True,
                         shuffle_buffer_size=4)
    packed = prepare_packed_data(data, character_tokenizer(), num_train_sequences=3, seed=0)
    assert packed.train.shape == (3, 64) and packed.eval.shape == (1, 64)
    data.text_column = "body"
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are \['content'\]"):
        prepare_packed_data(data, character_tokenizer(), 1, seed=0)


def test_missing_files_wrong_kind_and_wrong_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_data_files([str(tmp_path / "missing-*.jsonl")])
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected files ending in .* found .*table.csv"):
        expand_data_files([str(tmp_path / "table.csv")])
    files, _ = _write_files(tmp_path, "jsonl", ["some text"])
    data = DataArguments(data_files=files, text_column="text")
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['content'\]"):
        prepare_packed_data(data, character_tokenizer(), 1, seed=0)


def _write_compressed(path, text: str) -> None:
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    opener = openers.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(text)


@pytest.mark.parametrize("name", ["doc.txt", "doc.md", "doc.txt.gz", "docs.jsonl.bz2", "docs.json.xz", "docs.jsonl"])
def test_training_and_evaluation_read_the_same_file_kinds(tmp_path, name):
    texts = random_documents(3, seed=3, words=20)
    lines = [json.dumps({"content": text}) for text in texts]
    content, column, expected, title = {  # by the kind ending, before any compression ending
        ".txt": (texts[0], "text", texts[:1], "doc"),  # a plain-text file is one document
        ".md": (texts[0], "text", texts[:1], "doc"),
        ".jsonl": ("\n".join(lines) + "\n", "content", texts, "docs:1"),
        ".json": ("[" + ",".join(lines) + "]", "content", texts, "docs:1"),  # one JSON array
    }[Path(name).suffixes[0]]
    _write_compressed(tmp_path / name, content)
    training = load_documents(DataArguments(data_files=[str(tmp_path / "doc*")], text_column=column), "train")
    assert training[column] == expected
    records = load_document_records([str(tmp_path / "doc*")], text_column=column)
    assert [r["text"] for r in records] == expected and records[0]["title"] == title


def test_evaluation_mixes_file_kinds_and_names_what_it_expected(tmp_path):
    (tmp_path / "a.md").write_text("# a play", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "a line", "title": "B"}) + "\n", encoding="utf-8")
    records = load_document_records([str(tmp_path / "a.md"), str(tmp_path / "b.jsonl")], text_column="body")
    assert records == [{"title": "a", "text": "# a play"}, {"title": "B", "text": "a line"}]
    with pytest.raises(ValueError, match="expected files of one kind"):  # one dataset is read by one builder
        expand_data_files([str(tmp_path / "*")])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_document_records([str(tmp_path / "missing.txt")])
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected files ending in .* found .*table.csv"):
        load_document_records([str(tmp_path / "table.csv")])
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"other": "y"}) + "\n",
                                      encoding="utf-8")
    with pytest.raises(ValueError, match="expected text in field 'body' of record 2, found None"):
        load_document_records([str(tmp_path / "c.jsonl")], text_column="body")


def test_too_little_text_for_one_sequence(tmp_path):
    files, column = _write_files(tmp_path, "jsonl", ["short"])
    data = DataArguments(data_files=files, text_column=column, seq_len=512, eval_num_sequences=0)
    with pytest.raises(ValueError, match="fewer than seq_len=512 tokens"):
        prepare_packed_data(data, character_tokenizer(), 1, seed=0)


def test_embedded_corpus_holds_out_the_test_plays():
    train_titles = set(load_documents(DataArguments(), "train")["title"])
    test_titles = set(load_documents(DataArguments(), "test")["title"])
    assert len(test_titles) == 4 and not train_titles & test_titles
    data = DataArguments(seq_len=256, eval_num_sequences=2)
    packed = prepare_packed_data(data, character_tokenizer(), num_train_sequences=3, seed=0)
    assert packed.train.shape == (3, 256) and packed.eval.shape == (2, 256)


def test_the_extended_corpus_trains_on_more_and_evaluates_on_the_same_plays():
    # One document tokenized at a time: packing stops after the few sequences asked for.
    extended = DataArguments(dataset_name="embedded:extended", seq_len=256, eval_num_sequences=2,
                             preprocessing_batch_size=1)
    train = load_documents(extended, "train")
    assert len(train) == 35 + 74 and "Paradise Lost" in train["title"]
    assert load_documents(extended, "test")["title"] == load_documents(DataArguments(), "test")["title"]
    tokenizer = character_tokenizer()
    packed = prepare_packed_data(extended, tokenizer, num_train_sequences=3, seed=0)
    default = prepare_packed_data(DataArguments(seq_len=256, eval_num_sequences=2, preprocessing_batch_size=1),
                                  tokenizer, 3, seed=0)
    assert packed.train.shape == (3, 256) and torch.equal(packed.eval, default.eval)
    # The embedded corpus is read whole: a `streaming` left on by a Hub recipe does not stream it.
    streamed = DataArguments(dataset_name="embedded:extended", seq_len=256, eval_num_sequences=2,
                             preprocessing_batch_size=1, streaming=True)
    assert torch.equal(prepare_packed_data(streamed, tokenizer, 3, seed=0).train, packed.train)


def test_a_column_of_text_lists_gives_one_document_per_text(tmp_path):
    """OpenR1-Math keeps several reasoning traces of one problem in a list (`generations`)."""
    from seerattn_hf.training.data import iter_texts

    path = tmp_path / "traces.jsonl"
    rows = [{"generations": ["first trace", "second trace"]}, {"generations": ["", "third trace"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    documents = load_documents(DataArguments(data_files=[str(path)], text_column="generations"), "train")
    texts = [text for batch in iter_texts(documents, "generations", 8) for text in batch]
    assert texts == ["first trace", "second trace", "third trace"]
