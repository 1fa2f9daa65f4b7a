"""With g = 1 and component effects only, EM is REML for the linear mixed model.

The references are written here independently of the package: the closed-form ANOVA
estimator of the balanced one-way model, and the exact REML likelihood of
``y_i ~ N(X_i beta, sigma2 I + phi 1 1^T)`` maximised with scipy.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from mtl_jax.infer.em import em_fit
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM

LMM = MixtureGLMM(1, mixing_random_effects=False, component_random_effects=True, residual_update="reml",
                  variance_floor=0.0)


def lmm_data(num_tasks, n_per_task, num_covariates, seed, unbalanced=False):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 2 * n_per_task, num_tasks) if unbalanced else np.full(num_tasks, n_per_task)
    task = np.repeat(np.arange(num_tasks), sizes).astype(np.int32)
    n = len(task)
    x = np.column_stack([np.ones(n), rng.normal(size=(n, num_covariates))])
    beta = rng.normal(size=num_covariates + 1)
    y = x @ beta + rng.normal(0, 1.0, num_tasks)[task] + rng.normal(0, np.sqrt(0.5), n)
    design = MixtureDesign(y=jnp.asarray(y[:, None]), x_comp=jnp.asarray(x), x_mix=jnp.asarray(x[:, :1]),
                           task=jnp.asarray(task), num_tasks=num_tasks)
    return design, y, x, task


def fit_lmm(design):
    result = em_fit(LMM, design, jax.random.key(0), n_init=1, max_iter=20000, tol=1e-15)
    p = result.params
    return (np.asarray(p.component_coef[0, :, 0]), float(p.component_effects_cov[0, 0, 0]),
            float(p.component_cov[0, 0, 0]))


def reml_reference(y, x, task):
    """Maximise the REML log-likelihood over (log phi, log sigma2); return beta, phi, sigma2."""
    groups = [np.flatnonzero(task == i) for i in np.unique(task)]

    def gls(phi, sigma2):
        xtvx, xtvy, logdet, blocks = 0.0, 0.0, 0.0, []
        for rows in groups:
            v = sigma2 * np.eye(len(rows)) + phi * np.ones((len(rows), len(rows)))
            v_inv = np.linalg.inv(v)
            xtvx = xtvx + x[rows].T @ v_inv @ x[rows]
            xtvy = xtvy + x[rows].T @ v_inv @ y[rows]
            logdet += np.linalg.slogdet(v)[1]
            blocks.append(v_inv)
        beta = np.linalg.solve(xtvx, xtvy)
        quad = sum((y[r] - x[r] @ beta) @ vi @ (y[r] - x[r] @ beta) for r, vi in zip(groups, blocks))
        return beta, 0.5 * (logdet + np.linalg.slogdet(xtvx)[1] + quad)

    best = minimize(lambda t: gls(*np.exp(t))[1], np.zeros(2), method="Nelder-Mead",
                    options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 20000})
    phi, sigma2 = np.exp(best.x)
    return gls(phi, sigma2)[0], phi, sigma2


def test_balanced_one_way_anova_closed_form():
    design, y, _, task = lmm_data(num_tasks=12, n_per_task=9, num_covariates=0, seed=1)
    m, K = 9, 12
    means = np.array([y[task == i].mean() for i in range(K)])
    msw = sum(((y[task == i] - means[i]) ** 2).sum() for i in range(K)) / (K * (m - 1))
    msb = m * ((means - y.mean()) ** 2).sum() / (K - 1)
    beta, phi, sigma2 = fit_lmm(design)
    np.testing.assert_allclose(sigma2, msw, rtol=1e-6)
    np.testing.assert_allclose(phi, (msb - msw) / m, rtol=1e-6)
    np.testing.assert_allclose(beta[0], y.mean(), rtol=1e-6)


def test_unbalanced_lmm_with_covariates_matches_reml_likelihood_maximum():
    design, y, x, task = lmm_data(num_tasks=10, n_per_task=12, num_covariates=2, seed=2, unbalanced=True)
    beta, phi, sigma2 = fit_lmm(design)
    ref_beta, ref_phi, ref_sigma2 = reml_reference(y, x, task)
    np.testing.assert_allclose(phi, ref_phi, rtol=1e-6)
    np.testing.assert_allclose(sigma2, ref_sigma2, rtol=1e-6)
    np.testing.assert_allclose(beta, ref_beta, rtol=1e-6)
