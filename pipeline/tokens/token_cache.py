"""Step 1 of the mixture: each input part, filtered and tokenized once, cached on disk.

A part's documents (kept rows passing the source's polars SQL filter) are tokenized with
the fast tokenizer's batch API into a Megatron indexed dataset under `RUN/_cache/tokens/`,
each document followed by EOS, keyed (`cache_key`) by the input file, the filter and the
tokenizer hash. Beside it, `prefix.ids.arrow` (Arrow IPC, memory-mappable) holds each
document's id, in the same order, for the shards' provenance sidecars. `prefix.json`,
written last, marks a part done: a killed run keeps finished parts, and a changed budget
or weight re-mixes without re-tokenizing.

    from pipeline.tokens.token_cache import TokenizeJob, TokenizeTask
    for stats in executor.map(TokenizeTask("phi3", 1000), jobs):
        ...
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import iter_documents, write_json_atomic
from pipeline.tokens.allocation import MixtureError


def _filter_columns(expr: str | None) -> list[str]:
    if expr is None:
        return []
    import polars as pl

    return list(pl.sql_expr(expr).meta.root_names())


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


CACHE_VERSION = 2  # 2: document ids beside the tokens
IDS_SCHEMA = pa.schema([("id", pa.string())])


def ids_path(prefix: str) -> str:
    """A cached part's document ids: an Arrow IPC file, one `id` per document, in order."""
    return f"{prefix}.ids.arrow"


def is_cached(prefix: str) -> bool:
    """A finished cache part: its commit marker, and the ids it needs beside it."""
    return Path(f"{prefix}.json").is_file() and Path(ids_path(prefix)).is_file()


def cache_key(path: str, expr: str | None, tokenizer_sha: str) -> str:
    """The cache entry's name for (input file as it is now, filter, tokenizer)."""
    st = os.stat(path)
    blob = (
        f"v{CACHE_VERSION}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{expr}"
        f"\0{tokenizer_sha}"
    )
    return f"{Path(path).stem[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenize_part(
    tokenizer: Any, path: str, expr: str | None, prefix: str, batch_rows: int
) -> dict[str, Any]:
    """Tokenize the kept rows of one input file that pass `expr` into the indexed dataset
    `prefix` (each document + EOS) and their ids into `prefix.ids.arrow`; write
    `prefix.json` (the commit marker) last."""
    import polars as pl

    from pipeline.tokens.shards import IndexedDatasetWriter

    columns = list(dict.fromkeys(["id", "text", *_filter_columns(expr)]))
    predicate = pl.sql_expr(expr) if expr else None
    rows_in = rows = no_text = 0
    t0 = time.monotonic()
    ids_tmp = f"{ids_path(prefix)}.tmp-{os.getpid()}"
    try:
        with (
            IndexedDatasetWriter(prefix, dtype=np.uint16) as writer,
            pa.OSFile(ids_tmp, "wb") as sink,
            pa.ipc.new_file(sink, IDS_SCHEMA) as ids,
        ):
            for table in iter_documents([path], batch_rows, columns=columns):
                rows_in += len(table)
                if predicate is not None:
                    missing = [c for c in columns if c not in table.column_names]
                    if missing:
                        raise MixtureError(
                            f"{path}: filter {expr!r} needs columns {missing}, which this input lacks"
                        )
                    mask = pl.from_arrow(table.select(columns[2:])).select(predicate).to_series()
                    table = table.filter(pa.array(mask.fill_null(False).to_arrow()))
                if table["text"].null_count:
                    # A kept row without text has no tokens to give; counted, never fatal.
                    no_text += table["text"].null_count
                    table = table.filter(pc.is_valid(table["text"]))
                if not len(table):
                    continue
                flat, lengths = tokenizer.encode_batch(table["text"].to_pylist())
                writer.add_documents(*_with_eos(flat, lengths, tokenizer.eos_id))
                ids.write_table(pa.table({"id": table["id"].cast(pa.string())}, schema=IDS_SCHEMA))
                rows += len(table)
            info = writer.finalize()
    except BaseException:
        Path(ids_tmp).unlink(missing_ok=True)
        raise
    os.replace(ids_tmp, ids_path(prefix))
    stats = {
        "input": path,
        "input_sha256": _file_sha256(path),
        "filter": expr,
        "rows_in": rows_in,
        "documents": rows,
        "no_text": no_text,
        "tokens": int(info["tokens"]),
        "seconds": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(f"{prefix}.json", stats)
    return stats


def _with_eos(flat: np.ndarray, lengths: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Append EOS to every document of a flat batch (one vectorised insert)."""
    ends = np.cumsum(lengths)
    return np.insert(flat, ends, np.asarray(eos, flat.dtype)), lengths + 1


_LOADED: dict[str, Any] = {}  # the tokenizer this process loaded last, by spec


def process_tokenizer(spec: str) -> Any:
    """The tokenizer `spec`, loaded once per process and kept (one at a time).

    Why per process rather than per task object: a Ray task worker is a long-lived process
    that runs task after task, so a map of plain tasks loads the tokenizer once per worker,
    like an actor pool, without the pool's start-up before the first part."""
    if spec not in _LOADED:
        from pipeline.tokens.tokenizer import load_tokenizer

        _LOADED.clear()
        _LOADED[spec] = load_tokenizer(spec)  # one thread: one CPU each
    return _LOADED[spec]


class TokenizeTask:
    """One input part per call, with this process's tokenizer (`process_tokenizer`)."""

    def __init__(self, tokenizer_spec: str, batch_rows: int) -> None:
        self.tokenizer_spec = tokenizer_spec
        self.batch_rows = batch_rows

    def __call__(self, job: TokenizeJob) -> dict[str, Any]:
        tokenizer = process_tokenizer(self.tokenizer_spec)
        return tokenize_part(tokenizer, job.path, job.filter, job.prefix, self.batch_rows)


@dataclass
class TokenizeJob:
    """One input part to tokenize: the file, its source's filter, the cache prefix."""

    path: str
    filter: str | None
    prefix: str
