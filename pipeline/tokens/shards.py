"""Token shards in Megatron-LM's indexed-dataset format (`PREFIX.bin` + `PREFIX.idx`).

Why this format: Megatron-LM, NeMo and the trainers built on them read it directly, so the
shards Primer writes train anywhere without a conversion step. One sequence here is one
document (token ids ending with the EOS the caller appended), written exactly as
Megatron-core's `megatron/core/datasets/indexed_dataset.py` (`_IndexWriter`) writes it:

    PREFIX.bin   the documents' token ids back to back, little-endian, no separators
    PREFIX.idx   b"MMIDIDX\\x00\\x00"   9 bytes, magic
                 <Q 1                  version
                 <B dtype code         Megatron's DType enum: uint8 1, int8 2, int16 3,
                                       int32 4, int64 5, float64 6, float32 7, uint16 8
                 <Q sequence count     n
                 <Q document count     n + 1: the length of the document index array
                 int32[n]              tokens per sequence
                 int64[n]              byte offset of each sequence in PREFIX.bin
                 int64[n + 1]          document indices 0, 1, ..., n (sequence i is document i)
                 (int8[n] sequence modes follow only in multimodal files; never written here)

Empty documents are rejected: Megatron's own `tools/preprocess_data.py` never writes a
zero-length sequence (an empty document gets no sequence at all), and since every document
here carries at least its EOS, an empty one means a bug upstream.

Writing streams: tokens go through a buffered file and only the lengths (4 bytes a
document) stay in memory; both files are written under temporary names and renamed into
place by `finalize()`, the `.idx` last, so a prefix whose `.idx` exists is complete.
Reading uses positioned reads (`os.preadv`) of the `.bin` rather than a memory map, so
scanning a large shard does not grow the reader's resident memory; the `.idx` arrays are
memory-mapped (shared between DataLoader workers). The module is over 500 lines because it
is one file format: its writer, its reader and the checks that tie them to Megatron's.

Usage:

    from pipeline.tokens.shards import IndexedDatasetWriter, IndexedDataset
    with IndexedDatasetWriter("out/shard-00000") as w:
        w.add_document([5, 6, 7, eos])
        w.add_documents(flat_ids, lengths)      # many documents at once
        at = w.reserve(lengths)                 # or reserve them, then fill in any order:
        w.scatter(at + positions, tokens)       #   tokens at token positions of the file
        info = w.finalize()                     # documents, tokens, bin_bytes, idx_sha256
    ds = IndexedDataset("out/shard-00000")
    ds.get(0), ds.read_span(start=2, length=5)  # one document; the flat token stream
    ds.gather([4, 0], [3, 2])                   # the first 3 tokens of doc 4, 2 of doc 0

    python -m pipeline.tokens.shards out/shard-00000   # documents, tokens, the first ids
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8

# Megatron-core's `DType` enum; the codes are part of the file format.
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

_LENGTH_CHUNK = 1 << 16  # lengths of single add_document calls gather in chunks this long
_INDEX_CHUNK = 1 << 20  # sequences per step when pointers are computed or checked
_WRITE_BUFFER = 8 << 20


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def _token_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in DTYPE_CODES or dt.kind not in "iu":
        allowed = ", ".join(d.name for d in DTYPE_CODES if d.kind in "iu")
        raise ValueError(
            f"token dtype {dt.name} is not one Megatron can read; use one of {allowed}"
        )
    return dt


class IndexedDatasetWriter:
    """Stream documents into `prefix.bin` / `prefix.idx`; `finalize()` renames them into place.

    Memory holds only the document lengths (4 bytes each). As a context manager it removes
    its temporary files when the block raises, and finalizes when the block ends cleanly
    without an explicit `finalize()`.
    """

    def __init__(self, prefix: str | Path, dtype: Any = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.dtype = _token_dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self._tmp_bin = self.prefix.with_name(f".{self.prefix.name}.bin.tmp-{tag}")
        self._tmp_idx = self.prefix.with_name(f".{self.prefix.name}.idx.tmp-{tag}")
        self._bin = open(self._tmp_bin, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115
        self._chunks: list[np.ndarray] = []
        self._pending = np.empty(_LENGTH_CHUNK, dtype=np.int32)
        self._n_pending = 0
        self.documents = 0
        self.tokens = 0
        self.result: dict[str, Any] | None = None

    # -- adding ---------------------------------------------------------------------------

    def add_document(self, tokens: ArrayLike) -> None:
        """Append one document (its ids, EOS included)."""
        arr = self._checked(tokens)
        if arr.size == 0:
            raise ValueError(
                f"{self.prefix}: document {self.documents} is empty; every document needs at "
                "least its EOS token (Megatron's preprocessing never writes zero-length sequences)"
            )
        self._write(arr)
        if self._n_pending == _LENGTH_CHUNK:
            self._flush_pending()
        self._pending[self._n_pending] = arr.size
        self._n_pending += 1
        self.documents += 1

    def add_documents(self, flat_tokens: ArrayLike, lengths: ArrayLike) -> None:
        """Append many documents: `flat_tokens` is their ids back to back, `lengths` their sizes."""
        arr = self._checked(flat_tokens)
        lens = np.asarray(lengths)
        if lens.ndim != 1 or (lens.size and lens.dtype.kind not in "iu"):
            raise ValueError(f"{self.prefix}: lengths must be a 1-d integer array")
        if lens.size == 0:
            if arr.size:
                raise ValueError(f"{self.prefix}: {arr.size} tokens given with no lengths")
            return
        if int(lens.min()) < 1:
            bad = int(np.flatnonzero(lens < 1)[0])
            raise ValueError(
                f"{self.prefix}: document {self.documents + bad} has length {int(lens[bad])}; "
                "every document needs at least its EOS token"
            )
        if int(lens.max()) > np.iinfo(np.int32).max:
            raise ValueError(
                f"{self.prefix}: a document longer than 2**31-1 tokens cannot be indexed"
            )
        total = int(lens.sum(dtype=np.int64))
        if total != arr.size:
            raise ValueError(
                f"{self.prefix}: lengths add up to {total} tokens but {arr.size} tokens were given"
            )
        self._write(arr)
        self._flush_pending()
        self._chunks.append(lens.astype(np.int32, copy=True))
        self.documents += lens.size

    def reserve(self, lengths: ArrayLike) -> int:
        """Append documents of these lengths whose tokens `scatter` writes later, in any
        order, before `finalize()`; returns the token offset of the first one in the file.
        For writers that gather a shard's documents out of order (the mixture)."""
        lens = np.asarray(lengths, dtype=np.int64)
        if lens.size and int(lens.min()) < 1:
            raise ValueError(f"{self.prefix}: every reserved document needs at least one token")
        self._checked(np.empty(0, self.dtype))  # not finalized
        self._bin.flush()
        start = self.tokens
        self.tokens += int(lens.sum())
        self._bin.truncate(self.tokens * self.dtype.itemsize)
        self._bin.seek(self.tokens * self.dtype.itemsize)
        self._flush_pending()
        self._chunks.append(lens.astype(np.int32))
        self.documents += lens.size
        return start

    def scatter(self, positions: np.ndarray, tokens: ArrayLike) -> None:
        """Write `tokens[i]` at token position `positions[i]` of reserved space, through a
        shared memory map dropped on return (so the pages written leave this process's
        resident memory; they stay in the page cache until written back)."""
        arr = self._checked(tokens)
        if arr.size == 0:
            return
        self._bin.flush()
        data = np.memmap(self._tmp_bin, dtype=self.dtype, mode="r+", shape=(self.tokens,))
        try:
            data[positions] = arr  # written back by the kernel; finalize() fsyncs the file
        finally:
            del data

    def _checked(self, tokens: ArrayLike) -> np.ndarray:
        if self.result is not None:
            raise RuntimeError(f"{self.prefix}: writer already finalized")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size == 0:
            return arr.astype(self.dtype)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{self.prefix}: token ids must be integers, got dtype {arr.dtype}")
        if not np.can_cast(arr.dtype, self.dtype, "safe"):
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise ValueError(
                    f"{self.prefix}: token id {bad} (document {self.documents}) does not fit "
                    f"{self.dtype.name} [{info.min}, {info.max}]; write the shards with "
                    "dtype=np.int32 for a vocabulary this large"
                )
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def _write(self, arr: np.ndarray) -> None:
        self._bin.write(arr.data)
        self.tokens += arr.size

    def _flush_pending(self) -> None:
        if self._n_pending:
            self._chunks.append(self._pending[: self._n_pending].copy())
            self._n_pending = 0

    # -- finishing ------------------------------------------------------------------------

    def finalize(self) -> dict[str, Any]:
        """Write the index, rename both files into place; return the shard's counts."""
        if self.result is not None:
            return self.result
        self._flush_pending()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        digest = hashlib.sha256()
        idx_bytes = 0
        with open(self._tmp_idx, "wb", buffering=_WRITE_BUFFER) as f:

            def put(data: bytes | memoryview) -> None:
                nonlocal idx_bytes
                f.write(data)
                digest.update(data)
                idx_bytes += memoryview(data).nbytes

            n = self.documents
            put(INDEX_MAGIC)
            put(struct.pack("<Q", INDEX_VERSION))
            put(struct.pack("<B", DTYPE_CODES[self.dtype]))
            put(struct.pack("<Q", n))
            put(struct.pack("<Q", n + 1))
            for chunk in self._chunks:
                put(chunk.astype("<i4", copy=False).data)
            # Pointers are the running byte offset; computed a chunk at a time so finalizing
            # does not allocate 8 bytes per document at once.
            offset = 0
            for chunk in self._chunks:
                ends = np.cumsum(chunk, dtype=np.int64)
                starts = np.empty_like(ends)
                starts[0] = 0
                starts[1:] = ends[:-1]
                put(((starts + offset) * self.dtype.itemsize).astype("<i8", copy=False).data)
                offset += int(ends[-1])
            for lo in range(0, n + 1, _INDEX_CHUNK):
                put(np.arange(lo, min(n + 1, lo + _INDEX_CHUNK), dtype="<i8").data)
            f.flush()
            os.fsync(f.fileno())
        # A prefix whose .idx exists is complete: drop any old .idx before the new .bin
        # lands so an old index never describes a new .bin.
        idx_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        self._chunks = []
        self.result = {
            "prefix": str(self.prefix),
            "dtype": self.dtype.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "bin_bytes": self.tokens * self.dtype.itemsize,
            "idx_bytes": idx_bytes,
            "idx_sha256": digest.hexdigest(),
        }
        return self.result

    def abort(self) -> None:
        """Close and delete the temporary files; nothing appears under the prefix."""
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self.result is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise


class IndexedDataset:
    """Read a `prefix.bin` / `prefix.idx` pair written by Megatron-LM, NeMo or this module.

    `read_span(start, length)` reads the flat token stream (all documents in order), which
    is the `.bin` itself: Megatron's writer lays sequences out back to back, and the index
    is checked to say so when the dataset is opened.
    """

    def __init__(self, prefix: str | Path, check: bool = True) -> None:
        self.prefix = Path(prefix)
        self.check = check
        self._fd: int | None = None
        self._open_index()

    def _open_index(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        if not ipath.is_file():
            raise FileNotFoundError(f"{ipath}: index file not found (is {self.prefix} finalized?)")
        if not bpath.is_file():
            raise FileNotFoundError(f"{bpath}: data file not found beside {ipath.name}")
        size = ipath.stat().st_size
        with open(ipath, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise ValueError(
                f"{ipath}: truncated index ({size} bytes, the header alone is {HEADER_BYTES}); "
                "rewrite the shard"
            )
        if head[:9] != INDEX_MAGIC:
            raise ValueError(
                f"{ipath}: not a Megatron index (magic {head[:9]!r}, want {INDEX_MAGIC!r})"
            )
        version, code, n, n_docs = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION:
            raise ValueError(f"{ipath}: index version {version}, only version 1 is readable")
        if code not in CODE_DTYPES or CODE_DTYPES[code].kind not in "iu":
            raise ValueError(f"{ipath}: dtype code {code} is not an integer token type")
        self.dtype = CODE_DTYPES[code]
        want = HEADER_BYTES + 12 * n + 8 * n_docs
        # Multimodal files append one int8 mode per sequence; they read the same otherwise.
        if size not in (want, want + n):
            raise ValueError(
                f"{ipath}: index is {size} bytes but its header ({n} sequences, {n_docs} "
                f"document indices) needs {want}; the file is truncated or corrupt, rewrite it"
            )
        if n_docs < 1:
            raise ValueError(f"{ipath}: corrupt index, document count is 0")
        self.lengths = np.memmap(ipath, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(n,))
        self.pointers = np.memmap(
            ipath, dtype="<i8", mode="r", offset=HEADER_BYTES + 4 * n, shape=(n,)
        )
        self.document_indices = np.memmap(
            ipath, dtype="<i8", mode="r", offset=HEADER_BYTES + 12 * n, shape=(n_docs,)
        )
        if self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise ValueError(
                f"{ipath}: corrupt index, document indices run {int(self.document_indices[0])}"
                f"..{int(self.document_indices[-1])}, want 0..{n}"
            )
        if self.check:
            self.num_tokens = self._check_layout(ipath)
        else:  # trusted files (this process's own cache): open without reading the index
            last = n - 1
            self.num_tokens = (
                int(self.pointers[last]) // self.dtype.itemsize + int(self.lengths[last])
                if n
                else 0
            )
        bin_bytes = bpath.stat().st_size
        if bin_bytes != self.num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{bpath}: {bin_bytes} bytes but {ipath.name} describes {self.num_tokens} "
                f"{self.dtype.name} tokens ({self.num_tokens * self.dtype.itemsize} bytes); "
                "the pair is from different writes or the .bin is truncated, rewrite the shard"
            )

    def _check_layout(self, ipath: Path) -> int:
        """Check that sequences lie back to back in order; return the token count."""
        total = 0
        for lo in range(0, len(self.lengths), _INDEX_CHUNK):
            lens = np.asarray(self.lengths[lo : lo + _INDEX_CHUNK], dtype=np.int64)
            if lens.size and int(lens.min()) < 0:
                raise ValueError(f"{ipath}: corrupt index, negative sequence length")
            starts = np.cumsum(lens) - lens + total
            if not np.array_equal(starts * self.dtype.itemsize, self.pointers[lo : lo + lens.size]):
                raise ValueError(
                    f"{ipath}: sequence pointers are not the running sum of the lengths; "
                    "the index is corrupt (or the .bin is not laid out in order)"
                )
            total += int(lens.sum())
        return total

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "check": self.check}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self.check = state.get("check", True)
        self._fd = None
        self._open_index()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, documents={len(self)}, tokens={self.num_tokens})"
        )

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Document `i`'s tokens, or `length` of them from `offset` (Megatron's `get`)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: document {i} out of range ({n} documents)")
        i %= n
        size = int(self.lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.prefix}: tokens [{offset}, {offset + length}) of document {i} "
                f"out of range (it has {size})"
            )
        return self._pread(int(self.pointers[i]) + offset * self.dtype.itemsize, length)

    def gather(self, docs: ArrayLike, takes: ArrayLike) -> np.ndarray:
        """The first `takes[i]` tokens of document `docs[i]`, for every i, back to back.

        One vectorised read through a memory map of the `.bin` that is dropped on return,
        for callers that read many documents at once (the mixture's shard writer)."""
        docs = np.asarray(docs, dtype=np.int64)
        takes = np.asarray(takes, dtype=np.int64)
        n = len(self)
        if docs.size and (int(docs.min()) < 0 or int(docs.max()) >= n):
            raise IndexError(f"{self.prefix}: documents out of range ({n} documents)")
        if docs.size and ((takes < 0) | (takes > self.lengths[docs])).any():
            bad = int(np.flatnonzero((takes < 0) | (takes > self.lengths[docs]))[0])
            raise IndexError(
                f"{self.prefix}: {int(takes[bad])} tokens asked of document {int(docs[bad])}, "
                f"which has {int(self.lengths[docs[bad]])}"
            )
        total = int(takes.sum())
        if total == 0:
            return np.empty(0, dtype=self.dtype)
        starts = np.asarray(self.pointers[docs], dtype=np.int64) // self.dtype.itemsize
        ends = np.cumsum(takes)
        flat = np.repeat(starts - (ends - takes), takes) + np.arange(total, dtype=np.int64)
        data = np.memmap(bin_path(self.prefix), dtype=self.dtype, mode="r")
        try:
            return np.asarray(data[flat])
        finally:
            del data

    def read_span(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the flat stream (all documents in order) from token `start`."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"{self.prefix}: span [{start}, {start + length}) outside the "
                f"{self.num_tokens}-token stream"
            )
        return self._pread(start * self.dtype.itemsize, length)

    def _pread(self, byte_offset: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self.dtype.newbyteorder("<"))
        if count == 0:
            return out
        if self._fd is None:
            # Opened lazily: a forked DataLoader worker may share it, pread keeps no position.
            self._fd = os.open(bin_path(self.prefix), os.O_RDONLY)
        view = memoryview(out).cast("B")
        done = 0
        while done < view.nbytes:
            got = os.preadv(self._fd, [view[done:]], byte_offset + done)
            if got == 0:
                raise OSError(
                    f"{bin_path(self.prefix)}: unexpected end of file at byte {byte_offset + done}"
                )
            done += got
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tokens.shards", description="Summarise a Megatron indexed dataset."
    )
    parser.add_argument("prefix", help="path without .bin/.idx")
    parser.add_argument("--ids", type=int, default=16, help="how many of the first ids to print")
    args = parser.parse_args(argv)
    ds = IndexedDataset(args.prefix)
    print(f"prefix     {ds.prefix}")
    print(f"dtype      {ds.dtype.name}")
    print(f"documents  {len(ds)}")
    print(f"tokens     {ds.num_tokens}")
    if len(ds):
        lengths = np.asarray(ds.lengths)
        print(f"doc tokens min {lengths.min()}  mean {lengths.mean():.1f}  max {lengths.max()}")
        first = ds.get(0, 0, min(args.ids, int(lengths[0])))
        print(f"document 0 ({int(lengths[0])} tokens) starts {first.tolist()}")


if __name__ == "__main__":
    main()
