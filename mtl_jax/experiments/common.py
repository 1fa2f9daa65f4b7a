"""Helpers shared by the paper studies (:mod:`~mtl_jax.experiments.table2`,
:mod:`~mtl_jax.experiments.school`) and the scripts in ``benchmarks/``.

* dtypes: :func:`resolve_dtype` (a config's ``dtype`` setting) and :func:`cast_floats`;
* pytrees with a leading batch axis: :func:`stack_trees` and :func:`unstack_tree`;
* mean and standard error over replicates or splits: :func:`summarize` and its text form
  :func:`plus_minus`;
* ahead-of-time compilation with compile and run time measured apart:
  :func:`compile_and_run`; warm timings: :func:`median_time`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.infer.program_cache import CachedProgram
from mtl_jax.metrics import mean_and_standard_error

__all__ = [
    "TimedRun",
    "cast_floats",
    "compile_and_run",
    "median_time",
    "plus_minus",
    "resolve_dtype",
    "stack_trees",
    "summarize",
    "unstack_tree",
]


# ------------------------------------------------------------------------ dtypes
def resolve_dtype(name: str | None):
    """JAX float dtype for ``None`` (JAX's current default), ``"float32"`` or ``"float64"``.

    ``"float64"`` switches on ``jax_enable_x64`` for the whole process.

    Raises:
        ValueError: for any other name.
    """
    if name is None:
        return jnp.asarray(0.0).dtype
    if name == "float64":
        jax.config.update("jax_enable_x64", True)
        return jnp.dtype(jnp.float64)
    if name == "float32":
        return jnp.dtype(jnp.float32)
    raise ValueError(f"dtype must be None, 'float32' or 'float64', got {name!r}")


def cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype``.

    Integer leaves (task ids), PRNG keys and static fields are left as they are; NumPy
    leaves stay NumPy arrays, JAX leaves JAX arrays.
    """

    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


# ------------------------------------------------------------------------ pytrees
def stack_trees(trees: Sequence[Any]):
    """Equally shaped pytrees stacked along a new leading axis (one tree of ``[len(trees), ...]`` leaves)."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_tree(tree) -> list:
    """Inverse of :func:`stack_trees`: the pytrees ``tree[i]`` along the leading axis.

    NumPy leaves stay NumPy arrays, JAX leaves stay JAX arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    size = leaves[0].shape[0]
    return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(size)]


# ------------------------------------------------------------- mean +- std. error
def summarize(values) -> dict:
    """``{"mean", "se"}`` of ``values`` over replicates; ``se`` is ``None`` for a single value."""
    mean, se = mean_and_standard_error(values)
    return {"mean": mean, "se": None if np.isnan(se) else se}


def plus_minus(summary, *, sign: str = "±", digits: int = 1) -> str:
    """``"mean ± se"`` (just ``"mean"`` when ``se`` is ``None``).

    Args:
        summary: a :func:`summarize` dict or a ``(mean, se)`` pair (the papers' numbers).
        sign: the separator between mean and standard error (``"±"`` or ``"+-"``).
        digits: decimals of both numbers.
    """
    mean, se = (summary["mean"], summary["se"]) if isinstance(summary, dict) else summary
    if se is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} {sign} {se:.{digits}f}"


# ----------------------------------------------------- compile, then run and time
class TimedRun(NamedTuple):
    """Output and timings of :func:`compile_and_run`.

    Attributes:
        output: the function's output, blocked until ready.
        compile_seconds: tracing, lowering and compilation (about 0 when ``reused``).
        run_seconds: the compiled run alone.
        compiled: the compiled executable; call it again with the dynamic arguments,
            by keyword, e.g. ``compiled(design=other_design, key=other_key)``.
        reused: the executable came from the cache of an earlier call.
    """

    output: Any
    compile_seconds: float
    run_seconds: float
    compiled: Callable[..., Any]
    reused: bool

    @property
    def timing(self) -> dict:
        """``{"compile_seconds", "run_seconds"}``."""
        return {"compile_seconds": self.compile_seconds, "run_seconds": self.run_seconds}


#: Compiled executables by (function, static arguments, dynamic argument shapes), for
#: ``compile_and_run(..., cache=True)``.
_COMPILED: dict[tuple, Any] = {}


def compile_and_run(jitted, *, static: dict | None = None, cache: bool = False, batch_mesh=None,
                    **dynamic) -> TimedRun:
    """Compile ``jitted`` ahead of time for ``dynamic``, then run it once; time both apart.

    ``jitted`` is a ``jax.jit`` function or a
    :func:`~mtl_jax.infer.program_cache.cached_program`. Its static arguments go in ``static`` and its
    array arguments as keywords, so that ``jitted(**static, **dynamic)`` is the call
    being timed, e.g.::

        run = compile_and_run(em_fit, static=dict(model=model, n_init=4, max_iter=500, tol=1e-8),
                              design=design, key=key)
        run.output, run.compile_seconds, run.run_seconds

    The run blocks until every output is ready, so ``run_seconds`` is execution time and
    ``compile_seconds`` everything before it.

    Args:
        jitted: the jitted function.
        static: its static (hashable) keyword arguments.
        cache: reuse an executable compiled earlier in this process for the same function,
            static arguments and dynamic shapes and dtypes (``compile_seconds`` is then
            about 0); benchmarks that report compile time leave this off.
        batch_mesh: a device mesh (:func:`mtl_jax.infer.sharding.device_mesh`) over which
            ``dynamic``, whose leaves share a leading batch axis of size ``R``, are padded
            and sharded before the run (:func:`~mtl_jax.infer.sharding.place_batch`); the
            output, whose leaves lead with the same axis, comes back as host arrays of
            ``R`` elements (:func:`~mtl_jax.infer.sharding.gather_batch`). ``jitted`` must
            split its work over the same mesh (e.g. with
            :func:`~mtl_jax.infer.sharding.batch_map`). ``None``: as given.
        **dynamic: the traced arguments, by keyword.

    Returns:
        A :class:`TimedRun`.
    """
    static = dict(static or {})
    if batch_mesh is not None:
        from mtl_jax.infer.sharding import batch_size, place_batch

        size = batch_size(dynamic)
        dynamic = place_batch(dynamic, batch_mesh)
    signature = None
    if cache:
        leaves, treedef = jax.tree_util.tree_flatten(dynamic)
        shapes = tuple((np.shape(leaf), str(getattr(leaf, "dtype", type(leaf)))) for leaf in leaves)
        signature = (jitted, tuple(sorted(static.items())), treedef, shapes)
    start = time.perf_counter()
    reused = signature in _COMPILED
    if reused:
        compiled = _COMPILED[signature]
    else:
        if isinstance(jitted, CachedProgram):  # read from the store of traced programs when it is on
            compiled = jitted.compile(**static, **dynamic)
        else:
            compiled = jitted.lower(**static, **dynamic).compile()
        if cache:
            _COMPILED[signature] = compiled
    compiled_at = time.perf_counter()
    output = jax.block_until_ready(compiled(**dynamic))
    run_seconds = time.perf_counter() - compiled_at
    if batch_mesh is not None:
        from mtl_jax.infer.sharding import gather_batch

        output = gather_batch(output, size)
    return TimedRun(
        output=output,
        compile_seconds=compiled_at - start,
        run_seconds=run_seconds,
        compiled=compiled,
        reused=reused,
    )


def median_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` runs of ``run()`` after an untimed warm-up; and its last output.

    Each run blocks until its JAX outputs are ready. (A jitted function's warm-up is cheap
    once it has been compiled and run by :func:`compile_and_run`.)
    """
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def cpu_threads() -> int:
    """The cores this process may run on (what XLA's CPU thread pool uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on a shared machine skews the timings)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None
