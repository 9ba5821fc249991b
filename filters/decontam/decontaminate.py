"""The `decontaminate` stage: word n-gram overlap with benchmark test items.

What: every row gets `contam_benchmarks` (the benchmarks it overlaps, comma-separated),
`contam_items` (a JSON list of the items hit, "benchmark/split:index") and `contam_ngrams`
(how many distinct n-grams it shares with them); all three stay null for a clean row. A
contaminated row is dropped (`decontaminate:contaminated`) in `mode: drop`; in `mode: cut`
the matching spans are cut out of `text` and the row is kept unless too little is left.
`hit_report()` sums the columns of a stage's output per benchmark.

Why: a model that trained on a test item scores well on it for the wrong reason, and a
synthetic pipeline whose teacher memorised a benchmark can copy items into its output.
GPT-3 (Brown et al., 2020, appendix C) removed training text sharing a word 13-gram with any
test item, and lm-evaluation-harness's Janitor implements the same rule; Llama 2 and 3
measured contamination with 10- and 8-gram overlap. A 13-gram rarely occurs twice by chance,
so one shared n-gram (`min_ngrams: 1`) is the usual rule. n-gram overlap finds copies,
reformatted ones included (case, punctuation, accents, line breaks and labels such as
"Question:" or "A)" are normalised away or only break the n-grams that straddle them); it
misses paraphrases: a changed word every dozen words leaves no 13-gram intact. Recall on
real items planted into FineWeb documents, and false positives on clean web text, are
measured by tests/filters/test_decontam.py and benchmarks/decontam_quality.py (results in
README.md).

How: `setup()` loads the benchmark items (benchmarks.py) and builds their n-gram index
(index.py) once per worker process (`index_stats` says how big and how long); each batch is
normalised and its n-grams looked up in numpy. Only contaminated rows in `mode: cut` go
through Python, one at a time. The stage's fingerprint includes a hash of the local
benchmark files (`content_fingerprint`), so editing a benchmark set recomputes it.

    stage = DecontaminateStage(benchmarks="../shared/data/benchmarks")
    out = stage(table)                      # or `primer run` with stage `decontaminate`
    hit_report([out])                       # {"rows": ..., "benchmarks": {"gsm8k": ...}}
    python -m benchmarks.decontam_quality   # recall on planted items, FP rate, docs/s
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from filters.decontam.benchmarks import (
    benchmark_files,
    is_benchmark_file,
    load_items,
    local_path,
    sources_fingerprint,
)
from filters.decontam.index import (
    NgramIndex,
    build_index,
    cut_spans,
    find_matches,
    remove_spans,
    score_hits,
)
from filters.normalise import normalise
from pipeline.readers.hf import is_saved_dataset
from pipeline.stage import (
    PreflightError,
    Stage,
    StageConfig,
    is_ref,
    mark_dropped,
    require_path,
    set_column,
)

REASON = "contaminated"


class DecontamConfig(StageConfig):
    """Settings of the `decontaminate` stage. Defaults follow GPT-3's decontamination
    (13-grams, one shared n-gram is a hit, 200 characters around a match cut)."""

    benchmarks: list[str]
    """Benchmark test sets: a folder laid out like shared/data/benchmarks (searched for
    .jsonl, .jsonl.gz and .csv files), files, `datasets.save_to_disk` folders, or hub
    datasets as "hf:NAME[:CONFIG]:SPLIT" (e.g. "hf:openai/gsm8k:main:test"). Required."""

    ngram: int = Field(13, ge=4, le=64)
    """Words per n-gram (GPT-3 and lm-evaluation-harness: 13; Llama 3: 8)."""

    min_ngrams: int = Field(1, ge=1)
    """A row hits an item when they share this many distinct n-grams, or all the n-grams the
    item has when it has fewer. 1 is the GPT-3 / Llama rule."""

    short_min_words: int = Field(8, ge=1)
    """Questions and items shorter than `ngram` words but at least this long are matched
    whole, as one n-gram (GPT-3's floor for its per-benchmark N was 8). Set it to `ngram`
    to skip short passages."""

    max_items_per_ngram: int = Field(10, ge=1)
    """n-grams found in more items than this are benchmark templates and not indexed."""

    mode: Literal["drop", "cut"] = "drop"
    """drop: a contaminated row gets drop_reason `decontaminate:contaminated`. cut: the
    matching spans are removed from `text` and the row kept, unless too little is left."""

    cut_margin_words: int = Field(30, ge=0)
    """cut: words removed on each side of a matching n-gram, so the unmatched rest of an
    item (its choices, a short answer) goes with it. 30 words is about GPT-3's 200 characters
    of web text."""

    max_cut_spans: int = Field(10, ge=1)
    """cut: a row with more separate contaminated spans than this is dropped instead (a
    benchmark dump, not a page quoting an item; GPT-3 dropped documents split into more than
    10 pieces)."""

    min_chars_after_cut: int = Field(200, ge=0)
    """cut: a row with fewer characters than this left is dropped (GPT-3: 200)."""

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str | Path):
            v = [v]
        if isinstance(v, list | tuple):
            v = [str(p) for p in v]
        if not v:
            raise ValueError("give at least one benchmark file or folder")
        return v

    @model_validator(mode="after")
    def _short_below_ngram(self) -> DecontamConfig:
        if self.short_min_words > self.ngram:
            raise ValueError(
                f"short_min_words ({self.short_min_words}) is above ngram ({self.ngram}); "
                f"set it to {self.ngram} to skip short passages"
            )
        return self


_INDEX_CACHE: dict[tuple, NgramIndex] = {}


def load_index(config: DecontamConfig) -> NgramIndex:
    """The index for `config`, built once per process (a Ray actor is a process) and reused
    while the benchmark files are unchanged."""
    hub = [s for s in config.benchmarks if s.startswith("hf:") or is_saved_dataset(s)]
    files = benchmark_files([s for s in config.benchmarks if s not in hub])
    key = (
        tuple(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) + tuple(hub),
        config.ngram,
        config.short_min_words,
        config.max_items_per_ngram,
    )
    if key not in _INDEX_CACHE:
        t0 = time.perf_counter()
        items = load_items([*files, *hub])
        load_s = time.perf_counter() - t0
        index = build_index(items, config.ngram, config.short_min_words, config.max_items_per_ngram)
        index.stats["load_seconds"] = round(load_s, 3)
        del items
        _INDEX_CACHE.clear()  # one index per process is the memory budget
        _INDEX_CACHE[key] = index
        _give_back_scratch()
    return _INDEX_CACHE[key]


def _give_back_scratch() -> None:
    """Return the build's freed scratch to the OS: a worker's RSS peaks well above the index
    while building it, and glibc and Arrow's pool would otherwise keep that scratch for the
    worker's life (benchmarks/decontam_quality.py measures both)."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class DecontaminateStage(Stage):
    """n-gram overlap with benchmark test items; see the module docstring."""

    name = "decontaminate"
    version = 1
    Config = DecontamConfig
    needs = ("text",)
    adds = ("contam_benchmarks", "contam_items", "contam_ngrams")
    uses_model = True

    config: DecontamConfig

    def preflight(self) -> None:
        """Every benchmark source must be there before the run starts: a file, a folder
        holding benchmark files, a `save_to_disk` folder, or a well-formed "hf:" name (the
        hub itself is not asked). "@stage" sources are checked when that stage has run."""
        many = len(self.config.benchmarks) > 1
        for i, source in enumerate(self.config.benchmarks):
            key = f"benchmarks[{i}]" if many else "benchmarks"
            if source.startswith("hf:"):
                parts = source[3:].split(":")
                if len(parts) not in (2, 3) or "" in parts:
                    raise PreflightError(
                        key,
                        f"{source!r} is not hf:NAME[:CONFIG]:SPLIT (e.g. hf:openai/gsm8k:main:test)",
                    )
                continue
            if is_ref(source):
                continue
            require_path(key, source, kind="any")
            path = local_path(source)
            files = path.rglob("*") if path.is_dir() and not is_saved_dataset(path) else None
            if files is not None and not any(f.is_file() and is_benchmark_file(f) for f in files):
                raise PreflightError(
                    key,
                    f"{source!r} holds no .jsonl, .jsonl.gz or .csv file; give a folder laid "
                    "out like shared/data/benchmarks, or the benchmark files themselves",
                )

    def content_fingerprint(self) -> dict[str, str]:
        """A hash of each local benchmark file or folder (`sources_fingerprint`): editing a
        benchmark set recomputes the stage."""
        return sources_fingerprint(self.config.benchmarks)

    def setup(self) -> None:
        self.index = load_index(self.config)

    def process(self, table: pa.Table) -> pa.Table:
        cfg, index = self.config, self.index
        n = len(table)
        norm = normalise(table["text"])
        hits = score_hits(find_matches(norm, index), index, n, cfg.min_ngrams)
        benches: list[str | None] = [None] * n
        items: list[str | None] = [None] * n
        rows, first = np.unique(hits.row, return_index=True)
        bounds = np.append(first, len(hits.row))
        hit_items: dict[int, set[int]] = {}
        for r, lo, hi in zip(rows.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            its = hits.item[lo:hi].tolist()
            hit_items[r] = set(its)
            codes = np.unique(index.item_benchmark[its])
            benches[r] = ",".join(index.benchmarks[c] for c in codes)
            items[r] = json.dumps([index.item_ids[i] for i in its])
        contaminated = np.zeros(n, bool)
        contaminated[rows] = True
        table = set_column(table, "contam_benchmarks", pa.array(benches, pa.string()))
        table = set_column(table, "contam_items", pa.array(items, pa.large_string()))
        table = set_column(
            table, "contam_ngrams", pa.array(hits.ngrams, pa.int32(), mask=~contaminated)
        )
        if cfg.mode == "cut" and len(rows):
            text, contaminated = self._cut(table["text"], hit_items)
            table = set_column(table, "text", text)
        return mark_dropped(table, self.name, [(REASON, pa.array(contaminated))])

    def _cut(
        self, text: pa.ChunkedArray, hit_items: dict[int, set[int]]
    ) -> tuple[pa.Array, np.ndarray]:
        """`text` with the contaminated spans cut out of the rows in `hit_items`, and the
        rows to drop: too many spans, or too little left. A dropped row keeps its whole
        text, so the drop can be audited. One row at a time, contaminated rows only."""
        cfg = self.config
        text = text.combine_chunks().cast(pa.large_string())
        drop = np.zeros(len(text), bool)
        cut = np.zeros(len(text), bool)
        new: list[str] = []
        for r in sorted(hit_items):
            value = text[r].as_py()
            spans = cut_spans(value, hit_items[r], self.index, cfg.cut_margin_words)
            left = remove_spans(value, spans)
            if not spans or len(spans) > cfg.max_cut_spans or len(left) < cfg.min_chars_after_cut:
                drop[r] = True
            else:
                cut[r] = True
                new.append(left)
        if new:
            text = pc.replace_with_mask(text, pa.array(cut), pa.array(new, pa.large_string()))
        return text, drop

    @property
    def index_stats(self) -> dict[str, Any]:
        """Items, n-grams, bytes and seconds of this worker's index (after `setup`)."""
        return dict(self.index.stats)


# --- report ------------------------------------------------------------------------------------


def _report_tables(sources: Iterable[pa.Table | str | Path]) -> Iterator[pa.Table]:
    cols = ["contam_benchmarks", "contam_items", "drop_reason"]
    for src in sources:
        if isinstance(src, pa.Table):
            yield src.select([c for c in cols if c in src.column_names])
            continue
        p = Path(src)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"hit_report: {p} holds no Parquet file")
        for f in files:
            names = pq.read_schema(f).names
            yield pq.read_table(f, columns=[c for c in cols if c in names])


def hit_report(sources: Iterable[pa.Table | str | Path]) -> dict[str, Any]:
    """Benchmark hits of decontaminated rows: tables, Parquet files or a stage's folder.

    Returns {"rows", "contaminated", "dropped" (by this stage), "kept" (contaminated rows
    kept after a cut),
    "benchmarks": {name: {"documents", "items_hit", "top_items"}}}, benchmarks by documents
    hit; `top_items` are the (up to) 10 items found in the most documents."""
    rows = contaminated = dropped = kept = 0
    docs: dict[str, int] = {}
    per_item: dict[str, dict[str, int]] = {}
    for t in _report_tables(sources):
        rows += len(t)
        if "contam_items" not in t.column_names:
            continue
        t = t.filter(pc.is_valid(t["contam_items"]))
        contaminated += len(t)
        if "drop_reason" in t.column_names:
            reason = t["drop_reason"]
            dropped += pc.sum(pc.equal(reason, f"decontaminate:{REASON}")).as_py() or 0
            kept += reason.null_count
        for ids in t["contam_items"].to_pylist():
            seen = set()
            for item in json.loads(ids):
                bench = item.split("/", 1)[0]
                counts = per_item.setdefault(bench, {})
                counts[item] = counts.get(item, 0) + 1
                if bench not in seen:
                    seen.add(bench)
                    docs[bench] = docs.get(bench, 0) + 1
    benchmarks = {
        b: {
            "documents": docs[b],
            "items_hit": len(per_item[b]),
            "top_items": sorted(per_item[b].items(), key=lambda kv: (-kv[1], kv[0]))[:10],
        }
        for b in sorted(docs, key=lambda b: (-docs[b], b))
    }
    return {
        "rows": rows,
        "contaminated": contaminated,
        "dropped": dropped,
        "kept": kept,
        "benchmarks": benchmarks,
    }
