"""Data: packing, local files of each kind, the embedded corpus, held-out evaluation, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import character_tokenizer, random_documents

from seerattn_hf.training.arguments import DataArguments
from seerattn_hf.training.data import (
    PackedSequences,
    epoch_order,
    expand_data_files,
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
