"""The teacher's answer store on disk: answers by request id, a folder per part.

A store folder holds Parquet files of `COMPLETION_SCHEMA` rows, each written whole (temp
file, then rename): `g<generation>-<n>.parquet` (both 6 digits; each attempt takes the next
generation, so its files never overwrite an earlier attempt's), plus `<n>.parquet` from the
older position-keyed layout, read as generation 0. An id in several files resolves to its
newest usable answer, else its newest failure: a stored answer is never replaced by a
failure.

A stage's store is partitioned: `<root>/<part>/` is the folder of one part, `part` the
16-hex xxh64 of the `source_path` its rows carry (`part_key`), the column a stage's
`process()` sees, so a worker reads the answers of the part in hand and nothing else
(`PartAnswers`). Files directly under `<root>` are a store from before the partitioning;
checkpoint.py moves them into part folders. `run_checkpointed`'s store (one list of
requests) is a single folder.

    answers = PartAnswers(Path("state/completions"))
    found = answers.lookup(table["source_path"], table["id"])
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from generators.teacher.base import COMPLETION_SCHEMA
from pipeline.progress import Progress

log = logging.getLogger("primer.teacher")

PART = "teacher_part"
"""The column naming a request's (and its answer's) part folder."""

_GENERATION = re.compile(r"g(\d+)-\d+\.parquet")
_KEY = re.compile(r"[0-9a-f]{16}")
STATUS_SCHEMA = pa.schema(
    [("id", pa.string()), ("ok", pa.bool_()), ("prior", pa.int32()), ("early", pa.bool_()),
     ("last_gen", pa.int64())]
)  # fmt: skip


def part_key(source: str) -> str:
    """The part folder of rows whose `source_path` is `source`."""
    return xxhash.xxh64_hexdigest(source.encode())


def row_keys(sources: pa.Array | pa.ChunkedArray | None, n: int, fallback: str | None) -> pa.Array:
    """Each row's part folder: `part_key` of its source_path (one hash per distinct value);
    rows without one get `fallback`'s key, or null when `fallback` is None."""
    if sources is None:
        sources = pa.nulls(n, pa.string())
    sources = pc.cast(sources, pa.string())
    if isinstance(sources, pa.ChunkedArray):
        sources = sources.combine_chunks()
    enc = pc.dictionary_encode(sources)
    keys = pa.array([part_key(s) for s in enc.dictionary.to_pylist()], pa.string())
    out = keys.take(enc.indices)
    if fallback is not None:
        out = pc.fill_null(out, part_key(fallback))
    return out


def file_source(path: str) -> str:
    """What stands for the source_path of an input file's rows that have none:
    "<folder>/<file>" (what the seeds stage writes in it)."""
    return f"{Path(path).parent.name}/{Path(path).name}"


def store_files(folder: Path) -> list[Path]:
    """A folder's answer files, oldest first: legacy "<n>.parquet" names sort before "g..."."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith("."))


def part_folders(root: Path) -> list[Path]:
    """The part folders of a partitioned store, by key."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and _KEY.fullmatch(p.name))


def folders(root: Path) -> list[Path]:
    """Every folder holding answers: `root` itself when it has files, then its parts."""
    return ([Path(root)] if store_files(root) else []) + part_folders(root)


def generation(path: Path) -> int:
    m = _GENERATION.fullmatch(path.name)
    return int(m[1]) if m else 0


def next_generation(root: Path) -> int:
    gens = [generation(f) for d in folders(root) for f in store_files(d)]
    return max(gens, default=0) + 1


def read(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        # Renamed into place whole, so this is damage from outside: its ids are asked again.
        log.warning("teacher store: cannot read %s (%s); its requests count as unanswered", path, e)
        return None


def resolve(table: pa.Table) -> pa.Table:
    """One row per id: the newest usable answer, else the newest failure."""
    if not len(table):
        return table
    n = len(table)
    table = table.append_column("_ok", pc.is_null(table["error"]))
    table = table.append_column("_order", pa.array(np.arange(n, dtype=np.int64)))
    table = table.sort_by([("id", "ascending"), ("_ok", "descending"), ("_order", "descending")])
    ids = table["id"].combine_chunks()
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(first)).drop_columns(["_ok", "_order"])


def load_checkpoints(folder: Path) -> pa.Table:
    """Every stored completion of one folder, one row per request id (sorted by id)."""
    tables = [t for f in store_files(folder) if (t := read(f)) is not None]
    stored = pa.concat_tables([COMPLETION_SCHEMA.empty_table(), *tables])
    return resolve(stored)


def answered_ids(folder: Path) -> tuple[pa.Array, pa.Array]:
    """(ids with a usable answer, ids whose every stored answer failed) of one folder, each
    sorted and distinct; reads only the id and error columns."""
    tables = [t for f in store_files(folder) if (t := read(f, ["id", "error"])) is not None]
    empty = pa.schema([("id", pa.string()), ("error", pa.string())]).empty_table()
    stored = pa.concat_tables([empty, *tables])
    ok = pc.unique(stored.filter(pc.is_null(stored["error"]))["id"].combine_chunks())
    bad = pc.unique(stored.filter(pc.is_valid(stored["error"]))["id"].combine_chunks())
    bad = bad.filter(pc.invert(pc.is_in(bad, value_set=ok)))
    return ok.take(pc.array_sort_indices(ok)), bad.take(pc.array_sort_indices(bad))


def status(folder: Path, current: int) -> pa.Table:
    """One row per stored id of a folder: `ok` (a usable answer), `prior` (attempts of its
    failures so far, 0 once answered), `early` (it failed in a generation before `current`:
    an earlier attempt) and `last_gen` (the newest generation holding a row of it); reads
    id, error and attempts only."""
    tables = []
    for f in store_files(folder):
        t = read(f, ["id", "error", "attempts"])
        if t is not None:
            tables.append(t.append_column("gen", pa.repeat(pa.scalar(generation(f)), len(t))))
    if not tables:
        return STATUS_SCHEMA.empty_table()
    t = pa.concat_tables(tables)
    t = t.append_column("ok", pc.is_null(t["error"]))
    t = t.append_column("early", pc.and_(pc.invert(t["ok"]), pc.less(t["gen"], current)))
    g = t.group_by("id").aggregate([("ok", "any"), ("early", "any"), ("gen", "max")])
    # Attempts add up over an id's tries (a retry counts those before it): its largest
    # failed row holds the total so far.
    failed = t.filter(pc.invert(t["ok"])).group_by("id").aggregate([("attempts", "max")])
    prior = pc.fill_null(failed["attempts_max"].take(pc.index_in(g["id"], failed["id"])), 0)
    return pa.table(
        [g["id"], g["ok_any"], pc.if_else(g["ok_any"], 0, prior).cast(pa.int32()),
         g["early_any"], g["gen_max"].cast(pa.int64())],
        schema=STATUS_SCHEMA,
    )  # fmt: skip


def answers_revision(root: Path) -> str:
    """A digest of the ids with a usable answer, part by part: it changes exactly when an
    answer is added (a stored answer never changes), e.g. when a retry recovers failed rows.
    Holds one folder's ids at a time."""
    digest = hashlib.blake2b(digest_size=8)
    n = 0
    for i, folder in enumerate(folders(root)):
        ok, _ = answered_ids(folder)
        if i or folder != Path(root):
            digest.update(f"\n[{folder.name}]\n".encode())
        digest.update("\n".join(ok.to_pylist()).encode())
        n += len(ok)
    return f"{n}-{digest.hexdigest()}"


def failed_count(root: Path) -> int:
    """Ids whose stored answers all failed, over every folder of the store."""
    return sum(len(answered_ids(f)[1]) for f in folders(root))


class Commits:
    """One attempt's files in a store, each whole or absent: a table with a `PART` column
    goes to its parts' folders (`<root>/<part>/g<gen>-<n>.parquet`), one without it to
    `root` itself (a single-folder store)."""

    def __init__(self, root: Path, generation: int, progress: Progress | None = None) -> None:
        self.root, self.generation, self.progress = Path(root), generation, progress
        self.files: dict[str, int] = {}
        self.tokens = 0

    def write(self, table: pa.Table) -> None:
        if PART in table.column_names:
            parts = pc.dictionary_encode(table[PART].combine_chunks())
            table = table.drop_columns([PART])
            group = parts.indices.to_numpy(zero_copy_only=False)
            for code, key in enumerate(parts.dictionary.to_pylist()):
                rows = np.flatnonzero(group == code)
                if len(rows):
                    self._file(self.root / key, table.take(pa.array(rows)))
        else:
            self._file(self.root, table)
        self.tokens += int(pc.sum(table["completion_tokens"]).as_py() or 0)
        if self.progress is not None:
            self.progress.update(parts=1, rows=len(table))

    def _file(self, folder: Path, table: pa.Table) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        n = self.files.get(folder.name, 0)
        self.files[folder.name] = n + 1
        name = f"g{self.generation:06d}-{n:06d}.parquet"
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        pq.write_table(table.select(COMPLETION_SCHEMA.names).cast(COMPLETION_SCHEMA), tmp)
        os.replace(tmp, folder / name)


def remove_temp_files(root: Path) -> None:
    """Temp files a killed attempt left behind (never a finished file)."""
    for folder in [Path(root), *part_folders(root)]:
        for stale in folder.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)


class PartAnswers:
    """The resolved answers of a partitioned store, read a part folder at a time and kept
    for the last `keep` parts (a batch of rows is usually one part). Rows without a
    source_path cannot name their part: for those the whole store is read, once (stores
    whose rows carry no source_path, e.g. seeds parts written before they did)."""

    def __init__(self, root: Path, keep: int = 4) -> None:
        self.root, self.keep = Path(root), keep
        self._parts: OrderedDict[str, pa.Table] = OrderedDict()
        self._everything: pa.Table | None = None
        self.rows_loaded = 0
        """Answer rows read so far (tests check that a part reads only its own)."""

    def part(self, key: str) -> pa.Table:
        if key in self._parts:
            self._parts.move_to_end(key)
            return self._parts[key]
        table = load_checkpoints(self.root / key)
        self.rows_loaded += len(table)
        self._parts[key] = table
        while len(self._parts) > self.keep:
            self._parts.popitem(last=False)
        return table

    def everything(self) -> pa.Table:
        if self._everything is None:
            tables = [load_checkpoints(f) for f in folders(self.root)]
            self._everything = pa.concat_tables([COMPLETION_SCHEMA.empty_table(), *tables])
            self.rows_loaded += len(self._everything)
        return self._everything

    def lookup(self, sources: pa.ChunkedArray | pa.Array | None, ids: pa.ChunkedArray) -> pa.Table:
        """For each row (its source_path, id), its stored completion (COMPLETION_SCHEMA),
        all null where there is none."""
        return self.lookup_keys(row_keys(sources, len(ids), None), ids)

    def lookup_keys(self, keys: pa.Array | pa.ChunkedArray, ids: pa.ChunkedArray) -> pa.Table:
        """`lookup` by part folder (null: search the whole store) and id."""
        n = len(ids)
        ids = pc.cast(ids, pa.string())
        tables, pos = [COMPLETION_SCHEMA.empty_table()], pa.nulls(n, pa.int64())
        offset = 0
        for key in pc.unique(keys).to_pylist():
            rows = pc.is_null(keys) if key is None else pc.fill_null(pc.equal(keys, key), False)
            table = self.everything() if key is None else self.part(key)
            where = pc.index_in(ids, value_set=table["id"]).cast(pa.int64())
            pos = pc.if_else(rows, pc.add(where, offset), pos)
            tables.append(table)
            offset += len(table)
        return pa.concat_tables(tables).take(pos)
