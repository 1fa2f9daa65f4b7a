"""SQUAREM in the generic EM loop: a linear EM map with a known fixed point and rate, a
linear mixed model whose variance-component EM crawls, and the HBLR's VB sweeps.

Against plain EM: the same fixed point, fewer EM steps (counts measured once, asserted
with margin), monotone traces, vmapped restarts, rejected extrapolations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import fit
from mtl_jax.cli import _backend_options, _parser
from mtl_jax.data.personal import PersonData
from mtl_jax.infer.em import em_fit, run_em
from mtl_jax.models.hblr import HBLR
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM

TRUTH = jnp.array([1.0, 2.0])
RATES = jnp.array([0.995, 0.3])  # the slow mode: a fraction 0.995 of missing information


def linear_step(theta):
    """A linear EM map ``F(theta) = theta* + diag(RATES)(theta - theta*)`` and a concave
    objective at the old point (level -10, so that its relative change is meaningful)."""
    return TRUTH + RATES * (theta - TRUTH), -10.0 - 0.5 * jnp.sum((theta - TRUTH) ** 2)


def monotone(trace):
    trace = np.asarray(trace)
    return np.all(np.diff(trace) >= -1e-12 * np.abs(trace[1:]))


def test_linear_map_plain_em_crawls_and_squarem_lands_on_the_fixed_point():
    start = jnp.zeros(2)
    plain = jax.jit(lambda: run_em(linear_step, start, max_iter=5000, tol=1e-10))()
    fast = jax.jit(lambda: run_em(linear_step, start, max_iter=5000, tol=1e-10, acceleration="squarem"))()
    assert bool(plain.converged) and bool(fast.converged)
    # Plain EM stops once a step raises the objective by <= 1e-10 * 10: from a distance
    # d = 0.995^k, by (1 - 0.995^2) d^2 / 2 <= 1e-9, d <= 4.5e-4, k >= 1540 steps; it then
    # still lies about d = 4.4e-4 from theta*, where SQUAREM gets within 1e-6.
    assert int(plain.iteration) >= 1500
    assert 2e-4 < float(jnp.max(jnp.abs(plain.params - TRUTH))) < 1e-3
    # One SQUAREM cycle removes a mode of rate lambda exactly (alpha = 1/(1 - lambda) = 200)
    # once the step bound (1, 4, 16, ...) allows it; measured 34 EM steps in 12 cycles,
    # ending 4.9e-7 from theta*.
    assert int(fast.iteration) <= 45 and int(fast.cycles) < int(fast.iteration)
    assert float(jnp.max(jnp.abs(fast.params - TRUTH))) < 1e-5
    assert monotone(fast.trace[: int(fast.cycles)])


def test_worse_and_invalid_extrapolations_fall_back_to_plain_em():
    """An objective that punishes the fast coordinate's error, which the extrapolation
    amplifies by ``(1 - alpha (1 - 0.3))^2``: extrapolations whose stabilised point is worse
    are rejected (measured 58 of 119 cycles, 413 EM steps); then a ``valid`` that excludes the
    neighbourhood of the fixed point: no extrapolation lands there (measured 92 rejections).
    Either way the fit converges like plain EM and the trace stays monotone."""

    def step(theta):
        new, objective = linear_step(theta)
        return new, objective - 1e3 * jnp.abs(theta[1] - TRUTH[1])

    start = jnp.zeros(2)
    for valid in (None, lambda theta: theta[0] <= 0.999):
        run = jax.jit(lambda: run_em(step, start, max_iter=5000, tol=1e-10, acceleration="squarem",
                                     valid=valid))()
        trace = run.trace[: int(run.cycles)]
        assert bool(run.converged) and int(run.rejected) >= 20 and int(run.iteration) < 1500
        assert monotone(trace) and bool(jnp.all(jnp.isfinite(trace)))
        assert float(jnp.max(jnp.abs(run.params - TRUTH))) < 1e-3
    with pytest.raises(ValueError, match="acceleration"):
        run_em(linear_step, start, max_iter=10, tol=1e-8, acceleration="anderson")


def lmm_design(K=60, m=5, phi=0.15, seed=0):
    """A random-intercept LMM, 5 rows per task and a small task variance: REML's EM crawls."""
    rng = np.random.default_rng(seed)
    n = K * m
    task = np.arange(n) % K
    x = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = x @ np.array([1.0, 0.5]) + rng.normal(size=K)[task] * phi**0.5 + rng.normal(size=n)
    return MixtureDesign(y=jnp.asarray(y[:, None]), x_comp=jnp.asarray(x), x_mix=jnp.asarray(x),
                         task=jnp.asarray(task, dtype=jnp.int32), num_tasks=K)


def test_mixture_glmm_squarem_reaches_plain_em_fixed_point_in_fewer_steps_with_restarts():
    model, design = MixtureGLMM(1), lmm_design()
    plain = em_fit(model, design, jax.random.key(0), n_init=1, max_iter=1000, tol=1e-10)
    fast = em_fit(model, design, jax.random.key(0), n_init=3, max_iter=1000, tol=1e-10, acceleration="squarem")
    assert bool(plain.converged) and bool(fast.converged)
    # measured: plain EM 87 steps, SQUAREM 29 EM steps (12 accepted cycles)
    assert int(plain.n_iter) >= 70 and int(fast.n_iter) <= 45
    for name in ("component_coef", "component_cov", "component_effects_cov", "component_effects"):
        np.testing.assert_allclose(getattr(fast.params, name), getattr(plain.params, name), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fast.loglik, plain.loglik, rtol=1e-10)
    # every vmapped restart converges to the same (unique) REML point
    np.testing.assert_allclose(fast.restart_logliks, plain.loglik, rtol=1e-10)
    assert monotone(plain.trace[: int(plain.n_iter)]) and monotone(fast.trace[: int(fast.n_cycles)])


def test_hblr_vb_squarem_through_fit_and_the_command_line():
    from test_hblr import cluster_frame

    data = PersonData.from_dataframe(cluster_frame(), person="user", split="split")
    plain = fit(HBLR(), data, method="vb", n_init=1, tol=1e-12)
    fast = fit(HBLR(), data, method="vb", n_init=1, tol=1e-12, acceleration="squarem")
    assert plain.converged and fast.converged
    # measured: 51 sweeps plain, 23 with SQUAREM (9 accepted cycles)
    assert plain.n_iter >= 45 and fast.n_iter <= 35
    assert fast.diagnostics["cycles"] == len(fast.trace) < fast.n_iter
    np.testing.assert_allclose(fast.loglik, plain.loglik, rtol=1e-11)
    np.testing.assert_allclose(fast.params.mean, plain.params.mean, atol=1e-5)
    np.testing.assert_allclose(fast.params.membership, plain.params.membership, atol=1e-5)
    assert monotone(fast.trace)
    args = _parser("hblr").parse_args(["fit", "data.csv", "--model", "hblr", "--method", "vb",
                                       "--acceleration", "squarem", "--out", "fit.json"])
    assert _backend_options(args)["acceleration"] == "squarem"
