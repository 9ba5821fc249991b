"""Rebuild the quickstart sample in data/sample/ from the real third-party data in ../shared/data.

The sample is small real web data with known provenance (see data/sample/README.md):
500 FineWeb documents (as 5 JSONL.gz files), 20 CCNet documents, 22 full-HTML WARC captures
and one Common Crawl page as a matched WARC + WET pair (so its two copies are a real
near-duplicate for the dedup stage).

    python scripts/build_sample.py [--shared ../shared/data] [--out data/sample]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def _gzip_text(path: Path) -> io.TextIOWrapper:
    """A gzip text writer with a zero timestamp, so a rebuild is byte-identical."""
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=9, mtime=0), encoding="utf-8")


def write_reposts(source: Path, target: Path, n: int = 10) -> None:
    """Syndicated copies of real documents, the commonest duplicates in a crawl.

    The real sample is already deduplicated upstream, so without these the dedup stage has
    nothing to show. The first n/2 are exact reposts (only whitespace differs); the
    rest carry a site's boilerplate line, which makes them near-duplicates.
    """
    with gzip.open(source, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    with _gzip_text(target) as w:
        for i, d in enumerate(docs):
            text = d["text"]
            if i < n // 2:
                text = "  " + text.replace(". ", ".  ").replace("\n", "\n\n")
            else:
                text = (
                    text
                    + "\n\nThis article was republished from the original source with permission."
                )
            row = {
                "id": f"repost-{i}",
                "text": text,
                "url": f"https://mirror.example.org/{i}",
                "timestamp": d["timestamp"],
            }
            w.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "sample")
    args = ap.parse_args()
    src, out = args.shared, args.out
    out.mkdir(parents=True, exist_ok=True)

    # FineWeb: keep only the web fields; the upstream `score` is a *legal* rating, not edu.
    for i, f in enumerate(sorted((src / "web_text/fineweb_sample").glob("batch_*.parquet")), 1):
        table = pq.read_table(f, columns=["id", "text", "url", "timestamp"])
        with _gzip_text(out / f"fineweb-{i}.jsonl.gz") as w:
            for row in table.to_pylist():
                row["timestamp"] = row["timestamp"].isoformat() + "Z" if row["timestamp"] else None
                w.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_reposts(out / "fineweb-1.jsonl.gz", out / "reposts.jsonl.gz")
    for f in sorted((src / "web_text/dolma_ccnet").glob("*.jsonl.gz")):
        shutil.copyfile(f, out / f"ccnet-{f.name}")
    shutil.copyfile(src / "warc/dolma/sample-0000.warc.gz", out / "dolma-sample-0000.warc.gz")
    shutil.copyfile(src / "warc/whirlwind-python/whirlwind.warc.gz", out / "whirlwind.warc.gz")
    shutil.copyfile(
        src / "warc/whirlwind-python/whirlwind.warc.wet.gz", out / "whirlwind.warc.wet.gz"
    )
    shutil.copyfile(src / "warc/dolma/LICENSE", out / "LICENSE.apache-2.0")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
