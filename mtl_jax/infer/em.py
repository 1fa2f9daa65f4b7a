"""EM as a pure ``init`` / ``step`` loop inside ``lax.while_loop``, for any model.

A model supplies ``init(key, design) -> params``, ``em_step(params, design) -> (params,
objective_at_old_params)`` and ``score(params, design)`` (see
:mod:`mtl_jax.models.protocol`). The whole fit, restarts included, is one jittable
function of ``(design, key)``, so it vmaps over simulation replicates and shards over
devices. The loop watches the model's objective, which must converge (not drift) at a
boundary of the parameter space; a non-finite objective stops it without convergence.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from mtl_jax.infer.results import BackendResult
from mtl_jax.infer.sharding import constrain_rows, constrain_tasks, device_mesh, resolve_devices, to_host


class EMState(NamedTuple):
    """Loop state.

    Attributes:
        params: current parameter pytree.
        iteration: number of EM steps taken.
        previous: objective before the last step (``-inf`` at the start).
        trace: ``[max_iter]`` objective per iteration, NaN past the last one.
        converged: whether the relative change fell below the tolerance.
    """

    params: Any
    iteration: Int[Array, ""]
    previous: Float[Array, ""]
    trace: Float[Array, " max_iter"]
    converged: Bool[Array, ""]


class EMResult(NamedTuple):
    """Output of :func:`run_em` / :func:`em_fit` (leading restart axis removed)."""

    params: Any
    loglik: Float[Array, ""]
    trace: Float[Array, " max_iter"]
    n_iter: Int[Array, ""]
    converged: Bool[Array, ""]
    restart_logliks: Float[Array, " n_init"]
    restart_params: Any = None


def run_em(step, params, *, max_iter: int, tol: float, watch=None) -> EMState:
    """Iterate ``params, objective = step(params)`` until both the objective and the parameters settle.

    Converged when ``|L_c - L_{c-1}| <= tol * |L_{c-1}|`` and every watched leaf moved by
    at most ``sqrt(tol)`` relative to its size, ``max|d theta| <= sqrt(tol) max(max|theta|, sqrt(eps))``
    (``watch(params)`` picks the leaves, e.g. the model's population-level parameters;
    default all). The objective alone can stop too early in float32, where the change of
    a sum over many rows drowns in rounding while a variance still moves; the parameter
    test alone would never stop a variance creeping to its floor, whose relative change
    per iteration is tiny but constant. ``tol`` is raised to ``10 * eps`` of the
    parameters' dtype (about ``1.2e-6`` in float32). Stops at ``max_iter`` steps; a
    non-finite objective or non-finite parameters stop the loop without convergence.
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    tol = max(tol, 10 * float(jnp.finfo(dtype).eps))
    param_tol = tol**0.5
    watch = watch or (lambda tree: tree)

    def moved(old, new):
        """Largest relative change over the watched leaves."""
        pairs = zip(jax.tree_util.tree_leaves(watch(old)), jax.tree_util.tree_leaves(watch(new)))
        floor = jnp.sqrt(jnp.finfo(dtype).eps)  # a leaf at zero (balanced classes: v = 0) moves by rounding only
        changes = [jnp.max(jnp.abs(b - a)) / jnp.maximum(jnp.max(jnp.abs(b)), floor) for a, b in pairs if a.size]
        return jnp.max(jnp.asarray(changes)) if changes else jnp.zeros((), dtype)

    def body(state: EMState) -> EMState:
        new_params, objective = step(state.params)
        change = jnp.abs(objective - state.previous)
        finite = jnp.isfinite(objective) & jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(new_params)]))
        settled = (change <= tol * jnp.abs(state.previous)) & (moved(state.params, new_params) <= param_tol)
        converged = (state.iteration > 0) & settled & finite
        objective = jnp.where(finite, objective, jnp.nan)
        return EMState(
            params=new_params,
            iteration=state.iteration + 1,
            previous=objective,
            trace=state.trace.at[state.iteration].set(objective),
            converged=converged,
        )

    def keep_going(state: EMState):
        return (~state.converged) & (state.iteration < max_iter) & ~jnp.isnan(state.previous)

    start = EMState(
        params=params,
        iteration=jnp.zeros((), jnp.int32),
        previous=jnp.asarray(-jnp.inf, dtype),
        trace=jnp.full((max_iter,), jnp.nan, dtype),
        converged=jnp.zeros((), bool),
    )
    return jax.lax.while_loop(keep_going, body, start)


@functools.partial(
    jax.jit, static_argnames=("model", "n_init", "max_iter", "tol", "mesh")
)
def em_fit(
    model,
    design,
    key: Array,
    *,
    n_init: int = 4,
    max_iter: int = 500,
    tol: float = 1e-8,
    init_params=None,
    mesh: Mesh | None = None,
) -> EMResult:
    """Fit ``model`` by EM from ``n_init`` random starts (vmapped); keep the best.

    Args:
        model: a static model description with ``init``, ``em_step`` and ``score``.
        design: the model's array pytree.
        key: PRNG key for the random starts.
        n_init: number of random restarts, run in parallel with ``vmap``.
        max_iter, tol: EM stopping rule (relative change of the objective).
        init_params: optional start; when given, it is used for every restart
            (``n_init`` is then best left at 1).
        mesh: a 1-D device mesh (:func:`mtl_jax.infer.sharding.device_mesh`) to shard the
            tasks over: the design's rows and the per-task parameters are split along it at
            every EM step, the population-level parameters replicated
            (:func:`~mtl_jax.infer.sharding.constrain_tasks`); XLA inserts the cross-task
            reductions. The result equals the unsharded fit up to rounding. ``None``: one device.

    Returns:
        The restart with the largest score (non-finite scores never win); every
        restart's end point is kept in ``restart_params``.
    """

    sharded = mesh is not None and mesh.size > 1
    if sharded:
        design = constrain_rows(design, model.num_observations(design), mesh)

    def step(prm, design):
        if not sharded:
            return model.em_step(prm, design)
        new, objective = model.em_step(constrain_tasks(model, prm, mesh), design)
        return constrain_tasks(model, new, mesh), objective

    def one_start(start_key):
        params = model.init(start_key, design) if init_params is None else init_params
        state = run_em(lambda prm: step(prm, design), params, max_iter=max_iter, tol=tol,
                       watch=getattr(model, "population", None))
        loglik = model.score(state.params, design)
        return state, loglik

    states, logliks = jax.vmap(one_start)(jax.random.split(key, n_init))
    ranked = jnp.where(jnp.isfinite(logliks), logliks, -jnp.inf)
    best = jnp.argmax(ranked)
    state = jax.tree_util.tree_map(lambda leaf: leaf[best], states)
    if sharded:
        state = state._replace(params=constrain_tasks(model, state.params, mesh))
    return EMResult(
        params=state.params,
        loglik=logliks[best],
        trace=state.trace,
        n_iter=state.iteration,
        converged=state.converged,
        restart_logliks=logliks,
        restart_params=states.params,
    )


def run_em_backend(model, design, key, *, n_init: int = 4, max_iter: int = 500, tol: float = 1e-8,
                   init_params=None, devices: int = 1) -> BackendResult:
    """EM through the model's ``init`` / ``em_step`` / ``score`` (see :func:`em_fit`).

    ``devices > 1`` shards the tasks over that many devices (``em_fit``'s ``mesh``).
    """
    mesh = device_mesh(devices) if resolve_devices(devices) > 1 else None
    result = em_fit(model, design, key, n_init=n_init, max_iter=max_iter, tol=tol, init_params=init_params,
                    mesh=mesh)
    if mesh is not None:  # every process gets the whole result
        result = to_host(result._replace(restart_params=None))
    n_iter = int(result.n_iter)
    return BackendResult(
        params=jax.tree_util.tree_map(np.asarray, result.params),
        converged=bool(result.converged),
        n_iter=n_iter,
        trace=np.asarray(result.trace)[:n_iter],
        diagnostics={"restart_logliks": np.asarray(result.restart_logliks)},
        loglik=float(result.loglik),
    )


CLI_OPTIONS = (
    ("--n-init", dict(type=int, metavar="N", help="EM random restarts (default 4)")),
    ("--max-iter", dict(type=int, metavar="N", help="EM iteration limit (default 500)")),
    ("--tol", dict(type=float, metavar="TOL", help="EM relative tolerance (default 1e-8, floored at 10 eps)")),
    ("--devices", dict(type=int, metavar="N", help="shard the tasks over N devices (default 1; for very many "
                                                   "tasks; jax.device_count() says how many there are)")),
)
"""Command-line options of :func:`run_em_backend`."""
