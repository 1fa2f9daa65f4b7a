"""``fit(model, data, method=...)``: one call, any model, any backend, one :class:`Fit`.

A backend is a function ``(model, design, key, **options) -> BackendResult`` registered
in :data:`BACKENDS` with its command-line options in :data:`BACKEND_OPTIONS`. The
dispatcher checks that the model supports the method (its ``methods``), encodes the
data through the model, times the backend, scores the point estimate uniformly (the
model's ``score`` and BIC, so fits from EM, SVI and NUTS compare directly), adds the
model's standard errors to point fits and its per-task tables (``task_tables``) to every
fit, and runs the model's checks: every problem is a :class:`FitWarning`, and a fit that
is not numerically sound never says ``converged``.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.infer import em, nuts, optimize, svi
from mtl_jax.infer.compile_clock import CompileClock
from mtl_jax.infer.results import BackendResult, Fit, float_dtype, posterior_table
from mtl_jax.models.protocol import supports

BACKENDS: dict[str, Callable[..., BackendResult]] = {
    "em": em.run_em_backend,
    "vb": em.run_em_backend,  # closed-form variational Bayes: the same coordinate-ascent loop on an ELBO
    "svi": svi.run_svi_backend,
    "nuts": nuts.run_nuts_backend,
    "map": optimize.run_map_backend,
}
"""Backends by method name."""

BACKEND_OPTIONS = {("em", "vb"): em.CLI_OPTIONS, ("svi",): svi.CLI_OPTIONS, ("nuts",): nuts.CLI_OPTIONS,
                   ("map",): optimize.CLI_OPTIONS}
"""``(flag, argparse keywords)`` per backend option, for the command line, keyed by the
methods that take them (EM and VB run the same loop and share theirs)."""

#: R-hat (rank-normalised split, after relabelling) below which MCMC counts as converged.
MAX_R_HAT = 1.05


class FitWarning(UserWarning):
    """A fitted model has a problem (no convergence, a variance at its boundary, ...)."""


def fit(model, data, method: str = "em", *, seed: int = 0, standard_errors: bool = True, **options) -> Fit:
    """Fit ``model`` to ``data`` with ``method`` (one of the model's ``methods``).

    Args:
        model: a registered model description (see :mod:`mtl_jax.models.protocol`).
        data: a :class:`mtl_jax.data.TaskData` (or the model's raw design).
        method: inference backend, e.g. ``"em"``, ``"svi"``, ``"nuts"``.
        seed: seed of the PRNG key (random starts, SVI noise, NUTS).
        standard_errors: compute the model's asymptotic standard errors of a converged EM
            fit (``False`` skips them, e.g. when only the likelihood is wanted).
        **options: passed to the backend, e.g. ``n_init``, ``max_iter``, ``tol`` for EM.

    Returns:
        A :class:`Fit`; its ``warnings`` list every problem found (also issued as
        :class:`FitWarning`).

    Raises:
        ValueError: for a method the model does not support.
    """
    if method not in BACKENDS or not supports(model, method):
        offered = sorted(m for m in getattr(model, "methods", ()) if m in BACKENDS)
        raise ValueError(f"unknown method {method!r} for model {getattr(model, 'name', model)!r}; "
                         f"choose one of {offered}")
    design = model.design(data)
    labels = model.labels(data)
    with CompileClock() as fit_clock:
        result = BACKENDS[method](model, design, jax.random.key(seed), **options)
    with CompileClock() as score_clock:  # scoring, checks, standard errors and task tables
        dtype = float_dtype(design)
        params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, dtype), result.params)
        loglik = result.loglik if result.loglik is not None else float(model.score(params, design))
        num_obs = int(model.num_observations(design))
        bic = -2.0 * loglik + model.num_parameters(design) * math.log(num_obs)
        diagnostics = dict(result.diagnostics)
        problems = []
        if not result.converged:
            problems.append(f"{method} did not converge (n_iter {result.n_iter})")
        if not math.isfinite(loglik):
            problems.append("the log-likelihood is not finite at the estimate (the Laplace mode was not reached or "
                            "a task's Hessian is not negative definite)")
        if hasattr(model, "check"):
            problems += model.check(params, design, labels)
        converged = bool(result.converged) and math.isfinite(loglik)
        if result.draws is not None and not result.iid_draws:
            r_hat = posterior_table(model, result.draws, labels, iid_draws=False)["r_hat"].to_numpy(dtype=float)
            max_r_hat = float(np.nanmax(r_hat)) if np.isfinite(r_hat).any() else float("nan")
            diagnostics["max_r_hat"] = max_r_hat
            if not max_r_hat < MAX_R_HAT:
                problems.append(f"max R-hat {max_r_hat:.3f} >= {MAX_R_HAT}: the chains have not mixed")
            converged = converged and max_r_hat < MAX_R_HAT
        if standard_errors and method == "em" and hasattr(model, "standard_errors") and converged:
            diagnostics["standard_errors"] = model.standard_errors(params, design, labels)
            undefined = sorted(name for name, value in diagnostics["standard_errors"].items() if not math.isfinite(value))
            if undefined:
                problems.append(f"standard errors undefined for {undefined[:6]}{' ...' if len(undefined) > 6 else ''}: "
                                "the observed information is not positive definite at this point")
        task_tables = model.task_tables(params, design, labels) if hasattr(model, "task_tables") else {}
    for problem in problems:
        warnings.warn(problem, FitWarning, stacklevel=2)
    return Fit(
        model=model,
        method=method,
        params=jax.tree_util.tree_map(np.asarray, params),
        loglik=float(loglik),
        bic=float(bic),
        converged=converged,
        n_iter=result.n_iter,
        trace=result.trace,
        labels=labels,
        schema=getattr(data, "schema", None),
        num_obs=num_obs,
        draws=result.draws,
        iid_draws=result.iid_draws,
        task_tables=task_tables,
        diagnostics=diagnostics,
        warnings=problems,
        timings={"fit": fit_clock.seconds, "score": score_clock.seconds,
                 "compile": fit_clock.compile_seconds + score_clock.compile_seconds,
                 "run": fit_clock.run_seconds + score_clock.run_seconds},
    )
