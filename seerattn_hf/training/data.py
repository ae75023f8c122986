"""Training text through `datasets`: load documents, tokenize, pack into fixed-length sequences.

Packing: each sequence starts with BOS (when the tokenizer has one and `add_bos` is set), then
documents follow one another, each ended by EOS; a document that does not fit continues in the
next sequence. Every sequence holds exactly `seq_len` tokens; the incomplete tail is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..data import is_embedded_name
from ..documents import check_text_column, load_document_dataset
from .arguments import DataArguments

logger = logging.getLogger(__name__)

def load_documents(data: DataArguments, split: str):
    """The documents of one split as a `datasets.Dataset` (or `IterableDataset` when streaming).

    `split` is "train" or "test" for an embedded corpus, otherwise a split name of the dataset.
    """
    return load_document_dataset(data.data_files, data.dataset_name, data.dataset_config_name, split,
                                 streaming=data.streaming, revision=data.dataset_revision)


def iter_texts(documents, text_column: str, batch_size: int) -> Iterator[list[str]]:
    """Batches of non-empty document texts. A column holding lists of texts (e.g. the several reasoning
    traces of one problem in OpenR1-Math's `generations`) gives one document per text."""
    for batch in documents.iter(batch_size=batch_size):
        values = [item for value in batch[text_column] for item in (value if isinstance(value, list) else [value])]
        texts = [text for text in values if isinstance(text, str) and text.strip()]
        if texts:
            yield texts


def pack_token_stream(documents: Iterable[list[int]], seq_len: int, eos_id: int, bos_id: int | None = None,
                      max_sequences: int | None = None) -> Iterator[list[int]]:
    """Pack tokenized documents into sequences of exactly `seq_len` tokens.

    Each sequence starts with `bos_id` (if given); each document is followed by `eos_id`.
    Stops after `max_sequences` sequences, or when the documents run out (the partial tail is dropped).
    """
    if max_sequences is not None and max_sequences <= 0:
        return
    prefix = [] if bos_id is None else [bos_id]
    if seq_len <= len(prefix):
        raise ValueError(f"seq_len must exceed the BOS prefix, found seq_len={seq_len}")
    current = list(prefix)
    produced = 0
    for tokens in documents:
        pending = list(tokens) + [eos_id]
        while pending:
            room = seq_len - len(current)
            current.extend(pending[:room])
            pending = pending[room:]
            if len(current) == seq_len:
                yield current
                produced += 1
                if max_sequences is not None and produced >= max_sequences:
                    return
                current = list(prefix)


def tokenized_documents(documents, tokenizer, text_column: str, batch_size: int) -> Iterator[list[int]]:
    for texts in iter_texts(documents, text_column, batch_size):
        yield from tokenizer(texts, add_special_tokens=False)["input_ids"]


def special_token_ids(tokenizer, add_bos: bool) -> tuple[int, int | None]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token to separate documents")
    bos_id = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos_id is None:
        logger.warning("the tokenizer has no BOS token: packed sequences start without one")
    return tokenizer.eos_token_id, bos_id


def pack_documents(documents, tokenizer, data: DataArguments, max_sequences: int | None) -> torch.Tensor:
    """`[N, seq_len]` int32 token ids packed from `documents` (at most `max_sequences` rows)."""
    eos_id, bos_id = special_token_ids(tokenizer, data.add_bos)
    stream = tokenized_documents(documents, tokenizer, data.text_column, data.preprocessing_batch_size)
    rows = [torch.tensor(row, dtype=torch.int32)
            for row in pack_token_stream(stream, data.seq_len, eos_id, bos_id, max_sequences)]
    if not rows:
        return torch.empty(0, data.seq_len, dtype=torch.int32)
    return torch.stack(rows)


@dataclass
class PackedData:
    """Packed training and evaluation sequences, `[N, seq_len]` int32 each."""

    train: torch.Tensor
    eval: torch.Tensor


def prepare_packed_data(data: DataArguments, tokenizer, num_train_sequences: int, seed: int) -> PackedData:
    """Load, check, tokenize and pack the run's data.

    Evaluation: an embedded corpus' "test" plays, `eval_split` when given, otherwise the first
    `eval_num_sequences` packed sequences of the (shuffled) training data, which then are not trained on.
    """
    embedded = is_embedded_name(data.dataset_name) and not data.data_files
    documents = load_documents(data, "train" if embedded else data.dataset_split)
    check_text_column(documents, data.text_column)
    if data.streaming and not embedded:  # an embedded corpus is read whole, never streamed
        documents = documents.shuffle(seed=seed, buffer_size=data.shuffle_buffer_size)
    else:
        documents = documents.shuffle(seed=seed)

    held_out_split = "test" if embedded else data.eval_split
    if held_out_split is None:
        packed = pack_documents(documents, tokenizer, data, num_train_sequences + data.eval_num_sequences)
        eval_rows, train_rows = packed[: data.eval_num_sequences], packed[data.eval_num_sequences:]
    else:
        train_rows = pack_documents(documents, tokenizer, data, num_train_sequences)
        held_out = load_documents(data, held_out_split)
        check_text_column(held_out, data.text_column)
        eval_rows = pack_documents(held_out, tokenizer, data, data.eval_num_sequences)
    if len(train_rows) == 0:
        raise ValueError(f"the training data holds fewer than seq_len={data.seq_len} tokens: no sequence to train on")
    if len(eval_rows) < data.eval_num_sequences:
        logger.warning("only %d evaluation sequences of %d tokens available (eval_num_sequences=%d)",
                       len(eval_rows), data.seq_len, data.eval_num_sequences)
    return PackedData(train=train_rows, eval=eval_rows)


def epoch_order(num_rows: int, total: int, seed: int) -> torch.Tensor:
    """`total` row indices: one random permutation of the rows per epoch (seeded by seed and epoch),
    concatenated, so that a run reads a fixed, reproducible sequence of rows."""
    order = []
    epoch = 0
    while sum(len(part) for part in order) < total:
        generator = torch.Generator().manual_seed(seed + epoch)
        order.append(torch.randperm(num_rows, generator=generator))
        epoch += 1
    return torch.cat(order)[:total] if order else torch.empty(0, dtype=torch.long)


class PackedSequences(torch.utils.data.Dataset):
    """Rows of a packed tensor in a given order, as `{"input_ids": LongTensor[seq_len]}`."""

    def __init__(self, rows: torch.Tensor, order: torch.Tensor | None = None):
        self.rows = rows
        self.order = torch.arange(len(rows)) if order is None else order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[int(self.order[index])].long()}
