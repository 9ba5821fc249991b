"""Arrow tables from Parquet or a Hugging Face dataset -> READ_SCHEMA, column by column.

Why Arrow in, Arrow out: a Parquet or HF batch is already columnar, and a per-row Python
loop would cost more than the read itself. Only a batch that holds something unusual (bytes
that are not UTF-8, fractional float ids, nested ids) takes a row-by-row path, through the
same rules the JSONL reader applies (pipeline/readers/rows.py), so the readers cannot drift.

Text must be a string. `string`, `large_string`, `string_view` and dictionary-encoded
strings are read as they are; `binary` columns are decoded as UTF-8 (the read:invalid_utf8
rule, also applied to string columns whose bytes are not valid UTF-8); any other type is
read:text_not_string, and `check_input` names such a column at plan time.

    from pipeline.readers.arrow import input_columns, to_read_table
    table = to_read_table(table, "f.parquet", "f.parquet", 0, "text", "id")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.readers.rows import TIME_FIELDS, TIME_TYPE, decode_text, id_str, parse_time
from pipeline.schema import READ_SCHEMA


def input_columns(names: list[str], where: str, text_column: str, id_column: str) -> list[str]:
    """Columns to read; a clear error when the text column is absent (a config mistake)."""
    if text_column not in names:
        raise ValueError(
            f"{where}: no text column {text_column!r}; columns are {list_names(names)}. "
            "Pass text_column= naming the column that holds the document text."
        )
    wanted = [text_column, id_column, "url", "title"]
    wanted += [next((c for c in TIME_FIELDS if c in names), "")]
    return [c for c in dict.fromkeys(wanted) if c in names]


def list_names(names: list[str], limit: int = 20) -> str:
    """Column names for an error message: the first `limit`, then how many more."""
    shown = ", ".join(names[:limit])
    return f"[{shown}, ... {len(names) - limit} more]" if len(names) > limit else f"[{shown}]"


def to_read_table(
    table: pa.Table, source: str, name: str, offset: int, text_column: str, id_column: str
) -> pa.Table:
    n = table.num_rows
    names = table.column_names
    input_columns(names, source, text_column, id_column)  # streamed sources check here
    text, reason = _arrow_text(_column(table, text_column))
    ids = _arrow_ids(_column(table, id_column)) if id_column in names else None
    if ids is None or ids.null_count:
        fallback = fallback_ids(name, offset, n)
        ids = fallback if ids is None else pc.coalesce(ids, fallback)
    time_col = next((c for c in TIME_FIELDS if c in names), None)
    return pa.Table.from_arrays(
        [
            ids,
            text,
            pa.nulls(n, pa.large_binary()),
            _as_string(table, "url"),
            _as_string(table, "title"),
            _arrow_time(_column(table, time_col)) if time_col else pa.nulls(n, TIME_TYPE),
            repeat("text/plain", n),
            repeat(source, n),
            reason,
        ],
        schema=READ_SCHEMA,
    )


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """The first column called `name` (`table[name]` refuses a name that appears twice)."""
    return table.column(table.column_names.index(name))


def repeat(value: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.string()), n)


def fallback_ids(name: str, start: int, n: int) -> Any:
    """ "<name>:<row>" for rows start..start+n-1, built in Arrow."""
    rows = pc.cast(pa.array(np.arange(start, start + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(f"{name}:", rows, "")


def _decoded(col: Any) -> Any:
    """A dictionary-encoded column as plain values (Parquet keeps Arrow's dictionaries)."""
    t = col.type
    return pc.cast(col, t.value_type) if pa.types.is_dictionary(t) else col


def is_stringlike(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binarylike(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def can_hold_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return is_stringlike(t) or _is_binarylike(t) or pa.types.is_null(t)


def _as_utf8(col: Any, decode: Callable[[bytes], str | None]) -> tuple[Any, Any]:
    """A string or binary column as valid large_string, and which rows `decode` refused.

    Parquet does not check that a string column holds UTF-8 (a later `to_pylist` would
    fail on it), so strings are validated too. Only a batch that holds invalid bytes is
    decoded row by row in Python; the mask is None when there was none.
    """
    if is_stringlike(col.type):
        text = pc.cast(col, pa.large_string())
        try:
            text.validate(full=True)
            return text, None
        except pa.ArrowInvalid:
            raw = pc.cast(col, pa.large_binary())
    else:
        if pa.types.is_fixed_size_binary(col.type):
            col = pc.cast(col, pa.large_binary())
        try:
            return pc.cast(col, pa.large_string()), None  # the cast checks the UTF-8
        except pa.ArrowInvalid:
            raw = pc.cast(col, pa.large_binary())
    values = raw.to_pylist()
    decoded = [None if b is None else decode(b) for b in values]
    refused = [b is not None and d is None for b, d in zip(values, decoded, strict=True)]
    return pa.array(decoded, pa.large_string()), pa.array(refused, pa.bool_())


def _arrow_text(col: Any) -> tuple[Any, Any]:
    """The text column as large_string (null when dropped) and each row's drop reason."""
    n = len(col)
    col = _decoded(col)
    none = pa.scalar(None, pa.string())
    if not can_hold_text(col.type) or pa.types.is_null(col.type):
        reason = pc.if_else(pc.is_valid(col), "read:text_not_string", "read:missing_text")
        return pa.nulls(n, pa.large_string()), reason
    text, refused = _as_utf8(col, decode_text)
    missing = pc.fill_null(pc.equal(pc.binary_length(text), 0), True)
    reason = pc.if_else(missing, pa.scalar("read:missing_text"), none)
    if refused is not None:
        reason = pc.if_else(refused, pa.scalar("read:invalid_utf8"), reason)
    return pc.if_else(missing, pa.scalar(None, pa.large_string()), text), reason


def _arrow_ids(col: Any) -> Any:
    """Ids by the rule in pipeline/readers/rows.py, as strings; null where the fallback applies.

    Computed in Arrow for every common type; the rare ones (fractional floats, nested
    values) go through `id_str`, the JSONL rule itself, so the readers cannot drift apart.
    """
    col = _decoded(col)
    t = col.type
    try:
        if pa.types.is_null(t):
            return pa.nulls(len(col), pa.string())
        if is_stringlike(t) or _is_binarylike(t):
            ids = pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
        elif pa.types.is_integer(t):
            ids = pc.cast(col, pa.string())
        elif pa.types.is_boolean(t):
            ids = pc.if_else(col, "true", "false")
        elif pa.types.is_floating(t) or (pa.types.is_decimal(t) and t.scale > 0):
            ids = _float_ids(pc.cast(col, pa.float64()))
        elif pa.types.is_decimal(t) or pa.types.is_temporal(t):
            ids = pc.cast(col, pa.string())
        else:
            ids = pa.array([id_str(v) for v in col.to_pylist()], pa.string())
    except (pa.ArrowException, ValueError, TypeError):
        # A type with no string form in this pyarrow: every row gets its fallback id,
        # which loses the input's ids but not its documents.
        return pa.nulls(len(col), pa.string())
    return pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)


def _float_ids(f: Any) -> Any:
    """Float ids as `id_str` writes them: integral values (below 2**53, exact) as integers."""
    exact = pc.and_(pc.equal(pc.floor(f), f), pc.less(pc.abs(f), 2.0**53))
    if pc.any(pc.and_(pc.invert(exact), pc.is_finite(f))).as_py():
        return pa.array([id_str(v) for v in f.to_pylist()], pa.string())
    ints = pc.cast(pc.cast(pc.if_else(exact, f, 0.0), pa.int64()), pa.string())
    return pc.if_else(exact, ints, pa.scalar(None, pa.string()))


def _as_string(table: pa.Table, column: str) -> Any:
    """A url/title column as valid strings; all null when it is not text at all."""
    n = table.num_rows
    if column not in table.column_names:
        return pa.nulls(n, pa.string())
    col = _decoded(_column(table, column))
    try:
        if is_stringlike(col.type) or _is_binarylike(col.type):
            return pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(n, pa.string())  # e.g. a struct column named "title": not ours


def _arrow_time(col: Any) -> Any:
    """Any timestamp/date/string column -> timestamp[us, UTC]; unparseable values -> null."""
    col = _decoded(col)
    t = col.type
    try:
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            if pa.types.is_timestamp(t) and t.tz is None:
                col = pc.cast(col, pa.timestamp("us"), safe=False)  # naive: taken as UTC
            return pc.cast(col, TIME_TYPE, safe=False)
        if is_stringlike(t) or _is_binarylike(t):
            col = pc.cast(_as_utf8(col, lambda b: b.decode("utf-8", "replace"))[0], pa.string())
            for target in (TIME_TYPE, pa.timestamp("us")):  # with a zone, then naive (as UTC)
                try:
                    return pc.cast(pc.cast(col, target), TIME_TYPE)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    pass
            return pa.array([parse_time(v) for v in col.to_pylist()], TIME_TYPE)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass  # a time nobody can read costs the time, not the document
    return pa.nulls(len(col), TIME_TYPE)
