"""Build data/edu/openstax.jsonl.gz: the OpenStax excerpts Primer ships for edu_train.

What: one excerpt per OpenStax module (CC BY 4.0) of `--source` (the modules converted to
JSON Lines: id, text, book, title, source, licence; see README.md): whole paragraphs from a paragraph picked by a hash of the module id,
until the excerpt holds between 1,000 and 4,000 characters (a target drawn from the same
hash), so excerpts are about as long as web documents. Modules are taken in hash order
until `--max-bytes` of gzipped output; excerpts that share a word 13-gram with a benchmark
test item (`--benchmarks`, the `decontaminate` stage's rule) are left out.

Why excerpts: whole modules (median 15,000 characters) would not fit a small checkout, and
their length alone would tell them from web text, which teaches the length feature of
edu_train's combiner something false.

    .venv/bin/python data/edu/make_subset.py    # from the repository root; rewrites the file
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from pathlib import Path

import xxhash

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def excerpt(doc_id: str, text: str) -> tuple[int, str]:
    """(first paragraph index, excerpt) of one module."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    h = xxhash.xxh64_intdigest(doc_id.encode())
    target = 1_000 + h % 3_000
    start = (h >> 16) % max(1, len(paras))
    while start > 0 and sum(len(p) for p in paras[start:]) < target:
        start -= 1  # too near the end: start earlier
    out: list[str] = []
    for p in paras[start:]:
        out.append(p)
        if sum(len(x) + 2 for x in out) >= target:
            break
    return start, "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="the OpenStax modules as JSON Lines (.gz)")
    ap.add_argument("--benchmarks", required=True, help="benchmark test sets' folder")
    ap.add_argument("--out", default=str(REPO / "data/edu/openstax.jsonl.gz"))
    ap.add_argument("--max-bytes", type=int, default=900_000)
    args = ap.parse_args()

    import pyarrow as pa

    from filters.edu.labels import decontaminate_rows

    with gzip.open(args.source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows.sort(key=lambda r: xxhash.xxh64_intdigest(("edu-subset:" + r["id"]).encode()))
    cut = []
    for r in rows:
        start, text = excerpt(r["id"], r["text"])
        if len(text) >= 500:
            cut.append({"id": f"{r['id']}-p{start}", "text": text, "book": r["book"],
                        "title": r["title"], "source": r["source"], "licence": r["licence"]})  # fmt: skip
    hit, report = decontaminate_rows(
        pa.table({"id": [r["id"] for r in cut], "text": pa.array([r["text"] for r in cut], pa.large_string())}),
        [args.benchmarks], 13,
    )  # fmt: skip
    clean = [r for r, h in zip(cut, hit.tolist(), strict=True) if not h]
    buf = io.BytesIO()
    kept = 0
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for r in clean:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
            kept += 1
            if buf.tell() > args.max_bytes:
                break
    tmp = f"{args.out}.tmp-{os.getpid()}"
    Path(tmp).write_bytes(buf.getvalue())
    os.replace(tmp, args.out)
    print(json.dumps({"modules": len(rows), "excerpts": len(cut), "contaminated": report,
                      "written": kept, "bytes": len(buf.getvalue())}))  # fmt: skip


if __name__ == "__main__":
    main()
