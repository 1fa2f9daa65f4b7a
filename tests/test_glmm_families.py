"""GLM families, random slopes and membership per task against references written here.

* g = 1 Gaussian with a random intercept and slope (full covariance): the exact REML
  likelihood of ``y_i ~ N(X_i beta, Z_i Phi Z_i^T + sigma2 I)`` maximised by scipy.
* g = 1 binomial (trials) and Poisson (offset): an independent PQL-REML iteration in numpy
  (dense penalised IRLS to the joint mode, then ``Phi = mean(b b^T + H_bb)``).
* The Laplace approximation and adaptive Gauss-Hermite quadrature against scipy's ``quad``.
* Membership per task: posterior class probabilities against the exact multivariate normal
  marginal of each task under each class, enumerated here.
* EM monotone with the variance components held fixed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.integrate import quad
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import multivariate_normal

import mtl_jax
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams


def slope_data(num_tasks=12, size=8, seed=0):
    """``y = 1 + 0.5 t + b0_i + b1_i t + e`` with correlated ``(b0, b1)``."""
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(num_tasks), size)
    t = np.tile(np.linspace(-1, 1, size), num_tasks) + 0.1 * rng.normal(size=task.size)
    x = np.column_stack([np.ones(task.size), t])
    phi = np.array([[1.0, 0.4], [0.4, 0.5]])
    b = rng.multivariate_normal(np.zeros(2), phi, num_tasks)
    y = x @ [1.0, 0.5] + np.einsum("nk,nk->n", x, b[task]) + 0.3 * rng.normal(size=task.size)
    return y, x, task


def reml_criterion(phi, sigma2, y, x, z, task):
    """``(-REML log-likelihood + const, GLS beta)`` of ``y_i ~ N(X_i beta, Z_i Phi Z_i^T + sigma2 I)``."""
    groups = [np.flatnonzero(task == i) for i in np.unique(task)]
    xtvx, xtvy, logdet, inverses = 0.0, 0.0, 0.0, []
    for rows in groups:
        v = z[rows] @ phi @ z[rows].T + sigma2 * np.eye(len(rows))
        v_inv = np.linalg.inv(v)
        xtvx, xtvy = xtvx + x[rows].T @ v_inv @ x[rows], xtvy + x[rows].T @ v_inv @ y[rows]
        logdet += np.linalg.slogdet(v)[1]
        inverses.append(v_inv)
    beta = np.linalg.solve(xtvx, xtvy)
    quad_form = sum((y[g] - x[g] @ beta) @ vi @ (y[g] - x[g] @ beta) for g, vi in zip(groups, inverses))
    return 0.5 * (logdet + np.linalg.slogdet(xtvx)[1] + quad_form), beta


def exact_reml(y, x, z, task):
    """Maximise the REML log-likelihood over (log-Cholesky of Phi, log sigma2); return beta, Phi, sigma2."""
    r = z.shape[1]
    lower = np.tril_indices(r)

    def unpack(theta):
        chol = np.zeros((r, r))
        chol[lower] = theta[:-1]
        chol[np.diag_indices(r)] = np.exp(np.diag(chol))
        return chol @ chol.T, np.exp(theta[-1])

    def negative_reml(theta):
        return reml_criterion(*unpack(theta), y, x, z, task)[0]

    start = np.zeros(len(lower[0]) + 1)
    best = minimize(negative_reml, start, method="BFGS", options={"gtol": 1e-11, "maxiter": 5000})
    best = minimize(negative_reml, best.x, method="Nelder-Mead",
                    options={"xatol": 1e-13, "fatol": 1e-15, "maxiter": 40000})
    phi, sigma2 = unpack(best.x)
    return reml_criterion(phi, sigma2, y, x, z, task)[1], phi, sigma2


def slope_frame(y, x, task):
    return pd.DataFrame({"task": [f"s{i}" for i in task], "t": x[:, 1], "y": y})


def test_gaussian_random_intercept_and_slope_is_exact_reml():
    y, x, task = slope_data()
    frame = slope_frame(y, x, task)
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="y", covariates=["t"], standardize=False)
    model = MixtureGLMM(1, covariates=("t",), random_slopes=("t",), variance_floor=1e-14)
    result = mtl_jax.fit(model, data, "em", n_init=1, max_iter=20000, tol=1e-15)
    beta, phi, sigma2 = exact_reml(y, x, x, task)
    params = result.params
    np.testing.assert_allclose(params.component_effects_cov[0], phi, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(params.component_cov[0, 0, 0], sigma2, rtol=1e-6)
    np.testing.assert_allclose(params.component_coef[0, :, 0], beta, rtol=1e-6)
    names = result.named_parameters()
    assert names["phi[1, intercept, t]"] == pytest.approx(phi[0, 1], rel=1e-6)
    assert list(result.random_effects()["component"].columns) == ["B1[intercept]", "B1[t]"]


def test_diagonal_and_identity_structures_are_reml_within_their_family():
    y, x, task = slope_data(seed=3)
    data = mtl_jax.TaskData.from_dataframe(slope_frame(y, x, task), task="task", response="y", covariates=["t"],
                                           standardize=False)
    def negative_reml(phi, sigma2):
        return reml_criterion(phi, sigma2, y, x, x, task)[0]

    for structure, build in (("diagonal", lambda t: np.diag(np.exp(t[:2]))), ("identity", lambda t: np.exp(t[0]) * np.eye(2))):
        k = 2 if structure == "diagonal" else 1
        best = minimize(lambda t: negative_reml(build(t), np.exp(t[-1])), np.zeros(k + 1), method="Nelder-Mead",
                        options={"xatol": 1e-13, "fatol": 1e-15, "maxiter": 40000})
        model = MixtureGLMM(1, random_slopes=("t",), random_effects_covariance=structure, variance_floor=1e-14)
        result = mtl_jax.fit(model, data, "em", n_init=1, max_iter=20000, tol=1e-15)
        np.testing.assert_allclose(result.params.component_effects_cov[0], build(best.x), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(result.params.component_cov[0, 0, 0], np.exp(best.x[-1]), rtol=1e-6)


# --------------------------------------------------------------------- PQL-REML reference
def pql_reml(y, x, z, task, family, trials=None, offset=None, iterations=3000):
    """Penalised IRLS to the joint mode of (beta, b), then Phi = mean_i(b_i b_i^T + H_{b_i b_i}); repeat."""
    n, q = x.shape
    r = z.shape[1]
    K = task.max() + 1
    trials = np.ones(n) if trials is None else trials
    offset = np.zeros(n) if offset is None else offset
    big_z = np.zeros((n, K * r))
    for a in range(r):
        big_z[np.arange(n), task * r + a] = z[:, a]
    design = np.hstack([x, big_z])
    theta = np.zeros(q + K * r)
    phi = np.eye(r)
    for _ in range(iterations):
        penalty = np.zeros((q + K * r, q + K * r))
        penalty[q:, q:] = np.kron(np.eye(K), np.linalg.inv(phi))
        for _ in range(50):
            eta = design @ theta + offset
            mu = np.exp(eta) if family == "poisson" else expit(eta)
            score = y - (mu if family == "poisson" else trials * mu)
            weight = mu if family == "poisson" else trials * mu * (1 - mu)
            info = design.T @ (weight[:, None] * design) + penalty
            step = np.linalg.solve(info, design.T @ score - penalty @ theta)
            theta = theta + step
            if np.max(np.abs(step)) < 1e-14:
                break
        h = np.linalg.inv(info)
        b = theta[q:].reshape(K, r)
        new_phi = (b.T @ b + sum(h[q + i * r:q + (i + 1) * r, q + i * r:q + (i + 1) * r] for i in range(K))) / K
        if np.max(np.abs(new_phi - phi)) < 1e-13 * np.max(np.abs(phi)):
            phi = new_phi
            break
        phi = new_phi
    return theta[:q], phi, theta[q:].reshape(K, r)


def count_frame(family, seed=0, num_tasks=15, size=10):
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(num_tasks), size)
    x1 = rng.normal(size=task.size)
    b = rng.normal(0, 0.6, num_tasks)
    exposure = rng.uniform(0.5, 2.0, task.size)
    trials = rng.integers(1, 8, task.size)
    eta = 0.3 + 0.7 * x1 + b[task]
    if family == "poisson":
        y = rng.poisson(exposure * np.exp(eta))
    else:
        y = rng.binomial(trials, expit(eta))
    return pd.DataFrame({"task": [f"k{i}" for i in task], "x1": x1, "y": y, "trials": trials,
                         "log_exposure": np.log(exposure)})


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_glmm_em_is_pql_reml(family):
    frame = count_frame(family)
    options = {"trials": "trials"} if family == "binomial" else {"offset": "log_exposure"}
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="y", covariates=["x1"], standardize=False,
                                           **options)
    model = MixtureGLMM(1, family=family, variance_floor=1e-14)
    result = mtl_jax.fit(model, data, "em", n_init=1, max_iter=5000, tol=1e-15)
    x = np.column_stack([np.ones(len(frame)), frame["x1"]])
    task = np.asarray(data.task)
    beta, phi, b = pql_reml(frame["y"].to_numpy(float), x, x[:, :1], task, family,
                            trials=frame["trials"].to_numpy(float) if family == "binomial" else None,
                            offset=frame["log_exposure"].to_numpy() if family == "poisson" else None)
    np.testing.assert_allclose(result.params.component_coef[0, :, 0], beta, rtol=1e-6)
    np.testing.assert_allclose(result.params.component_effects_cov[0], phi, rtol=1e-6)
    np.testing.assert_allclose(result.params.component_effects[:, 0, :, 0], b, rtol=1e-6, atol=1e-9)
    assert result.converged


# ------------------------------------------------------------------ marginal likelihoods
def bernoulli_design(seed=1, num_tasks=6, size=7):
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(num_tasks), size)
    x = np.column_stack([np.ones(task.size), rng.normal(size=task.size)])
    y = rng.binomial(1, expit(0.2 + x[:, 1] + rng.normal(0, 1.5, num_tasks)[task]))
    design = MixtureDesign(y=jnp.asarray(y[:, None], float), x_comp=jnp.asarray(x), x_mix=jnp.asarray(x[:, :1]),
                           task=jnp.asarray(task), num_tasks=num_tasks)
    params = MixtureParams(
        mixing_coef=jnp.zeros((0, 1)), component_coef=jnp.asarray([[[0.1], [0.9]]]),
        component_cov=jnp.ones((1, 1, 1)), mixing_cov=jnp.zeros((0, 0)),
        component_effects_cov=jnp.full((1, 1, 1), 2.0), mixing_effects=jnp.zeros((num_tasks, 0)),
        component_effects=jnp.zeros((num_tasks, 1, 1, 1)), class_logits=jnp.zeros((num_tasks, 1)))
    return design, params, y, x, task


def quad_marginal(y, x, task, coef, var):
    total = 0.0
    for i in np.unique(task):
        rows = task == i

        def integrand(b, rows=rows):
            eta = x[rows] @ coef + b
            return np.exp(np.sum(y[rows] * eta - np.logaddexp(0, eta)) - 0.5 * b**2 / var) / np.sqrt(2 * np.pi * var)

        total += np.log(quad(integrand, -30, 30, epsabs=0, epsrel=1e-13, limit=200)[0])
    return total


def test_adaptive_quadrature_matches_numerical_integration_and_laplace_is_close():
    design, params, y, x, task = bernoulli_design()
    reference = quad_marginal(y, x, task, np.array([0.1, 0.9]), 2.0)
    agq = MixtureGLMM(1, family="bernoulli", quadrature_points=25).score(params, design)
    laplace = MixtureGLMM(1, family="bernoulli").score(params, design)
    np.testing.assert_allclose(agq, reference, rtol=1e-9)
    assert abs(laplace - reference) > 1e-4  # Laplace is an approximation for binary data ...
    np.testing.assert_allclose(laplace, reference, rtol=2e-2)  # ... but a close one


def test_gaussian_laplace_is_the_exact_marginal():
    y, x, task = slope_data(num_tasks=5, size=6, seed=4)
    design = MixtureDesign(y=jnp.asarray(y[:, None]), x_comp=jnp.asarray(x), x_mix=jnp.asarray(x[:, :1]),
                           task=jnp.asarray(task), num_tasks=5, z_comp=jnp.asarray(x))
    phi = np.array([[0.8, 0.3], [0.3, 0.6]])
    params = MixtureParams(
        mixing_coef=jnp.zeros((0, 1)), component_coef=jnp.asarray([[[0.9], [0.4]]]),
        component_cov=jnp.full((1, 1, 1), 0.2), mixing_cov=jnp.zeros((0, 0)),
        component_effects_cov=jnp.asarray(phi)[None], mixing_effects=jnp.zeros((5, 0)),
        component_effects=jnp.zeros((5, 1, 2, 1)), class_logits=jnp.zeros((5, 1)))
    want = sum(multivariate_normal(x[task == i] @ [0.9, 0.4], x[task == i] @ phi @ x[task == i].T
                                   + 0.2 * np.eye(6)).logpdf(y[task == i]) for i in range(5))
    got = MixtureGLMM(1, random_slopes=("x1",)).score(params, design)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ------------------------------------------------------------------ membership per task
def task_mixture_problem(seed=2, num_tasks=8, size=5):
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(num_tasks), size)
    t = np.tile(np.arange(size, dtype=float), num_tasks)
    x = np.column_stack([np.ones(task.size), t])
    w = rng.choice(2, num_tasks)
    mix_x = np.column_stack([np.ones(task.size), rng.normal(size=num_tasks)[task]])
    coef = np.array([[1.0, 0.3], [0.0, -0.2]])  # [g, q]
    y = np.einsum("nq,nq->n", x, coef[w[task]]) + rng.normal(0, 0.4, num_tasks)[task] + 0.3 * rng.normal(size=task.size)
    design = MixtureDesign(y=jnp.asarray(y[:, None]), x_comp=jnp.asarray(x), x_mix=jnp.asarray(mix_x),
                           task=jnp.asarray(task), num_tasks=num_tasks, z_comp=jnp.asarray(x))
    phis = [np.array([[0.5, 0.1], [0.1, 0.2]]), np.array([[0.3, -0.05], [-0.05, 0.1]])]
    params = MixtureParams(
        mixing_coef=jnp.asarray([[0.3, -0.7]]), component_coef=jnp.asarray(coef[:, :, None]),
        component_cov=jnp.asarray([[[0.1]], [[0.2]]]), mixing_cov=jnp.zeros((1, 1)),
        component_effects_cov=jnp.asarray(np.stack(phis)), mixing_effects=jnp.zeros((num_tasks, 1)),
        component_effects=jnp.zeros((num_tasks, 2, 2, 1)), class_logits=jnp.zeros((num_tasks, 2)))
    return design, params, y, x, mix_x, task, phis


def test_task_membership_posteriors_match_enumeration():
    design, params, y, x, mix_x, task, phis = task_mixture_problem()
    model = MixtureGLMM(2, random_slopes=("x1",), membership="task")
    got = np.exp(np.asarray(model.class_log_probabilities(params, design)))
    sigma2 = [0.1, 0.2]
    coef = np.asarray(params.component_coef)[..., 0]
    for i in range(design.num_tasks):
        rows = task == i
        logit = mix_x[rows][0] @ [0.3, -0.7]
        prior = np.array([expit(logit), 1 - expit(logit)])
        dens = np.array([multivariate_normal(x[rows] @ coef[h], x[rows] @ phis[h] @ x[rows].T
                                             + sigma2[h] * np.eye(rows.sum())).pdf(y[rows]) for h in range(2)])
        np.testing.assert_allclose(got[i], prior * dens / (prior * dens).sum(), rtol=1e-10)
    marginal = sum(np.log(sum(
        (expit(mix_x[task == i][0] @ [0.3, -0.7]) if h == 0 else 1 - expit(mix_x[task == i][0] @ [0.3, -0.7]))
        * multivariate_normal(x[task == i] @ coef[h], x[task == i] @ phis[h] @ x[task == i].T
                              + sigma2[h] * np.eye(5)).pdf(y[task == i]) for h in range(2)))
        for i in range(design.num_tasks))
    np.testing.assert_allclose(model.score(params, design), marginal, rtol=1e-12)


def test_task_membership_em_is_monotone_with_variance_components_fixed():
    design, params, *_ = task_mixture_problem(num_tasks=20)
    model = MixtureGLMM(2, random_slopes=("x1",), membership="task", residual_update="ml")
    step = jax.jit(lambda p: model.em_step(p, design, update_variance_components=False))
    values = []
    for _ in range(30):
        params, value = step(params)
        values.append(float(value))
    assert np.all(np.diff(values) >= -1e-9 * np.abs(values[:-1]))
    assert values[-1] > values[0] + 1.0


def test_poisson_observation_membership_em_is_monotone_with_variance_components_fixed():
    frame = count_frame("poisson", seed=5)
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="y", covariates=["x1"],
                                           offset="log_exposure")
    model = MixtureGLMM(2, family="poisson")
    design = model.design(data)
    params = model.init(jax.random.key(0), design)
    step = jax.jit(lambda p: model.em_step(p, design, update_variance_components=False))
    values = []
    for _ in range(25):
        values.append(float(model.objective(params, design)))
        params, _ = step(params)
    assert np.all(np.diff(values) >= -1e-9 * np.abs(values[:-1]))


def test_bernoulli_unseen_task_mean_integrates_the_effect_out():
    design, params, y, x, task = bernoulli_design()
    model = MixtureGLMM(1, family="bernoulli")
    unseen = MixtureDesign(y=design.y[:3], x_comp=design.x_comp[:3], x_mix=design.x_mix[:3],
                           task=jnp.full((3,), 6), num_tasks=7)
    got = np.asarray(model.predict(params, unseen))[:, 0]
    for j in range(3):
        eta = x[j] @ [0.1, 0.9]
        want = quad(lambda b: expit(eta + b) * np.exp(-0.25 * b**2) / np.sqrt(4 * np.pi), -30, 30, epsrel=1e-12)[0]
        np.testing.assert_allclose(got[j], want, rtol=1e-8)
    seen = np.asarray(model.predict(params, design))[:, 0]
    np.testing.assert_allclose(seen, expit(x @ [0.1, 0.9]), rtol=1e-12)  # the stored effects are zero here
