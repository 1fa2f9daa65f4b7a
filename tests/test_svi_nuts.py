"""NumPyro program, SVI and NUTS backends: density parity with EM, backend agreement, relabelling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy import stats
from support import random_problem

import mtl_jax
from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.infer.nuts import relabel_draws
from mtl_jax.infer.svi import site_values
from mtl_jax.models.mixture_glmm import (
    MixtureGLMM,
    MixtureParams,
    MixturePriors,
)


def independent_log_prior(values, priors, p):
    """Log prior of the sampled sites with scipy densities (LKJ for p = 2 via its Beta form)."""
    total = 0.0
    for name, value in values.items():
        value = np.asarray(value)
        if name in ("mixing_coef", "component_coef"):
            total += stats.norm(0, priors.coef_scale).logpdf(value).sum()
        elif name.endswith("_z"):
            total += stats.norm.logpdf(value).sum()
        elif name == "component_corr_chol":
            assert p == 2, "the independent LKJ density is written for p = 2"
            # LKJ(eta) for a 2 x 2 correlation: (r + 1) / 2 ~ Beta(eta, eta), r = L[1, 0].
            r = value[:, 1, 0]
            eta = priors.lkj_concentration
            total += (stats.beta(eta, eta).logpdf((r + 1) / 2) - np.log(2)).sum()
        else:  # component_scale, mixing_effects_sd, component_effects_sd
            total += stats.halfcauchy(scale=priors.sd_scale).logpdf(value).sum()
    return total


def stack(points):
    """MixtureParams points -> one MixtureParams with a new leading axis."""
    return MixtureParams(*(np.stack(leaves) for leaves in zip(*points)))


@pytest.mark.parametrize(
    "p, mixing_random_effects, component_random_effects",
    [(1, True, True), (2, True, True), (1, False, True), (2, True, False)],
)
def test_log_density_is_em_likelihood_plus_priors(p, mixing_random_effects, component_random_effects):
    model = MixtureGLMM(3, mixing_random_effects=mixing_random_effects,
                        component_random_effects=component_random_effects)
    params, design = random_problem(p)
    if not mixing_random_effects:
        params = params._replace(mixing_var=0 * params.mixing_var, mixing_effects=0 * params.mixing_effects)
    if not component_random_effects:
        params = params._replace(component_var=0 * params.component_var,
                                 component_effects=0 * params.component_effects)
    priors = MixturePriors(coef_scale=3.0, sd_scale=0.7, lkj_concentration=2.5)
    values = site_values(model, params)
    total, trace = log_density(model.numpyro_model, (design, priors), {}, values)

    # The mapping to sampled sites round-trips: every field is a site holding params' value.
    for field in MixtureParams._fields:
        np.testing.assert_allclose(trace[field]["value"], getattr(params, field), rtol=1e-10, atol=1e-12)

    # Likelihood: the observed site is L1 of the EM objective.
    l1 = jax.nn.logsumexp(model.log_joint(params, design), axis=-1).sum()
    y_site = trace["y"]
    np.testing.assert_allclose(y_site["fn"].log_prob(y_site["value"]).sum(), l1, rtol=1e-10)

    # Whole density: L1 + priors + standard-normal density of the non-centred effects.
    np.testing.assert_allclose(total, l1 + independent_log_prior(values, priors, p), rtol=1e-10)

    # Equivalently, the EM objective L1 + L2 plus the sd priors and the Jacobian of
    # a = sd * z:  log N(a; 0, sd^2) = log N(z; 0, 1) - log sd, per task.
    jacobian = sum(design.num_tasks * np.log(np.asarray(values[name])).sum()
                   for name in ("mixing_effects_sd", "component_effects_sd") if name in values)
    coef_and_sd_priors = independent_log_prior(
        {k: v for k, v in values.items() if not k.endswith("_z")}, priors, p
    )
    np.testing.assert_allclose(total, model.objective(params, design) + coef_and_sd_priors + jacobian,
                               rtol=1e-10)


def test_relabel_draws_restores_reference_order():
    model = MixtureGLMM(3)
    reference, _ = random_problem(p=2, g=3)
    rng = np.random.default_rng(1)
    perms = [(0, 1, 2), (2, 0, 1), (1, 0, 2), (0, 2, 1), (1, 2, 0), (2, 1, 0)]
    chains, original = [], []
    for _ in range(2):
        drawn, kept = [], []
        for perm in perms:
            point = MixtureParams(*(leaf + 0.01 * rng.normal(size=leaf.shape) for leaf in reference))
            kept.append(point)
            drawn.append(model.relabel(point, np.asarray(perm)))
        chains.append(drawn)
        original.append(kept)
    draws = stack([stack(row) for row in chains])
    truth = stack([stack(row) for row in original])

    relabelled, permuted = relabel_draws(model, draws, reference)

    assert permuted == 2 * (len(perms) - 1)
    # mixing_var is left out: re-expressing logits against a new reference adds variances,
    # which no later permutation undoes when g > 2.
    for field in MixtureParams._fields:
        if field != "mixing_var":
            np.testing.assert_allclose(getattr(relabelled, field), getattr(truth, field), atol=1e-10)


@pytest.fixture(scope="module")
def three_fits():
    """EM, SVI (AutoNormal) and NUTS through ``mtl_jax.fit`` on one small g = 2 study.

    All random effects are on. SVI and NUTS start at the EM estimate, which is also the
    NUTS relabelling reference, so the three share one labelling.
    """
    study = simulate_study(jax.random.key(0), 2, num_tasks=6, n_per_task=60)
    model = MixtureGLMM(2)
    em = mtl_jax.fit(model, study.train, "em", n_init=2)
    start = em.params
    svi = mtl_jax.fit(model, study.train, "svi", seed=1, init_params=start, num_steps=1000, num_samples=400)
    nuts = mtl_jax.fit(model, study.train, "nuts", seed=2, init_params=start, num_warmup=300, num_samples=300)
    return em, svi, nuts


def test_em_svi_and_nuts_agree_on_the_fixed_effects(three_fits):
    em, svi, nuts = three_fits
    assert nuts.diagnostics["max_r_hat"] < 1.1
    for field in ("component_coef", "mixing_coef"):
        nuts_mean = getattr(nuts.params, field)
        nuts_sd = nuts.draws[field].std(axis=(0, 1))
        np.testing.assert_array_less(np.abs(getattr(em.params, field) - nuts_mean), 3 * nuts_sd)
        np.testing.assert_array_less(np.abs(getattr(svi.params, field) - nuts_mean), 3 * nuts_sd)


def test_sampling_fits_carry_draws_and_diagnostics(three_fits):
    _, svi, nuts = three_fits
    g, K = 2, 6
    assert nuts.draws["component_coef"].shape == (2, 300, g, 5, 1)
    assert nuts.draws["mixing_effects"].shape == (2, 300, K, g - 1)
    assert svi.draws["component_effects"].shape == (1, 400, K, g, 1)
    assert set(nuts.diagnostics["r_hat"]) == {"mixing_coef", "component_coef", "component_cov",
                                              "mixing_var", "component_var"}
    assert nuts.diagnostics["num_divergences"] >= 0 and nuts.diagnostics["relabelled_draws"] >= 0
    assert nuts.diagnostics["min_ess"] > 0
    assert nuts.converged == (nuts.diagnostics["max_r_hat"] < 1.05)
    assert svi.trace.shape == (1000,) and np.all(np.isfinite(svi.trace))
    # The posterior mean is the point estimate, and the summary reports R-hat and ESS.
    summary = nuts.summary()
    assert {"estimate", "mean", "sd", "r_hat", "ess_bulk"} <= set(summary.columns)
    np.testing.assert_allclose(summary["estimate"], summary["mean"], rtol=1e-8)
    for fitted in (svi, nuts):
        posterior = fitted.to_arviz().posterior
        assert posterior["w[1, x1]"].shape[:2] == fitted.draws["component_coef"].shape[:2]


def test_map_guide_from_its_own_em_start():
    """AutoDelta (default EM start): every draw is the MAP point; loss = -log density there."""
    study = simulate_study(jax.random.key(3), 2, num_tasks=4, n_per_task=40)
    model = MixtureGLMM(2, mixing_random_effects=False)
    fitted = mtl_jax.fit(model, study.train, "svi", guide="map", num_steps=300, num_samples=5)
    for value in fitted.draws.values():
        np.testing.assert_array_equal(value, np.broadcast_to(value[:, :1], value.shape))
    params = MixtureParams(*map(jnp.asarray, fitted.params))
    at_map, _ = log_density(model.numpyro_model, (study.train,), {}, site_values(model, params))
    np.testing.assert_allclose(-at_map, fitted.trace[-1], rtol=1e-4)
    assert fitted.trace[-1] < fitted.trace[0]


def test_lowrank_guide_runs_from_given_start():
    study = simulate_study(jax.random.key(3), 2, num_tasks=4, n_per_task=40)
    model = MixtureGLMM(2, mixing_random_effects=False)
    start = model.init(jax.random.key(0), study.train)
    fitted = mtl_jax.fit(model, study.train, "svi", guide="lowrank", num_steps=50, num_samples=5,
                         init_params=start)
    assert np.all(np.isfinite(fitted.trace)) and fitted.n_iter == 50
    assert np.all(np.std(fitted.draws["component_coef"], axis=1) > 0)
