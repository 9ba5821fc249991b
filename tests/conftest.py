"""Shared fixtures: one Ray session for the whole test run, and the shared real data."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, started once (ray.init takes ~4 s) and shared by all tests."""
    import ray

    from pipeline.run import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared real data not found at {SHARED}")
    return SHARED


def fineweb_docs(n: int | None = None) -> list[dict]:
    """Real FineWeb documents from the bundled sample (id, text, url, timestamp)."""
    docs: list[dict] = []
    for f in sorted(SAMPLE.glob("fineweb-*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs.extend(json.loads(line) for line in fh)
    return docs[:n] if n else docs


def write_jsonl_parts(folder: Path, docs: list[dict], n_parts: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_parts):
        p = folder / f"docs-{i:03d}.jsonl.gz"
        with gzip.open(p, "wt", encoding="utf-8") as fh:
            for d in docs[i::n_parts]:
                fh.write(json.dumps(d) + "\n")
        paths.append(p)
    return paths
