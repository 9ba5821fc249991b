"""Hugging Face datasets -> READ_SCHEMA tables: a `save_to_disk` folder, or streamed.

As a recipe input a dataset is named by a spec, `hf:NAME[:CONFIG]:SPLIT` (NAME a hub name
or a local folder of data files; streamed, nothing downloaded in full first), or by a
`save_to_disk` folder (a DatasetDict folder reads as one input per split). Offline, a hub
name is read from the local `datasets` cache (HF_HUB_OFFLINE=1, HF_HOME); when neither the
hub nor the cache has it, the error says what to set. Its Arrow batches go through the same
column rules as Parquet (pipeline/readers/arrow.py); fallback ids are "<name>:<split>:<row>".

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

SPEC_PREFIX = "hf:"


class DatasetUnavailable(ValueError):
    """A dataset input that cannot be opened: not on the hub, not reachable, not cached."""


def is_hf_spec(path: str | os.PathLike[str]) -> bool:
    """`hf:NAME[:CONFIG]:SPLIT` (not an `hf://` URI, which names files)."""
    p = os.fspath(path)
    return p.startswith(SPEC_PREFIX) and not p.startswith("hf://")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG]:SPLIT` -> (name, config, split); `hf:NAME` is split "train"."""
    fields = spec[len(SPEC_PREFIX) :].split(":")
    if not fields[0] or len(fields) > 3 or not all(fields):
        raise ValueError(f"{spec!r}: expected hf:NAME[:CONFIG]:SPLIT")
    if len(fields) == 1:
        return fields[0], None, "train"
    if len(fields) == 2:
        return fields[0], None, fields[1]
    return fields[0], fields[1], fields[2]


def saved_dataset_inputs(path: str) -> list[str]:
    """A `save_to_disk` folder as inputs: itself (a Dataset) or its splits' folders (a
    DatasetDict, in the order dataset_dict.json lists them)."""
    import json

    dd = Path(path) / "dataset_dict.json"
    if dd.is_file():
        return [str(Path(path) / split) for split in json.loads(dd.read_text())["splits"]]
    return [str(path)]


def dataset_digest(path: str) -> str:
    """What a dataset input is, for fingerprints: a saved folder's or a local data folder's
    files (names, sizes, first 64 KiB); a hub dataset's spec (pin it with a revision in
    NAME@REVISION to make a changed hub dataset a different input)."""
    import xxhash

    folder = Path(path)
    if is_hf_spec(path):
        name = parse_hf_spec(path)[0]
        if not Path(name).is_dir():
            return f"hub:{path}"
        folder = Path(name)
    h = xxhash.xxh64()
    for f in sorted(x for x in folder.rglob("*") if x.is_file()):
        with open(f, "rb") as fh:
            h.update(f"{f.relative_to(folder)}\0{f.stat().st_size}\0".encode() + fh.read(1 << 16))
    return h.hexdigest()


def read_hf_input(
    path: str,
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    shards: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """A dataset input (a spec or a saved folder) -> READ_SCHEMA batches; `shards` (a, b)
    reads only those units of it (`dataset_spans`)."""
    if is_hf_spec(path):
        name, config, split = parse_hf_spec(path)
        return iter_hf_dataset(
            name, split, text_column, id_column, batch_rows, config=config, shards=shards
        )
    return iter_hf_dataset(path, "train", text_column, id_column, batch_rows, shards=shards)


def dataset_spans(path: str, max_rows: int | None) -> list[tuple[int, int]] | None:
    """How a dataset input splits into sub-parts, each its own task and commit: a streamed
    dataset one per data file (its `n_shards`: a hub dataset's Parquet or JSONL files), a
    `save_to_disk` dataset by row ranges of at most `max_rows`. None: one part (a single
    file, or few rows)."""
    ds = open_hf_dataset(path)
    if getattr(ds, "num_rows", None) is None:  # streamed
        n = _data_files(ds)
        return [(i, i + 1) for i in range(n)] if n > 1 else None
    if max_rows is None or ds.num_rows <= max_rows:
        return None
    return [(a, min(a + max_rows, ds.num_rows)) for a in range(0, ds.num_rows, max_rows)]


def check_hf_input(path: str, text_column: str = "text") -> str | None:
    """A one-line user error for a dataset input that will not read, or None: it opens the
    dataset (metadata, or the first rows when a stream has no schema up front)."""
    try:
        ds = open_hf_dataset(path)
    except (DatasetUnavailable, ValueError) as e:
        return str(e)
    names = ds.column_names
    if names is None:
        first = next(iter(ds.take(1)), None)
        names = list(first) if first is not None else []
    if text_column not in names:
        return (
            f"{path}: no text column {text_column!r}; its columns are {sorted(names)}. "
            "Set read.text_column to the one that holds the document text."
        )
    return None


def open_hf_dataset(path: str) -> Any:
    """The datasets.Dataset / IterableDataset a dataset input names."""
    if is_hf_spec(path):
        name, config, split = parse_hf_spec(path)
        return _load(name, split, config)
    return _load(path, "train", None)


def _load(name_or_path: str, split: str, config: str | None) -> Any:
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
        return ds
    name, _, revision = name_or_path.partition("@")
    kwargs: dict[str, Any] = {"split": split, "revision": revision or None}
    try:
        return datasets.load_dataset(name, config, streaming=True, **kwargs)
    except Exception as streamed:  # noqa: BLE001 - the hub is unreachable, or no such dataset
        if p.exists():
            raise DatasetUnavailable(f"{name_or_path}: {streamed}") from None
        try:  # offline: a copy in the local datasets cache
            return datasets.load_dataset(name, config, **kwargs)
        except Exception:  # noqa: BLE001 - reported with the advice below
            pass
        raise DatasetUnavailable(
            f"hf:{name_or_path}: cannot be opened ({type(streamed).__name__}: "
            f"{' '.join(str(streamed).split())[:200]}). The hub is not reachable or has no "
            "such dataset, and the local datasets cache holds no copy. Set HF_HOME (or "
            "HF_DATASETS_CACHE) to a cache that holds it, with HF_HUB_OFFLINE=1, or give a "
            "local copy: a save_to_disk folder, or hf:/path/to/data-folder:SPLIT"
        ) from None


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and any(
        (p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    )


def _data_files(ds: Any) -> int:
    """How many data files (shards) a streamed dataset reads; 1 for a saved one."""
    if getattr(ds, "num_rows", None) is not None:
        return 1
    return int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", None) or 1)


def iter_hf_dataset(
    name_or_path: str,
    split: str = "train",
    text_column: str = "text",
    id_column: str = "id",
    batch_rows: int = 1000,
    config: str | None = None,
    shards: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """A Hugging Face dataset -> READ_SCHEMA batches.

    A directory written by `save_to_disk` is opened with `datasets.load_from_disk` (a
    DatasetDict is indexed by `split`); anything else (a hub name, NAME@REVISION, a local
    folder of data files) is streamed with `load_dataset(..., streaming=True)`, so nothing is
    downloaded in full first (offline: from the local cache). `shards` (a, b) reads rows
    a..b-1 of a saved dataset, or data files a..b-1 of a streamed one (`dataset_spans`).
    Fallback ids are "<name>:<split>:<row>", and "<name>:<split>:<file>:<row>" for a
    streamed dataset of several data files (read file by file, so a row's id does not
    depend on how the files are grouped into parts); ids and text follow the rules of
    pipeline/readers/rows.py and arrow.py, as in Parquet.
    """
    ds = _load(name_or_path, split, config)
    if ds.column_names is not None:  # None for some streamed sources until read
        ds = ds.select_columns(input_columns(ds.column_names, name_or_path, text_column, id_column))
    name = f"{Path(name_or_path).name or name_or_path}:{split}"
    n_files = _data_files(ds)
    if getattr(ds, "num_rows", None) is not None:  # saved: rows by index
        first, stop = shards if shards is not None else (0, ds.num_rows)
        pieces = [(name, first, ds.select(range(first, stop)) if shards is not None else ds)]
    elif n_files > 1:  # streamed, several data files: one at a time
        first, stop = shards if shards is not None else (0, n_files)
        pieces = [(f"{name}:{i}", 0, ds.shard(n_files, i)) for i in range(first, stop)]
    else:
        pieces = [(name, 0, ds)]
    for prefix, offset, piece in pieces:
        for table in piece.with_format("arrow").iter(batch_size=batch_rows):
            yield to_read_table(table, name_or_path, prefix, offset, text_column, id_column)
            offset += table.num_rows
