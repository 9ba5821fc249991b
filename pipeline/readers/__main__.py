"""`python -m pipeline.readers FILE [FILE ...]`: rows per drop reason of each file, and the time.

A quick look at what the readers make of a crawl or dump before a run: exit code 1 when a
file is of a kind no reader handles (or lacks its text column), 2 without arguments.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from pipeline.readers import check_input, iter_batches


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pipeline.readers FILE [FILE ...]", file=sys.stderr)
        return 2
    rc = 0
    for path in argv:
        problem = check_input(path)
        if problem:
            print(problem, file=sys.stderr)
            rc = 1
            continue
        reasons: Counter[str | None] = Counter()
        t0 = time.perf_counter()
        for table in iter_batches(path):
            for item in table["drop_reason"].value_counts().to_pylist():
                reasons[item["values"]] += item["counts"]
        dt = time.perf_counter() - t0
        n = sum(reasons.values())
        print(f"{path}: {n} rows in {dt:.3f} s")
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"  {reason or 'kept'}: {count}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
