"""Inputs on object storage: a real S3-compatible server (moto's server mode) on 127.0.0.1,
read through the same readers and runner as local files, with the same rows."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.io import expand_inputs
from pipeline.parts import ReadOptions, plan_parts
from pipeline.readers import iter_batches
from pipeline.stage_runner import output_files
from tests.conftest import fineweb_docs, moto_s3

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
BUCKET = "primer-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (an ephemeral port) holding a copy of a local folder
    of inputs; the standard AWS variables point at it. Yields (local folder, s3 prefix)."""
    mp = pytest.MonkeyPatch()
    try:
        with moto_s3(mp):
            local = tmp_path_factory.mktemp("inputs")
            for name in (
                "fineweb-1.jsonl.gz",
                "dolma-sample-0000.warc.gz",
                "whirlwind.warc.wet.gz",
            ):
                shutil.copy(SAMPLE / name, local / name)
            docs = fineweb_docs(120)
            table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})
            pq.write_table(table, local / "docs.parquet", row_group_size=25)
            with open(local / "plain.jsonl", "w") as f:
                for d in docs[:80]:
                    f.write(json.dumps(d) + "\n")
            (local / "LICENSE").write_text("a licence, not documents\n")

            fs, _ = storage.filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            fs.put(f"{local}/", f"{BUCKET}/inputs/", recursive=True)
            yield local, f"s3://{BUCKET}/inputs"
    finally:
        mp.undo()


def _rows(t: pa.Table) -> list[tuple]:
    cols = ("id", "text", "html", "url", "drop_reason")
    return sorted(zip(*(t[c].to_pylist() for c in cols), strict=True), key=repr)


def _read(path: str, **kwargs) -> pa.Table:
    return pa.concat_tables(list(iter_batches(path, batch_rows=50, **kwargs)))


def test_folders_and_globs_on_a_bucket_expand_to_uris(s3):
    local, prefix = s3
    files = expand_inputs([prefix])
    assert files == sorted(f"{prefix}/{p.name}" for p in local.iterdir())
    assert expand_inputs([f"{prefix}/*.warc*.gz"]) == [
        f"{prefix}/dolma-sample-0000.warc.gz",
        f"{prefix}/whirlwind.warc.wet.gz",
    ]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([f"{prefix}/nothing-*.jsonl"])


@pytest.mark.parametrize(
    "name",
    [
        "fineweb-1.jsonl.gz",
        "dolma-sample-0000.warc.gz",
        "whirlwind.warc.wet.gz",
        "docs.parquet",
        "plain.jsonl",
    ],
)
def test_every_reader_gives_the_same_rows_from_the_bucket(s3, name):
    local, prefix = s3
    assert _rows(_read(f"{prefix}/{name}")) == _rows(_read(str(local / name)))


def test_sub_parts_of_bucket_files_read_every_record_once(s3):
    local, prefix = s3
    read = ReadOptions(max_rows_per_part=50, max_bytes_per_part=40_000)
    remote = plan_parts(expand_inputs([prefix]), read=read)
    split = {p.source.rsplit("/", 1)[1]: [] for p in remote}
    for p in remote:
        split[p.source.rsplit("/", 1)[1]].append(p)
    assert len(split["dolma-sample-0000.warc.gz"]) > 3 and len(split["docs.parquet"]) == 3
    assert len(split["plain.jsonl"]) > 1
    for name in ("dolma-sample-0000.warc.gz", "docs.parquet", "plain.jsonl"):
        tables = [
            t
            for p in split[name]
            for t in iter_batches(
                p.source, batch_rows=50, row_groups=p.row_groups, byte_range=p.byte_range
            )
        ]
        whole = _read(str(local / name))
        got = pa.concat_tables(tables)
        assert sorted(got["text"].drop_null().to_pylist()) == sorted(
            whole["text"].drop_null().to_pylist()
        )
        assert got.num_rows == whole.num_rows


def test_a_run_reads_its_inputs_from_the_bucket_like_local_files(s3, tmp_path):
    local, prefix = s3

    def run(inputs: str, out: Path) -> pa.Table:
        recipe = tmp_path / f"{out.name}.yaml"
        recipe.write_text(
            "name: s3\nexecutor: local\nstages:\n"
            f"  quality: {{input: ['{inputs}']}}\n"
            "  dedup: {}\n"
        )
        assert main(["run", str(recipe), "--output", str(out)]) == 0
        t = pa.concat_tables(pq.read_table(f) for f in output_files(out / "dedup"))
        return t.filter(pc.is_null(t["drop_reason"]))

    remote = run(f"{prefix}/*.jsonl*", tmp_path / "remote")
    here = run(f"{local}/*.jsonl*", tmp_path / "local")
    assert remote.num_rows == here.num_rows > 50

    def docs(t: pa.Table) -> list[tuple]:
        return sorted(zip(t["id"].to_pylist(), t["text"].to_pylist(), strict=True))

    assert docs(remote) == docs(here)
    # lineage names the object, as a URI
    assert set(remote["source_path"].to_pylist()) == {f"{prefix}/fineweb-1.jsonl.gz"}
    manifest = json.loads((tmp_path / "remote/quality/_manifest.json").read_text())
    assert "testing" not in json.dumps(manifest)  # the key is never written


def test_a_missing_filesystem_package_names_the_extra(monkeypatch):
    import fsspec

    def missing(protocol, **kwargs):
        raise ImportError(f"no {protocol}")

    storage._filesystem.cache_clear()
    monkeypatch.setattr(fsspec, "filesystem", missing)
    with pytest.raises(ImportError, match=r"pip install gcsfs"):
        storage.filesystem("gs://bucket/x.jsonl")
    storage._filesystem.cache_clear()


def test_a_crawl_paths_listing_names_its_files_relative_to_the_bucket(s3, tmp_path):
    """Common Crawl publishes warc.paths.gz: one path per line, relative to the bucket."""
    import gzip

    local, prefix = s3
    fs, _ = storage.filesystem(prefix)
    names = [
        "inputs/dolma-sample-0000.warc.gz",
        "inputs/whirlwind.warc.wet.gz",
        "inputs/plain.jsonl",
    ]
    fs.pipe(f"{BUCKET}/crawl/warc.paths.gz", gzip.compress("\n".join(names).encode() + b"\n"))
    listing = f"s3://{BUCKET}/crawl/warc.paths.gz"
    assert expand_inputs([listing]) == sorted(f"s3://{BUCKET}/{n}" for n in names)
    assert expand_inputs([listing + "#1-1"]) == [f"s3://{BUCKET}/inputs/whirlwind.warc.wet.gz"]
    # a local listing: relative lines are relative to its folder, URIs stay as they are
    (tmp_path / "mine.paths").write_text(f"fineweb-1.jsonl.gz\n{prefix}/docs.parquet\n")
    shutil.copy(local / "fineweb-1.jsonl.gz", tmp_path / "fineweb-1.jsonl.gz")
    assert expand_inputs([str(tmp_path / "mine.paths")]) == sorted(
        [str(tmp_path / "fineweb-1.jsonl.gz"), f"{prefix}/docs.parquet"]
    )


def test_parquet_row_groups_on_a_bucket_are_fetched_together_ahead_of_the_reader(
    s3, monkeypatch, tmp_path
):
    """Row groups come in one ranged GET besides the footer's, the column the reader skips
    between them included; with one group a request and a read-ahead budget of one byte,
    the same rows come, a GET a group."""
    local, prefix = s3
    docs = pq.read_table(local / "docs.parquet")
    docs = docs.append_column("unread", pa.array([f"x{i}" * 50 for i in range(len(docs))]))
    pq.write_table(docs, tmp_path / "wide.parquet", row_group_size=25)
    fs, _ = storage.filesystem(prefix)
    fs.put(str(tmp_path / "wide.parquet"), f"{BUCKET}/wide/wide.parquet")
    fetched = []
    fetch = storage.SpanFile._fetch

    def spy(self, start, stop):
        fetched.append((start, stop))
        return fetch(self, start, stop)

    monkeypatch.setattr(storage.SpanFile, "_fetch", spy)
    groups = pq.ParquetFile(tmp_path / "wide.parquet").metadata.num_row_groups
    want = _rows(_read(str(tmp_path / "wide.parquet")))
    assert _rows(_read(f"s3://{BUCKET}/wide/wide.parquet")) == want
    assert len(fetched) == 2
    fetched.clear()
    monkeypatch.setattr(storage, "_COALESCE", 1)
    monkeypatch.setattr(storage, "_AHEAD", 1)
    assert _rows(_read(f"s3://{BUCKET}/wide/wide.parquet")) == want
    assert len(fetched) == 1 + groups > 2


def test_an_object_deleted_under_the_reader_raises_file_not_found(s3):
    """A ranged GET's S3 error comes back as s3fs would raise it (the readers let a
    FileNotFoundError through; other OSErrors become read:corrupt_parquet rows)."""
    local, prefix = s3
    fs, _ = storage.filesystem(prefix)
    fs.put(str(local / "docs.parquet"), f"{BUCKET}/gone/docs.parquet")
    f = storage.SpanFile(f"s3://{BUCKET}/gone/docs.parquet")
    fs.rm(f"{BUCKET}/gone/docs.parquet")
    with pytest.raises(FileNotFoundError):
        f.read(100)
    f.close()


def test_parquet_on_other_remote_filesystems_is_read_through_fsspec(s3):
    """Schemes other than s3:// (here fsspec's in-memory one) fetch their ranges with fsspec."""
    import fsspec

    local, _ = s3
    memory = fsspec.filesystem("memory")
    memory.pipe("/primer/docs.parquet", (local / "docs.parquet").read_bytes())
    try:
        got = _read("memory://primer/docs.parquet")
    finally:
        memory.rm("/primer", recursive=True)
    assert _rows(got) == _rows(_read(str(local / "docs.parquet")))


def test_a_store_that_fails_mid_read_fails_the_part_instead_of_losing_rows(s3, monkeypatch):
    """A network error that outlives the retries is the store's fault: reading stops with
    RemoteReadError (the part fails; a rerun reads it again), no read:corrupt_parquet rows."""
    import fsspec

    local, _ = s3
    memory = fsspec.filesystem("memory")
    memory.pipe("/primer/flaky.parquet", (local / "docs.parquet").read_bytes())
    footer = memory.size("/primer/flaky.parquet") - 64 * 1024
    real = type(memory).cat_file

    def flaky(self, path, start=None, end=None, **kw):
        if start is not None and start < footer:  # the footer reads; the data does not
            raise ConnectionResetError("connection reset by peer")
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(memory), "cat_file", flaky)
    try:
        with pytest.raises(storage.RemoteReadError, match="connection reset"):
            _read("memory://primer/flaky.parquet")
    finally:
        monkeypatch.undo()
        memory.rm("/primer", recursive=True)


@pytest.mark.parametrize("name", ["dolma-sample-0000.warc.gz", "fineweb-1.jsonl.gz"])
def test_a_stream_cut_by_the_network_fails_instead_of_recording_bad_records(s3, monkeypatch, name):
    """WARC and JSONL readers record unreadable bytes as bad-record rows; bytes the network
    did not deliver are not the file's fault: RemoteReadError, and no rows are committed."""
    local, _ = s3
    data = (local / name).read_bytes()

    class CutFile(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > len(data) // 3:
                raise ConnectionResetError("connection reset by peer")
            return super().read(n if n is None or n < 0 else min(n, 4096))

    class Store:
        def open(self, path, mode="rb", **kw):
            return CutFile(data)

        def size(self, path):
            return len(data)

        def exists(self, path):
            return True

    monkeypatch.setattr(storage, "filesystem", lambda uri: (Store(), uri.split("://", 1)[1]))
    with pytest.raises(storage.RemoteReadError, match="connection reset"):
        _read(f"s3://{BUCKET}/cut/{name}")
