"""Versioned prompt templates: Jinja2 files in configs/prompts/, named `<id>_v<version>.j2`.

A template file defines one macro per chat role it fills (`system`, `user`), so the prompt
text lives in the file and the code only passes variables:

    {% macro system() %}You rate documents ...{% endmacro %}
    {% macro user(document, boundary) %}<{{ boundary }}>{{ document }}</{{ boundary }}>{% endmacro %}

A record keeps `template_id` and `template_version`; a published version never changes
meaning, so a changed prompt is a new file (`edu_annotate_v2.j2`), and the loaded
template's sha256 goes into the stage fingerprint and the record lineage.

    t = load_template("edu_annotate_v1")
    messages = t.messages(document="...", boundary="doc-1f2e")

A stage that names a template checks it before a run starts with `require_template`
(its `preflight`), so a typo stops the run with the known names, not mid-way.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "configs" / "prompts"
_NAME = re.compile(r"(?P<id>[a-z][a-z0-9_]*?)_v(?P<version>\d+)")


@dataclass(frozen=True)
class Template:
    """A loaded template: its id, version, file hash and the role macros it defines."""

    template_id: str
    version: int
    path: Path
    sha256: str
    _module: Any

    @property
    def name(self) -> str:
        return f"{self.template_id}_v{self.version}"

    def system(self) -> str | None:
        """The system message (a template's system() takes no variables), or None."""
        macro = getattr(self._module, "system", None)
        return None if macro is None else str(macro()).strip()

    def messages(self, **variables: Any) -> list[dict[str, str]]:
        """The chat messages: one per role macro the template defines, system first."""
        out = []
        for role in ("system", "user"):
            macro = getattr(self._module, role, None)
            if macro is None:
                continue
            names = set(macro.arguments)
            missing = names - variables.keys()
            if missing:
                raise TypeError(f"template {self.name}: {role}() needs {sorted(missing)}")
            text = str(macro(**{k: variables[k] for k in macro.arguments})).strip()
            out.append({"role": role, "content": text})
        if not out or out[-1]["role"] != "user":
            raise ValueError(f"template {self.name} ({self.path}) defines no user() macro")
        return out


def load_template(name: str, directory: str | Path | None = None) -> Template:
    """The template `<id>_v<version>` from `directory` (default configs/prompts/)."""
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(
            f"template name {name!r} must look like '<id>_v<version>' (e.g. edu_annotate_v1)"
        )
    return _load(name, str(Path(directory) if directory else PROMPTS_DIR))


def require_template(key: str, name: str, directory: str | Path | None = None) -> None:
    """Preflight: raise `PreflightError(key, ...)` unless the template `name` exists and
    compiles (no variables are rendered)."""
    from pipeline.stage import PreflightError

    try:
        load_template(name, directory)
    except (ValueError, FileNotFoundError) as e:
        raise PreflightError(key, str(e)) from None
    except Exception as e:  # a Jinja syntax error: say where
        raise PreflightError(key, f"template {name!r} does not compile: {e}") from None


@functools.lru_cache(maxsize=32)
def _load(name: str, directory: str) -> Template:
    import jinja2

    path = Path(directory) / f"{name}.j2"
    if not path.is_file():
        known = sorted(p.stem for p in Path(directory).glob("*.j2"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FileNotFoundError(f"no prompt template {path}{hint}; templates there: {known}")
    source = path.read_text(encoding="utf-8")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False
    )
    module = env.from_string(source).module
    m = _NAME.fullmatch(name)
    assert m is not None
    return Template(
        template_id=m["id"],
        version=int(m["version"]),
        path=path,
        sha256=hashlib.sha256(source.encode()).hexdigest(),
        _module=module,
    )
