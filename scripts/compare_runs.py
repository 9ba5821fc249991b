"""Compare two run folders stage by stage: the same rows, reasons and texts, the same shards?

For every stage folder of a run it digests each part's rows in file order as (id,
drop_reason, xxh64 of the text), and separately every other column's values (scores,
lineage), and for artifact stages and the mixture every file's bytes. Two runs of the same
recipe on the same input, written to the same output path (part names and column parts
record where their inputs were), must agree on all of them, whatever the executor, the
number of workers or the number of times the run was killed and resumed; timings,
manifests and teacher latencies are left out. Exit status 0 when everything compared is
equal.

    python scripts/compare_runs.py runs/a runs/b            # prints a line per stage
    python scripts/compare_runs.py runs/a --save a.json     # the digests, to compare later
    python scripts/compare_runs.py a.json runs/b            # a saved digest against a run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

# Columns whose values depend on the clock or the machine, not on the data.
VOLATILE = frozenset({"latency_s", "fetch_seconds", "generated_at"})
# Keys of JSON files (metrics, manifests) that record when and how long, not what.
# manifest_sha256: train_smoke records the hash of the mixture manifest, whose timings
# older runs kept in it.
VOLATILE_KEYS = ("seconds", "started", "finished", "elapsed", "latency", "manifest_sha256")
# Files of artifact stages that record when and how long, not what.
VOLATILE_FILES = frozenset({"_manifest.json", "_fingerprint", "_lock", "_runs.json"})


def _hash_column(h: Any, column: pa.ChunkedArray) -> None:
    for chunk in column.chunks:
        if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            for v in chunk.to_pylist():
                h.update(b"\0" if v is None else b"\1" + v.encode("utf-8", "surrogatepass"))
        else:
            for v in chunk.to_pylist():
                h.update(repr(v).encode())


def part_digest(path: Path) -> dict[str, Any]:
    """(id, drop_reason, text hash) of every row in order, and the other columns."""
    table = pq.read_table(path)
    rows = xxhash.xxh64()
    names = table.column_names
    n = len(table)
    ids = table["id"].cast(pa.string()).to_pylist() if "id" in names else [None] * n
    reasons = table["drop_reason"].to_pylist() if "drop_reason" in names else [None] * n
    texts = pc.cast(table["text"], pa.large_string()).to_pylist() if "text" in names else [None] * n
    kept = 0
    for i, r, t in zip(ids, reasons, texts, strict=True):
        kept += r is None
        th = "" if t is None else xxhash.xxh64_hexdigest(t.encode("utf-8", "surrogatepass"))
        rows.update(f"{i}\0{r}\0{th}\n".encode("utf-8", "surrogatepass"))
    other = {}
    for name in sorted(set(names) - {"id", "drop_reason", "text"} - VOLATILE):
        h = xxhash.xxh64()
        _hash_column(h, table[name])
        other[name] = h.hexdigest()
    return {"rows": n, "kept": kept, "rows_digest": rows.hexdigest(), "columns": other}


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _strip_volatile(v)
            for k, v in obj.items()
            if not any(w in k for w in VOLATILE_KEYS) and not k.endswith(("_per_s", "_per_minute"))
        }
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def file_digest(path: Path) -> str:
    """sha256 of the bytes; for JSON, of its content less timings (`VOLATILE_KEYS`)."""
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except ValueError:
            pass
        else:
            blob = json.dumps(_strip_volatile(obj), sort_keys=True).encode()
            return hashlib.sha256(blob).hexdigest()[:16]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_digest(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage_dir in sorted(p for p in run.iterdir() if p.is_dir() and not p.name.startswith("_")):
        stage: dict[str, Any] = {"parts": {}, "files": {}}
        manifest = stage_dir / "_manifest.json"
        names = json.loads(manifest.read_text()).get("part_names", []) if manifest.is_file() else []
        for name in names:
            part = stage_dir / f"{name}.parquet"
            if part.is_file():
                stage["parts"][name] = part_digest(part)
        for f in sorted(stage_dir.rglob("*")):
            rel = f.relative_to(stage_dir)
            if (
                f.is_file()
                and rel.parts[0] not in ("_parts", "_state")
                and (f.suffix != ".parquet" or rel.stem not in stage["parts"])
                and f.name not in VOLATILE_FILES
                and not f.name.startswith(".")
            ):
                stage["files"][str(rel)] = file_digest(f)
        out[stage_dir.name] = stage
    return out


def load(arg: str) -> dict[str, Any]:
    p = Path(arg)
    return json.loads(p.read_text()) if p.is_file() else run_digest(p)


def compare(a: dict[str, Any], b: dict[str, Any], files: bool = True) -> list[str]:
    """One line per stage: 'same' or what differs."""
    lines = []
    for stage in sorted(set(a) | set(b)):
        if stage not in a or stage not in b:
            lines.append(f"{stage:<16} only in {'the second' if stage in b else 'the first'}")
            continue
        sa, sb = a[stage], b[stage]
        diffs = []
        if sorted(sa["parts"]) != sorted(sb["parts"]):
            diffs.append("part names differ")
        for name in sorted(set(sa["parts"]) & set(sb["parts"])):
            pa_, pb_ = sa["parts"][name], sb["parts"][name]
            if pa_["rows_digest"] != pb_["rows_digest"]:
                diffs.append(
                    f"{name}: rows differ ({pa_['rows']}/{pa_['kept']} vs "
                    f"{pb_['rows']}/{pb_['kept']} rows/kept)"
                )
            cols = sorted(
                c
                for c in set(pa_["columns"]) | set(pb_["columns"])
                if pa_["columns"].get(c) != pb_["columns"].get(c)
            )
            if cols:
                diffs.append(f"{name}: columns differ: {', '.join(cols)}")
        if files:
            fd = sorted(
                f
                for f in set(sa["files"]) | set(sb["files"])
                if sa["files"].get(f) != sb["files"].get(f)
            )
            if fd:
                diffs.append(f"files differ: {', '.join(fd[:8])}")
        kept = sum(p["kept"] for p in sa["parts"].values())
        rows = sum(p["rows"] for p in sa["parts"].values())
        head = f"{stage:<16} {rows:>7} rows {kept:>7} kept  "
        lines.append(head + ("same" if not diffs else "DIFFERENT: " + "; ".join(diffs[:6])))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="a run folder or a saved digest (.json)")
    p.add_argument("second", nargs="?", help="a run folder or a saved digest (.json)")
    p.add_argument("--save", help="write the first run's digest to this file")
    args = p.parse_args(argv)
    a = load(args.first)
    if args.save:
        Path(args.save).write_text(json.dumps(a, indent=1, sort_keys=True) + "\n")
    if not args.second:
        return 0
    lines = compare(a, load(args.second))
    print("\n".join(lines))
    return 0 if all(line.endswith("same") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
