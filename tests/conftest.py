"""Shared fixtures: one Ray session for the whole test run, and the shared real data."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterator
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

    from pipeline.executor import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_run(ray_session, tmp_path_factory) -> tuple[Path, dict]:
    """The quickstart recipe as shipped, on the real local Ray, with the teacher's work cut
    down for the test's time budget: run ONCE per session (about 3 minutes) and shared by the
    end-to-end test, the report tests and the notebook tests. Returns (run folder, summary);
    read it, never write into it."""
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    small = [
        "stages.edu_annotate.sample_size=6",
        "stages.seeds.per_style={textbook: 1, worked_examples: 1, story: 1}",
        "stages.generate.max_tokens=48",
        "stages.validate.min_words=10",
        "stages.train_smoke.steps=12",
    ]
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    loaded = load_recipe(REPO / "configs" / "quickstart.yaml", overrides=small)
    return run_dir, run_recipe(loaded, output=run_dir)


def require_data(path: Path, what: str = "shared real data") -> Path:
    """`path`, or a skip when it is absent; in CI (CI=true) an absent file fails the test,
    so a checkout that lost its data cannot pass by skipping."""
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: missing test data is a failure)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_data(SHARED)


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


@contextlib.contextmanager
def moto_s3(mp: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, an ephemeral port; the
    standard AWS variables point at it through `mp`. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
