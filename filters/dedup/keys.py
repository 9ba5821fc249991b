"""What identifies a row in dedup, and the long-form keys of the rows it judges.

A document is known by its (source_path, id) pair, carried as one short string, its node
(`row_nodes`): ids are unique only within the file a row was read from, so two JSONL shards
that both number their rows from 0 hold two different documents "0". Each kept row becomes
long-form rows (node, band, key): one exact key (its `text_hash`) and one LSH key per band
(`dedup_keys`, `input_keys`). This long form is all that leaves a worker: a few dozen bytes
plus the id per row, no text. Two kept rows with the same node are an error
(`DuplicateRowError`), never a silent keep of both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from filters.dedup.config import DedupConfig
from filters.dedup.minhash import band_keys, minhash, text_hash
from filters.normalise import normalise
from pipeline.stage import StageFatal

EXACT_BAND = -1
"""The `band` value of a document's exact-dedup key in the long form (its text_hash)."""

SOURCE_BAND = -2
"""Long-form rows that are no LSH key: one per (input, source_path) met, `node` = the
source's prefix + its path, `key` = the input's position in the list. They bring the
per-source table (prefix -> path) to the driver and are kept out of every bucket."""

PREFIX_CHARS = 16
"""Hex digits of a node's source hash (`row_nodes`): a node's id is `node[PREFIX_CHARS:]`."""

KEYS_SCHEMA = pa.schema([("node", pa.string()), ("band", pa.int16()), ("key", pa.uint64())])

READ_COLUMNS = ("id", "text", "source_path")
"""The columns dedup reads from its inputs."""


class DuplicateRowError(StageFatal, ValueError):
    """Two kept rows with the same (source_path, id): dedup could not tell them apart. Fatal
    for the part: splitting the batch to find "the bad row" would separate the pair."""


def as_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` as one string array (chunks combined)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values.cast(pa.string())


def row_sources(table: pa.Table) -> pa.Array:
    """Each row's `source_path`; "" where it has none (synthetic rows, tables built in
    memory), so all such rows count as one source and need ids unique among them."""
    if "source_path" not in table.column_names:
        return pa.array(np.full(len(table), ""), pa.string())
    return pc.fill_null(as_strings(table["source_path"]), "")


def node_hash(nodes: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """xxh64 of each node (no nulls): for lookups and samples, never as its identity."""
    return text_hash(as_strings(nodes), normalised=True).to_numpy(zero_copy_only=False)


def source_prefix(source: str) -> str:
    return f"{xxhash.xxh64_intdigest(source.encode()):016x}"


def row_nodes(table: pa.Table) -> pa.Array:
    """The key dedup clusters over: 16 hex digits of xxh64(source_path), then the id.

    Ids repeat across parts (two JSONL shards both numbered from 0) but not within the
    file a row was read from (the runner numbers a repeated id "X#1"), so the pair is
    unique per row; hashing the path, not the row, keeps the key short and exact (two
    paths sharing a hash would be caught by `source_table`). The prefix has a fixed width:
    a node's id is `node[16:]`. Null for a null id."""
    enc = pc.dictionary_encode(row_sources(table))
    prefixes = pa.array([source_prefix(s) for s in enc.dictionary.to_pylist()], pa.string())
    return pc.binary_join_element_wise(prefixes.take(enc.indices), as_strings(table["id"]), "")


def kept_rows(table: pa.Table) -> pa.Table:
    """The rows dedup judges: not dropped by an earlier stage, with an id."""
    mask = pc.is_valid(table["id"])
    if "drop_reason" in table.column_names:
        mask = pc.and_(mask, pc.is_null(table["drop_reason"]))
    return table.filter(mask)


def check_unique_nodes(nodes: pa.Array, sources: dict[str, str], where: str) -> None:
    """Raise DuplicateRowError if `nodes` (no nulls) repeat; `sources` maps prefixes."""
    if pc.count_distinct(nodes).as_py() == len(nodes):
        return
    counts = pc.value_counts(nodes)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    node = repeated[0]["values"].as_py()
    source = sources.get(node[:PREFIX_CHARS], "?")
    raise DuplicateRowError(
        f"dedup: {len(repeated)} (source_path, id) pairs occur on more than one kept row of "
        f"{where}, e.g. id {node[PREFIX_CHARS:]!r} from source_path {source!r}; dedup tells "
        "documents apart by that pair, so it would judge two documents as one. Give every "
        "row of an input file its own id (the runner numbers a repeated id X as X#1, X#2) "
        "and rows of different files their file in `source_path`"
    )


# --- keys: what leaves a worker ------------------------------------------------------------


def dedup_keys(table: pa.Table, config: DedupConfig) -> pa.Table:
    """Long form (node, band, key) of a batch: with `exact`, one row per document with
    band = EXACT_BAND and key = text_hash; with `near`, one row per band for documents
    with at least one word. `node` is the row's `row_nodes` key. Rows with null text or a
    drop_reason are left out. This is all that leaves a worker: a few dozen bytes plus
    the id per row, no text."""
    table = kept_rows(table)
    return _keys(table, row_nodes(table), config)


def _keys(table: pa.Table, nodes: pa.Array, config: DedupConfig) -> pa.Table:
    if table["text"].null_count:
        has_text = pc.is_valid(table["text"])
        table, nodes = table.filter(has_text), nodes.filter(has_text.combine_chunks())
    norm = normalise(table["text"], **config.norm_flags)
    parts = []
    if config.exact:
        th = text_hash(norm, normalised=True)
        band = pa.array(np.full(len(nodes), EXACT_BAND, np.int16))
        parts.append(pa.table([nodes, band, th], schema=KEYS_SCHEMA))
    if config.near:
        sig = minhash(norm, config, normalised=True)
        has_words = pc.greater(pc.binary_length(norm), 0).to_numpy(zero_copy_only=False)
        keys = band_keys(sig[has_words], config.bands, config.rows_per_band, config.seed)
        n, nb = keys.shape
        doc_nodes = nodes.filter(pa.array(has_words)).take(pa.array(np.repeat(np.arange(n), nb)))
        band = np.tile(np.arange(nb, dtype=np.int16), n)
        parts.append(pa.table([doc_nodes, band, keys.ravel()], schema=KEYS_SCHEMA))
    return pa.concat_tables(parts) if parts else KEYS_SCHEMA.empty_table()


@dataclass
class SeenNodes:
    """What one pass over inputs saw: each kept row's node, to check that none repeats, and
    the source_path behind each prefix (per source, not per row)."""

    nodes: list[pa.Array] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def check_unique(self, where: str) -> None:
        if self.nodes:
            check_unique_nodes(pa.concat_arrays(self.nodes), self.sources, where)


def input_keys(
    tables: Iterable[pa.Table], config: DedupConfig, index: int, seen: SeenNodes
) -> Iterator[pa.Table]:
    """The long-form keys of one input's batches, then its SOURCE_BAND rows: one per
    source_path met, `node` = prefix + path and `key` = the input's position `index`."""
    met: dict[str, str] = {}
    for table in tables:
        table = kept_rows(table)
        if not len(table):
            continue
        nodes = row_nodes(table)
        seen.nodes.append(nodes)
        for source in pc.unique(row_sources(table)).to_pylist():
            met.setdefault(source_prefix(source), source)
        yield _keys(table, nodes, config)
    seen.sources.update(met)
    if met:
        n = len(met)
        yield pa.table(
            [
                pa.array([p + s for p, s in met.items()], pa.string()),
                pa.array(np.full(n, SOURCE_BAND, np.int16)),
                pa.array(np.full(n, index, np.uint64)),
            ],
            schema=KEYS_SCHEMA,
        )


def source_table(rows: pa.Table, names: Sequence[str]) -> pa.Table:
    """SOURCE_BAND rows -> (prefix, source_path), one row per source, after checking the
    two things that keep nodes unique across inputs: a prefix names one source_path, and
    a source_path (other than "", rows without one) comes through one input only, as the
    runner's parts do (one part per input file). `names` are the inputs' names, in order."""
    node = rows["node"]
    table = pa.table(
        {
            "prefix": pc.utf8_slice_codeunits(node, 0, PREFIX_CHARS),
            "source_path": pc.utf8_slice_codeunits(node, PREFIX_CHARS),
            "input": rows["key"],
        }
    )
    per_source = table.group_by("source_path").aggregate(
        [("input", "count_distinct"), ("input", "min"), ("input", "max")]
    )
    split = per_source.filter(
        pc.and_(
            pc.greater(per_source["input_count_distinct"], 1),
            pc.not_equal(per_source["source_path"], ""),
        )
    )
    if len(split):
        row = split.slice(0, 1).to_pylist()[0]
        a, b = names[row["input_min"]], names[row["input_max"]]
        raise DuplicateRowError(
            f"dedup: rows read from source_path {row['source_path']!r} come in through "
            f"{row['input_count_distinct']} inputs ({a!r} and {b!r}, ...); ids are unique "
            "only within one source file, so the same source in two inputs can repeat a "
            "document. Give dedup each stage output once (check the stage's `input` list)"
        )
    distinct = table.group_by(["prefix", "source_path"]).aggregate([])
    per_prefix = distinct.group_by("prefix").aggregate([("source_path", "count")])
    clash = per_prefix.filter(pc.greater(per_prefix["source_path_count"], 1))
    if len(clash):
        prefix = clash["prefix"][0].as_py()
        paths = distinct.filter(pc.equal(distinct["prefix"], prefix))["source_path"].to_pylist()
        raise DuplicateRowError(
            f"dedup: source paths {paths[:2]} share the 64-bit hash {prefix}, so their rows "
            "cannot be told apart; rename one of the files"
        )
    return distinct.select(["prefix", "source_path"])
