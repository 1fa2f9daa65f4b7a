"""float32 EM on the GLMM families in hard regimes, against float64 on the same data.

float32 is JAX's default dtype, so the float32 fits here run with 64-bit types switched
off (``jax.enable_x64(False)``: the configuration of a fresh process, where no float64
can appear anywhere), and the float64 fits with them on. Every regime is a ``g = 1`` GLMM
with task random effects, 30 tasks of 20 rows, ``x = (1, N(0, 1))``, fitted by
``mtl_jax.fit(..., "em")`` from the same (deterministic, ``g = 1``) start:

* Poisson with large counts: ``log mu = 7 + 0.3 x + b_i + log exposure`` (counts ~ 1100),
  ``phi = 0.1``;
* binomial with 200 trials and ``p ~ 0.02``: ``logit p = logit(0.02) + 0.3 x + b_i``, ``phi = 0.2``;
* Bernoulli with a random-effect variance near zero (``phi = 0.01``): its estimate is at
  the boundary;
* Gaussian random intercept and slope, ``y = 1000 + 0.5 x + b_i0 + b_i1 x + N(0, 0.01^2)``.

Tolerances: coefficients ``1e-3`` relative; variances ``2e-3`` relative, because float32
EM stops at a tolerance floored at ``10 eps`` (its parameter test is then ``sqrt(1.2e-6)
~ 1.1e-3`` relative per step; the binomial ``phi`` stops ``5.5e-4`` from float64's);
log-likelihoods ``1e-3`` nats per row, the measure of ``benchmarks/float32_grid.py``
(Gaussian: float32 resolves ``y ~ 1000`` to ``6e-5``, 0.6% of ``sigma``, and its
marginal of a task goes through ``V_i = Z Phi Z^T + sigma^2 I`` with condition number
``~ 2e5``; measured ``2.8e-4`` nats per row).

Regressions guarded here (each was a failure before its fix):

* The Gaussian regime at the default ``variance_floor = 1e-6``: the fixed-effect ridge was
  ``delta n max(Sigma^-1)``, not small next to the intercept's marginal information
  ``K / phi`` when ``n_i phi / sigma^2`` is large, and EM converged (in both precisions) to
  intercept 0.005 with ``phi_00 = 1e6``. The ridge is now in units of the data's second
  moment.
* The Bernoulli variance crawled to its floor (EM's relative change per step is
  proportional to ``phi``) and float32 declared convergence at ``phi = 2.9e-3``; a scalar
  component variance now steps to the boundary when the Laplace surrogate prefers it.
* Bernoulli/binomial data in float32 with 64-bit types on crashed EM
  (``Family.log_density`` returned float64).
"""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax
from mtl_jax.infer.fit import FitWarning
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM

NUM_TASKS, ROWS = 30, 20
COEF_RTOL, VARIANCE_RTOL, LOGLIK_PER_ROW = 1e-3, 2e-3, 1e-3


def regime_data(regime: str, seed: int = 0):
    """``(model, arrays)``: the regime's model and its design as float64 NumPy arrays (``y [n, 1]``)."""
    rng = np.random.default_rng(seed)
    n = NUM_TASKS * ROWS
    task = np.repeat(np.arange(NUM_TASKS), ROWS)
    x1 = rng.normal(size=n)
    x = np.column_stack([np.ones(n), x1])
    arrays = {"x_comp": x, "x_mix": x[:, :1], "task": task.astype(np.int32)}
    if regime == "poisson-large-counts":
        log_exposure = np.log(rng.uniform(0.5, 2.0, n))
        b = rng.normal(0, math.sqrt(0.1), NUM_TASKS)
        y = rng.poisson(np.exp(7.0 + 0.3 * x1 + b[task] + log_exposure))
        arrays["offset"] = log_exposure
        model = MixtureGLMM(1, family="poisson")
    elif regime == "binomial-200-trials-rare":
        b = rng.normal(0, math.sqrt(0.2), NUM_TASKS)
        eta = math.log(0.02 / 0.98) + 0.3 * x1 + b[task]
        y = rng.binomial(200, 1 / (1 + np.exp(-eta)))
        arrays["trials"] = np.full(n, 200.0)
        model = MixtureGLMM(1, family="binomial")
    elif regime == "bernoulli-phi-near-zero":
        b = rng.normal(0, math.sqrt(0.01), NUM_TASKS)
        y = rng.binomial(1, 1 / (1 + np.exp(-(0.2 + 0.8 * x1 + b[task]))))
        model = MixtureGLMM(1, family="bernoulli")
    elif regime == "gaussian-slope-small-noise":
        b = rng.multivariate_normal(np.zeros(2), [[1.0, 0.1], [0.1, 0.04]], NUM_TASKS)
        y = x @ [1000.0, 0.5] + np.einsum("nk,nk->n", x, b[task]) + 0.01 * rng.normal(size=n)
        arrays["z_comp"] = x
        model = MixtureGLMM(1, random_slopes=("x1",), variance_floor=1e-12)  # see the module docstring
    else:
        raise ValueError(regime)
    arrays["y"] = np.asarray(y, float)[:, None]
    return model, arrays


def fit_em(model, arrays, dtype, *, max_iter=1000):
    """EM through ``mtl_jax.fit`` on the arrays cast to ``dtype``, with 64-bit types on only for float64."""
    with jax.enable_x64(dtype == jnp.float64):
        design = MixtureDesign(**{name: jnp.asarray(a, dtype if a.dtype.kind == "f" else jnp.int32)
                                  for name, a in arrays.items()}, num_tasks=NUM_TASKS)
        fitted = mtl_jax.fit(model, design, "em", seed=0, n_init=1, max_iter=max_iter, standard_errors=False)
    assert fitted.params.component_coef.dtype == dtype
    return fitted


def relative_gaps(fit32, fit64):
    """``{name: |a32 - a64| / |a64|}`` over the named population parameters."""
    est32, est64 = fit32.named_parameters(), fit64.named_parameters()
    assert est32.keys() == est64.keys()
    return {name: abs(float(est32[name]) - float(est64[name])) / abs(float(est64[name])) for name in est64}


@pytest.fixture(scope="module")
def fits():
    """``fits(regime) -> (model, fit64, fit32)``, each regime fitted once per module."""
    cache = {}

    def get(regime):
        if regime not in cache:
            model, arrays = regime_data(regime)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FitWarning)  # kept in each fit's .warnings
                cache[regime] = model, fit_em(model, arrays, jnp.float64), fit_em(model, arrays, jnp.float32)
        return cache[regime]

    return get


@pytest.mark.parametrize("regime", ["poisson-large-counts", "binomial-200-trials-rare", "gaussian-slope-small-noise"])
def test_float32_matches_float64_and_says_converged(fits, regime):
    """Both precisions converge to the same point, without warnings.

    Measured float32-vs-float64 gaps (largest relative over coefficients / over variances /
    log-likelihood in nats per row): Poisson 9.2e-8 / 1.2e-5 / 1.2e-4; binomial 1.3e-5 /
    5.5e-4 / 7.1e-5; Gaussian 3.0e-7 / 3.4e-5 / 2.8e-4. Iterations float64 / float32:
    6 / 5, 8 / 5, 9 / 36.
    """
    _, fit64, fit32 = fits(regime)
    assert fit64.converged and fit32.converged
    assert not fit64.warnings and not fit32.warnings
    gaps = relative_gaps(fit32, fit64)
    coefficients = {name: gap for name, gap in gaps.items() if name.startswith("w[")}
    variances = {name: gap for name, gap in gaps.items() if not name.startswith("w[")}
    assert len(coefficients) == 2 and variances
    assert max(coefficients.values()) < COEF_RTOL, coefficients
    assert max(variances.values()) < VARIANCE_RTOL, variances
    assert abs(fit32.loglik - fit64.loglik) < LOGLIK_PER_ROW * fit64.num_obs, (fit32.loglik, fit64.loglik)
    if regime == "gaussian-slope-small-noise":
        # The fit is the right one, not just the same in both precisions: the intercept is
        # within 3 standard errors (sqrt(phi_00 / K) ~ 0.18) of 1000 and sigma2 near 1e-4.
        est = fit32.named_parameters()
        assert abs(float(est["w[1, x0]"]) - 1000.0) < 3 * math.sqrt(1.0 / NUM_TASKS)
        assert 0.8e-4 < float(est["sigma2[1]"]) < 1.2e-4


def test_bernoulli_boundary_variance_agrees(fits):
    """Variance near zero: fixed effects to 1e-3, ``phi`` to 5e-3 absolute, log-likelihood as above.

    The variance's estimate is at its boundary, where the likelihood is flat in ``phi``
    (float64 after 1000 steps: ``phi = 2.0e-3``, still falling, not converged; float32
    stops at ``2.9e-3``; the two log-likelihoods differ by 0.008 nats), so ``phi`` is
    compared on its scale (1, the link scale) rather than relative to its own tiny size.
    Measured: coefficients 1.0e-4, 1.1e-4 relative; ``|phi32 - phi64| = 9.0e-4``;
    log-likelihood 1.3e-5 nats per row.
    """
    _, fit64, fit32 = fits("bernoulli-phi-near-zero")
    gaps = relative_gaps(fit32, fit64)
    assert max(gaps["w[1, x0]"], gaps["w[1, x1]"]) < COEF_RTOL, gaps
    phi32, phi64 = (float(fit.params.component_effects_cov[0, 0, 0]) for fit in (fit32, fit64))
    assert phi64 < 0.01 and abs(phi32 - phi64) < 5e-3, (phi32, phi64)
    assert abs(fit32.loglik - fit64.loglik) < LOGLIK_PER_ROW * fit64.num_obs, (fit32.loglik, fit64.loglik)


def test_float32_says_converged_only_at_the_boundary(fits):
    model, _, fit32 = fits("bernoulli-phi-near-zero")
    phi32 = float(fit32.params.component_effects_cov[0, 0, 0])
    assert fit32.converged and phi32 <= 10 * model.variance_floor, (fit32.converged, fit32.n_iter, phi32)


def test_gaussian_default_floor_float32_converges_only_when_right(fits):
    model, reference, _ = fits("gaussian-slope-small-noise")  # variance_floor = 1e-12: the ridge is negligible
    _, arrays = regime_data("gaussian-slope-small-noise")
    default = dataclasses.replace(model, variance_floor=MixtureGLMM(1).variance_floor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        fit32 = fit_em(default, arrays, jnp.float32, max_iter=3000)
    w32, w64 = float(fit32.params.component_coef[0, 0, 0]), float(reference.params.component_coef[0, 0, 0])
    assert fit32.converged and abs(w32 - w64) < 1e-5 * abs(w64), (fit32.n_iter, w32, w64)


@pytest.mark.parametrize("regime", ["bernoulli-phi-near-zero", "binomial-200-trials-rare"])
def test_float32_data_with_x64_on_runs(regime):
    model, arrays = regime_data(regime)
    with jax.enable_x64(True):
        design = MixtureDesign(**{name: jnp.asarray(a, jnp.float32 if a.dtype.kind == "f" else jnp.int32)
                                  for name, a in arrays.items()}, num_tasks=NUM_TASKS)
        fitted = mtl_jax.fit(model, design, "em", seed=0, n_init=1, max_iter=50, standard_errors=False)
    assert fitted.params.component_coef.dtype == jnp.float32


@pytest.mark.parametrize("regime", ["poisson-large-counts", "gaussian-slope-small-noise"])
def test_float32_fit_without_the_models_compiler_options_agrees(fits, regime, monkeypatch):
    """``MixtureGLMM.compiler_options`` (no XLA CPU library fusions) changes speed, not the fit:
    XLA's default compilation of the same public float32 fit converges to the float64 point
    within the tolerances above, and to the options' float32 point within float32 EM's
    stopping tolerance (measured: Poisson 5 / 5 iterations, parameters within 2.9e-7
    relative; Gaussian 42 / 36 iterations, 3.5e-5)."""
    model, fit64, fit32 = fits(regime)
    _, arrays = regime_data(regime)
    monkeypatch.setattr(MixtureGLMM, "compiler_options", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        default32 = fit_em(model, arrays, jnp.float32)
    assert default32.converged and not default32.warnings
    gaps = relative_gaps(default32, fit64)
    assert max(gap for name, gap in gaps.items() if name.startswith("w[")) < COEF_RTOL, gaps
    assert max(gap for name, gap in gaps.items() if not name.startswith("w[")) < VARIANCE_RTOL, gaps
    assert abs(default32.loglik - fit64.loglik) < LOGLIK_PER_ROW * fit64.num_obs
    between = relative_gaps(default32, fit32)
    assert max(between.values()) < VARIANCE_RTOL, between
