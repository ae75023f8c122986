"""Documents to evaluate on: local text / JSON lines / parquet files, a Hub dataset, or the embedded
held-out Shakespeare plays (the default: no network needed)."""

from __future__ import annotations

import json
from pathlib import Path


def load_documents(data_files: list[str] | None = None, dataset_name: str | None = None,
                   dataset_config: str | None = None, split: str = "test", text_column: str = "text",
                   limit: int | None = None) -> list[dict]:
    """Documents as `{"title", "text"}` records, at most `limit` of them.

    data_files: `.txt` files (one document each), `.jsonl`/`.json` (one JSON object per line, the
    text under `text_column`) or `.parquet` (read with `datasets`). dataset_name: a Hub dataset,
    streamed. Neither: the embedded test split (plays never used for gate training).
    """
    if data_files and dataset_name:
        raise ValueError("give --data_files or --dataset_name, not both")
    if data_files:
        documents = []
        for path in data_files:
            documents.extend(_read_local(Path(path), text_column))
            if limit is not None and len(documents) >= limit:
                break
    elif dataset_name:
        documents = _read_hub(dataset_name, dataset_config, split, text_column, limit)
    else:
        from seerattn_hf.data import load_default_corpus

        documents = [{"title": r["title"], "text": r["text"]} for r in load_default_corpus("test")]
    return documents[:limit] if limit is not None else documents


def _read_local(path: Path, text_column: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffixes = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffixes in (".txt", ".md"):
        return [{"title": path.stem, "text": path.read_text(encoding="utf-8")}]
    if suffixes in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        import gzip

        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            content = handle.read()
        if content.lstrip().startswith("["):  # a JSON array rather than JSON lines
            records = enumerate(json.loads(content), 1)
        else:
            records = ((n, json.loads(line)) for n, line in enumerate(content.splitlines(), 1) if line.strip())
        documents = []
        for number, record in records:
            if text_column not in record:
                raise ValueError(f"{path}:{number} has no {text_column!r} field (found {sorted(record)}); "
                                 "choose the field with --text_column")
            documents.append({"title": str(record.get("title", f"{path.stem}:{number}")), "text": record[text_column]})
        return documents
    if suffixes == ".parquet":
        from datasets import load_dataset

        rows = load_dataset("parquet", data_files=str(path), split="train")
        return [{"title": f"{path.stem}:{i}", "text": row[text_column]} for i, row in enumerate(rows)]
    raise ValueError(f"data file {path}: expected .txt, .jsonl, .json or .parquet, found {path.name!r}")


def _read_hub(name: str, config: str | None, split: str, text_column: str, limit: int | None) -> list[dict]:
    from datasets import load_dataset

    rows = load_dataset(name, config, split=split, streaming=True)
    documents = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        documents.append({"title": str(row.get("short_book_title") or row.get("title") or f"{name}:{i}"),
                          "text": row[text_column]})
    return documents
