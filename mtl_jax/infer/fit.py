"""``fit(model, data, method=...)``: one call, any backend, one :class:`Fit`.

A backend is a function ``(model, design, key, **options) -> BackendResult``. The
dispatcher encodes the data, times the backend, and scores the point estimate
uniformly (marginal log-likelihood and BIC), so fits from EM, SVI and NUTS compare
directly.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from mtl_jax.data import TaskData
from mtl_jax.infer.em import em_fit
from mtl_jax.infer.nuts import run_nuts_backend
from mtl_jax.infer.results import BackendResult, Fit
from mtl_jax.infer.svi import run_svi_backend
from mtl_jax.models.mixture_glmm import MixtureDesign
from mtl_jax.models.variance_components import (
    variance_component_covariance,
    variance_component_names,
)


def run_em_backend(
    model,
    design,
    key,
    *,
    n_init: int = 4,
    max_iter: int = 500,
    tol: float = 1e-8,
    update_variance_components: bool = True,
    init_params=None,
) -> BackendResult:
    """EM with BLUP and approximate-REML variance components (see :func:`em_fit`)."""
    result = em_fit(
        model,
        design,
        key,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        update_variance_components=update_variance_components,
        init_params=init_params,
    )
    n_iter = int(result.n_iter)
    return BackendResult(
        params=jax.tree_util.tree_map(np.asarray, result.params),
        converged=bool(result.converged),
        n_iter=n_iter,
        trace=np.asarray(result.trace)[:n_iter],
        diagnostics={"restart_logliks": np.asarray(result.restart_logliks)},
        loglik=float(result.loglik),
    )


BACKENDS: dict[str, Callable[..., BackendResult]] = {
    "em": run_em_backend,
    "svi": run_svi_backend,
    "nuts": run_nuts_backend,
}


def fit(model, data: TaskData | MixtureDesign, method: str = "em", *, seed: int = 0, **options) -> Fit:
    """Fit ``model`` to ``data`` with ``method`` in ``{"em", "svi", "nuts"}``.

    Args:
        model: a model description such as :class:`mtl_jax.MixtureGLMM`.
        data: a :class:`mtl_jax.data.TaskData` (or the model's raw design).
        method: inference backend.
        seed: seed of the PRNG key (random starts, SVI noise, NUTS).
        **options: passed to the backend, e.g. ``n_init``, ``max_iter``, ``tol`` for EM.

    Returns:
        A :class:`Fit`.
    """
    if method not in BACKENDS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(BACKENDS)}")
    if isinstance(data, TaskData):
        design = model.design(data)
        labels = dict(
            task_names=data.task_names,
            component_columns=tuple(data.columns[i] for i in data.columns_for(model.covariates)),
            mixing_columns=tuple(data.columns[i] for i in data.columns_for(model.mixing_covariates)),
            response_names=data.response_names,
            schema=data.schema,
        )
    else:
        design = data
        labels = dict(
            task_names=tuple(str(i) for i in range(design.num_tasks)),
            component_columns=tuple(f"x{i}" for i in range(design.x_comp.shape[1])),
            mixing_columns=tuple(f"x{i}" for i in range(design.x_mix.shape[1])),
            response_names=tuple(f"y{i}" for i in range(design.y.shape[1])),
            schema=None,
        )
    start = time.perf_counter()
    result = BACKENDS[method](model, design, jax.random.key(seed), **options)
    fitted = time.perf_counter()
    params = jax.tree_util.tree_map(lambda leaf: jax.numpy.asarray(leaf, design.y.dtype), result.params)
    loglik = result.loglik if result.loglik is not None else float(model.marginal_log_likelihood(params, design))
    bic = float(model.bic(loglik, design))
    diagnostics = dict(result.diagnostics)
    if method == "em" and (model.has_mixing_effects or model.component_random_effects):
        covariance = np.asarray(variance_component_covariance(model, params, design))
        names = variance_component_names(model, labels["response_names"])
        diagnostics["variance_component_cov"] = covariance
        diagnostics["variance_component_se"] = dict(zip(names, np.sqrt(np.diag(covariance)).tolist()))
    return Fit(
        model=model,
        method=method,
        params=jax.tree_util.tree_map(np.asarray, params),
        loglik=loglik,
        bic=bic,
        converged=result.converged,
        n_iter=result.n_iter,
        trace=result.trace,
        num_obs=int(design.y.shape[0]),
        draws=result.draws,
        diagnostics=diagnostics,
        timings={"fit": fitted - start, "score": time.perf_counter() - fitted},
        **labels,
    )
