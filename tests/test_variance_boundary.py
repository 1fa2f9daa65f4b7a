"""A mixing variance at its boundary: the Laplace surrogate, EM reaching the floor and leaving it."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mtl_jax import MixtureGLMM, TaskData, fit
from mtl_jax.experiments.common import cast_floats
from mtl_jax.infer.em import em_fit
from mtl_jax.models.mixture_glmm.em import effects_surrogate


def quadrature_surrogate(cov, info, score):
    """``sum_i log E_{a ~ N(0, cov)} exp(u_i a - a I_i a / 2)`` on a tensor Gauss-Hermite grid."""
    r = cov.shape[0]
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    grid = np.stack(np.meshgrid(*[nodes] * r, indexing="ij"), -1).reshape(-1, r)  # standard normal nodes
    w = np.prod(np.stack(np.meshgrid(*[weights] * r, indexing="ij"), -1).reshape(-1, r), axis=1)
    w = w / w.sum()
    a = grid @ np.linalg.cholesky(cov).T
    total = 0.0
    for u, inf in zip(score, info):
        exponent = a @ u - 0.5 * np.einsum("nk,kl,nl->n", a, inf, a)
        top = exponent.max()
        total += top + np.log(np.sum(w * np.exp(exponent - top)))
    return total


@pytest.mark.parametrize("r", [1, 2])
def test_effects_surrogate_matches_quadrature_and_its_modes(r):
    rng = np.random.default_rng(r)
    K = 5
    roots = rng.normal(size=(K, r, r))
    info = roots @ np.swapaxes(roots, 1, 2) + 0.3 * np.eye(r)
    score = rng.normal(size=(K, r))
    for cov in [0.7 * np.eye(r) + 0.2, 1e-6 * np.eye(r)]:
        value, mode = effects_surrogate(jnp.asarray(cov), jnp.asarray(info), jnp.asarray(score))
        np.testing.assert_allclose(float(value), quadrature_surrogate(cov, info, score), rtol=1e-8, atol=1e-10)
        expected_mode = np.linalg.solve(np.linalg.inv(cov) + info, score[..., None])[..., 0]
        np.testing.assert_allclose(np.asarray(mode), expected_mode, rtol=1e-7, atol=1e-12)


def mixture_frame(mixing_sd: float | None, seed: int = 0, K: int = 30, n: int = 40) -> pd.DataFrame:
    """Two well separated regression components; task ``i`` picks component 1 with logit ``a_i``.

    ``mixing_sd=None``: every task has exactly half its rows in each component, less spread
    than binomial sampling gives, so the mixing variance's estimate is at its boundary 0.
    """
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(K), n)
    x = rng.normal(size=K * n)
    if mixing_sd is None:
        first = np.arange(K * n) % 2 == 0
    else:
        logit = mixing_sd * rng.normal(size=K)[task]
        first = rng.random(K * n) < 1.0 / (1.0 + np.exp(-logit))
    y = np.where(first, 2.0 + x, -2.0 - 0.5 * x) + 0.5 * rng.normal(size=K * n)
    return pd.DataFrame({"task": [f"s{i}" for i in task], "x": x, "y": y})


def encode(frame: pd.DataFrame) -> TaskData:
    return TaskData.from_dataframe(frame, task="task", response="y", covariates=["x"])


MODEL = MixtureGLMM(2, component_random_effects=False)


def test_em_converges_at_the_boundary_and_reports_it():
    """No task effect on the mixing: EM stops at the floor (it used to creep towards 0 without converging)."""
    result = fit(MODEL, encode(mixture_frame(None)), "em", seed=0, n_init=2, max_iter=400)
    assert result.converged
    np.testing.assert_allclose(np.asarray(result.params.mixing_cov), MODEL.variance_floor, rtol=1e-12)
    assert any("lambda[1] is at its boundary" in w for w in result.warnings)


def test_em_leaves_the_floor_when_the_data_want_a_mixing_variance():
    """Started at the floor on data with a large mixing variance, EM reaches the same interior fit as from 1."""
    design = MODEL.design(encode(mixture_frame(1.5)))
    free = em_fit(MODEL, design, jax.random.key(0), n_init=1, max_iter=1000)
    start = MODEL.init(jax.random.key(0), design)
    floored = start._replace(mixing_cov=jnp.full_like(start.mixing_cov, MODEL.variance_floor))
    escaped = em_fit(MODEL, design, jax.random.key(0), n_init=1, max_iter=1000, init_params=floored)
    assert bool(free.converged) and bool(escaped.converged)
    lam_free, lam_escaped = float(free.params.mixing_cov[0, 0]), float(escaped.params.mixing_cov[0, 0])
    assert lam_free > 0.5
    np.testing.assert_allclose(lam_escaped, lam_free, rtol=1e-4)
    np.testing.assert_allclose(float(escaped.loglik), float(free.loglik), rtol=1e-9)


def test_float32_fit_reaches_the_same_boundary():
    """The boundary comparison holds in float32 (the surrogate is computed through Cholesky factors of Lambda)."""
    design = cast_floats(MODEL.design(encode(mixture_frame(None))), jnp.float32)
    result = em_fit(MODEL, design, jax.random.key(0), n_init=2, max_iter=400)
    assert bool(result.converged) and result.params.mixing_cov.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(result.params.mixing_cov), MODEL.variance_floor, rtol=1e-6)
