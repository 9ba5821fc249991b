"""Loose HTML files (.html, .htm, optionally .gz) -> one READ_SCHEMA row each.

The raw bytes go to `html` (the extract stage decodes and extracts them), id "<name>:0".
A file over rows.MAX_RECORD_BYTES is read:too_large without being held whole; a cut or
corrupt .gz is read:truncated_gzip / read:corrupt_gzip; an empty file gives no row.

    from pipeline.readers.html import read_html
    [table] = read_html("page.html")
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow as pa

from pipeline.readers import rows
from pipeline.readers.compression import iter_chunks


def read_html(
    path: str, batch_rows: int = 1000, *, text_column: str = "text", id_column: str = "id"
) -> Iterator[pa.Table]:
    """One .html/.htm(.gz) file -> one row with the raw bytes in `html` (id "<name>:0")."""
    name = os.path.basename(path)
    parts: list[bytes] = []
    size = 0
    try:
        for chunk in iter_chunks(path):
            parts.append(chunk)
            size += len(chunk)
            if size > rows.MAX_RECORD_BYTES:
                yield rows.rows_table([rows.drop_row(f"{name}:0", "too_large")], path)
                return
    except rows.BadInput as e:
        yield rows.rows_table([rows.drop_row(f"{name}:0", e.reason)], path)
        return
    if size:
        body = b"".join(parts)
        yield rows.rows_table(
            [(f"{name}:0", None, body, None, None, None, "text/html", None)], path
        )
