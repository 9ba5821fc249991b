"""Megatron indexed-dataset shards: the bytes Megatron-LM reads, round trips, failures."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.tokens.shards import IndexedDataset, IndexedDatasetWriter, main

EOS = 32000


def random_docs(rng: np.random.Generator, n: int, vocab: int = 32011) -> list[np.ndarray]:
    docs = []
    for _ in range(n):
        body = rng.integers(0, vocab, size=int(rng.integers(0, 40)))
        docs.append(np.append(body, EOS))
    return docs


def megatron_read(prefix: Path) -> tuple[int, list[int], list[int], list[int], bytes]:
    """An independent reader following Megatron-core's `_IndexReader` field by field."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", raw, 17)
    n, n_docs = struct.unpack_from("<QQ", raw, 18)
    pos = 34
    lengths = list(struct.unpack_from(f"<{n}i", raw, pos))
    pos += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, pos))
    pos += 8 * n
    doc_idx = list(struct.unpack_from(f"<{n_docs}q", raw, pos))
    pos += 8 * n_docs
    assert pos == len(raw), "no sequence modes: not a multimodal file"
    return code, lengths, pointers, doc_idx, Path(f"{prefix}.bin").read_bytes()


def test_round_trip_and_megatron_byte_layout(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50)
    prefix = tmp_path / "shard-00000"
    with IndexedDatasetWriter(prefix) as w:
        for d in docs[:20]:
            w.add_document(d)
        w.add_documents(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
        info = w.finalize()
    total = sum(len(d) for d in docs)
    assert info["documents"] == 50 and info["tokens"] == total and info["bin_bytes"] == 2 * total

    code, lengths, pointers, doc_idx, data = megatron_read(prefix)
    assert code == 8  # uint16 in Megatron's DType enum
    assert lengths == [len(d) for d in docs]
    assert pointers == [2 * p for p in np.cumsum([0] + lengths[:-1]).tolist()]
    assert doc_idx == list(range(51))  # document count field is n + 1, like Megatron's
    assert data == np.concatenate(docs).astype("<u2").tobytes()

    ds = IndexedDataset(prefix)
    assert len(ds) == 50 and ds.num_tokens == total and ds.dtype == np.uint16
    for i in (0, 7, 20, 49):
        np.testing.assert_array_equal(ds.get(i), docs[i])
    np.testing.assert_array_equal(ds.get(3, offset=1, length=1), docs[3][1:2])
    np.testing.assert_array_equal(ds.lengths, lengths)
    np.testing.assert_array_equal(ds.document_indices, np.arange(51))


def test_read_span_crosses_document_boundaries(tmp_path):
    docs = [np.array([1, 2, EOS]), np.array([EOS]), np.array([3, 4, 5, 6, EOS])]
    with IndexedDatasetWriter(tmp_path / "s") as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "s")
    flat = np.concatenate(docs)
    for start in range(len(flat)):
        for length in range(len(flat) - start + 1):
            np.testing.assert_array_equal(ds.read_span(start, length), flat[start : start + length])
    with pytest.raises(IndexError, match="outside the 9-token stream"):
        ds.read_span(5, 5)


def test_int32_shards_hold_large_vocabularies(tmp_path):
    doc = np.array([0, 70000, 2**31 - 1])
    with IndexedDatasetWriter(tmp_path / "big", dtype=np.int32) as w:
        w.add_document(doc)
    assert megatron_read(tmp_path / "big")[0] == 4
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "big").get(0), doc)


def test_out_of_range_tokens_and_empty_documents_are_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s") as w:
        with pytest.raises(ValueError, match=r"token id 70000 \(document 0\) does not fit uint16"):
            w.add_document([1, 70000, EOS])
        with pytest.raises(ValueError, match="token id -1"):
            w.add_documents(np.array([1, -1]), [2])
        with pytest.raises(ValueError, match="document 0 is empty"):
            w.add_document([])
        with pytest.raises(ValueError, match="document 1 has length 0"):
            w.add_documents(np.array([1, 2]), [2, 0])
        with pytest.raises(ValueError, match="lengths add up to 3 tokens but 2"):
            w.add_documents(np.array([1, 2]), [1, 2])
        with pytest.raises(TypeError, match="must be integers"):
            w.add_document(np.array([1.5]))
        w.add_document([7, EOS])
    # the refused documents left nothing behind
    assert IndexedDataset(tmp_path / "s").read_span(0, 2).tolist() == [7, EOS]


def test_finalize_is_atomic_and_an_exception_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(tmp_path / "s") as w:
        w.add_document([1, EOS])
        assert not (tmp_path / "s.bin").exists()  # nothing under the final name mid-write
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_prefix_replaces_both_files(tmp_path):
    for n in (3, 5):
        with IndexedDatasetWriter(tmp_path / "s") as w:
            w.add_documents(np.full(n, EOS), np.ones(n, dtype=np.int64))
    assert len(IndexedDataset(tmp_path / "s")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]


@pytest.fixture
def shard(tmp_path) -> Path:
    with IndexedDatasetWriter(tmp_path / "s") as w:
        for d in random_docs(np.random.default_rng(1), 10):
            w.add_document(d)
    return tmp_path / "s"


def test_truncated_index_is_named(shard):
    idx = Path(f"{shard}.idx")
    raw = idx.read_bytes()
    idx.write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"s\.idx: index is .* truncated or corrupt"):
        IndexedDataset(shard)
    idx.write_bytes(raw[:20])
    with pytest.raises(ValueError, match=r"s\.idx: truncated index"):
        IndexedDataset(shard)


def test_corrupt_index_is_named(shard):
    idx = Path(f"{shard}.idx")
    raw = bytearray(idx.read_bytes())
    idx.write_bytes(b"NOTANIDX\x00" + raw[9:])
    with pytest.raises(ValueError, match=r"s\.idx: not a Megatron index"):
        IndexedDataset(shard)
    bad_version = raw[:9] + struct.pack("<Q", 2) + raw[17:]
    idx.write_bytes(bad_version)
    with pytest.raises(ValueError, match="index version 2"):
        IndexedDataset(shard)
    bad_dtype = raw[:17] + struct.pack("<B", 6) + raw[18:]  # float64
    idx.write_bytes(bad_dtype)
    with pytest.raises(ValueError, match="dtype code 6"):
        IndexedDataset(shard)
    raw[34 + 4 * 10 + 8] += 2  # the second pointer
    idx.write_bytes(raw)
    with pytest.raises(ValueError, match="pointers are not the running sum"):
        IndexedDataset(shard)


def test_bin_size_mismatch_is_named(shard):
    b = Path(f"{shard}.bin")
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"s\.bin: .* bytes but s\.idx describes"):
        IndexedDataset(shard)
    b.unlink()
    with pytest.raises(FileNotFoundError, match=r"s\.bin: data file not found"):
        IndexedDataset(shard)


def test_cli_prints_counts_and_first_ids(shard, capsys):
    main([str(shard), "--ids", "3"])
    out = capsys.readouterr().out
    ds = IndexedDataset(shard)
    assert f"documents  {len(ds)}" in out and f"tokens     {ds.num_tokens}" in out
    assert str(ds.get(0)[:3].tolist()) in out


def test_reserved_documents_filled_out_of_order_and_gathered(tmp_path):
    """The mixture's way through the format: reserve, scatter in any order, gather."""
    docs = random_docs(np.random.default_rng(3), 30)
    lengths = [len(d) for d in docs]
    with IndexedDatasetWriter(tmp_path / "seq") as w:
        w.add_documents(np.concatenate(docs), lengths)
    with IndexedDatasetWriter(tmp_path / "scattered") as w:
        w.add_document(docs[0])
        at = w.reserve(lengths[1:])
        starts = at + np.cumsum([0, *lengths[1:-1]])
        for i in reversed(range(1, len(docs))):  # last document first
            w.scatter(starts[i - 1] + np.arange(lengths[i]), docs[i])
    for suffix in (".bin", ".idx"):
        assert (
            Path(f"{tmp_path}/seq{suffix}").read_bytes()
            == Path(f"{tmp_path}/scattered{suffix}").read_bytes()
        )
    ds = IndexedDataset(tmp_path / "scattered", check=False)
    assert ds.num_tokens == sum(lengths)
    pick, take = np.array([7, 2, 7]), np.array([1, lengths[2], lengths[7]])
    want = np.concatenate([docs[7][:1], docs[2], docs[7]])
    assert np.array_equal(ds.gather(pick, take), want)
    with pytest.raises(IndexError, match="asked of document 2"):
        ds.gather([2], [lengths[2] + 1])
