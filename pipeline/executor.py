"""Where work runs: this process, or a Ray cluster. The one place Primer's stages reach Ray.

A stage never imports ray. The runner hands every stage that does its own fan-out (a
global stage's `prepare`, an artifact stage's `build`) an `Executor`, and the stage maps a
function over items with it:

    for result in executor.map(count_words, files):                 # tasks
        ...
    for result in executor.map(ScorePart(model), parts, uses_model=True):  # an actor pool
        ...

`LocalExecutor` runs the calls one after another in this process (tests, `executor:
local`, debugging); `ProcessExecutor(n)` runs them in n local processes, without Ray.
`RayExecutor` runs them as plain Ray tasks, a bounded number in flight, or, with
`uses_model=True`, in a Ray Data actor pool that autoscales with the cluster. Every worker
process unpickles a map's `fn` once, so whatever `fn` loads lazily (a tokenizer, a model)
is loaded once per worker, not once per item. Items and results travel pickled; results
come back as they finish (not in item order), so a caller that needs an order sorts them.
`fn` and the items must pickle; keep both small (paths, configs), and let the work read
and write files.

The runner maps its parts with the same executor (pipeline/stage_runner.py), so a stage's
own fan-out and the runner's share one mechanism and one set of resources.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from pipeline.progress import configure_ray_data_logging

T = TypeVar("T")
R = TypeVar("R")


class Executor:
    """Maps a function over items, here or on a cluster; see the module docstring."""

    name: str = "base"
    uses_ray: bool = False

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        *,
        uses_model: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> Iterator[R]:
        """`fn(item)` for every item, as each finishes. `uses_model`: `fn` loads something
        heavy on first use; run it in a pool of long-lived workers (one load each)."""
        raise NotImplementedError

    def workers(self, num_cpus: float = 1.0, num_gpus: float = 0.0) -> int:
        """How many calls can run at once with these resources each."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Everything in this process, in item order."""

    name = "local"

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        *,
        uses_model: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> Iterator[R]:
        for item in items:
            yield fn(item)

    def workers(self, num_cpus: float = 1.0, num_gpus: float = 0.0) -> int:
        return 1


_WORKER_FNS: dict[str, Any] = {}  # a ProcessExecutor worker's unpickled fns, by digest


def _call_worker(digest: str, blob: bytes, item: Any) -> Any:
    fn = _WORKER_FNS.get(digest)
    if fn is None:
        if len(_WORKER_FNS) >= 8:  # a long-lived worker serves many maps: keep the latest
            _WORKER_FNS.pop(next(iter(_WORKER_FNS)))
        fn = _WORKER_FNS[digest] = pickle.loads(blob)
    return fn(item)


class ProcessExecutor(Executor):
    """A pool of `workers` processes on this machine (no Ray), started on first use and
    kept for the executor's life (`close()`): each process unpickles a map's `fn` once and
    keeps it for the rest of that map, so it behaves like an actor pool. Results come back
    as they finish, so a caller sees the same completion-order freedom as on a cluster;
    tests use it to check that an output does not depend on the number of workers."""

    name = "processes"

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("ProcessExecutor needs at least one worker")
        self.n = workers
        self._pool: Any = None

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        *,
        uses_model: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> Iterator[R]:
        import concurrent.futures as cf
        import multiprocessing as mp

        items = list(items)
        if not items:
            return
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.n,
                mp_context=mp.get_context("spawn"),  # no forked copies of a driver's threads
            )
        blob = pickle.dumps(fn)
        digest = hashlib.sha256(blob).hexdigest()
        futures = [self._pool.submit(_call_worker, digest, blob, item) for item in items]
        try:
            for future in cf.as_completed(futures):
                yield future.result()
        finally:
            for f in futures:
                f.cancel()

    def workers(self, num_cpus: float = 1.0, num_gpus: float = 0.0) -> int:
        return self.n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Apply:
    """Ray Data UDF: unpickle `fn` once (per actor, or per task), apply it to each item."""

    def __init__(self, fn_blob: bytes) -> None:
        self.fn = pickle.loads(fn_blob)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return {"result": [pickle.dumps(self.fn(pickle.loads(b))) for b in batch["item"]]}


class RayExecutor(Executor):
    """Ray Data over the cluster Ray is connected to (`init_ray` first)."""

    name = "ray"
    uses_ray = True

    def workers(self, num_cpus: float = 1.0, num_gpus: float = 0.0) -> int:
        import ray

        res = ray.cluster_resources()
        n = int(res.get("CPU", 1) // max(num_cpus, 0.001))
        if num_gpus:
            n = min(n, int(res.get("GPU", 0) // num_gpus))
        return max(1, n)

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        *,
        uses_model: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> Iterator[R]:
        import ray

        items = list(items)
        if not items:
            return
        if not uses_model:
            yield from self._tasks(fn, items, num_cpus, num_gpus)
            return
        blob = pickle.dumps(fn)
        ds = ray.data.from_items(
            [{"item": pickle.dumps(item)} for item in items], override_num_blocks=len(items)
        )
        resources: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus or None}
        # The pool autoscales between one actor and one per item, starting with as many
        # as the cluster holds now: nodes that join later get actors too. One call at a
        # time per actor, run on the actor's own thread: an item is one whole unit of
        # work, so Ray Data's default wrapper (the UDF on a helper thread while the actor
        # thread batches) only costs time.
        now = max(1, min(len(items), self.workers(num_cpus, num_gpus)))
        ds = ds.map_batches(
            _Apply,
            fn_constructor_args=(blob,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                min_size=1,
                max_size=len(items),
                initial_size=now,
                max_concurrent_calls_per_actor=1,
                enable_true_multi_threading=True,
            ),
            **resources,
        )
        for row in ds.iter_rows():
            yield pickle.loads(row["result"])

    def _tasks(
        self, fn: Callable[[T], R], items: list[T], num_cpus: float, num_gpus: float
    ) -> Iterator[R]:
        """Plain Ray tasks, at most twice as many in flight as the cluster runs at once;
        `fn` travels once through the object store and each worker process unpickles it
        once (`_call_worker`'s cache). Ray Data's dispatch starts one-item tasks one at a
        time, a fixed cost per item that short items (a tokenizer part) cannot hide."""
        import ray

        blob = pickle.dumps(fn)
        digest = hashlib.sha256(blob).hexdigest()
        blob_ref = ray.put(blob)
        task = ray.remote(_call_worker).options(num_cpus=num_cpus, num_gpus=num_gpus or 0)
        window = 2 * self.workers(num_cpus, num_gpus)
        todo = iter(items)
        pending = [task.remote(digest, blob_ref, item) for item in itertools.islice(todo, window)]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for item in itertools.islice(todo, len(done)):
                    pending.append(task.remote(digest, blob_ref, item))
                yield ray.get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref)


LOCAL = LocalExecutor()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> RayExecutor:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray once."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local": always a fresh local Ray, never a cluster some other `ray
            # start` left running on this machine (join one with --ray-address/RAY_ADDRESS).
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True
            )
        # Ray Data logs every dataset's plan at INFO; Primer's own progress lines say enough
        # (pipeline/progress.py configures it, in workers too, before ray.data loads).
        configure_ray_data_logging()
        with contextlib.suppress(ImportError, AttributeError):
            # ray.data may have been imported (and configured) before Primer set the variable.
            from ray.data._internal.logging import configure_logging

            configure_logging()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Primer prints its own progress with rate and ETA
    ctx.verbose_stats_logs = False
    return RayExecutor()
