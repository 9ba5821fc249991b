"""Each web stage of Primer against its peers, one core each, same input.

What: documents/second per core for reader, extract, langid, quality and MinHash, Primer
against datatrove 0.10.1's equivalent blocks and, for extraction and MinHash, against the
fastest libraries for the job (resiliparse; rensa, datasketch), all measured in the same
run on the same documents, with the ratio, peak memory, and the share of kept documents as
a sanity check. A reference row times a single polars pass that only counts words and
lines, the floor for any pass over the text: every stage's cost is also given in such
passes (reference docs/s over the stage's docs/s). Targets: quality signals >= 2,500 docs/s
per core, MinHash signatures >= 4,000 docs/s per core and faster than rensa.

Peers, on the same documents:
- extract: resiliparse's `extract_plain_text(main_content=True)` called directly on the
  pages, decoded untimed by Primer's `decode_html`.
- MinHash: rensa (Rust) and datasketch (numpy), given the text as Primer's dedup
  normalises it (normalised untimed, as Python strings); they split it into words, join
  word 5-grams as Primer shingles (one shingle of all the words of a shorter document)
  and compute 112 permutations (14 bands x 8 rows, seed 1), each with its own hash
  functions, so their signatures differ from Primer's. rensa: `RMinHash.
  digest_matrix_from_token_sets` over the batch; datasketch: one `MinHash` (permutations
  drawn once), cleared and fed each document's shingles by `update_batch`. Primer's row on
  the same normalised text (`normalised=True`) is the like-for-like one; its main row also
  normalises.

Why: Primer's stages work on pyarrow batches (vectorised, or one compiled loop over a
batch's buffers) where datatrove loops over one Python `Document` at a time; this says by
how much that pays, stage by stage, on this machine.

How: the FineWeb sample (`shared/data/web_text/fineweb_sample`, 500 docs of ~7 KB) is
replicated to `--docs` rows (ids suffixed `/k`) and cached under `.bench/` as raw JSONL and
Parquet (reader rows) and as reader output (`READ_SCHEMA` Parquet, every other row); the
extract rows use the 22 HTML pages of `shared/data/warc/dolma/sample-0000.warc.gz`
replicated to `--html-docs`. Every row runs in its own subprocess pinned to one core
(`sched_setaffinity`, one thread for polars, Arrow, OpenMP and BLAS), reads its input
untimed, warms up on 8 documents (model loads, imports), then times only the stage on
batches of 1,000 rows: Primer calls the stage object as the runner does (`Stage.__call__`
on a pyarrow Table), datatrove gets `Document`s built from the same rows. Docs/s per core
is docs / wall seconds; docs per CPU-second (user + system, children included) is printed
too, since this box is shared and wall time includes time stolen by other work.

datatrove's slow blocks (extract, quality, MinHash) run on the first `--peer-docs` rows;
a multiple of 500 covers the sample evenly, so both systems see the same mix of documents.

rensa and datasketch come with the `bench` extra; a row whose library is missing fails
with the install command and the others run.

Offline adaptations for datatrove (nothing is downloaded at run time):
- its English word tokenizer is spaCy's blank "en" (no model data), and its JSONL reader,
  language filter and dedup package need orjson, fasteners and tokenizers. None of these
  are Primer dependencies; install them beside the venv, not into it:
      .venv/bin/python -m pip install --target .bench/peer_site spacy orjson fasteners tokenizers
  (`.bench/peer_site` is appended to sys.path of the datatrove subprocesses only).
- `LanguageFilter` (ft176 backend) downloads lid.176.bin; here its model object reads
  lid.176.ftz from Primer's asset cache (pipeline/assets.py), the compressed lid.176 that
  Primer also uses.

Run:
    .venv/bin/python benchmarks/web_stages.py                          # 100k docs, ~15 min
    .venv/bin/python benchmarks/web_stages.py --docs 20000 --peer-docs 1000
    .venv/bin/python benchmarks/web_stages.py --stages quality,minhash
Results are also written to `.bench/web_stages.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `pipeline` and `filters` importable
    sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench"
PEER_SITE = BENCH / "peer_site"
SHARED = ROOT.parent / "shared" / "data"
FINEWEB = SHARED / "web_text" / "fineweb_sample"
WARC = SHARED / "warc" / "dolma" / "sample-0000.warc.gz"

BATCH_ROWS = 1000
WARMUP_DOCS = 8
STAGES = ("reader", "extract", "langid", "quality", "minhash", "reference")
TARGETS = {
    "extract/primer-cascade": 300.0,  # pages/s; its F1: benchmarks/extraction_quality.py
    "quality/primer": 2500.0,
    "minhash/primer": 4000.0,
}
FASTER_THAN = {"minhash/primer": "minhash/rensa", "minhash/primer-normalised": "minhash/rensa"}
ONE_THREAD = {
    "POLARS_MAX_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ARROW_NUM_THREADS": "1",
}
PEER_HINT = (
    "datatrove's blocks need spaCy (its English tokenizer), orjson, fasteners and "
    "tokenizers; install them beside the venv: .venv/bin/python -m pip install --target "
    ".bench/peer_site spacy orjson fasteners tokenizers"
)


# --------------------------------------------------------------------------------------------
# What is measured: one row per (stage, system, variant)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str  # "<stage>/<system>[-variant]"; also the name of the child runner
    stage: str
    label: str
    input: str  # which cached input: jsonl | parquet | read | html
    peer: str | None = None  # key of the row its ratio is against
    slow_peer: bool = False  # datatrove row limited to --peer-docs


ROWS = (
    Row("reader/primer-jsonl", "reader", "primer iter_batches (JSONL)", "jsonl", "reader/dt-jsonl"),
    Row("reader/dt-jsonl", "reader", "datatrove JsonlReader", "jsonl"),
    Row(
        "reader/primer-parquet",
        "reader",
        "primer iter_batches (Parquet)",
        "parquet",
        "reader/dt-parquet",
    ),
    Row("reader/dt-parquet", "reader", "datatrove ParquetReader", "parquet"),
    Row(
        "extract/primer", "extract", "primer ExtractStage (trafilatura fast)", "html", "extract/dt"
    ),
    Row(
        "extract/primer-resiliparse",
        "extract",
        "primer ExtractStage (resiliparse)",
        "html",
        "extract/resiliparse",
    ),
    Row(
        "extract/primer-cascade",
        "extract",
        "primer ExtractStage (cascade)",
        "html",
        "extract/primer",
    ),
    Row(
        "extract/primer-precision",
        "extract",
        "primer ExtractStage (trafilatura precision)",
        "html",
        "extract/dt",
    ),
    Row(
        "extract/resiliparse",
        "extract",
        "resiliparse extract_plain_text(main_content)",
        "html",
    ),
    Row(
        "extract/dt",
        "extract",
        "datatrove Trafilatura (precision, no dedup)",
        "html",
        slow_peer=True,
    ),
    Row(
        "extract/dt-dedup",
        "extract",
        "datatrove Trafilatura (FineWeb: + dedup)",
        "html",
        "extract/dt",
        slow_peer=True,
    ),
    Row("langid/primer", "langid", "primer LangIdStage (lid.176.ftz)", "read", "langid/dt"),
    Row("langid/dt", "langid", "datatrove LanguageFilter (ft176, .ftz)", "read"),
    Row("quality/primer", "quality", "primer QualityStage", "read", "quality/dt"),
    Row("quality/dt", "quality", "datatrove 4 filters, every doc", "read", slow_peer=True),
    Row("quality/dt-chained", "quality", "datatrove 4 filters chained", "read", slow_peer=True),
    Row("minhash/primer", "minhash", "primer dedup.minhash", "read", "minhash/rensa"),
    Row(
        "minhash/primer-normalised",
        "minhash",
        "primer dedup.minhash (normalised text)",
        "read",
        "minhash/rensa",
    ),
    Row("minhash/primer-keys", "minhash", "primer dedup.dedup_keys", "read", "minhash/dt"),
    Row("minhash/rensa", "minhash", "rensa RMinHash (normalised text)", "read"),
    Row(
        "minhash/datasketch",
        "minhash",
        "datasketch MinHash (normalised text)",
        "read",
        slow_peer=True,
    ),
    Row("minhash/dt", "minhash", "datatrove MinhashDedupSignature", "read", slow_peer=True),
    Row("reference/polars", "reference", "polars word+line count pass", "read"),
)

STAGE_TITLES = {
    "reader": "reader: raw file -> batches / Documents",
    "extract": "extract: HTML -> main text (dolma WARC pages)",
    "langid": "langid: fastText lid.176, keep en >= 0.65",
    "quality": "quality: Gopher repetition + Gopher quality + C4 + FineWeb",
    "minhash": "minhash: signatures, word 5-grams, 14 x 8",
    "reference": "reference: one polars pass counting words and lines",
}
STAGE_NOTES = {  # what the peers compute, printed under the stage's title
    "extract": [
        "resiliparse: extract_plain_text(main_content=True) on the pages, decoded untimed by",
        "decode_html; Primer's resiliparse backend also decodes, guards and builds its columns",
        "(its vs peer is against this row)",
    ],
    "minhash": [
        "rensa, datasketch: word 5-gram strings of Primer-normalised text (normalised untimed),",
        "112 permutations with their own hash functions (rensa: digest_matrix_from_token_sets",
        "per batch; datasketch: MinHash.update_batch per document, affine32 scheme).",
        "primer (normalised text): the same input, Primer's shingle hash and permutations;",
        "primer dedup.minhash also normalises (both vs peer against rensa)",
    ],
}


# --------------------------------------------------------------------------------------------
# Inputs, cached under .bench/
# --------------------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        write(tmp)
        os.replace(tmp, path)
    return path


def _fineweb_sample() -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(FINEWEB.glob("*.parquet"))
    if not files:
        raise SystemExit(f"no FineWeb sample at {FINEWEB}/*.parquet")
    return pa.concat_tables(
        pq.read_table(f, columns=["id", "text", "url", "timestamp"]) for f in files
    )


def _replicate(table: Any, n: int) -> Any:
    """`table` cycled to n rows; replica k of a row gets id "<id>/k" so ids stay unique."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    idx = np.arange(n) % len(table)
    copy = (np.arange(n) // len(table)).astype(str)
    out = table.take(pa.array(idx))
    ids = pc.binary_join_element_wise(out["id"], pa.array(copy), "/")
    return out.set_column(out.column_names.index("id"), "id", ids)


def _write_jsonl(table: Any, path: Path) -> None:
    rows = table.to_pylist()
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            r["timestamp"] = r["timestamp"].isoformat() if r["timestamp"] else None
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_read_table(source: Path, path: Path) -> None:
    """Primer's reader output for `source`, as the runner would hand it to the first stage."""
    import pyarrow.parquet as pq

    from pipeline.readers import iter_batches
    from pipeline.schema import READ_SCHEMA

    with pq.ParquetWriter(path, READ_SCHEMA, compression="zstd") as w:
        for table in iter_batches(source, BATCH_ROWS):
            w.write_table(table, row_group_size=10 * BATCH_ROWS)


def _write_html(n: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.readers import iter_batches
    from pipeline.schema import READ_SCHEMA

    pages = pa.concat_tables(iter_batches(WARC, BATCH_ROWS))
    pages = pages.filter(pc.is_valid(pages["html"]))
    pq.write_table(_replicate(pages, n).cast(READ_SCHEMA), path, compression="zstd")


def prepare_inputs(docs: int, html_docs: int) -> dict[str, str]:
    """Paths of the cached inputs, built on first use (a few seconds to a minute)."""
    import pyarrow.parquet as pq

    BENCH.mkdir(exist_ok=True)
    raw = None

    def fineweb() -> Any:
        nonlocal raw
        if raw is None:
            raw = _replicate(_fineweb_sample(), docs)
        return raw

    parquet = _atomic(
        BENCH / f"fineweb_{docs}.parquet",
        lambda p: pq.write_table(fineweb(), p, compression="zstd", row_group_size=10_000),
    )
    jsonl = _atomic(BENCH / f"fineweb_{docs}.jsonl", lambda p: _write_jsonl(fineweb(), p))
    read = _atomic(BENCH / f"fineweb_{docs}.read.parquet", lambda p: _write_read_table(parquet, p))
    html = _atomic(
        BENCH / f"dolma_html_{html_docs}.read.parquet", lambda p: _write_html(html_docs, p)
    )
    return {"jsonl": str(jsonl), "parquet": str(parquet), "read": str(read), "html": str(html)}


# --------------------------------------------------------------------------------------------
# The child: one row, pinned to one core
# --------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # datatrove's extractor sandbox
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over exec from
    the parent, so every child would report at least the driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


Work = Callable[[Any], tuple[int, int]]  # item -> (documents, kept documents)


def measure(items: Iterator[Any], work: Work, warmup: Callable[[Any], Any] | None) -> dict:
    """Time `work` over `items` (each prepared untimed), after one untimed warm-up call."""
    first = next(items)
    if warmup is not None:
        work(warmup(first))
    base_rss = _peak_rss_mb()
    docs = kept = 0
    wall = cpu = 0.0
    for item in chain([first], items):
        w0, c0 = time.perf_counter(), _cpu_seconds()
        n, k = work(item)
        wall += time.perf_counter() - w0
        cpu += _cpu_seconds() - c0
        docs, kept = docs + n, kept + k
    return {
        "docs": docs,
        "kept": kept,
        "wall_s": wall,
        "cpu_s": cpu,
        "base_rss_mb": base_rss,
        "peak_rss_mb": _peak_rss_mb(),
    }


def read_tables(path: str, n: int) -> Iterator[Any]:
    """The first n rows of a cached READ_SCHEMA Parquet, in tables of BATCH_ROWS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    left = n
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        if left <= 0:
            return
        yield pa.Table.from_batches([batch]).slice(0, left)
        left -= batch.num_rows


def _kept(table: Any) -> tuple[int, int]:
    return len(table), table["drop_reason"].null_count


def _first_rows(table: Any) -> Any:
    return table.slice(0, WARMUP_DOCS)


def _first_items(items: Any) -> Any:
    return items[:WARMUP_DOCS]


# --- Primer -----------------------------------------------------------------------------------


def _warm_reader(item: tuple[str, int]) -> tuple[str, int]:
    return item[0], WARMUP_DOCS  # the same file, first batch only


def primer_reader(path: str, n: int) -> dict:
    from pipeline.readers import iter_batches

    def work(item: tuple[str, int]) -> tuple[int, int]:
        docs = kept = 0
        for table in iter_batches(item[0], BATCH_ROWS):
            docs, kept = docs + len(table), kept + table["drop_reason"].null_count
            if docs >= item[1]:
                break
        return docs, kept

    return measure(iter([(path, n)]), work, _warm_reader)


def primer_stage(make: Callable[[], Callable[[Any], Any]]) -> Callable[[str, int], dict]:
    def run(path: str, n: int) -> dict:
        stage = make()
        return measure(read_tables(path, n), lambda t: _kept(stage(t)), _first_rows)

    return run


def _extract(**kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        from filters.extract import ExtractStage

        return ExtractStage(**kw)

    return make


def _langid() -> Any:
    from filters.langid import LangIdStage

    return LangIdStage()


def _quality() -> Any:
    from filters.quality.quality import QualityStage

    return QualityStage()


def primer_minhash(path: str, n: int) -> dict:
    from filters.dedup.config import DedupConfig
    from filters.dedup.minhash import minhash

    config = DedupConfig()

    def work(table: Any) -> tuple[int, int]:
        minhash(table["text"], config)
        return len(table), len(table)

    return measure(read_tables(path, n), work, _first_rows)


def primer_dedup_keys(path: str, n: int) -> dict:
    from filters.dedup.config import DedupConfig
    from filters.dedup.keys import dedup_keys

    config = DedupConfig()

    def work(table: Any) -> tuple[int, int]:
        dedup_keys(table, config)
        return len(table), len(table)

    return measure(read_tables(path, n), work, _first_rows)


def _normalised(path: str, n: int, as_strings: bool) -> Iterator[Any]:
    """The text of `read_tables`' rows as Primer's dedup normalises it (done untimed): an
    Arrow array, or Python strings for the peers."""
    from filters.dedup.config import DedupConfig
    from filters.normalise import normalise

    flags = DedupConfig().norm_flags
    for table in read_tables(path, n):
        text = normalise(table["text"], **flags)
        yield text.to_pylist() if as_strings else text


def primer_minhash_normalised(path: str, n: int) -> dict:
    from filters.dedup.config import DedupConfig
    from filters.dedup.minhash import minhash

    config = DedupConfig()

    def work(text: Any) -> tuple[int, int]:
        minhash(text, config, normalised=True)
        return len(text), len(text)

    return measure(_normalised(path, n, False), work, _first_items)


def polars_reference(path: str, n: int) -> dict:
    import polars as pl

    def work(table: Any) -> tuple[int, int]:
        text = pl.from_arrow(table["text"])
        pl.select(
            words=text.str.count_matches(r"\S+"),
            lines=text.str.count_matches("\n", literal=True) + 1,
        )
        return len(table), len(table)

    return measure(read_tables(path, n), work, _first_rows)


# --- extraction and MinHash libraries ------------------------------------------------------


def _pages(path: str, n: int) -> Iterator[list[str]]:
    """The HTML rows of `read_tables` as str, decoded (untimed) by Primer's `decode_html`."""
    from filters.extract import decode_html

    for table in read_tables(path, n):
        yield [decode_html(b) for b in table["html"].to_pylist()]


def resiliparse_extract(path: str, n: int) -> dict:
    from resiliparse.extract.html2text import extract_plain_text

    def work(pages: list[str]) -> tuple[int, int]:
        kept = sum(bool(extract_plain_text(p, main_content=True).strip()) for p in pages)
        return len(pages), kept

    return measure(_pages(path, n), work, _first_items)


def shingles(text: str, ngram: int) -> list[str]:
    """Primer's shingles of normalised text, as strings: its word n-grams, all its words
    when it has fewer, none when it is empty."""
    if not text:
        return []
    words = text.split(" ")
    if len(words) <= ngram:
        return [text]
    return [" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


PEER_INSTALL = "install the bench extra, or: .venv/bin/python -m pip install rensa datasketch"


def rensa_minhash(path: str, n: int) -> dict:
    from filters.dedup.config import DedupConfig

    try:
        from rensa import RMinHash
    except ImportError as e:
        raise SystemExit(f"{e}; {PEER_INSTALL}") from None
    config = DedupConfig()

    def work(texts: list[str]) -> tuple[int, int]:
        sets = [shingles(t, config.ngram) for t in texts]
        RMinHash.digest_matrix_from_token_sets(sets, config.num_perm, config.seed)
        return len(texts), len(texts)

    return measure(_normalised(path, n, True), work, _first_items)


def datasketch_minhash(path: str, n: int) -> dict:
    from filters.dedup.config import DedupConfig

    try:
        from datasketch import MinHash
    except ImportError as e:
        raise SystemExit(f"{e}; {PEER_INSTALL}") from None
    config = DedupConfig()
    sketch = MinHash(num_perm=config.num_perm, seed=config.seed)  # permutations drawn once

    def work(texts: list[str]) -> tuple[int, int]:
        for t in texts:
            sketch.clear()
            sketch.update_batch([s.encode("utf-8") for s in shingles(t, config.ngram)])
            sketch.digest()
        return len(texts), len(texts)

    return measure(_normalised(path, n, True), work, _first_items)


# --- datatrove --------------------------------------------------------------------------------


def _peer_imports() -> None:
    sys.path.append(str(PEER_SITE))  # appended: the venv's numpy, pydantic, ... win
    try:
        import datatrove  # noqa: F401
        import fasteners  # noqa: F401
        import orjson  # noqa: F401
        import spacy  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{e}. {PEER_HINT}") from None


def documents(path: str, n: int, html: bool = False) -> Iterator[list]:
    """The same rows as `read_tables`, as lists of datatrove Documents (built untimed).

    HTML payloads are decoded with Primer's `decode_html`, as datatrove's WarcReader would
    hand decoded text to its extractor."""
    from datatrove.data import Document

    from filters.extract import decode_html

    for table in read_tables(path, n):
        texts = table["html"].to_pylist() if html else table["text"].to_pylist()
        if html:
            texts = [decode_html(b) for b in texts]
        yield [Document(text=t, id=i) for t, i in zip(texts, table["id"].to_pylist(), strict=True)]


def _fresh(docs: list) -> list:
    """Copies of the first documents: C4QualityFilter rewrites `doc.text` in place."""
    from datatrove.data import Document

    return [Document(text=d.text, id=d.id) for d in docs[:WARMUP_DOCS]]


def _drain(it: Iterable) -> int:
    return sum(1 for _ in it)


def dt_reader(kind: str) -> Callable[[str, int], dict]:
    def run(path: str, n: int) -> dict:
        _peer_imports()
        from datatrove.pipeline.readers import JsonlReader, ParquetReader

        reader_cls = JsonlReader if kind == "jsonl" else ParquetReader
        p = Path(path)

        def work(item: tuple[str, int]) -> tuple[int, int]:
            reader = reader_cls(str(p.parent), glob_pattern=p.name, limit=item[1])
            docs = _drain(reader.run())
            return docs, docs

        return measure(iter([(path, n)]), work, _warm_reader)

    return run


def dt_extract(deduplicate: bool) -> Callable[[str, int], dict]:
    """datatrove's Trafilatura block with FineWeb's settings (favour_precision, 1 s timeout
    per page in a sandbox process). `deduplicate` is its default and FineWeb's, but on
    replicated pages trafilatura's cross-document cache empties later copies of a page
    (about a third dropped here), which real crawls do not do: the peer row turns it off."""

    def run(path: str, n: int) -> dict:
        _peer_imports()
        import trafilatura  # noqa: F401  imported once here, so forked sandboxes inherit it
        from datatrove.pipeline.extractors import Trafilatura

        block = Trafilatura(deduplicate=deduplicate)
        docs = [d for batch in documents(path, n, html=True) for d in batch]

        def work(items: list) -> tuple[int, int]:
            # One run() over everything: one sandbox process, as in a datatrove task.
            return len(items), _drain(block.run(iter(items)))

        result = measure(iter([docs]), work, _fresh)
        counters = block.stats.stats  # includes the warm-up's documents
        notes = {k: counters[k].total for k in ("timeout", "clean_error") if k in counters}
        result["notes"] = notes
        return result

    return run


def _local_ft176(languages: list[str]) -> Any:
    """datatrove's FT176LID reading lid.176.ftz from Primer's asset cache instead of downloading
    lid.176.bin: the only change is where the model file comes from."""
    from datatrove.utils.lid import FT176LID

    from filters.langid import default_model_path

    class LocalFT176LID(FT176LID):
        @property
        def model(self) -> Any:
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(str(default_model_path()))
            return self._model

    return LocalFT176LID(languages)


def dt_langid(path: str, n: int) -> dict:
    _peer_imports()
    from datatrove.pipeline.filters import LanguageFilter

    block = LanguageFilter(languages=["en"])  # FineWeb: en, threshold 0.65
    block.model = _local_ft176(["en"])
    return measure(
        documents(path, n), lambda docs: (len(docs), _drain(block.run(iter(docs)))), _fresh
    )


def _quality_blocks() -> list:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
        FineWebQualityFilter(),
    ]


def dt_quality_every_doc(path: str, n: int) -> dict:
    """Each of the four filters judges every document (the work Primer does: all signals
    on all rows), each on its own copy since C4QualityFilter rewrites the text."""
    _peer_imports()
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import get_filter_result

    blocks = _quality_blocks()

    def work(docs: list) -> tuple[int, int]:
        kept = 0
        for d in docs:
            verdicts = [
                get_filter_result(b.filter(Document(text=d.text, id=d.id)))[0] for b in blocks
            ]
            kept += all(verdicts)
        return len(docs), kept

    return measure(documents(path, n), work, _fresh)


def dt_quality_chained(path: str, n: int) -> dict:
    """The four filters chained through run() as in FineWeb: a dropped document is not
    seen by the filters after the one that dropped it."""
    _peer_imports()
    blocks = _quality_blocks()

    def work(docs: list) -> tuple[int, int]:
        stream: Iterable = iter(docs)
        for b in blocks:
            stream = b.run(stream)
        return len(docs), _drain(stream)

    return measure(documents(path, n), work, _fresh)


def dt_minhash(path: str, n: int) -> dict:
    """MinhashDedupSignature's per-document work (get_shingles + get_signature, what its
    run() does before packing the buckets to disk); nothing is written."""
    _peer_imports()
    import tempfile

    import xxhash
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    block = MinhashDedupSignature(output_folder=tempfile.mkdtemp(prefix="dt-minhash-"))
    # datatrove 0.10.1 hands str to xxhash, which xxhash >= 4 refuses; xxhash 3 (what
    # datatrove's `processing` extra pins) encoded it as UTF-8, which this does explicitly.
    block._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode("utf-8"))

    def work(docs: list) -> tuple[int, int]:
        for d in docs:
            shingles = block.get_shingles(d.text)
            if shingles.size:
                block.get_signature(shingles)
        return len(docs), len(docs)

    return measure(documents(path, n), work, _fresh)


RUNNERS: dict[str, Callable[[str, int], dict]] = {
    "reader/primer-jsonl": primer_reader,
    "reader/dt-jsonl": dt_reader("jsonl"),
    "reader/primer-parquet": primer_reader,
    "reader/dt-parquet": dt_reader("parquet"),
    "extract/primer": primer_stage(_extract()),
    "extract/primer-resiliparse": primer_stage(_extract(backend="resiliparse")),
    "extract/primer-cascade": primer_stage(_extract(backend="cascade")),
    "extract/primer-precision": primer_stage(_extract(trafilatura_mode="precision")),
    "extract/resiliparse": resiliparse_extract,
    "extract/dt": dt_extract(deduplicate=False),
    "extract/dt-dedup": dt_extract(deduplicate=True),
    "langid/primer": primer_stage(_langid),
    "langid/dt": dt_langid,
    "quality/primer": primer_stage(_quality),
    "quality/dt": dt_quality_every_doc,
    "quality/dt-chained": dt_quality_chained,
    "minhash/primer": primer_minhash,
    "minhash/primer-normalised": primer_minhash_normalised,
    "minhash/primer-keys": primer_dedup_keys,
    "minhash/rensa": rensa_minhash,
    "minhash/datasketch": datasketch_minhash,
    "minhash/dt": dt_minhash,
    "reference/polars": polars_reference,
}


def child_main(spec: dict) -> None:
    os.sched_setaffinity(0, {spec["core"]})
    os.environ.update(ONE_THREAD)  # before polars is imported (the parent sets them too)
    import pyarrow as pa

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    result = RUNNERS[spec["key"]](spec["path"], spec["docs"])
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------
# The parent: run the rows, print the tables
# --------------------------------------------------------------------------------------------


def run_row(row: Row, path: str, docs: int, core: int, timeout: float) -> dict:
    spec = {"key": row.key, "path": path, "docs": docs, "core": core}
    env = {**os.environ, **ONE_THREAD}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def rates(result: dict) -> tuple[float, float]:
    docs = result["docs"]
    return docs / max(result["wall_s"], 1e-9), docs / max(result["cpu_s"], 1e-9)


def print_stage(stage: str, rows: list[Row], results: dict[str, dict]) -> None:
    ref = results.get("reference/polars", {})
    ref_rates = rates(ref) if "docs" in ref and stage != "reference" else None
    print(f"\n== {STAGE_TITLES[stage]}")
    for line in STAGE_NOTES.get(stage, []):
        print(f"  {line}")
    header = (
        f"  {'system':<44} {'docs':>7} {'docs/s/core':>12} {'docs/CPU-s':>11} "
        f"{'peak RSS MB':>12} {'kept':>6} {'vs peer':>8} {'(CPU)':>7} {'x ref':>7} {'(CPU)':>7}"
    )
    print(header)
    for row in rows:
        r = results[row.key]
        if "error" in r:
            print(f"  {row.label:<44} FAILED: {r['error']}")
            continue
        wall_rate, cpu_rate = rates(r)
        peer = results.get(row.peer or "", {})
        ratio = cpu_ratio = ""
        if "docs" in peer:
            ratio = f"{wall_rate / rates(peer)[0]:.1f}x"
            cpu_ratio = f"{cpu_rate / rates(peer)[1]:.1f}x"
        # Cost in single polars passes: how many word+line counts one document's stage costs.
        vs_ref = cpu_vs_ref = ""
        if ref_rates:
            vs_ref = f"{ref_rates[0] / wall_rate:,.1f}"
            cpu_vs_ref = f"{ref_rates[1] / cpu_rate:,.1f}"
        kept = f"{100 * r['kept'] / max(r['docs'], 1):.0f}%"
        print(
            f"  {row.label:<44} {r['docs']:>7} {wall_rate:>12,.1f} {cpu_rate:>11,.1f} "
            f"{r['peak_rss_mb']:>12,.0f} {kept:>6} {ratio:>8} {cpu_ratio:>7} {vs_ref:>7} "
            f"{cpu_vs_ref:>7}"
        )
        if r.get("notes"):
            print(f"    {row.label}: " + ", ".join(f"{k} {v}" for k, v in r["notes"].items()))


def print_targets(results: dict[str, dict]) -> dict[str, str]:
    verdicts = {}
    print("\n== targets (docs/s per core, wall, pinned to one core)")
    for key, target in TARGETS.items():
        r = results.get(key)
        if not r or "error" in r:
            continue
        wall_rate, cpu_rate = rates(r)
        verdict = "PASS" if wall_rate >= target else "FAIL"
        verdicts[key] = verdict
        print(
            f"  {key:<16} >= {target:>6,.0f}: {wall_rate:>8,.1f} docs/s "
            f"({cpu_rate:,.1f} per CPU-s)  {verdict}"
        )
    for key, peer_key in FASTER_THAN.items():
        r, peer = results.get(key, {}), results.get(peer_key, {})
        if "docs" not in r or "docs" not in peer:
            continue
        (wall_rate, cpu_rate), (peer_wall, peer_cpu) = rates(r), rates(peer)
        verdict = "PASS" if wall_rate > peer_wall and cpu_rate > peer_cpu else "FAIL"
        verdicts[f"{key} > {peer_key}"] = verdict
        print(
            f"  {key} faster than {peer_key}: {wall_rate / peer_wall:.1f}x wall, "
            f"{cpu_rate / peer_cpu:.1f}x per CPU-s  {verdict}"
        )
    return verdicts


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    names = ("datatrove", "polars", "pyarrow", "numpy", "numba", "trafilatura", "resiliparse")
    for name in (*names, "rensa", "datasketch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000, help="FineWeb rows for Primer")
    ap.add_argument("--peer-docs", type=int, default=2_000, help="rows for datatrove's slow blocks")
    ap.add_argument("--html-docs", type=int, default=2_000, help="HTML pages for extract")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--core", type=int, default=0, help="the core every child is pinned to")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; choose from {STAGES}")
    peer_docs = min(args.peer_docs, args.docs)
    if peer_docs % 500:
        print(
            f"note: --peer-docs {peer_docs} is not a multiple of 500; the sample is covered unevenly"
        )
    t0 = time.time()
    load0 = os.getloadavg()
    print(
        f"web_stages: {args.docs} docs (datatrove's slow blocks: {peer_docs}), "
        f"{args.html_docs} HTML pages, one core (#{args.core}) per row; {_cpu_model()}",
        flush=True,
    )
    paths = prepare_inputs(args.docs, args.html_docs)
    rows = [r for r in ROWS if r.stage in stages]
    results: dict[str, dict] = {}
    for row in rows:
        n = args.html_docs if row.input == "html" else args.docs
        if row.slow_peer:
            n = min(n, peer_docs)
        results[row.key] = run_row(row, paths[row.input], n, args.core, args.timeout)
        r = results[row.key]
        status = r.get("error") or f"{r['docs']} docs, {rates(r)[0]:,.1f} docs/s"
        print(f"  {row.key:<28} {status}", flush=True)

    print(f"\nweb_stages results ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
    print(
        "  docs/s/core = docs / wall s pinned to one core; docs/CPU-s = docs / (user + sys) s;"
        "\n  vs peer = docs/s/core over the peer row's (datatrove's block unless the stage says"
        "\n  otherwise), (CPU) the same per CPU-s; x ref = the stage's cost in polars word+line"
        "\n  passes (reference docs/s over its docs/s), wall and (CPU)"
    )
    for stage in stages:
        print_stage(stage, [r for r in rows if r.stage == stage], results)
    verdicts = print_targets(results)
    load1 = os.getloadavg()
    print(f"\nload average before/after: {load0[0]:.2f} / {load1[0]:.2f}; {time.time() - t0:.0f} s")

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {**vars(args), "peer_docs": peer_docs},
        "cpu": _cpu_model(),
        "load_avg_before_after": [load0[0], load1[0]],
        "versions": _versions(),
        "rows": [{**asdict(r), **results[r.key]} for r in rows],
        "targets": verdicts,
    }
    out = BENCH / "web_stages.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
