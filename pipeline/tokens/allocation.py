"""How many tokens each mixture source gives.

The mixture stage's arithmetic, apart from any file: `allocate` splits a phase's token
budget over its sources by weight, exact to one token (largest remainder), and fails (or
scales the budget down) when a source cannot supply its share within `max_epochs`. Which
documents make up those tokens is pipeline/tokens/draws.py's business.

    from pipeline.tokens.allocation import SourcePlan, allocate
    plans = [SourcePlan("web", 0.7, 1.0, available_tokens, available_documents), ...]
    budget = allocate("phase1", 400_000, plans)       # sets plans[i].tokens
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("primer")

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


class MixtureError(ValueError):
    """A mixture that cannot be built as configured (a source short of its share)."""


def parse_tokens(value: int | float | str) -> int:
    """Token counts as written in recipes: 400000, "400k", "2.5B", "3.3T"."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([kKmMbBgGtT]?)\s*", str(value))
    if not m:
        raise ValueError(f"not a token count: {value!r} (use e.g. 400000, '400k', '2.5B')")
    return int(float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1))


@dataclass
class SourcePlan:
    name: str
    weight: float
    max_epochs: float
    available_tokens: int
    available_documents: int
    tokens: int = 0

    @property
    def epochs(self) -> float:
        return self.tokens / self.available_tokens if self.available_tokens else 0.0


def allocate(
    phase: str,
    budget: int,
    sources: Sequence[SourcePlan],
    on_short: Literal["fail", "scale"] = "fail",
) -> int:
    """Set each source's `tokens` to its share of `budget`; return the phase's tokens.

    Shares are exact to one token (largest remainder). A source whose share exceeds
    `available x max_epochs` fails the phase, or with on_short="scale" the budget shrinks
    to the largest one at which every source fits.
    """
    capacity = {s.name: int(s.available_tokens * s.max_epochs) for s in sources}
    short = [
        (s, math.ceil(s.weight * budget) - capacity[s.name])
        for s in sources
        if math.ceil(s.weight * budget) > capacity[s.name]
    ]
    if short and on_short == "fail":
        lines = [
            f"source {s.name!r} needs {math.ceil(s.weight * budget):,} tokens "
            f"({s.weight:.0%} of {budget:,}) but has {s.available_tokens:,} tokens "
            f"({s.available_documents:,} documents) x max_epochs {s.max_epochs:g} = "
            f"{capacity[s.name]:,}: short by {gap:,} tokens"
            for s, gap in short
        ]
        raise MixtureError(
            f"phase {phase!r} cannot meet its budget of {budget:,} tokens:\n  "
            + "\n  ".join(lines)
            + "\n  Lower the phase's tokens or this source's weight, raise its max_epochs, "
            "add data, or set on_short: scale."
        )
    if short:
        scaled = min(int(capacity[s.name] / s.weight) for s, _ in short)
        while scaled > 0 and any(math.ceil(s.weight * scaled) > capacity[s.name] for s in sources):
            scaled -= 1
        if scaled <= 0:
            empty = [s.name for s, _ in short if capacity[s.name] == 0]
            raise MixtureError(
                f"phase {phase!r}: sources {empty} have no tokens; nothing to scale to"
            )
        log.warning(
            "mixture: phase %r scaled from %s to %s tokens: %s short of its share",
            phase, f"{budget:,}", f"{scaled:,}", ", ".join(s.name for s, _ in short),
        )  # fmt: skip
        budget = scaled
    exact = [s.weight * budget for s in sources]
    shares = [math.floor(x) for x in exact]
    for i in sorted(range(len(sources)), key=lambda i: shares[i] - exact[i])[
        : budget - sum(shares)
    ]:
        shares[i] += 1
    for s, n in zip(sources, shares, strict=True):
        s.tokens = n
    return budget
