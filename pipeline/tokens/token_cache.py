"""Step 1 of the mixture: each input part, filtered and tokenized once, cached on disk.

A part's documents (kept rows passing the source's polars SQL filter) are tokenized with
the fast tokenizer's batch API into a Megatron indexed dataset under `RUN/_cache/tokens/`,
each document followed by EOS, keyed (`cache_key`) by the input file, the filter and the
tokenizer hash. `prefix.json`, written last, marks a part done: a killed run keeps
finished parts, and a changed budget or weight re-mixes without re-tokenizing.

    from pipeline.tokens.token_cache import TokenizeJob, TokenizeTask
    for stats in executor.map(TokenizeTask("phi3", 1000), jobs, uses_model=True):
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


def cache_key(path: str, expr: str | None, tokenizer_sha: str) -> str:
    """The cache entry's name for (input file as it is now, filter, tokenizer)."""
    st = os.stat(path)
    blob = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{expr}\0{tokenizer_sha}"
    return f"{Path(path).stem[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenize_part(
    tokenizer: Any, path: str, expr: str | None, prefix: str, batch_rows: int
) -> dict[str, Any]:
    """Tokenize the kept rows of one input file that pass `expr` into the indexed dataset
    `prefix` (each document + EOS); write `prefix.json` (the commit marker) last."""
    import polars as pl

    from pipeline.tokens.shards import IndexedDatasetWriter

    columns = list(dict.fromkeys(["id", "text", *_filter_columns(expr)]))
    predicate = pl.sql_expr(expr) if expr else None
    rows_in = rows = no_text = 0
    t0 = time.monotonic()
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
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
            rows += len(table)
        info = writer.finalize()
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


class TokenizeTask:
    """One input part per call; the tokenizer is loaded on first use, once per worker (the
    executor keeps this object alive in each actor)."""

    def __init__(self, tokenizer_spec: str, batch_rows: int) -> None:
        self.tokenizer_spec = tokenizer_spec
        self.batch_rows = batch_rows
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_spec": self.tokenizer_spec, "batch_rows": self.batch_rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self, job: TokenizeJob) -> dict[str, Any]:
        if self._tokenizer is None:
            from pipeline.tokens.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)  # one thread: one CPU each
        return tokenize_part(self._tokenizer, job.path, job.filter, job.prefix, self.batch_rows)


@dataclass
class TokenizeJob:
    """One input part to tokenize: the file, its source's filter, the cache prefix."""

    path: str
    filter: str | None
    prefix: str
