"""Class probabilities of a supervised fastText model over an Arrow text column.

What: `load_scorer(path)` gives a `Scorer`; `scorer.probs(text, lowercase, max_chars)` is,
for each document, the probabilities `model.predict(line, k=-1, threshold=0.0)` gives for
its line (the first `max_chars` characters, optionally lower-cased, newlines as spaces), in
`scorer.labels` order, as an (n, labels) float64 array. `edu_score` (and `validate`, and
`edu_train`'s metrics) score documents through it.

Why: for `edu_score` the model call is the whole stage, and fastText's own predict is
mostly bookkeeping: a std::string per token, probes of a hash table that compare against
the words' std::strings, and a 32-float row of a 30 MB matrix averaged per token and word
bigram. Two engines compute the same numbers:

- `fused` (the default where the model allows it): one numba loop over the UTF-8 buffer
  of the Arrow column tokenizes each line as fastText's `readWord` does (space, \\n, \\r,
  \\t, \\v, \\f and \\0 separate tokens; a line ends at its first `</s>`, else `</s>` is
  added), hashes each token as fastText does (FNV-1a over *signed* chars), looks it up in
  an open-addressing table that holds each word's hash, length and first 8 bytes (one
  cache line for most lookups), forms the word n-gram ids as `Dictionary::addWordNgrams`
  does (int32 hashes widened with sign extension, `h * 116049371 + h'`, modulo `bucket`)
  and skips label-prefixed tokens, as fastText does. Instead of averaging input rows and
  multiplying by the output matrix it averages rows of `input @ output.T`, computed once:
  a softmax model's logits are linear in the average, so this is the same function, with
  `labels` floats per row where fastText reads `dim`. No Python object is made per
  document or token. The results differ from fastText's only by float rounding: fastText
  adds up a line's rows in 32-bit floats, this engine in 64-bit over folded rows
  (tests/filters/test_fasttext_scorer.py checks it against `model.predict` on real and odd
  text; README.md has the measured difference and speed, `python -m benchmarks.edu_score`).
- `fasttext`: fastText's native `multilinePredict` on the same lines (UTF-8 bytes made in
  Arrow, so no Python str is decoded per document), exactly `model.predict`.

`fused` covers what edu_train trains and DCLM-style classifiers: supervised, softmax loss,
no character n-grams (`maxn` 0), not quantized. `engine="auto"` uses it for such a model
and `fasttext` for anything else (a `.ftz`, hierarchical softmax, subwords), saying why.
numba builds the loop ahead of time once per machine (filters/compiled.py), so a process
that scores does not import numba.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.compiled import Kernels

log = logging.getLogger("primer.fasttext")

Engine = Literal["auto", "fused", "fasttext"]
EOS = b"</s>"  # fastText's end-of-line token
_MAX_WORDS = 1 << 24  # word ids share a 64-bit slot key with the hash and length

# fastText's token separators (Dictionary::readWord) and its signed-char widening in hash().
_SEPARATOR = np.zeros(256, np.bool_)
_SEPARATOR[list(b" \n\r\t\v\f\0")] = True
_SIGNED = np.array([(c - 256 if c > 127 else c) & 0xFFFFFFFF for c in range(256)], np.uint64)


# --- preprocessing ---------------------------------------------------------------------------


def one_line(
    text: pa.Array | pa.ChunkedArray,
    lowercase: bool,
    max_chars: int | None,
    newlines: bool = True,
) -> pa.Array | pa.ChunkedArray:
    """The line fastText reads for each document: nulls as "", the first `max_chars`
    characters, optionally lower-cased, newlines to spaces (`newlines=False` leaves them:
    the fused engine treats a newline as the space it would become)."""
    t = pc.fill_null(text, "")
    if max_chars:
        t = pc.utf8_slice_codeunits(t, 0, max_chars)
    if lowercase:
        t = pc.utf8_lower(t)
    return pc.replace_substring(t, "\n", " ") if newlines else t


def fasttext_lines(
    text: pa.Array | pa.ChunkedArray, lowercase: bool, max_chars: int | None
) -> list[str]:
    """`one_line` as Python strs: what training files and `model.predict` take."""
    return one_line(text, lowercase, max_chars).to_pylist()


def fasttext_inputs(
    text: pa.Array | pa.ChunkedArray, lowercase: bool, max_chars: int | None
) -> list[bytes]:
    """`fasttext_lines` as the bytes `model.predict` hands fastText's native code for each
    line: UTF-8 ending in a newline. Made in Arrow from its UTF-8 buffers, so no Python
    str is decoded per document and then encoded again."""
    t = one_line(text, lowercase, max_chars)
    t = pc.binary_join_element_wise(t, pa.scalar("\n", t.type), pa.scalar("", t.type))
    return t.cast(
        pa.large_binary() if pa.types.is_large_string(t.type) else pa.binary()
    ).to_pylist()


def predict_all(model: Any, inputs: list[bytes]) -> tuple[list[list[str]], list[list[float]]]:
    """`model.predict(lines, k=-1, threshold=0.0)` over `fasttext_inputs(...)`: the same
    native call (`multilinePredict`) on the same bytes, without predict's per-line Python
    newline check and copy, which `fasttext_inputs` makes unneeded."""
    return model.f.multilinePredict(inputs, -1, 0.0, "strict")


def load_fasttext(path: str | Path) -> Any:
    import fasttext  # lazy: a native module that `import pipeline` must not need

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no fastText model at {path}")
    with contextlib.redirect_stderr(io.StringIO()):  # old builds warn on every load
        return fasttext.load_model(str(path))


# --- engines ---------------------------------------------------------------------------------


class NativeScorer:
    """fastText's own predict (multilinePredict) on `fasttext_inputs`."""

    engine = "fasttext"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.labels: list[str] = list(model.get_labels())
        self._index = {lbl: i for i, lbl in enumerate(self.labels)}

    def probs(self, text: pa.Array | pa.ChunkedArray, lowercase: bool, max_chars: int | None):
        n, k = len(text), len(self.labels)
        if n == 0:
            return np.zeros((0, k))
        pred_labels, pred_probs = predict_all(
            self.model, fasttext_inputs(text, lowercase, max_chars)
        )
        out = np.full((n, k), np.nan)  # a line with no features gets no prediction
        sizes = np.fromiter(map(len, pred_labels), np.intp, n)
        rows = np.repeat(np.arange(n), sizes)
        cols = np.fromiter(
            (self._index[lbl] for labels in pred_labels for lbl in labels), np.intp, len(rows)
        )
        p = np.fromiter((q for probs in pred_probs for q in probs), np.float64, len(rows))
        # fastText hands back exp(log(p + 1e-5)), which can pass 1 by rounding
        out[rows, cols] = np.minimum(p, 1.0)
        return out


def _vocabulary(model: Any) -> list[bytes]:
    """The model's words as the bytes fastText holds (not all of them need be UTF-8)."""
    return [w.encode("utf-8", "surrogateescape") for w in model.f.getVocab("surrogateescape")[0]]


class FusedScorer:
    """The fused numba engine; see the module docstring. `make_scorer` builds one."""

    engine = "fused"

    def __init__(self, model: Any, words: list[bytes] | None = None) -> None:
        args = model.f.getArgs()
        words = _vocabulary(model) if words is None else words
        vocab = pa.array(words, pa.large_binary())
        self._voffs = np.frombuffer(vocab.buffers()[1], np.int64, len(vocab) + 1)
        self._vdata = (
            np.frombuffer(vocab.buffers()[2], np.uint8)
            if vocab.buffers()[2] is not None
            else np.zeros(1, np.uint8)
        )
        compiled = KERNELS.load()
        self._score = compiled.score
        size = 1 << max(4, (2 * len(words) - 1).bit_length())  # load factor <= 1/2
        self._slots, hashes = compiled.build_table(self._vdata, self._voffs, size, _SIGNED)
        self._nwords = len(words)
        self._bucket = int(args.bucket)
        self._ngrams = int(args.wordNgrams)
        self._eos_hash = int(hashes[words.index(EOS)])
        self._label = np.frombuffer(args.label.encode(), np.uint8)
        wi = model.get_input_matrix()
        wo = model.get_output_matrix()
        # Fold the output layer into the rows: the mean of (wi @ wo.T) rows is wo @ mean(wi rows).
        self._table = np.ascontiguousarray(
            (wi.astype(np.float64) @ wo.T.astype(np.float64)).astype(np.float32)
        )
        self.labels = list(model.get_labels())

    @staticmethod
    def unsupported(model: Any, words: list[bytes] | None = None) -> str | None:
        """Why the fused engine cannot run `model` (its `words`, when already read), or
        None when it can."""
        args = model.f.getArgs()
        if model.is_quantized():
            return "the model is quantized (.ftz)"
        if not str(args.model).endswith("supervised"):
            return f"it is not a supervised model ({args.model})"
        if not str(args.loss).endswith("softmax"):
            return f"its loss is {args.loss}, not softmax"
        if args.maxn > 0:
            return f"it uses character n-grams (maxn {args.maxn})"
        if args.wordNgrams > 1 and args.bucket <= 0:
            return "it has word n-grams but no buckets"
        words = _vocabulary(model) if words is None else words
        if len(words) >= _MAX_WORDS:
            return (
                f"its vocabulary has {len(words):,} words (the fused engine takes < {_MAX_WORDS:,})"
            )
        if model.get_word_id(EOS.decode()) < 0:
            return "its vocabulary has no '</s>'"
        return None

    def probs(self, text: pa.Array | pa.ChunkedArray, lowercase: bool, max_chars: int | None):
        lines = one_line(text, lowercase, max_chars, newlines=False)
        if isinstance(lines, pa.ChunkedArray):
            lines = lines.combine_chunks()
        lines = lines.cast(pa.large_binary())
        n = len(lines)
        offsets = np.frombuffer(lines.buffers()[1], np.int64, n + 1, lines.offset * 8)
        data = lines.buffers()[2]
        data = (
            np.frombuffer(data, np.uint8)
            if data is not None and data.size
            else np.zeros(1, np.uint8)
        )
        longest = int(np.diff(offsets).max(initial=0))
        # per-token scratch: at most one token per 2 bytes, and the added `</s>`
        positions = np.empty((3, longest // 2 + 2), np.int64)
        keys = np.empty((2, longest // 2 + 2), np.uint64)
        logits = np.empty((n, self._table.shape[1]))
        self._score(
            data, offsets, self._slots, self._vdata, self._voffs, self._table, self._nwords,
            self._bucket, self._ngrams, self._eos_hash, self._label, _SEPARATOR, _SIGNED,
            positions, keys, logits,
        )  # fmt: skip
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        # fastText hands back exp(log(p + 1e-5)) (its std_log); the same, clipped as above
        return np.minimum(z / z.sum(axis=1, keepdims=True) + 1e-5, 1.0)


Scorer = FusedScorer | NativeScorer


def make_scorer(model: Any, engine: Engine = "auto") -> Scorer:
    """A scorer for a loaded fastText model; `auto` takes `fused` where the model allows."""
    if engine == "fasttext":
        return NativeScorer(model)
    words = _vocabulary(model)  # read once, for the check and the lookup table
    why = FusedScorer.unsupported(model, words)
    if why is None:
        return FusedScorer(model, words)
    if engine == "fused":
        raise ValueError(
            f"the fused fastText engine cannot run this model: {why}; use engine: fasttext"
        )
    log.info("fastText model scored with fastText's own predict: %s", why)
    return NativeScorer(model)


def load_scorer(path: str | Path, engine: Engine = "auto") -> Scorer:
    return make_scorer(load_fasttext(path), engine)


# --- the numba kernels -----------------------------------------------------------------------
# Written as plain Python over numpy arrays; `KERNELS` (filters/compiled.py) compiles them,
# ahead of time once per machine. Every integer is kept in uint64/int64 with explicit 32-bit masks: numba widens
# uint32 arithmetic, and fastText's hashes are 32-bit.


def _build_table(vdata, voffs, size, signed):  # pragma: no cover - compiled by numba
    """Open addressing (linear probing, `size` a power of two) over the vocabulary: slot j
    holds [hash | min(len, 255) << 32 | word id << 40, first 8 bytes little-endian]; key 0
    is empty (no word is empty). Returns the slots and each word's fastText hash."""
    n = len(voffs) - 1
    slots = np.zeros((size, 2), np.uint64)
    hashes = np.empty(n, np.uint64)
    mask = size - 1
    for i in range(n):
        start = voffs[i]
        length = voffs[i + 1] - start
        h = np.uint64(2166136261)
        head = np.uint64(0)
        for k in range(length):
            c = vdata[start + k]
            h = ((h ^ signed[c]) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
            if k < 8:
                head |= np.uint64(c) << np.uint64(8 * k)
        hashes[i] = h
        j = np.int64(h) & mask
        while slots[j, 0] != 0:
            j = (j + 1) & mask
        slots[j, 0] = (
            h | (np.uint64(min(length, 255)) << np.uint64(32)) | (np.uint64(i) << np.uint64(40))
        )
        slots[j, 1] = head
    return slots, hashes


def _score(data, offsets, slots, vdata, voffs, table, nwords, bucket, ngrams, eos_hash,
           label, separator, signed, positions, keys, out):  # fmt: skip  # pragma: no cover - numba
    """out[d] = the mean of `table` rows over line d's features, as fastText's getLine.

    Three passes per line, so that the table lookups of one pass do not wait on each
    other: tokenize and hash, look every token up, then add the word and n-gram rows."""
    n_out = table.shape[1]
    mask = len(slots) - 1
    n_label = len(label)
    inv_bucket = 1.0 / np.float64(max(bucket, 1))
    ibucket = np.int64(max(bucket, 1))
    starts = positions[0]
    lengths = positions[1]
    wids = positions[2]
    hashes = keys[0]
    heads = keys[1]
    for d in range(len(offsets) - 1):
        # 1. tokens: separators as fastText's readWord; label tokens dropped; stop at `</s>`
        i = offsets[d]
        end = offsets[d + 1]
        ntok = 0
        ended = False
        while i < end:
            if separator[data[i]]:
                i += 1
                continue
            start = i
            h = np.uint64(2166136261)
            while i < end and not separator[data[i]]:
                # the low 32 bits of a product depend only on the operands' low 32 bits,
                # so fastText's uint32 hash is this one masked once at the end
                h = (h ^ signed[data[i]]) * np.uint64(16777619)
                i += 1
            h &= np.uint64(0xFFFFFFFF)
            length = i - start
            head = np.uint64(0)
            for k in range(min(length, 8)):
                head |= np.uint64(data[start + k]) << np.uint64(8 * k)
            if length >= n_label:  # a label token (`__label__x`): neither a word nor hashed
                is_label = True
                for k in range(n_label):
                    if data[start + k] != label[k]:
                        is_label = False
                        break
                if is_label:
                    continue
            starts[ntok] = start
            lengths[ntok] = length
            hashes[ntok] = h
            heads[ntok] = head
            ntok += 1
            # "</s>" (little-endian head): a literal end-of-line token ends the line
            if length == 4 and head == np.uint64(0x3E732F3C):
                ended = True
                break
        if not ended:
            starts[ntok] = -1
            lengths[ntok] = 4
            hashes[ntok] = np.uint64(eos_hash)
            heads[ntok] = np.uint64(0x3E732F3C)
            ntok += 1
        # 2. vocabulary lookups: hash, length and first 8 bytes in the slot, the rest compared
        for t in range(ntok):
            h = hashes[t]
            length = lengths[t]
            head = heads[t]
            want = h | (np.uint64(min(length, 255)) << np.uint64(32))
            j = np.int64(h) & mask
            wid = -1
            while True:
                key = slots[j, 0]
                if key == 0:
                    break
                if (key & np.uint64(0xFFFFFFFFFF)) == want and slots[j, 1] == head:
                    cand = np.int64(key >> np.uint64(40))
                    same = True
                    if length > 8:
                        vstart = voffs[cand]
                        start = starts[t]
                        if voffs[cand + 1] - vstart != length:
                            same = False
                        else:
                            for k in range(8, length):
                                if vdata[vstart + k] != data[start + k]:
                                    same = False
                                    break
                    if same:
                        wid = cand
                        break
                j = (j + 1) & mask
            wids[t] = wid
            # fastText keeps hashes as int32 and widens them to uint64 with sign extension
            hashes[t] = np.uint64(np.int64(np.int32(np.uint32(h))))
        # 3. the rows: words found, then word n-grams (`h * 116049371 + h'`, mod bucket)
        nrows = 0
        for q in range(n_out):
            out[d, q] = 0.0
        for t in range(ntok):
            wid = wids[t]
            if wid >= 0:
                for q in range(n_out):
                    out[d, q] += table[wid, q]
                nrows += 1
        for a in range(ntok):
            hh = hashes[a]
            for b in range(a + 1, min(ntok, a + ngrams)):
                hh = hh * np.uint64(116049371) + hashes[b]
                # hh % bucket without a 64-bit division: a quotient from the reciprocal,
                # off by at most a few, then corrected exactly in integers
                rem = np.int64(hh - np.uint64(np.float64(hh) * inv_bucket) * np.uint64(ibucket))
                while rem < 0:
                    rem += ibucket
                while rem >= ibucket:
                    rem -= ibucket
                row = nwords + rem
                for q in range(n_out):
                    out[d, q] += table[row, q]
                nrows += 1
        for q in range(n_out):
            out[d, q] /= nrows
    return out


KERNELS = Kernels(
    "fasttext_scorer",
    __name__,
    {
        "build_table": (
            "_build_table",
            "Tuple((u8[:, ::1], u8[::1]))(u1[::1], i8[::1], i8, u8[::1])",
        ),
        "score": (
            "_score",
            "f8[:, ::1](u1[::1], i8[::1], u8[:, ::1], u1[::1], i8[::1], f4[:, ::1], i8, i8, i8, "
            "i8, u1[::1], b1[::1], u8[::1], i8[:, ::1], u8[:, ::1], f8[:, ::1])",
        ),
    },
)
