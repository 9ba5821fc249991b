"""The one explicit registry of stages: short name -> stage class.

Recipes and `primer stage NAME` name stages by these keys (optionally pinned to a version,
`quality_v1`); nothing is looked up by import path from YAML. Classes import lazily so that
`import pipeline` stays light on a bare CPU box.
"""

from __future__ import annotations

import difflib
import importlib
import re

from pipeline.stage import Stage

_STAGES: dict[str, str] = {
    "extract": "filters.extract:ExtractStage",
    "langid": "filters.langid:LangIdStage",
    "quality": "filters.quality.quality:QualityStage",
    "dedup": "filters.dedup.dedup:DedupStage",
    "edu_annotate": "filters.edu.annotate:EduAnnotateStage",
    "edu_train": "filters.edu.train:EduTrainStage",
    "edu_score": "filters.edu.score:EduScoreStage",
    "seeds": "generators.seeds:SeedsStage",
    "generate": "generators.generate:GenerateStage",
    "validate": "generators.validate:ValidateStage",
    "decontaminate": "filters.decontam.decontaminate:DecontaminateStage",
    "mixture": "pipeline.tokens.mixture:MixtureStage",
    "train_smoke": "pipeline.tokens.train_smoke:TrainSmokeStage",
}


def names() -> list[str]:
    return list(_STAGES)


def location(name: str) -> tuple[str, str]:
    """(module, class name) of a registered stage, without importing it."""
    module, cls_name = _STAGES[name].split(":")
    return module, cls_name


def get(name: str) -> type[Stage]:
    """The stage class for `name` or `name_vN`; a clear error naming the known stages."""
    base, version = name, None
    m = re.fullmatch(r"(.+)_v(\d+)", name)
    if m and m.group(1) in _STAGES:
        base, version = m.group(1), int(m.group(2))
    if base not in _STAGES:
        close = difflib.get_close_matches(name, _STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown stage {name!r}{hint}; known stages: {', '.join(_STAGES)}")
    module, cls_name = location(base)
    cls = getattr(importlib.import_module(module), cls_name)
    if version is not None and version != cls.version:
        raise KeyError(
            f"stage {name!r} pins version {version}, but this Primer has {base}_v{cls.version}"
        )
    return cls
