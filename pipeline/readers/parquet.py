"""Parquet -> READ_SCHEMA tables, row group by row group, a broken group costing only its rows.

Only the mapped columns are read (text, id, url, title, a time field), batch by batch inside
each row group. A row group that does not decode becomes read:corrupt_parquet rows, as many
as the footer says it holds, with the ids a clean read would give them; a file whose footer
does not decode (0 bytes, cut short, not Parquet at all) is one such row, id "<name>:0".
Page checksums are verified where the writer stored them.

    from pipeline.readers.parquet import read_parquet
    for table in read_parquet("part-0.parquet", 1000, text_column="content"):
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.readers.arrow import (
    fallback_ids,
    input_columns,
    is_stringlike,
    repeat,
    to_read_table,
)
from pipeline.readers.rows import TIME_TYPE, rebatch
from pipeline.schema import READ_SCHEMA


def read_parquet(
    path: str,
    batch_rows: int = 1000,
    *,
    text_column: str = "text",
    id_column: str = "id",
    row_groups: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    """Parquet -> READ_SCHEMA batches of `batch_rows` rows (the last one fewer).

    Reads only the columns it maps, row group by row group and batch by batch inside a
    group, so a row group that does not decode costs only the rows it did not yield: they
    become read:corrupt_parquet rows, as many as the footer says the group holds, with the
    ids a clean read would give them. A file whose footer does not decode is one such row.
    `row_groups` (a, b) reads groups a..b-1 only; their rows keep the file's row numbers
    (the fallback ids "<name>:<row>" are the same as in a whole read).
    """
    tables = _parquet_tables(path, batch_rows, text_column, id_column, row_groups)
    return rebatch(tables, batch_rows)


# What pyarrow raises for Parquet bytes that do not decode (thrift, snappy, page checksum,
# short reads). FileNotFoundError is an OSError too, but a file deleted under the reader is
# not corrupt data: it propagates.
PARQUET_ERRORS = (pa.ArrowException, OSError)


def _parquet_tables(
    path: str,
    batch_rows: int,
    text_column: str,
    id_column: str,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        # Page checksums, where the writer stored them, turn silent bit rot into an error.
        source = storage.parquet_source(path)
        pf = pq.ParquetFile(source, page_checksum_verification=True)
    except FileNotFoundError:
        raise
    except PARQUET_ERRORS:
        yield _lost_rows(path, name, 0, 1)  # 0 bytes, cut short, not Parquet at all
        return
    try:
        meta = pf.metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        names = pf.schema_arrow.names
        if min(groups, default=0) < 0 or sum(groups) != meta.num_rows:
            # The footer decodes but contradicts itself (a flipped bit): its counts cannot
            # be trusted to say how many documents a broken group held.
            raise pa.ArrowInvalid(f"{path}: row group counts do not add up to num_rows")
    except PARQUET_ERRORS:
        pf.close()
        yield _lost_rows(path, name, 0, 1)
        return
    try:
        columns = input_columns(names, path, text_column, id_column)
        first, stop = row_groups if row_groups is not None else (0, len(groups))
        storage.plan_row_groups(pf, range(first, stop), source, columns)  # remote: read ahead
        offset = sum(groups[:first])
        for group, n in enumerate(groups[first:stop], start=first):
            done = 0
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            while True:
                try:
                    batch = next(batches)
                    _check_decoded(batch)
                    table = pa.Table.from_batches([batch])
                    table = to_read_table(table, path, name, offset + done, text_column, id_column)
                except StopIteration:
                    break
                except FileNotFoundError:
                    raise
                except PARQUET_ERRORS:
                    break  # the rest of this group is lost; the next group may be fine
                yield table
                done += batch.num_rows
            for start in range(offset + done, offset + n, batch_rows):
                yield _lost_rows(path, name, start, min(start + batch_rows, offset + n))
            offset += max(n, done)
    finally:
        pf.close()
        if not isinstance(source, str):
            source.close()  # a remote file's read-ahead thread


def _check_decoded(batch: pa.RecordBatch) -> None:
    """Raise ArrowInvalid where pyarrow decoded garbage without noticing.

    A broken page can decode into dictionary indices past the dictionary's end, which
    would fail later, in some stage. String columns get the cheap check only: their UTF-8
    is the text and id rules' to judge, row by row.
    """
    for col in batch.columns:
        col.validate(full=not is_stringlike(col.type))


def _lost_rows(path: str, name: str, start: int, stop: int) -> pa.Table:
    """read:corrupt_parquet rows for rows start..stop-1 of a Parquet file."""
    n = stop - start
    return pa.Table.from_arrays(
        [
            fallback_ids(name, start, n),
            pa.nulls(n, pa.large_string()),
            pa.nulls(n, pa.large_binary()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.string()),
            pa.nulls(n, TIME_TYPE),
            pa.nulls(n, pa.string()),
            repeat(path, n),
            repeat("read:corrupt_parquet", n),
        ],
        schema=READ_SCHEMA,
    )
