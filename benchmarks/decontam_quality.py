"""The `decontaminate` stage against lm-evaluation-harness's Janitor: recall, false
positives, index build and throughput.

What: on the real benchmark test sets of shared/data/benchmarks, for Primer's
`DecontaminateStage` (filters/decontam/decontaminate.py) and the peer,
lm-evaluation-harness 0.4.13's `Janitor` (lm_eval/decontamination/janitor.py: the 13-gram decontamination of GPT-3's
recipe that the harness ships, in its pure-Python mode; its C++ `janitor_util` is not on
PyPI):
- recall: 200 real items (60 GSM8K, 70 MMLU, 45 ARC, 25 HumanEval; seed 7) planted into
  real FineWeb documents verbatim, reformatted and lightly rephrased, exactly as
  tests/filters/test_decontam.py plants them (benchmarks/decontam_planting.py). Primer
  counts a hit only when the planted item is among the items it names; the Janitor does not
  name items, so it counts any hit.
- false positives: the FineWeb and CCNet documents of data/sample, plus the trafilatura
  evaluation pages and the dolma WARC pages of shared/data, extracted with Primer's
  `extract` stage; every hit is printed, to be read by hand.
- index: seconds (wall and CPU) and memory to load the items and build the index, in a
  fresh child process each: Arrow's pool peak, and the growth of the peak RSS and of the
  RSS after the build (what a Ray actor keeps), over the RSS before loading the items.
- throughput: docs/s and docs/CPU-s on the sample's web documents replicated
  `--replicate` times; Primer calls the stage on 1,000-row tables (as the runner does), the
  Janitor `clean_python(text)` per document. The ratio is Primer / Janitor.

Both index the same text per item: Primer's items as `load_items` reads them, the Janitor
each item's full text and its alternative renderings (`register_contaminant_python`).

Run (the peer from its wheel, without its dependencies, in a folder of its own; only the
module file is loaded, not the package, whose __init__ imports the evaluator):
    .venv/bin/python -m pip install --target .bench/lm_eval_site --no-deps lm-eval==0.4.13
    .venv/bin/python -m benchmarks.decontam_quality              # about a minute
Results are also written to `.bench/decontam_quality.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import io
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.decontam_planting import FORMS, planted_docs  # noqa: E402
from filters.decontam.benchmarks import Item, load_items  # noqa: E402
from filters.decontam.decontaminate import (  # noqa: E402
    DecontamConfig,
    DecontaminateStage,
    load_index,
)

SHARED = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample"
BENCH = SHARED / "benchmarks"
PEER = REPO / ".bench" / "lm_eval_site" / "lm_eval" / "decontamination" / "janitor.py"


def load_janitor() -> Any:
    if not PEER.is_file():
        sys.exit(
            f"no {PEER}; install the peer first:\n  .venv/bin/python -m pip install "
            "--target .bench/lm_eval_site --no-deps lm-eval==0.4.13"
        )
    spec = importlib.util.spec_from_file_location("lm_eval_janitor", PEER)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        spec.loader.exec_module(module)  # warns that its C++ module is missing
    return module


def peer_texts(item: Item) -> list[str]:
    return ["\n".join((*item.main, *item.extra)), *item.alt]


def build_peer(items: list[Item]) -> Any:
    janitor = load_janitor()
    jan = janitor.Janitor(ngram_n=13)
    for it in items:
        for text in peer_texts(it):
            jan.register_contaminant_python(text)
    jan.module = janitor
    return jan


def peer_hit(jan: Any, text: str) -> bool:
    """The Janitor's own test for a contaminated n-gram (the one `clean_python` applies)."""
    return any(
        jan.normalize_string(ngram) in jan.dirt_ngrams
        for ngram, _ in jan.module.word_ngrams_indices(text, jan.ngram_n)
    )


def fineweb_docs() -> list[dict]:
    """The FineWeb documents of data/sample (id, text, url, timestamp)."""
    docs: list[dict] = []
    for f in sorted(SAMPLE.glob("fineweb-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs.extend(json.loads(line) for line in fh)
    return docs


# --- index build, each in a fresh process ---------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e6


def _build_child(which: str, out: Any) -> None:
    import pyarrow as pa

    from filters.normalise import normalise

    normalise(pa.array(["warm up"]))  # imports and Arrow's pool, not the index
    rss0 = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if which == "primer":  # as a worker's setup() does it
        index = load_index(DecontamConfig(benchmarks=[str(BENCH)]))
        size = {"items": len(index.item_ids), "ngrams": len(index.keys)}
        size["index_mb"] = round(index.nbytes / 1e6, 1)
    else:
        items = load_items([BENCH])
        jan = build_peer(items)
        size = {"items": len(items), "ngrams": len(jan.dirt_ngrams)}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    out.put(
        {
            "which": which,
            **size,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 1e6, 1),
            "peak_rss_growth_mb": round(peak_mb - rss0, 1),
            "rss_growth_mb": round(_rss_mb() - rss0, 1),
        }
    )


def measure_build(which: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_build_child, args=(which, q))
    p.start()
    result = q.get()
    p.join()
    return result


# --- recall and false positives -----------------------------------------------------------------


def clean_web_docs() -> tuple[list[str], list[str]]:
    """(texts, names) of the web documents used for the false-positive rate."""
    texts = [d["text"] for d in fineweb_docs()]
    names = [f"fineweb:{d['id']}" for d in fineweb_docs()]
    for f in sorted(SAMPLE.glob("ccnet-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for k, line in enumerate(fh):
                texts.append(json.loads(line)["text"])
                names.append(f"ccnet:{f.name}:{k}")
    from filters.extract import ExtractStage
    from pipeline.readers import iter_batches

    extract = ExtractStage()
    pages = sorted((SHARED / "html_extraction" / "trafilatura-eval-en" / "html").glob("*"))
    for path in [*pages, SHARED / "warc" / "dolma" / "sample-0000.warc.gz"]:
        for table in iter_batches(str(path), batch_rows=1000):
            out = extract(table)
            out = out.filter(pc.and_(pc.is_null(out["drop_reason"]), pc.is_valid(out["text"])))
            texts += out["text"].to_pylist()
            names += [f"{path.name}:{u}" for u in out["url"].to_pylist()]
    return texts, names


def run_primer(stage: DecontaminateStage, texts: list[str]) -> pa.Table:
    parts = []
    for lo in range(0, len(texts), 1000):
        chunk = texts[lo : lo + 1000]
        ids = [str(i) for i in range(lo, lo + len(chunk))]
        parts.append(stage(pa.table({"id": ids, "text": pa.array(chunk, pa.large_string())})))
    return pa.concat_tables(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicate", type=int, default=4, help="copies of the sample's web docs")
    args = ap.parse_args()
    load_janitor()  # fail early when the peer is missing
    report: dict[str, Any] = {}

    report["build"] = [measure_build("primer"), measure_build("janitor")]
    for b in report["build"]:
        print("build", json.dumps(b))

    items = {it.id: it for it in load_items([BENCH])}
    stage = DecontaminateStage(benchmarks=str(BENCH))
    stage.setup()
    jan = build_peer(list(items.values()))

    texts, meta = planted_docs(items, [d["text"] for d in fineweb_docs()])
    hit_items = run_primer(stage, texts)["contam_items"].to_pylist()
    found = [json.loads(x) if x else [] for x in hit_items]
    peer = [peer_hit(jan, t) for t in texts]
    recall: dict[str, dict[str, float]] = {}
    for form in FORMS:
        rows = [k for k, (f, _) in enumerate(meta) if f == form]
        recall[form] = {
            "primer_item": round(float(np.mean([meta[k][1] in found[k] for k in rows])), 3),
            "primer_doc": round(float(np.mean([bool(found[k]) for k in rows])), 3),
            "janitor_doc": round(float(np.mean([peer[k] for k in rows])), 3),
        }
        for bench in ("gsm8k", "mmlu", "arc", "humaneval"):
            sel = [k for k in rows if meta[k][1].startswith(bench)]
            recall[form][f"primer_{bench}"] = round(
                float(np.mean([meta[k][1] in found[k] for k in sel])), 3
            )
            recall[form][f"janitor_{bench}"] = round(float(np.mean([peer[k] for k in sel])), 3)
        print(f"recall {form:12s}", json.dumps(recall[form]))
    report["recall"] = recall

    web, names = clean_web_docs()
    out = run_primer(stage, web)
    hits = out.filter(pc.is_valid(out["contam_items"]))
    peer_fp = [k for k, t in enumerate(web) if peer_hit(jan, t)]
    report["false_positives"] = {
        "docs": len(web),
        "primer": len(hits),
        "janitor": len(peer_fp),
        "primer_hits": [
            {"doc": names[int(r["id"])], "items": r["contam_items"], "ngrams": r["contam_ngrams"]}
            for r in hits.to_pylist()
        ],
        "janitor_hits": [names[k] for k in peer_fp],
    }
    print("false positives", json.dumps(report["false_positives"]))

    docs = [d["text"] for d in fineweb_docs()]
    for f in sorted(SAMPLE.glob("ccnet-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line)["text"] for line in fh]
    docs = docs * args.replicate
    speed = {}
    t0, c0 = time.perf_counter(), time.process_time()
    run_primer(stage, docs)
    speed["primer"] = (time.perf_counter() - t0, time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in docs:
        jan.clean_python(t)
    speed["janitor"] = (time.perf_counter() - t0, time.process_time() - c0)
    report["throughput"] = {
        k: {
            "docs": len(docs),
            "docs_per_s": round(len(docs) / w),
            "docs_per_cpu_s": round(len(docs) / c),
        }
        for k, (w, c) in speed.items()
    }
    ratio = speed["janitor"][1] / speed["primer"][1]
    report["throughput"]["ratio_cpu"] = round(ratio, 1)
    print("throughput", json.dumps(report["throughput"]), f"-> {ratio:.1f}x the Janitor per CPU-s")

    out_path = REPO / ".bench" / "decontam_quality.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
