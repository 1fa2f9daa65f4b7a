"""EM, SVI and NUTS on the non-Gaussian families: one posterior, three backends.

For a Bernoulli GLMM and a Poisson GLMM (``g = 1``, task random intercept; the Poisson one
with an offset) and a ``g = 2`` Poisson mixture with membership per task, data are drawn
with :meth:`MixtureGLMM.simulate` (20 tasks of 15 rows) and fitted through the public
``mtl_jax.fit`` by EM, SVI (AutoNormal) and NUTS (2 chains of 300 draws). Each fit runs
once (module fixtures); SVI and NUTS start from the EM point (``init_params``, the NUTS
chains dispersed by ``init_jitter = 0.5`` unconstrained sds), so they do not each rerun
EM, and their draws are aligned to it. The mixture case is marked ``slow`` (most of the
module's time is XLA compiling each case's three programs).

* The NumPyro program that SVI and NUTS sample is first checked against its density
  written out here with scipy (likelihood of each family, offset, the per-task
  mixture, and every prior), so the backends agree on the right posterior.
* The EM estimate and the SVI point (the guide's mean) lie within 3 posterior sds of
  the NUTS posterior mean for every fixed effect ``W`` (and ``v`` for ``g = 2``).
* The random-effect sd ``tau = sqrt(phi)`` of EM and of SVI lies within 3 posterior sds
  of the NUTS mean, and inside the central 99% NUTS interval. The second check is the
  one with teeth at the boundary: the posterior of ``tau`` is right-skewed (at 20 tasks
  its sd is a quarter to a half of its mean, e.g. Bernoulli mean 0.51, sd 0.21), so
  ``mean - 3 sd < 0`` and the sd check alone would pass a collapsed ``tau = 0`` (EM's
  floor, ``tau = 1e-3``); the 0.5% quantile (0.026 to 0.55 here) does not.

The margins measured on these seeds are in each test's docstring.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import special, stats

import mtl_jax
from mtl_jax.infer.fit import MAX_R_HAT
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

NUM_TASKS, ROWS = 20, 15
NUM_WARMUP, NUM_DRAWS, NUM_CHAINS = 300, 300, 2


def simulated_design(model, coef, tau, key, *, offset=False, mixing_coef=None):
    """A design of ``NUM_TASKS x ROWS`` rows, ``x = (1, N(0, 1))``, responses drawn by ``model.simulate``.

    ``coef [g, 2]`` are the true fixed effects and ``tau [g]`` the random-intercept sds;
    with ``offset`` a log exposure ``log U(0.5, 2)`` enters the linear predictor.
    """
    g = model.num_components
    key_x, key_offset, key_effects, key_y = jax.random.split(key, 4)
    n = NUM_TASKS * ROWS
    x = jnp.column_stack([jnp.ones(n), jax.random.normal(key_x, (n,))])
    log_exposure = jnp.log(jax.random.uniform(key_offset, (n,), minval=0.5, maxval=2.0)) if offset else None
    design = MixtureDesign(y=jnp.zeros((n, 1)), x_comp=x, x_mix=x[:, :1],
                           task=jnp.repeat(jnp.arange(NUM_TASKS, dtype=jnp.int32), ROWS), num_tasks=NUM_TASKS,
                           offset=log_exposure)
    truth = MixtureParams(
        mixing_coef=jnp.zeros((g - 1, 1)) if mixing_coef is None else jnp.asarray(mixing_coef, float),
        component_coef=jnp.asarray(coef, float)[:, :, None],
        component_cov=jnp.ones((g, 1, 1)),
        mixing_cov=jnp.zeros((g - 1, g - 1)),
        component_effects_cov=jnp.asarray(tau, float)[:, None, None] ** 2,
        mixing_effects=jnp.zeros((NUM_TASKS, g - 1)),
        component_effects=jnp.zeros((NUM_TASKS, g, 1, 1)),
        class_logits=jnp.zeros((NUM_TASKS, g)),
    )
    truth = model.sample_effects(key_effects, truth, NUM_TASKS)
    _, y = model.simulate(key_y, truth, design)
    return MixtureDesign(y=y, x_comp=design.x_comp, x_mix=design.x_mix, task=design.task, num_tasks=NUM_TASKS,
                         offset=design.offset)


CASES = {
    "bernoulli": lambda: (
        model := MixtureGLMM(1, family="bernoulli"),
        simulated_design(model, [[0.3, 0.8]], [0.8], jax.random.key(11)),
    ),
    "poisson-offset": lambda: (
        model := MixtureGLMM(1, family="poisson"),
        simulated_design(model, [[0.5, 0.4]], [0.5], jax.random.key(12), offset=True),
    ),
    "poisson-mixture-per-task": lambda: (
        model := MixtureGLMM(2, family="poisson", membership="task"),
        simulated_design(model, [[0.8, 0.5], [-0.8, -0.5]], [0.6, 0.6], jax.random.key(14)),
    ),
}


@pytest.fixture(scope="module", params=["bernoulli", "poisson-offset",
                                        pytest.param("poisson-mixture-per-task", marks=pytest.mark.slow)])
def case(request):
    """``(name, model, design, em, svi, nuts)``: the three fits of one case, each run once."""
    model, design = CASES[request.param]()
    n_init = 1 if model.num_components == 1 else 2
    em = mtl_jax.fit(model, design, "em", seed=0, n_init=n_init, max_iter=500, standard_errors=False)
    svi = mtl_jax.fit(model, design, "svi", seed=1, num_steps=2000, learning_rate=0.01, num_samples=400,
                      init_params=em.params)
    nuts = mtl_jax.fit(model, design, "nuts", seed=2, num_warmup=NUM_WARMUP, num_samples=NUM_DRAWS,
                       num_chains=NUM_CHAINS, init_jitter=0.5, init_params=em.params)
    return request.param, model, design, em, svi, nuts


# --------------------------------------------------------------- the posterior itself
def reference_log_density(model, design, values):
    """Log density of the program at ``values`` (its sampled sites), written out with scipy.

    Likelihood: Bernoulli / Poisson (log mean ``x w + b_i + offset``); membership per task
    sums each task's rows under each component before mixing with ``softmax(v, 0)``.
    Priors (non-Gaussian families: link scale, spread 1): ``W ~ N(m [c = 0], coef_scale)``
    with ``m`` the mean of the empirical link ``log(y + 1/2) - offset`` or
    ``logit((y + 1/2) / 2)``, ``v ~ N(0, coef_scale)``, ``tau ~ HalfCauchy(sd_scale)``,
    ``z ~ N(0, 1)``.
    """
    priors = model.priors
    y, x, offset = np.asarray(design.y)[:, 0], np.asarray(design.x_comp), np.asarray(design.offset)
    task = np.asarray(design.task)
    g = model.num_components
    w = np.asarray(values["component_coef"])[..., 0]  # [g, q]
    tau = np.asarray(values["component_effects_sd"])  # [g, 1]
    z = np.asarray(values["component_effects_z"])  # [K, g, 1]
    b = (tau[None] * z)[..., 0]  # [K, g]
    eta = x @ w.T + b[task] + offset[:, None]  # [n, g]
    if model.family == "poisson":
        dens = stats.poisson.logpmf(y[:, None], np.exp(eta))
        centre = np.mean(np.log(y + 0.5) - offset)
    else:
        dens = stats.bernoulli.logpmf(y[:, None], special.expit(eta))
        centre = np.mean(special.logit((y + 0.5) / 2.0) - offset)
    if model.membership == "task":
        v = np.asarray(values["mixing_coef"])  # [g - 1, 1]
        log_pi = np.append(v[:, 0], 0.0) - special.logsumexp(np.append(v[:, 0], 0.0))
        per_task = np.stack([dens[task == i].sum(0) for i in range(design.num_tasks)])  # [K, g]
        loglik = special.logsumexp(log_pi + per_task, axis=1).sum()
    else:
        loglik = dens[:, 0].sum()
    loc = np.zeros_like(w)
    loc[:, 0] = centre
    log_prior = stats.norm(loc, priors.coef_scale).logpdf(w).sum()
    if g > 1:
        log_prior += stats.norm(0, priors.coef_scale).logpdf(np.asarray(values["mixing_coef"])).sum()
    log_prior += stats.halfcauchy(scale=priors.sd_scale).logpdf(tau).sum() + stats.norm.logpdf(z).sum()
    return loglik + log_prior


def test_program_density_is_the_family_likelihood_plus_priors(case):
    """At the EM point and at a moved point, the density SVI and NUTS see is the one written out here."""
    _, model, design, em, _, _ = case
    point = MixtureParams(*map(jnp.asarray, em.params))
    moved = point._replace(component_coef=point.component_coef + 0.1,
                           component_effects_cov=point.component_effects_cov * 1.7,
                           component_effects=point.component_effects - 0.2,
                           mixing_coef=point.mixing_coef - 0.3)
    for params in (point, moved):
        values = model.site_values(params)
        total, _ = log_density(model.numpyro_model, (design,), {}, values)
        np.testing.assert_allclose(float(total), reference_log_density(model, design, values), rtol=1e-10)


# --------------------------------------------------------------------- the three fits
def test_every_backend_converges(case):
    """EM settles, the SVI loss plateaus, and the NUTS chains mix (R-hat < 1.05, few divergences).

    Measured max R-hat: Bernoulli 1.007, Poisson 1.023, Poisson mixture 1.014; no divergences.
    """
    _, model, _, em, svi, nuts = case
    assert em.converged and svi.converged and nuts.converged
    assert not em.warnings and not svi.warnings and not nuts.warnings
    assert nuts.diagnostics["max_r_hat"] < MAX_R_HAT
    assert nuts.diagnostics["num_divergences"] <= 0.01 * NUM_CHAINS * NUM_DRAWS
    g = model.num_components
    assert nuts.draws.component_coef.shape == (NUM_CHAINS, NUM_DRAWS, g, 2, 1)
    assert svi.draws.component_effects_cov.shape == (1, 400, g, 1, 1)
    assert math.isfinite(em.loglik) and math.isfinite(svi.loglik) and math.isfinite(nuts.loglik)


def standardized_gaps(point, draws):
    """``|point - mean| / sd`` of each entry, against draws with leading ``[chain, draw]`` axes."""
    draws = np.asarray(draws)
    return np.abs(np.asarray(point) - draws.mean(axis=(0, 1))) / draws.std(axis=(0, 1))


def test_fixed_effects_agree_with_the_nuts_posterior(case):
    """EM and the SVI point within 3 NUTS posterior sds for ``W`` (and ``v`` when ``g = 2``).

    Measured (max over entries, EM / SVI): Bernoulli 0.09 / 0.10; Poisson with offset
    0.11 / 0.12; Poisson mixture W 0.57 / 0.72, v 0.38 / 0.53.
    """
    _, model, _, em, svi, nuts = case
    fields = ["component_coef"] + (["mixing_coef"] if model.num_components > 1 else [])
    for field in fields:
        draws = getattr(nuts.draws, field)
        for name, fitted in (("em", em), ("svi", svi)):
            gaps = standardized_gaps(getattr(fitted.params, field), draws)
            assert gaps.size and np.all(np.isfinite(gaps)), (field, name)
            assert gaps.max() < 3.0, (field, name, gaps.ravel())


def test_random_effect_sd_agrees_with_the_nuts_posterior(case):
    """``tau = sqrt(phi)`` of EM and SVI: within 3 NUTS sds of its mean and in the central 99% interval.

    Measured (gap in sds EM / SVI; NUTS 99% interval): Bernoulli 0.04 / 0.03 (tau 0.52,
    [0.026, 1.07]); Poisson 0.37 / 0.47 (tau 0.40, [0.28, 0.78]); Poisson mixture
    0.57, 0.69 / 0.33, 0.78 (tau 0.46, 0.83; [0.19, 1.57], [0.55, 1.99]).
    """
    _, model, _, em, svi, nuts = case
    tau_draws = np.sqrt(np.asarray(nuts.draws.component_effects_cov)[..., 0, 0])  # [chains, draws, g]
    low, high = np.quantile(tau_draws, [0.005, 0.995], axis=(0, 1))
    # The interval excludes EM's floor (tau = 1e-3), so the check below catches a collapsed estimate.
    assert np.all(low > 10 * math.sqrt(model.variance_floor))
    for name, fitted in (("em", em), ("svi", svi)):
        tau = np.sqrt(np.asarray(fitted.params.component_effects_cov)[:, 0, 0])
        gaps = standardized_gaps(tau, tau_draws)
        assert gaps.max() < 3.0, (name, tau, gaps)
        assert np.all((low < tau) & (tau < high)), (name, tau, low, high)
