"""Kernels built ahead of time (filters/compiled.py): a process that runs them never imports
numba, they give what numba's JIT gives, a wrong argument raises instead of reading the
wrong memory, and a machine that cannot build falls back to the JIT, saying why.

    .venv/bin/pytest tests/filters/test_compiled.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filters import compiled
from filters.compiled import KernelBuildError, arguments
from filters.dedup.minhash import KERNELS as MINHASH
from filters.dedup.minhash import minhash
from filters.normalise import KERNELS as NORMALISE
from filters.normalise import normalise
from filters.quality.kernels import document_counts
from tests.conftest import fineweb_docs

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def sample_texts() -> list[str]:
    return [d["text"] for d in fineweb_docs()][:200]


def test_a_process_that_runs_every_kernel_never_imports_numba():
    done = run_python(
        """
        import sys
        import numpy as np, pyarrow as pa
        from filters.dedup.minhash import minhash, KERNELS
        from filters.fasttext_scorer import KERNELS as SCORER
        from filters.quality.signals import compute_quality_signals
        texts = pa.array(["Hello world, this is a test.", "Ça va? Ünïcödé ﬁ text", ""])
        compute_quality_signals(texts)
        minhash(texts)
        words = pa.array([b"</s>", b"hello"], pa.large_binary())
        vdata = np.frombuffer(words.buffers()[2], np.uint8).copy()
        voffs = np.frombuffer(words.buffers()[1], np.int64).copy()
        signed = np.arange(256, dtype=np.uint64)
        slots, hashes = SCORER.load().build_table(vdata, voffs, 16, signed)
        assert slots.shape == (16, 2) and len(hashes) == 2
        print(KERNELS.load().mode, SCORER.load().mode)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite")))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["aot aot", "[]"]


def test_wrong_arguments_raise_instead_of_reading_the_wrong_memory():
    kernel = NORMALISE.load().changed_by_nfkd
    buf, table = np.zeros(10, np.uint8), np.zeros(0x110000, np.uint8)
    assert kernel(buf, np.array([0, 5, 10]), table).tolist() == [0, 0]
    with pytest.raises(TypeError, match="argument 1 must be a C-contiguous 1-d int64"):
        kernel(buf, np.array([0, 5, 10], np.int32), table)
    with pytest.raises(TypeError, match="argument 2 .* c_contiguous=False"):
        kernel(buf, np.array([0, 5, 10]), np.zeros(0x220000, np.uint8)[::2])
    with pytest.raises(TypeError, match="3 arguments, got 2"):
        kernel(buf, table)
    assert [(a.code, a.ndim) for a in arguments("Tuple((u8[:, ::1], u8[::1]))(u1[::1], i8)")] == [
        ("u1", 1),
        ("i8", 0),
    ]


def digest(result) -> str:
    if isinstance(result, pa.Array):
        return hashlib.sha256(json.dumps(result.to_pylist()).encode()).hexdigest()
    return hashlib.sha256(result.tobytes()).hexdigest()


@pytest.mark.parametrize(
    "kernels",
    [
        ("minhash", "normalise"),
        # numba's JIT compiles the quality pass in ~30 s on a clean checkout
        pytest.param(("document_counts",), marks=pytest.mark.slow),
    ],
    ids=["minhash+normalise", "quality"],
)
def test_the_jit_gives_what_the_built_kernels_give(tmp_path, kernels):
    texts = sample_texts() + ["", "é\u0301 ﬁ ½ 中文 😀 ", "word " * 500, "  a - b \u2028"]
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(texts))
    code = f"""
        import json
        import pyarrow as pa
        from filters.compiled import mode
        from filters.dedup.minhash import minhash
        from filters.normalise import normalise
        from filters.quality.kernels import document_counts
        from tests.filters.test_compiled import digest
        texts = pa.array(json.load(open({str(path)!r})), pa.large_string())
        assert mode() == "jit"
        for kernel in {list(kernels)!r}:
            print(digest(globals()[kernel](texts)))
        """
    done = run_python(code, PRIMER_KERNELS_MODE="jit")
    assert done.returncode == 0, done.stderr
    built = {"minhash": minhash, "normalise": normalise, "document_counts": document_counts}
    arr = pa.array(texts, pa.large_string())
    assert done.stdout.split() == [digest(built[k](arr)) for k in kernels]


def test_a_machine_that_cannot_build_falls_back_to_the_jit(tmp_path, monkeypatch):
    texts = ["Hello world, this is one.", "Ünïcödé ﬁ text, and two"]
    code = f"""
        import warnings
        import pyarrow as pa
        from filters.dedup.minhash import minhash, KERNELS
        warnings.simplefilter("always")
        print(minhash(pa.array({texts!r})).tolist())
        print(KERNELS.load().mode)
        """
    env = {"PRIMER_KERNELS": str(tmp_path), "CC": "/bin/false"}  # no working C compiler
    first = run_python(code, **env)
    assert first.returncode == 0, first.stderr
    expected = minhash(pa.array(texts)).tolist()
    assert first.stdout.splitlines() == [str(expected), "jit"]
    assert "no ahead-of-time build (the build failed: RuntimeError" in first.stderr
    (failed,) = tmp_path.glob("primer_minhash_*.failed")
    assert "build-one filters.dedup.minhash" in failed.read_text()

    # Other processes do not try again until the record is deleted (checked in this
    # process, on a fresh declaration of the same kernels: the same extension name)
    monkeypatch.setenv("PRIMER_KERNELS", str(tmp_path))
    again = compiled.Kernels(MINHASH.name, MINHASH.module, MINHASH.exports, MINHASH.sources)
    with pytest.raises(KernelBuildError, match="an earlier build failed, see .*failed"):
        compiled._extension(again)
    monkeypatch.setenv("PRIMER_KERNELS_MODE", "aot")  # a failed build is then an error
    with pytest.raises(KernelBuildError):
        again.load()
    monkeypatch.setenv("PRIMER_KERNELS_MODE", "jti")
    with pytest.raises(ValueError, match="PRIMER_KERNELS_MODE='jti': expected one of auto"):
        compiled.mode()
