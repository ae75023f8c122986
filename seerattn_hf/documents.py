"""Documents to train or evaluate on: local files, a Hub dataset, or an embedded corpus.

One loader for training and evaluation: `load_document_dataset` returns a `datasets.Dataset` (an
`IterableDataset` when streaming), which training tokenizes and packs; `load_document_records` reads
the same sources into `{"title", "text"}` records for evaluation.

Local files: .txt and .md (one document per file), .json and .jsonl (JSON lines, or one JSON array of
objects) and .parquet, each optionally compressed (.gz, .bz2, .xz, .zst); glob patterns allowed. With
neither files nor a Hub dataset, the embedded corpus (seerattn_hf/data/) is read: no network needed.
A dataset name "embedded:<name>" picks an embedded corpus ("embedded:shakespeare", the default, or
"embedded:extended": the plays plus Milton and the King James Bible for training, the same held-out plays).
"""

from __future__ import annotations

import glob
import os

# datasets builder for each local file kind.
FILE_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# The column of datasets' text builder: a plain-text file has no fields, its whole text is the document.
PLAIN_TEXT_COLUMN = "text"


def _name_parts(path: str) -> tuple[str, str]:
    """(file name without its kind and compression endings, the kind ending in lower case)."""
    name = os.path.basename(path)
    for compression in COMPRESSIONS:
        if name.lower().endswith(compression):
            name = name[: -len(compression)]
    stem, extension = os.path.splitext(name)
    return stem, extension.lower()


def builder_for(path: str) -> str:
    """The `datasets` builder reading the file `path` ("text", "json" or "parquet")."""
    extension = _name_parts(path)[1]
    if extension not in FILE_BUILDERS:
        raise ValueError(f"--data_files: expected files ending in {sorted(FILE_BUILDERS)} (optionally "
                         f"compressed: {', '.join(COMPRESSIONS)}), found {path!r}")
    return FILE_BUILDERS[extension]


def matching_files(patterns: list[str]) -> list[str]:
    """The files matched by glob `patterns`, in order (sorted within a pattern); every pattern must match."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"--data_files: no file matches {pattern!r} (working directory {os.getcwd()})")
        files.extend(matched)
    return files


def expand_data_files(patterns: list[str]) -> tuple[str, list[str]]:
    """The `datasets` builder and the files matched by `patterns`, which must all be of one kind
    (one dataset is read by one builder)."""
    files = matching_files(patterns)
    builders = {builder_for(path) for path in files}
    if len(builders) > 1:
        raise ValueError(f"--data_files: expected files of one kind, found a mix read by {sorted(builders)}")
    return builders.pop(), files


def load_document_dataset(data_files: list[str] | None = None, dataset_name: str | None = None,
                          dataset_config: str | None = None, split: str = "train", streaming: bool = False,
                          revision: str | None = None):
    """Documents as a `datasets.Dataset` (`IterableDataset` when `streaming`).

    data_files: glob patterns of local files of one kind (split "train": datasets' name for the only
    split of local files). dataset_name: a Hub dataset (or a local dataset folder), its `split`.
    Neither, or dataset_name "embedded:<name>": that embedded corpus' `split` (default "embedded:shakespeare"),
    "train" or "test" (four held-out plays), never streamed.
    """
    import datasets

    from .data import is_embedded_name

    if data_files and dataset_name:
        raise ValueError(f"expected --data_files or --dataset_name, found both ({data_files} and {dataset_name!r})")
    if data_files:
        builder, files = expand_data_files(data_files)
        options = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split=split, streaming=streaming, **options)
    if not is_embedded_name(dataset_name):
        return datasets.load_dataset(dataset_name, dataset_config, split=split, streaming=streaming,
                                     revision=revision)
    return datasets.Dataset.from_list(embedded_records(dataset_name, split))


def embedded_records(dataset_name: str | None, split: str) -> list[dict]:
    """The `split` of the embedded corpus `dataset_name` names (None: the default one) as records."""
    from .data import SPLITS, corpus_name, load_default_corpus

    name = corpus_name(dataset_name)
    if split not in SPLITS:
        raise ValueError(f"split of the embedded corpus {name!r}: expected one of {list(SPLITS)}, found {split!r}")
    return load_default_corpus(split, name)


def check_text_column(documents, text_column: str, source: str = "the data") -> None:
    """Raise when the dataset `documents` has no column `text_column` (`source` names it in the message)."""
    columns = documents.column_names
    if columns is None:  # a streamed dataset may only know its columns after the first record
        first = next(iter(documents), None)
        columns = list(first) if first is not None else []
    if text_column not in columns:
        raise ValueError(f"--text_column: {source} has no column {text_column!r}; its columns are {columns}")


def load_document_records(data_files: list[str] | None = None, dataset_name: str | None = None,
                          dataset_config: str | None = None, split: str = "test", text_column: str = "text",
                          limit: int | None = None) -> list[dict]:
    """Documents as `{"title", "text"}` records, at most `limit` of them.

    data_files: glob patterns of local files; each file is read alone, so kinds may be mixed and a
    title can name its file. dataset_name: a Hub dataset, streamed, its `split`, or "embedded:<name>", that
    embedded corpus' `split`. Neither: the embedded corpus' "test" plays (never used for gate training). A
    title is the record's "short_book_title" (PG19) or "title" field, else the file's name (a plain-text
    file) or "<name>:<record number>".
    """
    from .data import is_embedded_name

    if data_files and dataset_name:
        raise ValueError(f"expected --data_files or --dataset_name, found both ({data_files} and {dataset_name!r})")
    if dataset_name and is_embedded_name(dataset_name):
        return _records(load_document_dataset(dataset_name=dataset_name, split=split), text_column, dataset_name,
                        dataset_name, limit)
    if dataset_name:
        documents = load_document_dataset(dataset_name=dataset_name, dataset_config=dataset_config, split=split,
                                          streaming=True)
        return _records(documents, text_column, dataset_name, dataset_name, limit)
    if not data_files:
        return _records(load_document_dataset(split="test"), text_column, "embedded corpus", "embedded corpus", limit)
    records = []
    for path in matching_files(data_files):
        if limit is not None and len(records) >= limit:
            break
        plain_text = builder_for(path) == "text"
        records += _records(load_document_dataset([path]), PLAIN_TEXT_COLUMN if plain_text else text_column, path,
                            _name_parts(path)[0], None, numbered=not plain_text)
    return records[:limit] if limit is not None else records


def _records(documents, text_column: str, source: str, title: str, limit: int | None,
             numbered: bool = True) -> list[dict]:
    """`{"title", "text"}` records of a dataset; untitled ones get `title` (":<record number>" added
    when `numbered`)."""
    check_text_column(documents, text_column, source)
    records = []
    for number, row in enumerate(documents, 1):
        if limit is not None and len(records) >= limit:
            break
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{source}: expected text in field {text_column!r} of record {number}, found {text!r}; "
                             "choose the field with --text_column")
        default = f"{title}:{number}" if numbered else title
        records.append({"title": str(row.get("short_book_title") or row.get("title") or default), "text": text})
    return records
