"""The stage protocol: a small callable from a pyarrow Table to a pyarrow Table.

A stage declares the columns it needs and the columns it adds, holds a typed config, and
loads any model lazily in `setup()` (once per worker, never in `__init__`, so a stage object
pickles cheaply to Ray workers). The same object runs in-process in tests and under Ray Data
`map_batches(..., batch_format="pyarrow")`.

Scoring is separate from filtering: `process` adds score columns; rows that fail a config
threshold get a `drop_reason` ("<stage>:<reason>") through `mark_dropped`, they are never
removed here. The runner keeps both kept and dropped rows on disk and counts the reasons.

    class Shout(Stage):
        name = "shout"
        needs = ("text",)
        adds = ("title",)
        def process(self, table):
            return table.append_column("title", pc.utf8_upper(table["text"]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.schema import conform


class StageConfig(BaseModel):
    """Settings every stage has; a stage's own config subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop_fraction: float = Field(0.9, ge=0.0, le=1.0)
    """Guardrail: if this stage drops more than this share of its input rows, the run warns
    loudly (or stops, see `on_excess_drop`) instead of silently losing the corpus. Rows a
    sampling stage leaves out (its `unwritten_reasons`) do not count as dropped here."""

    on_excess_drop: Literal["warn", "fail"] = "warn"
    """What to do when `max_drop_fraction` is exceeded."""

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
    """True when `setup()` loads something heavy: Ray runs the stage in an actor pool."""
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset()
    """Config keys that do not change the output (a dry-run switch): changing them must not
    make the runner recompute the stage."""
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

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        missing = [c for c in self.needs if c not in table.column_names]
        if missing:
            raise KeyError(
                f"stage {self.name!r} needs columns {missing}, the input has "
                f"{table.column_names}; run the stage that adds them first"
            )
        if not self._ready:
            self.setup()
            self._ready = True
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

    The runner calls `prepare(inputs, state_dir, use_ray)` once: it reads the kept rows of
    `inputs` (Parquet files of the previous stage), computes whatever global state it needs
    and writes it under `state_dir`, ending with the file `state_dir/_DONE` so a resumed run
    skips it. Then the stage runs as an ordinary map stage over each part, with `setup()`
    loading that state. Memory on the driver must grow with the state, never with the text.
    """

    state_dir: str | None = None

    def prepare(self, inputs: Sequence[str], state_dir: str, use_ray: bool) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "state_dir": self.state_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])
        self.state_dir = state["state_dir"]


class ArtifactStage(Stage):
    """A stage whose output is an artifact (a trained model and its metrics), not rows.

    `build(inputs, out_dir, use_ray)` reads the kept rows of `inputs`, writes its files into
    `out_dir` (atomically) and returns counts for the manifest (`rows_in` at least). The
    runner skips it when its manifest is complete with the same fingerprint.
    """

    def build(self, inputs: Sequence[str], out_dir: str, use_ray: bool) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, table: pa.Table) -> pa.Table:
        raise TypeError(f"stage {self.name!r} builds an artifact; it does not map batches")
