"""Compile time apart from run time, for any call, and JAX's persistent compilation cache.

:class:`CompileClock` adds up the durations JAX reports through :mod:`jax.monitoring`
while a block runs: tracing to a jaxpr, lowering to MLIR and XLA's compilation (a
program served from the persistent cache reports only its tracing, lowering and the cache
read). The rest of the block's wall time is run time::

    with CompileClock() as clock:
        result = fit_fn(...)
    clock.compile_seconds, clock.run_seconds

:func:`enable_persistent_cache` switches JAX's on-disk cache of compiled programs on for
the command line (setting ``MTL_JAX_CACHE_DIR``, below), so that a repeated ``mtl-jax fit``
or ``mtl-jax run`` reads its programs instead of compiling them again.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import jax
import jax.monitoring

from mtl_jax.infer import program_cache

#: The :mod:`jax.monitoring` duration events that are compilation (tracing, lowering, XLA).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

_totals = threading.local()


def _record(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _totals.seconds = getattr(_totals, "seconds", 0.0) + duration


jax.monitoring.register_event_duration_secs_listener(_record)


class CompileClock:
    """Context manager: wall time of a block split into compile and run seconds (this thread's events)."""

    compile_seconds: float = 0.0
    run_seconds: float = 0.0

    def __enter__(self) -> "CompileClock":
        self._compiled_before = getattr(_totals, "seconds", 0.0)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        self.compile_seconds = min(getattr(_totals, "seconds", 0.0) - self._compiled_before, wall)
        self.run_seconds = wall - self.compile_seconds

    @property
    def seconds(self) -> float:
        """Wall time of the block."""
        return self.compile_seconds + self.run_seconds


#: Environment variable of the command line's compilation cache: a directory, or ``off``.
CACHE_ENV = "MTL_JAX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mtl_jax/xla`` (``~/.cache/mtl_jax/xla`` when ``XDG_CACHE_HOME`` is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtl_jax" / "xla"


def enable_persistent_cache() -> Path | None:
    """Switch JAX's persistent compilation cache on for this process; returns its directory.

    The directory is ``MTL_JAX_CACHE_DIR`` if set (``off``, ``0``, ``false`` or empty turn
    the cache off and return None), else JAX's own ``JAX_COMPILATION_CACHE_DIR`` if set,
    else :func:`default_cache_dir`. Every compiled program is kept, however quick its
    compilation (the small ones add up to seconds per command). Call it before the first
    compilation.
    """
    setting = os.environ.get(CACHE_ENV)
    if setting is not None and setting.strip().lower() in ("", "off", "0", "false", "no"):
        return None
    directory = Path(setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    program_cache.enable(directory / "programs")
    return directory
