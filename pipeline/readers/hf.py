"""Hugging Face datasets -> READ_SCHEMA tables: a `save_to_disk` folder, or streamed.

A dataset is not a file, so it has no extension for `iter_batches`: call `iter_hf_dataset`
with a hub name or a path. Its Arrow batches go through the same column rules as Parquet
(pipeline/readers/arrow.py); fallback ids are "<name>:<split>:<row>".

    from pipeline.readers import iter_hf_dataset
    for table in iter_hf_dataset("HuggingFaceFW/fineweb-edu", split="train"):
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.readers.arrow import input_columns, to_read_table


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and any(
        (p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def iter_hf_dataset(
    name_or_path: str,
    split: str = "train",
    text_column: str = "text",
    id_column: str = "id",
    batch_rows: int = 1000,
) -> Iterator[pa.Table]:
    """A Hugging Face dataset -> READ_SCHEMA batches.

    A directory written by `save_to_disk` is opened with `datasets.load_from_disk` (a
    DatasetDict is indexed by `split`); anything else (a hub name, a local folder of data
    files) is streamed with `load_dataset(..., streaming=True)`, so nothing is downloaded
    in full first. Fallback ids are "<name>:<split>:<row>"; ids and text follow the rules
    of pipeline/readers/rows.py and arrow.py, as in Parquet.
    """
    import datasets

    p = Path(name_or_path)
    if is_saved_dataset(p):
        ds: Any = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(
                    f"{name_or_path}: no split {split!r}; it has {sorted(ds)} (pass split=)"
                )
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name_or_path, split=split, streaming=True)
    if ds.column_names is not None:  # None for some streamed sources until read
        ds = ds.select_columns(input_columns(ds.column_names, name_or_path, text_column, id_column))
    name = f"{p.name or name_or_path}:{split}"
    offset = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        yield to_read_table(table, name_or_path, name, offset, text_column, id_column)
        offset += table.num_rows
