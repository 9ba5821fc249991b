"""A quiet progress line with a rate and an ETA, for stages that run for minutes or hours.

Prints to stderr at most every `every` seconds (and once at the end), so logs from a DAG
task or a cluster driver stay readable:

    [quality] parts 12/40  rows 120,431  2,310 rows/s  elapsed 0:00:52  ETA 0:01:20

On a resumed run, parts finished by earlier attempts (`done`) count towards parts/total
but not towards the rate: the ETA is this attempt's speed times what is left.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


class Progress:
    def __init__(
        self, label: str, total_parts: int, every: float = 5.0, stream=None, done: int = 0
    ) -> None:
        self.label = label
        self.total = total_parts
        self.every = every
        self.stream = stream or sys.stderr
        self.done = done  # finished before this attempt started
        self.parts = done
        self.rows = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, parts: int = 0, rows: int = 0) -> None:
        self.parts += parts
        self.rows += rows
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.rows / elapsed
        ran = self.parts - self.done
        if ran > 0 and self.parts < self.total:
            eta = str(timedelta(seconds=round(elapsed * (self.total - self.parts) / ran)))
        elif self.parts >= self.total:
            eta = "done"
        else:
            eta = "?"
        return (
            f"[{self.label}] parts {self.parts}/{self.total}  rows {self.rows:,}  "
            f"{rate:,.{0 if rate >= 10 else 2}f} rows/s  elapsed {timedelta(seconds=round(elapsed))}  ETA {eta}"
        )

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        self._print()


# Ray Data's own logging, configured the documented way (RAY_DATA_LOGGING_CONFIG, a YAML
# `logging.config` dict): everything still goes to the session's ray-data.log, but the
# console only shows warnings, since Primer prints its own progress. Ray Data re-reads the
# variable whenever a worker switches datasets, so it is set in every process that imports
# the runner (driver and workers), on whatever node, unless the user set their own.
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
filters:
  console_filter: {"()": ray.data._internal.logging.HiddenRecordFilter}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
  console: {class: ray._private.log.PlainRayHandler, formatter: ray, level: WARNING, filters: [console_filter]}
loggers:
  ray.data: {level: DEBUG, handlers: [file, console], propagate: false}
"""


def configure_ray_data_logging() -> None:
    """Point RAY_DATA_LOGGING_CONFIG at Primer's quiet config (written once per machine)."""
    import hashlib
    import os
    import tempfile

    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    digest = hashlib.sha1(_RAY_DATA_LOGGING.encode()).hexdigest()[:8]
    path = os.path.join(tempfile.gettempdir(), f"primer-ray-data-logging-{digest}.yaml")
    if not os.path.isfile(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(_RAY_DATA_LOGGING)
        os.replace(tmp, path)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = path
