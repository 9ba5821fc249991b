"""The stage protocol: a small callable from a pyarrow Table to a pyarrow Table.

A stage declares the columns it needs and the columns it adds, holds a typed config, and
loads any model lazily in `setup()` (once per worker, never in `__init__`, so a stage object
pickles cheaply to Ray workers). The runner (pipeline/stage_runner.py) calls the same object
on each batch of a part, in this process or on a Ray worker.

Scoring is separate from filtering. A stage whose config has thresholds names them in
`threshold_keys` and splits `process` in two: `score` adds its columns (the expensive part:
a model, text statistics) and `mark` turns those columns and the thresholds into
`drop_reason` ("<stage>:<reason>") through `mark_dropped`. Rows are never removed here: the
runner keeps both kept and dropped rows on disk, counts the reasons, and when only
thresholds change it calls `mark` again over the stored scores instead of scoring again.
Config keys that cannot change the output at all (a teacher's timeouts, batch sizes) are
`transport_keys`: changing them recomputes nothing.

    class Shout(Stage):
        name = "shout"
        needs = ("text",)
        adds = ("title",)
        def process(self, table):
            return table.append_column("title", pc.utf8_upper(table["text"]))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.executor import LOCAL, Executor
from pipeline.schema import FIELDS, conform


class PreflightError(ValueError):
    """A config value that cannot work, found before any stage runs (`Stage.preflight`).

    `key` is the dotted key inside the stage's config ("model", "teacher.local.model_path");
    the recipe loader prefixes it with `stages.<name>.` and the CLI exits 2 with one line.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def is_ref(value: Any) -> bool:
    """A "@stage[/file]" value: a path inside an earlier stage's output, resolved when that
    stage has run, so preflight checks cannot look at it yet."""
    return isinstance(value, str) and value.startswith("@")


def stage_refs(value: Any) -> list[str]:
    """Every "@stage[/file]" string in a config value, nested lists and mappings included
    (a mixture's sources name their inputs this way)."""
    if isinstance(value, str):
        return [value] if is_ref(value) else []
    if isinstance(value, dict):
        return [r for v in value.values() for r in stage_refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in stage_refs(v)]
    return []


def replace_refs(value: Any, resolve: Callable[[str], str]) -> Any:
    """`value` with every "@stage[/file]" string replaced by `resolve(ref)`."""
    if isinstance(value, str):
        return resolve(value) if is_ref(value) else value
    if isinstance(value, dict):
        return {k: replace_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [replace_refs(v, resolve) for v in value]
    return value


def require_path(key: str, value: str | os.PathLike[str] | None, kind: str = "file") -> None:
    """Preflight helper: `value` must be an existing file ("file"), folder ("dir") or
    either ("any"); None and "@stage" references pass (checked when they exist)."""
    if value is None or is_ref(value):
        return
    p = Path(os.path.expandvars(str(value))).expanduser()
    ok = {"file": p.is_file, "dir": p.is_dir, "any": p.exists}[kind]()
    if not ok:
        what = {"file": "file", "dir": "folder", "any": "path"}[kind]
        hint = "" if p.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise PreflightError(key, f"no such {what}: {str(value)!r}{hint}")


class StageFatal(Exception):
    """Raised by a stage for a failure that is no single row's fault (a state that does not
    match its input, two rows it cannot tell apart): the runner stops the part with it and
    never splits the batch to look for a bad row."""


class DryRun(Exception):
    """A stage asked only to estimate (`generate.dry_run`) stops the run with its estimate
    as the message: the CLI prints it and exits 0."""


class MissingColumns(KeyError):
    """A stage was handed a table without the columns it `needs`: a plan mistake (the stage
    that adds them did not run), never one row's fault."""


GUARDRAIL_KEYS = ("max_drop_fraction", "on_excess_drop", "max_error_fraction")
"""StageConfig keys that judge a stage's output but never change it: raising a guardrail
bound after a stop must not recompute the stage."""

BASE_TRANSPORT_KEYS = frozenset({*GUARDRAIL_KEYS, "batch_rows"})
"""StageConfig keys of every stage that never change its output: the guardrails, and the
batch size (a stage's rows never depend on how its input was cut into batches)."""


def nested_exclude(keys: Iterable[str]) -> dict[str, Any]:
    """Dotted keys ("teacher.timeout_s") as the nested `exclude` mapping pydantic takes."""
    out: dict[str, Any] = {}
    for key in keys:
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            nxt = node.setdefault(p, {})
            if nxt is True:
                break
            node = nxt
        else:
            node[leaf] = True
    return out


class StageConfig(BaseModel):
    """Settings every stage has; a stage's own config subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop_fraction: float = Field(0.9, ge=0.0, le=1.0)
    """Guardrail: if this stage drops more than this share of its input rows, the run warns
    loudly (or stops, see `on_excess_drop`) instead of silently losing the corpus. Rows a
    sampling stage leaves out (its `unwritten_reasons`) do not count as dropped here."""

    on_excess_drop: Literal["warn", "fail"] = "warn"
    """What to do when `max_drop_fraction` is exceeded."""

    max_error_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Guardrail on rows the stage could not process (`<stage>:error`, the exception in the
    `error` column): one bad document is recorded and the part goes on, but more than
    this share of the stage's input failing is a broken stage or model, not bad data, and
    the run stops (the stage is left incomplete) whatever `on_excess_drop` says."""

    batch_rows: int = Field(1000, ge=1)
    """Rows per batch handed to the stage (Ray Data `batch_size`)."""


class Stage:
    """Base class of every stage. Subclasses set the class attributes and `process`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type[StageConfig]] = StageConfig
    needs: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False
    """True when `setup()` loads something heavy (a model, a cluster table, an index): Ray
    runs the stage in an actor pool, one load per actor. Other stages run as tasks."""
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    transport_keys: ClassVar[frozenset[str]] = frozenset()
    """Config keys that do not change the output (a dry-run switch, a teacher's timeout,
    retries, concurrency, request batch sizes): changing them must not make the runner
    recompute the stage. Dotted keys reach into nested sections ("teacher.timeout_s"). The
    guardrails and `batch_rows` are always in (`BASE_TRANSPORT_KEYS`)."""
    threshold_keys: ClassVar[frozenset[str]] = frozenset()
    """Config keys that only `mark` reads: when nothing else changed, the runner marks the
    stored scores again instead of computing them again (`scores_reused` in the manifest).
    A stage with threshold keys implements `score` and `mark`, not `process`."""
    score_reasons: ClassVar[frozenset[str]] = frozenset()
    """Drop reasons `score` itself sets (rows it cannot score, e.g. a document too long to
    score); marking again keeps them, and clears and re-decides every other reason of the
    stage except `error`."""
    annotates: ClassVar[bool] = False
    """True when the stage only adds columns (`adds`, `drop_reason`) to rows it reads whole,
    from `needs` alone: over a previous stage's part it then writes a column part (`id`,
    its columns, `drop_reason`) that readers join with that part (pipeline/io.py), instead
    of copying every document's text."""
    unwritten_reasons: ClassVar[frozenset[str]] = frozenset()
    """Drop reasons that are counted but whose rows are not written (a sampling stage's
    "not_sampled" would otherwise copy the whole corpus into its output)."""

    def __init__(self, config: StageConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = config.model_copy(update=overrides)
        self.config = config
        self._ready = False

    def setup(self) -> None:
        """Load models or build tables; called once per worker before the first batch."""

    def preflight(self) -> None:
        """Check what can be checked before any stage of the run starts: files and folders
        the config names, values a model must know (a language code). Raise
        `PreflightError(key, message)`; "@stage" references are skipped (`is_ref`), they
        are checked when that stage has run. Cheap: no model loads, no data reads."""

    def output_config(self, scores_only: bool = False) -> dict[str, Any]:
        """The config values that decide the output: less the transport keys, and with
        `scores_only` less the thresholds too (what decides the stored scores)."""
        keys = {*BASE_TRANSPORT_KEYS, *self.transport_keys}
        if scores_only:
            keys |= self.threshold_keys
        return self.config.model_dump(mode="json", exclude=nested_exclude(keys))

    def content_fingerprint(self) -> dict[str, str]:
        """Hashes of files the config names by path whose content decides the output (a
        prompt template's sha256), so editing such a file recomputes the stage. Files in an
        earlier stage's output ("@stage/...") need none: that stage's fingerprint chains in."""
        return {}

    def fingerprint(self, name: str | None = None, scores_only: bool = False) -> str:
        """Hash of what determines this stage's output given its input (or, with
        `scores_only`, its scores): its recipe name, version, `output_config` and
        `content_fingerprint`."""
        blob = json.dumps(
            {
                "stage": name or self.name,
                "version": self.version,
                "config": self.output_config(scores_only),
                "content": self.content_fingerprint(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config_refs(self) -> list[str]:
        """The earlier stages named by "@stage/file" values in this stage's config."""
        refs = stage_refs(self.config.model_dump())
        names = (r[1:].partition("/")[0] for r in refs)
        # "@_assets/..." names a file fetched into the run folder (pipeline/remote_assets.py)
        return list(dict.fromkeys(n for n in names if not n.startswith("_")))

    def with_refs_resolved(self, run_dir: str | os.PathLike[str]) -> Stage:
        """This stage with "@stage/file" (and "@_assets/...") config values turned into
        paths in `run_dir`."""
        if not stage_refs(self.config.model_dump()):
            return self

        def path_of(ref: str) -> str:
            stage, _, rest = ref[1:].partition("/")
            return str(Path(run_dir, stage, rest)) if rest else str(Path(run_dir, stage))

        raw = replace_refs(self.config.model_dump(), path_of)
        return type(self)(type(self.config).model_validate(raw))

    def ensure_setup(self) -> None:
        """Run `setup()` once; the runner calls it before the first batch so that a model
        that cannot load fails the part clearly instead of as a row error."""
        if not self._ready:
            self.setup()
            self._ready = True

    def process(self, table: pa.Table) -> pa.Table:
        """Add this stage's columns and mark the rows it drops. Stages with
        `threshold_keys` get this for free: `mark(score(table))`."""
        if not self.threshold_keys:
            raise NotImplementedError(f"stage {self.name!r} implements neither process nor score")
        return self.mark(self.score(table))

    def score(self, table: pa.Table) -> pa.Table:
        """Add the columns the thresholds judge (`adds`); may mark rows it cannot score."""
        raise NotImplementedError

    def mark(self, table: pa.Table) -> pa.Table:
        """`drop_reason` (and any column derived from thresholds) from the scored columns and
        the `threshold_keys` alone: no model, no `setup()`, no other input columns, so the
        runner can call it over a stored part whose reasons it has cleared."""
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        missing = [c for c in self.needs if c not in table.column_names]
        if missing:
            raise MissingColumns(
                f"stage {self.name!r} needs columns {missing}, the input has "
                f"{table.column_names}; run the stage that adds them first"
            )
        self.ensure_setup()
        table = _declared_types(table)
        if "drop_reason" not in table.column_names:
            table = table.append_column("drop_reason", pa.nulls(len(table), pa.string()))
        return conform(self.process(table))

    def __getstate__(self) -> dict[str, Any]:
        # Ship config only: whatever setup() loaded is rebuilt on the worker.
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _declared_types(table: pa.Table) -> pa.Table:
    """Columns of Arrow type null (what a batch of all-missing values infers) get their
    declared type, so no stage meets a column its string kernels cannot take."""
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type) and f.name in FIELDS:
            typ = FIELDS[f.name].type
            table = table.set_column(i, pa.field(f.name, typ), table.column(i).cast(typ))
    return table


def mark_dropped(
    table: pa.Table, stage: str, rules: Sequence[tuple[str, pa.Array | pa.ChunkedArray]]
) -> pa.Table:
    """Set `drop_reason` to "<stage>:<reason>" for rows where a rule's mask is true.

    Rules are checked in order and the first failing rule names the reason; a row that
    already has a reason keeps it. Null mask entries count as "not dropped".
    """
    reason = table["drop_reason"] if "drop_reason" in table.column_names else None
    if reason is None:
        reason = pa.nulls(len(table), pa.string())
    for name, mask in rules:
        hit = pc.and_(pc.is_null(reason), pc.fill_null(mask, False))
        reason = pc.if_else(hit, pa.scalar(f"{stage}:{name}", pa.string()), reason)
    idx = table.column_names.index("drop_reason") if "drop_reason" in table.column_names else -1
    if idx >= 0:
        return table.set_column(idx, "drop_reason", reason)
    return table.append_column("drop_reason", reason)


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Add or replace a column by name."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


class GlobalStage(Stage):
    """A stage that must see all of its input once before it can judge any row (dedup).

    The runner calls `prepare(inputs, state_dir, executor)` once: it reads the kept rows of
    `inputs` (Parquet files of the previous stage), computes whatever global state it needs
    (fanning work out with `executor.map`, never with Ray directly) and writes it under
    `state_dir`, ending with the file `state_dir/_DONE` so a resumed run skips it. The
    runner discards `state_dir` with the rest of the stage folder when the stage's
    fingerprint changes. Then the stage runs as an ordinary map stage over each part, with
    `setup()` loading that state. Memory on the driver must grow with the state, never
    with the text.
    """

    state_dir: str | None = None

    uses_model: ClassVar[bool] = True
    """`setup()` loads what `prepare()` wrote (clusters, stored answers): once per actor."""

    retryable: ClassVar[bool] = False
    """True for stages whose rows can fail for a transient reason recorded in the state
    (a teacher's timeout): `primer run --retry-failed` then asks those rows again."""

    def prepare(self, inputs: Sequence[str], state_dir: str, executor: Executor = LOCAL) -> None:
        raise NotImplementedError

    def reopen_failed(self, state_dir: str) -> int:
        """`--retry-failed`: arrange for the next `prepare()` to ask again exactly the rows
        recorded as failed, through the same checkpointed path, and return how many there
        are (0: nothing to retry, the stage's parts stay as they are). Only for
        `retryable` stages."""
        raise TypeError(f"stage {self.name!r} has no failed rows to retry")

    def output_revision(self) -> str:
        """A short string that changes whenever the stage's state changes its output for the
        same config and input (a retry recovered answers); downstream stages chain it into
        their fingerprints, so they recompute only then. Called after the stage ran."""
        return ""

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "state_dir": self.state_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])
        self.state_dir = state["state_dir"]


class ArtifactStage(Stage):
    """A stage whose output is an artifact (a trained model and its metrics), not rows.

    `build(inputs, out_dir, executor)` reads the kept rows of `inputs`, writes its files into
    `out_dir` (atomically; any fan-out through `executor.map`) and returns counts for the
    manifest (`rows_in` at least). The runner skips it when its manifest is complete with
    the same fingerprint.
    """

    def build(
        self, inputs: Sequence[str], out_dir: str, executor: Executor = LOCAL
    ) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, table: pa.Table) -> pa.Table:
        raise TypeError(f"stage {self.name!r} builds an artifact; it does not map batches")
