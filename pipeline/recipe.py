"""Typed recipes: a YAML file validated, in full, before any work starts.

A recipe names its stages in order, each with its own typed config (the stage's
`Config`, a pydantic model that forbids unknown keys). An unknown key, a wrong type or a
missing input is a `ConfigError` naming the dotted key (`stages.quality.min_words`) and,
for typos, the closest valid key.

    name: quickstart
    stages:
      extract:
        input: [../data/sample/*.warc.gz]   # relative to this file
        backend: resiliparse
      langid: {languages: [en]}
      quality: {}
      dedup: {}

Input paths in a recipe are relative to the recipe file; `output` is relative to the
working directory. `--set stages.quality.min_words=100` overrides any key from the CLI.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import registry
from pipeline.secrets import is_secret_key, looks_like_secret, scrub
from pipeline.stage import Stage, StageConfig, stage_refs


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix, one
    line per problem (the CLI prints each as its own `primer: config error:` line)."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """Ray cluster address ("auto", "ray://head:10001"); None starts a local Ray. The CLI's
    --ray-address and the RAY_ADDRESS variable override it."""

    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local Ray (None: all of this machine's). Ignored on a cluster."""


class ReadConfig(BaseModel):
    """How stages that read raw files (not an earlier stage's output) read them."""

    model_config = ConfigDict(extra="forbid")

    text_column: str = "text"
    """JSONL/Parquet/HF field that holds the document text."""

    id_column: str = "id"
    """Field that holds the document id (kept, as a string, when present; otherwise ids are
    "<file>:<row>")."""

    max_rows_per_part: int | None = Field(2_000_000, ge=1)
    """A raw Parquet input with more rows than this is read as several parts (ranges of its
    row groups, each at most this many rows unless one group holds more), each its own task
    with its own commit, so one big file is not one core's work however big the cluster.
    Rows of such a part carry `source_path` "<file>#row_groups=a-b". None: never split."""

    max_bytes_per_part: int | None = Field(256 << 20, ge=1 << 16)
    """A gzip WARC/WET (one gzip member per record, as Common Crawl writes them) or a plain
    JSONL input larger than this many bytes is read as several parts, byte ranges each
    holding the records that start in it. Rows carry `source_path` "<file>#bytes=a-b".
    Compressed JSONL cannot be entered mid-file and is read whole. None: never split."""

    on_unknown_input: Literal["skip", "fail"] = "skip"
    """Files in an input folder or glob that no reader handles (a LICENSE, a README, a
    `.wat.gz` metadata file, a JSON manifest): "skip" lists them before any work, with a
    warning, and counts them in the manifest and summary; "fail" stops before any work."""


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    """Short name; the default output folder is runs/<name>."""

    description: str = ""

    output: str | None = None
    """Run folder (relative to the working directory); default runs/<name>."""

    executor: Literal["ray", "local"] = "ray"
    """"ray" runs stages as Ray Data jobs; "local" runs them in this process (debugging)."""

    ray: RayConfig = RayConfig()

    read: ReadConfig = ReadConfig()

    stages: dict[str, dict[str, Any] | None]
    """Stage name -> its config, in run order. `stage: dedup` runs a registered stage under
    another name (its output folder), e.g. a second dedup over synthetic text. The key `input` (paths or globs) feeds a stage
    from files, `input: "@dedup"` from an earlier stage's output; without it a stage reads
    the previous stage's output. A config value "@edu_train/model.bin" names a file in an
    earlier stage's output folder."""


@dataclass
class StageSpec:
    name: str
    cls: type[Stage]
    config: StageConfig
    inputs: list[str] | None  # raw patterns, resolved; None: the previous stage's output

    def fingerprint(self) -> str:
        """Hash of what determines this stage's output given its input (the runner chains
        it with the input's)."""
        return self.cls(self.config).fingerprint(self.name)


@dataclass
class LoadedRecipe:
    recipe: Recipe
    stages: list[StageSpec]
    path: Path | None

    @property
    def output_location(self) -> str:
        """The run folder as written: a path, or a URI on object storage (s3://...)."""
        return expand_vars(self.recipe.output or f"runs/{self.recipe.name}", "output", False)

    @property
    def output(self) -> Path:
        return Path(self.output_location)


def expand_vars(value: str, key: str, strict: bool = True) -> str:
    """`$VAR` / `${VAR}` expanded; with `strict`, a variable that is not set is a
    ConfigError naming it (os.path.expandvars would leave "$PRIMER_CC" in the path, to fail
    later as "matches no file")."""
    expanded = os.path.expandvars(value)
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if left and strict:
        raise ConfigError(
            f"{key}: {value!r} uses ${left[0]}, which is not set in the environment; "
            f"export it (e.g. export {left[0]}=/data/...) or write the path out"
        )
    return expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: two `quality:`
    sections would otherwise silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 3, 0.5, true, [en, fr], null."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, _, value = item.partition("=")
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
            node = node.setdefault(p, {})
            if node is None:
                node = {}
        node[parts[-1]] = parse_value(value)
    return raw


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel]:
    """The nested model a validation error's location points into (phases.0.sources.1)."""
    for key in loc:
        if isinstance(key, int) or key not in model.model_fields:
            continue
        inner = [model.model_fields[key].annotation]
        while inner:
            t = inner.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            inner.extend(typing.get_args(t))
    return model


def _format_error(exc: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
        if any(is_secret_key(k) for k in err["loc"]) or looks_like_secret(err.get("input")):
            # Never echo what was typed where a secret (or a secret's name) goes.
            lines.append(f"{loc}: {scrub(err['msg'])} (value not shown)")
            continue
        if err["type"] == "extra_forbidden":
            known = list(_model_at(model, err["loc"][:-1]).model_fields)
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = (
                f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(known)}"
            )
            lines.append(f"{loc}: unknown key{hint}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_stage_config(
    name: str, raw: dict[str, Any], where: str
) -> tuple[type[Stage], StageConfig]:
    try:
        cls = registry.get(name)
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    try:
        return cls, cls.Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, where, cls.Config)) from None


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    raw: dict[str, Any] | None = None,
    check_inputs: bool = True,
) -> LoadedRecipe:
    """Read, override and validate a recipe; every problem is raised before any work."""
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"recipe {str(path)!r} is a folder; name a recipe YAML file")
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe {str(path)!r} cannot be read: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping (name:, stages:, ...), "
                f"not a {type(raw).__name__}"
            )
        base = path.resolve().parent
    raw = apply_overrides(dict(raw or {}), overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        lines = _format_error(e, "", Recipe).splitlines()
        raise ConfigError("\n".join(f"{path or 'recipe'}: {line}" for line in lines)) from None
    if not recipe.stages:
        raise ConfigError(f"{path or 'recipe'}: `stages` is empty")

    specs: list[StageSpec] = []
    problems: list[str] = []  # every stage's problems, reported together
    for i, (name, body) in enumerate(recipe.stages.items()):
        try:
            specs.append(_stage_spec(i, name, body, list(recipe.stages)[:i], base, check_inputs))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    if check_inputs and recipe.output:
        expand_vars(recipe.output, "output")  # an unset $VAR in the run folder is named now
    return LoadedRecipe(recipe=recipe, stages=specs, path=Path(path) if path else None)


def _input_path(base: Path, value: str) -> str:
    """A recipe input: a URI as written (s3://, gs://, hf://, file://), a dataset spec
    (hf:NAME[:CONFIG]:SPLIT), else a path relative to the recipe file."""
    from pipeline import storage

    if storage.scheme(value) is not None:
        return value
    if value.startswith("hf:"):  # hf:NAME[:CONFIG]:SPLIT; a local NAME is recipe-relative
        name, sep, rest = value[3:].partition(":")
        if name.startswith((".", "/", "~")):
            name = str(Path(base, Path(name).expanduser()))
        return f"hf:{name}{sep}{rest}"
    return str(Path(base, Path(value).expanduser()))


def _stage_spec(
    i: int, name: str, body: dict | None, earlier: list[str], base: Path, check_inputs: bool
) -> StageSpec:
    """One stage of a recipe, validated (`earlier`: the names of the stages before it)."""
    body = dict(body or {})
    inputs = body.pop("input", None)
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs is not None and (
        not isinstance(inputs, list) or not all(isinstance(x, str) and x for x in inputs)
    ):
        raise ConfigError(
            f'stages.{name}.input: expected a path, a glob, "@stage" or a list of them '
            f"(got {inputs!r})"
        )
    if not isinstance(body.get("stage", name), str):
        raise ConfigError(f"stages.{name}.stage: expected a registered stage name")
    for ref in [*(inputs or []), *stage_refs(body)]:
        if ref.startswith("@") and ref[1:].split("/")[0] not in earlier:
            raise ConfigError(
                f"stages.{name}: {ref!r} refers to no earlier stage; "
                f"earlier stages: {', '.join(earlier) or 'none'}"
            )
    refs = [p for p in inputs or [] if str(p).startswith("@")]
    if refs and len(refs) != len(inputs):
        raise ConfigError(f"stages.{name}.input: mix of @stage references and files")
    if inputs is not None and not refs:
        inputs = [
            _input_path(base, expand_vars(p, f"stages.{name}.input", check_inputs)) for p in inputs
        ]
        if check_inputs:
            from pipeline.io import expand_inputs

            try:
                expand_inputs(inputs)
            except FileNotFoundError as e:
                raise ConfigError(f"stages.{name}.input: {e}") from None
    elif i == 0:
        raise ConfigError(f"stages.{name}.input: the first stage needs input files")
    uses = body.pop("stage", name)
    cls, cfg = build_stage_config(uses, body, f"stages.{name}")
    return StageSpec(name=name, cls=cls, config=cfg, inputs=inputs)
