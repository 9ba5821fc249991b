"""Keep secrets out of everything Primer writes: manifests, summaries, reports, logs, errors.

A config value whose key names a secret (a part of the key, split on "_" or "-", is one of
`SECRET_WORDS`: `api_key`, `hf_token`, `aws_secret_access_key`, `password`, and also
`api_key_env`, whose value is only a variable's name but is often mistaken for the key) is
replaced by `MASK` before the config is dumped anywhere. `max_tokens` is not a secret:
"tokens" is a count, and only the exact word "token" counts. Values that look like a
credential wherever they appear (`looks_like_secret`: known key prefixes, long
high-entropy strings) are masked in error messages too.

    >>> mask({"teacher": {"api_key_env": "sk-live-abc", "max_tokens": 16}})
    {'teacher': {'api_key_env': '***', 'max_tokens': 16}}
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

MASK = "***"

SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "pwd", "credential",
     "credentials", "auth", "authorization", "cookie", "bearer"}
)  # fmt: skip

_PREFIXES = re.compile(
    r"^(?:sk[-_]|rk[-_]|pk[-_]live|hf_|ghp_|gho_|ghs_|ghu_|github_pat_|xox[abprs]-|AKIA|ASIA|"
    r"AIza|glpat-|ya29\.|eyJ|Bearer\s)"
)


def is_secret_key(key: object) -> bool:
    """Whether a config key names a secret (see the module docstring)."""
    if not isinstance(key, str):
        return False
    parts = [p for p in re.split(r"[_\-.\s]+", key.lower()) if p]
    return any(p in SECRET_WORDS for p in parts)


def looks_like_secret(value: object) -> bool:
    """A string shaped like a credential: a known key prefix, or 24+ characters of
    mixed letters and digits with high entropy and no spaces (not an ordinary word or
    ENV_VAR_NAME)."""
    if not isinstance(value, str):
        return False
    s = value.strip()
    if _PREFIXES.match(s):
        return True
    if len(s) < 24 or any(c.isspace() for c in s) or "/" in s:
        return False
    classes = sum(
        (any(c.islower() for c in s), any(c.isupper() for c in s), any(c.isdigit() for c in s))
    )
    if classes < 3:
        return False
    counts = Counter(s)
    entropy = -sum(n / len(s) * math.log2(n / len(s)) for n in counts.values())
    return entropy >= 4.0


def mask(obj: Any) -> Any:
    """A copy of a JSON-like value with every secret-named key's value (and every value
    that looks like a credential) replaced by MASK."""
    if isinstance(obj, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "") else mask(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [mask(v) for v in obj]
    if looks_like_secret(obj):
        return MASK
    return obj


def scrub(text: str, values: list[str] | None = None) -> str:
    """`text` with credential-shaped words (and the given `values`) replaced by MASK: for
    messages that quote user input."""
    for v in values or []:
        if v:
            text = text.replace(v, MASK)

    def word(m: re.Match[str]) -> str:
        w = m.group(0)
        key, eq, value = w.partition("=")
        if eq and (is_secret_key(key.rsplit(".", 1)[-1]) or looks_like_secret(value)):
            return f"{key}={MASK}"  # --set teacher.api_key_env=..., KEY=value
        return MASK if looks_like_secret(w.strip("'\",:()[]{}")) else w

    return re.sub(r"\S+", word, text)
