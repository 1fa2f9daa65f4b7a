"""EM as a pure ``init`` / ``step`` loop inside ``lax.while_loop``.

A model supplies ``init(key, design) -> params``, ``em_step(params, design) -> (params,
objective_at_old_params)`` and ``marginal_log_likelihood(params, design)``. The whole fit,
restarts included, is one jittable function of ``(design, key)``, so it vmaps over
simulation replicates and shards over devices.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


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


def run_em(step, params, *, max_iter: int, tol: float) -> EMState:
    """Iterate ``params, objective = step(params)`` until the objective settles.

    Converged when ``|L_c - L_{c-1}| <= tol * |L_{c-1}|``; stops at ``max_iter`` steps.
    A non-finite objective stops the loop without convergence. ``tol`` is raised to
    ``10 * eps`` of the parameters' dtype (about ``1.2e-6`` in float32): a smaller relative
    change is below what the sum over observations resolves.
    """
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    tol = max(tol, 10 * float(jnp.finfo(dtype).eps))

    def body(state: EMState) -> EMState:
        new_params, objective = step(state.params)
        change = jnp.abs(objective - state.previous)
        converged = (state.iteration > 0) & (change <= tol * jnp.abs(state.previous))
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
    jax.jit, static_argnames=("model", "n_init", "max_iter", "tol", "update_variance_components")
)
def em_fit(
    model,
    design,
    key: Array,
    *,
    n_init: int = 4,
    max_iter: int = 500,
    tol: float = 1e-8,
    update_variance_components: bool = True,
    init_params=None,
) -> EMResult:
    """Fit ``model`` by EM from ``n_init`` random starts (vmapped); keep the best.

    Args:
        model: a static model description with ``init``, ``em_step`` and
            ``marginal_log_likelihood``.
        design: the model's array pytree.
        key: PRNG key for the random starts.
        n_init: number of random restarts, run in parallel with ``vmap``.
        max_iter, tol: EM stopping rule (relative change of the objective).
        update_variance_components: ``False`` holds the variance components at
            their initial values.
        init_params: optional start; when given, it is used for every restart
            (``n_init`` is then best left at 1).

    Returns:
        The restart with the largest marginal log-likelihood.
    """

    def one_start(start_key):
        params = model.init(start_key, design) if init_params is None else init_params
        step = functools.partial(
            model.em_step, design=design, update_variance_components=update_variance_components
        )
        state = run_em(step, params, max_iter=max_iter, tol=tol)
        loglik = model.marginal_log_likelihood(state.params, design)
        return state, loglik

    states, logliks = jax.vmap(one_start)(jax.random.split(key, n_init))
    ranked = jnp.where(jnp.isfinite(logliks), logliks, -jnp.inf)
    best = jnp.argmax(ranked)
    state = jax.tree_util.tree_map(lambda leaf: leaf[best], states)
    return EMResult(
        params=state.params,
        loglik=logliks[best],
        trace=state.trace,
        n_iter=state.iteration,
        converged=state.converged,
        restart_logliks=logliks,
    )
