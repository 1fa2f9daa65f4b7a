"""Standard errors of an EM fit against dense, independent references.

* The general REML information ``1/2 tr(X dG_c X dG_d)`` computed in O(n + K) equals the
  same formula evaluated on the dense inverse of the full Hessian of ``L`` (mixtures).
* For the linear mixed model it equals the textbook expected REML information
  ``1/2 tr(P V_c P V_d)`` built from the dense marginal covariance ``V`` (two responses, so
  the off-diagonal entries between the two ``phi`` are exercised).
* Fixed-effect covariances equal ``(X' V^-1 X)^-1`` for the LMM; residual-variance
  standard errors equal the inverse observed information of the exact marginal
  log-likelihood, by finite differences of a dense multivariate normal written here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import block_diag
from scipy.stats import multivariate_normal
from support import random_problem

import mtl_jax
from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.infer.em import em_fit
from mtl_jax.models.mixture_glmm import MixtureGLMM
from mtl_jax.models.mixture_glmm.variance import (
    fixed_and_variance_covariance,
    marginal_covariance,
    variance_parameters,
)


def central_hessian(f, theta, step):
    """Central second differences of a scalar ``f`` at ``theta`` with per-coordinate ``step``."""
    m = theta.size
    hess = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            ea, eb = np.eye(m)[a] * step[a], np.eye(m)[b] * step[b]
            hess[a, b] = (f(theta + ea + eb) - f(theta + ea - eb) - f(theta - ea + eb) + f(theta - ea - eb)) / (
                4 * step[a] * step[b])
    return hess


def dense_general_information(model, params, design):
    """Pi = -Hessian of L over (v, W, a, b) densely; H = Pi^-1; 1/2 tr(X E_c X E_d) over all K tasks."""
    K = design.num_tasks
    g = model.num_components
    p = params.component_coef.shape[-1]
    shapes = [params.mixing_coef.shape, params.component_coef.shape,
              params.mixing_effects.shape, params.component_effects.shape]
    sizes = [int(np.prod(s)) for s in shapes]

    def objective(flat):
        v, w, a, b = (part.reshape(shape) for part, shape in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes))
        return model.objective(params._replace(mixing_coef=v, component_coef=w, mixing_effects=a,
                                               component_effects=b), design)

    flat = jnp.concatenate([params.mixing_coef.ravel(), params.component_coef.ravel(),
                            params.mixing_effects.ravel(), params.component_effects.ravel()])
    keep = np.ones(flat.size, bool)
    start_a = sizes[0] + sizes[1]
    start_b = start_a + sizes[2]
    if not model.has_mixing_effects:
        keep[start_a:start_b] = False
    if not model.component_random_effects:
        keep[start_b:] = False
    h = np.linalg.inv(-np.asarray(jax.hessian(objective)(flat))[np.ix_(keep, keep)])
    index = np.cumsum(keep) - 1
    # per-task random coordinates in H, task-major: (a_i, b_i)
    coords = []
    for i in range(K):
        rows = []
        if model.has_mixing_effects:
            rows += list(index[start_a + i * (g - 1) + np.arange(g - 1)])
        if model.component_random_effects:
            rows += list(index[start_b + i * g * p + np.arange(g * p)])
        coords.append(rows)
    order = np.concatenate(coords)
    t = h[np.ix_(order, order)]  # posterior covariance of all random effects
    blocks = []
    if model.has_mixing_effects:
        blocks.append(np.asarray(params.mixing_cov))
    if model.component_random_effects:
        blocks.append(block_diag(*np.asarray(params.component_effects_cov)))
    g0 = np.block([[b if i == j else np.zeros((b.shape[0], c.shape[0])) for j, c in enumerate(blocks)]
                   for i, b in enumerate(blocks)])
    g_inv = np.linalg.inv(np.kron(np.eye(K), g0))
    x = g_inv - g_inv @ t @ g_inv
    r = g0.shape[0]
    selectors = []
    offset = g - 1 if model.has_mixing_effects else 0
    for kind, index in variance_parameters(model, p, p):
        e = np.zeros((r, r))
        if kind == "lambda":
            k, l = index
            e[k, l] = e[l, k] = 1.0
        else:
            h, a, b = index
            e[offset + h * p + a, offset + h * p + b] = e[offset + h * p + b, offset + h * p + a] = 1.0
        selectors.append(np.kron(np.eye(K), e))
    return np.array([[0.5 * np.trace(x @ ec @ x @ ed) for ed in selectors] for ec in selectors])


@pytest.mark.parametrize("g, effects", [(2, (True, True)), (2, (True, False)), (2, (False, True)), (3, (True, True))])
def test_variance_information_matches_dense_brute_force(g, effects):
    study = simulate_study(jax.random.key(3), g, num_tasks=5, n_per_task=40)
    model = MixtureGLMM(g, mixing_random_effects=effects[0], component_random_effects=effects[1])
    params = em_fit(model, study.train, jax.random.key(0), n_init=2, max_iter=200).params
    _, _, cov = fixed_and_variance_covariance(model, params, study.train)
    want = np.linalg.inv(dense_general_information(model, params, study.train))
    np.testing.assert_allclose(np.asarray(cov), want, rtol=1e-7)
    assert np.all(np.linalg.eigvalsh(np.asarray(cov)) > 0)


def lmm_problem():
    """g = 1, two responses, unbalanced tasks, at a parameter point (not a fit)."""
    params, design = random_problem(p=2, g=1, K=4, n=22, seed=5)
    params = params._replace(component_cov=jnp.asarray([[[1.0, 0.9], [0.9, 1.0]]]),
                             component_effects_cov=jnp.diag(jnp.asarray([0.8, 1.5]))[None])  # correlated responses
    return MixtureGLMM(1, random_effects_covariance="diagonal"), params, design


def dense_marginal(params, design):
    """Per-task y_i ~ N(X_i W, Sigma (x) I + 1 1' (x) diag(phi)): mean, covariance and design blocks."""
    y, x, task = map(np.asarray, (design.y, design.x_comp, design.task))
    w, sigma, phi = (np.asarray(a)[0] for a in (params.component_coef, params.component_cov,
                                                params.component_effects_cov))
    out = []
    for i in range(design.num_tasks):
        rows = task == i
        m = rows.sum()
        v = np.kron(np.eye(m), sigma) + np.kron(np.ones((m, m)), phi)
        xi = np.kron(x[rows], np.eye(2))  # vec(y_i) row-major = (x_j (x) I_2) vec(W)
        out.append((y[rows].ravel(), xi, v, m))
    return out, w


def test_lmm_variance_information_is_the_textbook_expected_reml_information():
    model, params, design = lmm_problem()
    _, _, cov = fixed_and_variance_covariance(model, params, design)
    blocks, _ = dense_marginal(params, design)
    vcs = [None, None]
    v = block_diag(*[b[2] for b in blocks])
    x = np.vstack([b[1] for b in blocks])
    for k in range(2):
        e = np.zeros((2, 2))
        e[k, k] = 1.0
        vcs[k] = block_diag(*[np.kron(np.ones((b[3], b[3])), e) for b in blocks])
    v_inv = np.linalg.inv(v)
    proj = v_inv - v_inv @ x @ np.linalg.inv(x.T @ v_inv @ x) @ x.T @ v_inv
    info = np.array([[0.5 * np.trace(proj @ a @ proj @ b) for b in vcs] for a in vcs])
    assert abs(info[0, 1]) > 1e-3 * abs(info[0, 0])  # the off-diagonal term matters here
    np.testing.assert_allclose(np.asarray(cov), np.linalg.inv(info), rtol=1e-8)


def test_lmm_fixed_effect_covariance_is_gls():
    model, params, design = lmm_problem()
    _, cov_w, _ = fixed_and_variance_covariance(model, params, design)
    blocks, _ = dense_marginal(params, design)
    gls = np.linalg.inv(sum(b[1].T @ np.linalg.inv(b[2]) @ b[1] for b in blocks))
    q = design.x_comp.shape[1]
    np.testing.assert_allclose(np.asarray(cov_w).reshape(q * 2, q * 2), gls, rtol=1e-8)


def test_lmm_residual_se_is_the_inverse_observed_information_of_the_marginal():
    model, params, design = lmm_problem()
    sigma = np.asarray(params.component_cov)[0]
    phi = np.diagonal(np.asarray(params.component_effects_cov)[0])

    def loglik(theta):  # theta = (S11, S12, S22, phi1, phi2)
        s = np.array([[theta[0], theta[1]], [theta[1], theta[2]]])
        moved = params._replace(component_cov=jnp.asarray(s)[None], component_effects_cov=jnp.diag(jnp.asarray(theta[3:]))[None])
        blocks, _ = dense_marginal(moved, design)
        w = np.asarray(params.component_coef)[0].ravel()
        return sum(multivariate_normal(b[1] @ w, b[2]).logpdf(b[0]) for b in blocks)

    theta = np.array([sigma[0, 0], sigma[0, 1], sigma[1, 1], phi[0], phi[1]])
    hess = central_hessian(loglik, theta, 1e-4 * np.maximum(np.abs(theta), 0.1))
    want = np.sqrt(np.diag(np.linalg.inv(-hess)))[:3]
    fields = ("component_cov", "component_effects_cov")
    got = np.sqrt(np.diagonal(np.asarray(marginal_covariance(model, params, design, fields))))[:3]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_em_fit_reports_standard_errors_for_every_parameter():
    from mtl_jax import fit

    study = simulate_study(jax.random.key(3), 2, num_tasks=6, n_per_task=60)
    result = fit(MixtureGLMM(2), study.train, "em", n_init=2, max_iter=300)
    se = result.summary()["se"]
    assert list(se.index) == list(result.named_parameters())
    assert np.all(np.isfinite(se.to_numpy())) and np.all(se.to_numpy() > 0)


def test_mixture_dispersion_se_is_the_inverse_hessian_of_the_converged_laplace_marginal():
    """g = 2, mixing and component random intercepts: the Laplace marginal's Hessian in
    (sigma_1^2, sigma_2^2, Lambda, phi_1, phi_2), against central differences of a Laplace
    approximation written here, whose per-task modes are Newton-iterated to machine precision
    at every perturbed point (the mode moves with the variances; its derivatives must be
    carried into the log-determinant)."""
    study = simulate_study(jax.random.key(3), 2, num_tasks=8, n_per_task=60)
    model, design = MixtureGLMM(2), study.train
    params = em_fit(model, design, jax.random.key(0), n_init=2, max_iter=500).params
    K = design.num_tasks
    y = design.y.reshape(K, -1)
    x, x_mix = design.x_comp.reshape(K, y.shape[1], -1), design.x_mix.reshape(K, y.shape[1], -1)
    v, w = params.mixing_coef[0], params.component_coef[:, :, 0]
    start = jnp.concatenate([params.mixing_effects, params.component_effects.reshape(K, 2)], axis=1)  # the BLUPs

    def task_log_joint(u, y_i, x_i, xm_i, theta):  # u = (a, b_1, b_2)
        logit = xm_i @ v + u[0]
        log_pi = jnp.stack([jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)], axis=-1)
        dens = jax.scipy.stats.norm.logpdf(y_i[:, None], x_i @ w.T + u[1:], jnp.sqrt(theta[:2]))
        prior = jax.scipy.stats.norm.logpdf(u, 0.0, jnp.sqrt(theta[2:])).sum()
        return jax.nn.logsumexp(log_pi + dens, axis=-1).sum() + prior

    @jax.jit
    def laplace(theta):
        def one_task(y_i, x_i, xm_i, u):
            grad = jax.grad(task_log_joint)
            hess = jax.hessian(task_log_joint)
            u = jax.lax.fori_loop(0, 60, lambda _, u: u - jnp.linalg.solve(hess(u, y_i, x_i, xm_i, theta),
                                                                            grad(u, y_i, x_i, xm_i, theta)),
                                  u)
            _, logdet = jnp.linalg.slogdet(-hess(u, y_i, x_i, xm_i, theta))
            return task_log_joint(u, y_i, x_i, xm_i, theta) + 1.5 * np.log(2 * np.pi) - 0.5 * logdet
        return jax.vmap(one_task)(y, x, x_mix, start).sum()

    theta = np.array([*np.asarray(params.component_cov)[:, 0, 0], float(params.mixing_cov[0, 0]),
                      *np.asarray(params.component_effects_cov)[:, 0, 0]])
    assert abs(float(laplace(theta)) - float(model.laplace(params, design)[0])) < 1e-8
    hess = central_hessian(lambda t: float(laplace(t)), theta, 1e-3 * theta)
    want = np.sqrt(np.diag(np.linalg.inv(-hess)))
    fields = ("component_cov", "mixing_cov", "component_effects_cov")
    got = np.sqrt(np.diagonal(np.asarray(marginal_covariance(model, params, design, fields))))
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_membership_per_task_standard_errors_are_the_inverse_hessian_of_the_exact_marginal():
    """Membership per task, Gaussian, random intercepts: the observed information of the
    marginal in (v, W, Sigma, Phi), against the Hessian of the exact marginal written here
    densely, sum_i log sum_h pi_h N(y_i; X_i w_h, sigma_h^2 I + phi_h 1 1^T). The task
    effects' modes move with the fixed effects: an intercept's standard error counts the
    spread of the task intercepts, not only the rows within each task."""
    import equinox as eqx
    from jax.scipy.stats import multivariate_normal as mvn

    study = simulate_study(jax.random.key(5), 2, num_tasks=12, n_per_task=40)
    design = eqx.tree_at(lambda d: d.x_mix, study.train, jnp.ones((study.train.y.shape[0], 1)))
    model = MixtureGLMM(2, membership="task")
    params = em_fit(model, design, jax.random.key(0), n_init=2, max_iter=500).params  # phi = (0.36, 0.42)
    K = design.num_tasks
    y = design.y.reshape(K, -1)
    x = design.x_comp.reshape(K, y.shape[1], -1)
    ones = jnp.ones((y.shape[1], y.shape[1]))

    def exact_marginal(v0, w, s2, phi):
        log_pi = jnp.array([jax.nn.log_sigmoid(v0), jax.nn.log_sigmoid(-v0)])

        def task(y_i, x_i):
            dens = jnp.stack([mvn.logpdf(y_i, x_i @ w[h], s2[h] * jnp.eye(y_i.shape[0]) + phi[h] * ones)
                              for h in range(2)])
            return jax.nn.logsumexp(log_pi + dens)
        return jax.vmap(task)(y, x).sum()

    def flat_marginal(theta):
        q = x.shape[-1]
        return exact_marginal(theta[0], theta[1:1 + 2 * q].reshape(2, q), theta[1 + 2 * q:3 + 2 * q], theta[3 + 2 * q:])

    theta = jnp.concatenate([params.mixing_coef.ravel(), params.component_coef.ravel(),
                             params.component_cov.ravel(), params.component_effects_cov.ravel()])
    np.testing.assert_allclose(float(model.laplace(params, design)[0]), float(flat_marginal(theta)), rtol=1e-12)
    information = -np.asarray(jax.hessian(flat_marginal)(theta))
    assert np.linalg.eigvalsh(information)[0] > 0  # a maximum
    want = np.sqrt(np.diag(np.linalg.inv(information)))
    fields = ("mixing_coef", "component_coef", "component_cov", "component_effects_cov")
    got = np.sqrt(np.diagonal(np.asarray(marginal_covariance(model, params, design, fields))))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The same through the public fit (same key, same fit), by the summary's names; and in float32.
    names = (["v[1, x0]"] + [f"w[{h}, x{k}]" for h in (1, 2) for k in range(x.shape[-1])]
             + ["sigma2[1]", "sigma2[2]", "phi[1]", "phi[2]"])
    fitted = mtl_jax.fit(model, design, "em", seed=0, n_init=2, max_iter=500)
    assert fitted.converged and not fitted.warnings
    np.testing.assert_allclose([fitted.diagnostics["standard_errors"][name] for name in names], want, rtol=1e-6)
    with jax.enable_x64(False):
        single = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32) if a.dtype.kind == "f" else a, design)
        fitted32 = mtl_jax.fit(model, single, "em", seed=0, n_init=2, max_iter=500)
    assert fitted32.converged
    se32 = [fitted32.diagnostics["standard_errors"][name] for name in names]
    np.testing.assert_allclose(se32, want, rtol=1e-3)
