"""Compiled kernels built ahead of time, once per machine, so a worker never imports numba.

What: a module declares its numba kernels (plain Python functions over numpy arrays) as a
`Kernels`: the functions callers call, each with its argument types, and the helpers they
call (`@helper`). `kernels.load()` returns them compiled, as attributes:

    KERNELS = Kernels("minhash", __name__, {"signatures": ("_signatures", "void(u1[::1], ...)")})
    KERNELS.load().signatures(buf, off, ...)

Why: numba's JIT costs every process that calls a kernel about 170 MB of RSS even when the
machine code is cached on disk (measured: importing numba and llvmlite ~55 MB, its CPU
target and typing context ~75 MB, loading the cached code ~40 MB). That is more than a
stage's batch, and a Ray node with a worker per core pays it once per worker.

How: the first process on a machine that needs a module's kernels builds them with
`numba.pycc` into an ordinary CPython extension for the host CPU, in a subprocess (numba
never enters the calling process), under a file lock (concurrent workers build once), in
`$PRIMER_KERNELS` (default `~/.cache/primer/kernels`). The extension's name carries a
digest of its sources, numba's and Python's versions and the CPU's model and features, so
a changed kernel, upgrade or other machine type builds its own. Every later process
imports the extension: no numba. An extension checks no argument types, so `load` wraps
each function in a check of dtype, dimensions and contiguity against its declared types
(a wrong dtype would read the wrong memory, not raise).

Where the build fails (no C compiler, say) Primer warns once with the reason, records it
beside the extension (`<name>.failed`: other workers do not retry; delete it to retry) and
uses numba's JIT on the same functions: the same results, numba's memory. The mode is
`$PRIMER_KERNELS_MODE`: `auto` (the default, as above), `jit` (never build) or `aot` (a
failed build is an error). `python -m filters.compiled build` builds every module's
extension up front (`make setup` does).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODES = ("auto", "jit", "aot")

OWNERS = (
    "filters.normalise",
    "filters.dedup.minhash",
    "filters.quality.kernels",
    "filters.fasttext_scorer",
)
"""The modules that declare kernels as `KERNELS`: what `python -m filters.compiled build`
builds."""

_HELPER = "__primer_kernel_helper__"


class KernelBuildError(RuntimeError):
    """The ahead-of-time build failed (with `$PRIMER_KERNELS_MODE=aot`, an error)."""


def helper(signature: str | Callable | None = None) -> Callable:
    """Marks a function that kernels call (`@helper` or `@helper("i8(i8)")`, numba's
    signature): compiled with them, left a plain Python function on import."""

    def mark(func: Callable) -> Callable:
        setattr(func, _HELPER, signature if isinstance(signature, str) else "")
        return func

    return mark(signature) if callable(signature) else mark


@dataclass(frozen=True)
class Arg:
    """One argument's type: a numpy dtype code (`u1`, `i8`, ...) and its dimensions (0 for
    a scalar; arrays are C-contiguous, as numba's `u1[::1]`, `i8[:, ::1]`)."""

    code: str
    ndim: int = 0

    def check(self, value: Any, name: str, position: int) -> Any:
        if not self.ndim:
            return float(value) if self.code.startswith("f") else int(value)
        if (
            not isinstance(value, np.ndarray)
            or value.dtype != np.dtype(self.code)
            or value.ndim != self.ndim
            or not value.flags.c_contiguous
        ):
            got = (
                f"{value.dtype}, {value.ndim}-d, c_contiguous={value.flags.c_contiguous}"
                if isinstance(value, np.ndarray)
                else type(value).__name__
            )
            raise TypeError(
                f"kernel {name}: argument {position} must be a C-contiguous {self.ndim}-d "
                f"{np.dtype(self.code)} array, got {got}"
            )
        return value


def arguments(signature: str) -> tuple[Arg, ...]:
    """The argument types of a numba signature such as "void(u1[::1], i8, u8[:, ::1])"."""
    depth = 0
    for i in range(len(signature) - 1, -1, -1):  # the parenthesis that opens the arguments
        depth += {")": 1, "(": -1}.get(signature[i], 0)
        if depth == 0:
            break
    inside = signature[i + 1 : -1]
    return tuple(
        Arg(code, bracket.count(",") + 1 if bracket else 0)
        for code, bracket in re.findall(r"(\w+)(\[[^\]]*\])?", inside)
    )


@dataclass(frozen=True, eq=False)
class Kernels:
    """The kernels of `module`: exported name -> (the function's name in the module, its
    numba signature; arrays C-contiguous)."""

    name: str
    module: str
    exports: Mapping[str, tuple[str, str]]
    sources: tuple[str, ...] = ()
    """Other modules whose functions these kernels compile (their source joins the digest)."""

    def load(self) -> types.SimpleNamespace:
        """The compiled kernels, as attributes named as `exports`."""
        return _load(self)

    @functools.cached_property
    def digest(self) -> str:
        """Of the sources, versions and CPU (read once: it reads files)."""
        return _digest(self)

    @property
    def module_name(self) -> str:
        return f"primer_{self.name}_{self.digest[:16]}"

    @property
    def file_name(self) -> str:
        return f"{self.module_name}{sysconfig.get_config_var('EXT_SUFFIX')}"


def kernels_dir() -> Path:
    """Where extensions are built: `$PRIMER_KERNELS`, else `~/.cache/primer/kernels`."""
    env = os.environ.get("PRIMER_KERNELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "primer" / "kernels"


def mode() -> str:
    value = os.environ.get("PRIMER_KERNELS_MODE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"PRIMER_KERNELS_MODE={value!r}: expected one of {', '.join(MODES)}")
    return value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@functools.cache
def _load(kernels: Kernels) -> types.SimpleNamespace:
    chosen = mode()
    if chosen == "jit":
        return jit(kernels)
    try:
        module = _extension(kernels)
    except KernelBuildError as exc:
        if chosen == "aot":
            raise
        warnings.warn(
            f"{kernels.name} kernels: no ahead-of-time build ({exc}); using numba's JIT, "
            "which costs each process ~170 MB more",
            RuntimeWarning,
            stacklevel=3,
        )
        return jit(kernels)
    return types.SimpleNamespace(
        mode="aot",
        **{
            name: _checked(getattr(module, name), f"{kernels.name}.{name}", arguments(sig))
            for name, (_, sig) in kernels.exports.items()
        },
    )


def _checked(func: Callable, name: str, args: Sequence[Arg]) -> Callable:
    def call(*values: Any) -> Any:
        if len(values) != len(args):
            raise TypeError(f"kernel {name}: {len(args)} arguments, got {len(values)}")
        return func(
            *(a.check(v, name, i) for i, (a, v) in enumerate(zip(args, values, strict=True)))
        )

    call.__name__ = name
    return call


def jit(kernels: Kernels) -> types.SimpleNamespace:
    """The kernels compiled by numba's JIT in this process (cached beside their modules)."""
    module = _jitted_module(kernels.module)
    return types.SimpleNamespace(
        mode="jit",
        **{name: getattr(module, func) for name, (func, _) in kernels.exports.items()},
    )


@functools.cache
def _jitted_module(name: str) -> types.ModuleType:
    """`name` imported, with its helpers and exported functions made numba dispatchers
    (numba resolves a kernel's callees among its module's globals when it compiles)."""
    from numba import njit

    module = importlib.import_module(name)
    options = {"cache": True, "nogil": True, "boundscheck": False}
    exported = _exported(module)
    for attr, value in list(vars(module).items()):
        signature = getattr(value, _HELPER, None)
        if signature:
            setattr(module, attr, njit(signature, **options)(value))
        elif signature is not None or attr in exported:
            setattr(module, attr, njit(**options)(value))
    return module


def _exported(module: types.ModuleType) -> set[str]:
    kernels = getattr(module, "KERNELS", None)
    return {func for func, _ in kernels.exports.values()} if kernels else set()


def _extension(kernels: Kernels) -> types.ModuleType:
    """The built extension of `kernels`, building it first where this machine lacks it."""
    folder = kernels_dir()
    path = folder / kernels.file_name
    failed = folder / f"{kernels.module_name}.failed"
    if not path.exists():
        if failed.exists():
            raise KernelBuildError(f"an earlier build failed, see {failed}")
        from pipeline.assets import locked

        try:
            with locked(folder / f"{kernels.module_name}.lock"):
                if not path.exists() and not failed.exists():
                    _build_in_subprocess(kernels, folder, failed)
        except OSError as exc:  # a read-only or full cache folder
            raise KernelBuildError(f"cannot build in {folder}: {exc}") from exc
        if not path.exists():
            raise KernelBuildError(f"an earlier build failed, see {failed}")
    spec = importlib.util.spec_from_file_location(kernels.module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_in_subprocess(kernels: Kernels, folder: Path, failed: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building %s kernels into %s (once per machine)", kernels.name, folder)
    command = [sys.executable, "-m", "filters.compiled", "build-one", kernels.module]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-20:]
        failed.write_text(" ".join(command) + "\n" + "\n".join(tail) + "\n")
        errors = [ln for ln in tail if re.match(r"[\w.]+(Error|Exception)\b", ln)]
        reason = (errors or tail or [f"exit status {done.returncode}"])[-1]
        raise KernelBuildError(f"the build failed: {reason}")


# --------------------------------------------------------------------------------------------
# Building (in the subprocess)
# --------------------------------------------------------------------------------------------


def build(kernels: Kernels, folder: Path) -> Path:
    """Builds `kernels` into `folder` with numba.pycc; returns the extension's path."""
    from numba.pycc import CC

    module = _jitted_module(kernels.module)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / kernels.file_name
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        cc = CC(kernels.module_name)
        cc.output_dir = tmp
        cc.target_cpu = "host"
        cc.verbose = False
        for name, (func, signature) in kernels.exports.items():
            cc.export(name, signature)(getattr(module, func).py_func)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycc's pending-deprecation notice
            cc.compile()
        (built,) = Path(tmp).glob(f"{kernels.module_name}*")
        os.replace(built, target)  # atomic: a reader sees no half-written extension
    return target


def _digest(kernels: Kernels) -> str:
    h = hashlib.sha256()
    for name in (kernels.module, *kernels.sources):
        spec = importlib.util.find_spec(name)
        h.update(Path(spec.origin).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(repr(sorted(kernels.exports.items())).encode())
    for package in ("numba", "llvmlite", "numpy"):
        h.update(f"{package}={importlib.metadata.version(package)}".encode())
    h.update(f"{sys.version}|{platform.machine()}|{_cpu()}".encode())
    return h.hexdigest()


def _cpu() -> str:
    """The CPU's model and feature flags (the extension is built for the host CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in {"model name", "flags", "Features"}]
    return "\n".join(dict.fromkeys(keep))


def _owner(name: str) -> Kernels:
    return importlib.import_module(name).KERNELS


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m filters.compiled", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build every module's kernels into $PRIMER_KERNELS")
    one = sub.add_parser("build-one", help="build one module's kernels (what load runs)")
    one.add_argument("module")
    args = parser.parse_args(argv)
    if args.command == "build-one":
        build(_owner(args.module), kernels_dir())
        return 0
    for name in OWNERS:
        kernels = _owner(name)
        loaded = kernels.load()
        print(f"{kernels.name}: {loaded.mode} ({kernels_dir() / kernels.module_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
