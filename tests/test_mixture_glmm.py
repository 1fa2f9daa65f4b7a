"""Mixture GLMM: brute force at tiny sizes, EM monotonicity, recovery, label handling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import block_diag
import pytest
from scipy.stats import multivariate_normal
from support import random_problem

from mtl_jax.experiments.simulation import simulate_study, table1_params
from mtl_jax.infer.em import em_fit
from mtl_jax.metrics import explained_variance, match_components
from mtl_jax.models.mixture_glmm import MixtureGLMM


def brute_force_joint(params, design):
    """log pi_h + log f_h for every observation, by explicit loops (scipy densities)."""
    y, xc, xm, task = map(np.asarray, (design.y, design.x_comp, design.x_mix, design.task))
    P = jax.tree_util.tree_map(np.asarray, params)
    g = P.component_coef.shape[0]
    out = np.zeros((len(y), g))
    for j in range(len(y)):
        i = task[j]
        logits = [P.mixing_coef[h] @ xm[j] + P.mixing_effects[i, h] for h in range(g - 1)] + [0.0]
        log_pi = np.array(logits) - np.log(np.sum(np.exp(logits)))
        for h in range(g):
            mean = xc[j] @ P.component_coef[h] + P.component_effects[i, h, 0]
            out[j, h] = log_pi[h] + multivariate_normal(mean, P.component_cov[h]).logpdf(y[j])
    return out


@pytest.mark.parametrize("p", [1, 2])
def test_responsibilities_and_loglik_match_brute_force(p):
    params, design = random_problem(p=p)
    model = MixtureGLMM(3)
    joint = brute_force_joint(params, design)
    tau = np.exp(joint - np.log(np.exp(joint).sum(1, keepdims=True)))
    np.testing.assert_allclose(model.responsibilities(params, design), tau, rtol=1e-10)
    l1 = np.log(np.exp(joint).sum(1)).sum()
    l2 = sum(multivariate_normal(np.zeros(2), params.mixing_cov).logpdf(a)
             for a in np.asarray(params.mixing_effects))
    l2 += sum(multivariate_normal(np.zeros(3 * p), block_diag(*np.asarray(params.component_effects_cov)))
              .logpdf(np.ravel(b)) for b in np.asarray(params.component_effects))
    np.testing.assert_allclose(model.objective(params, design), l1 + l2, rtol=1e-10)


def test_em_step_objective_is_the_mixture_loglik_with_far_apart_logits():
    """The E-step's objective (one logarithm per row, the mixing partition divided out) is
    ``sum_j log sum_h pi_h f_h`` of the scipy loop, also where the logits differ by ~100."""
    params, design = random_problem(p=1, g=3, K=2, n=9, seed=4)
    params = params._replace(mixing_coef=60.0 * params.mixing_coef,
                             mixing_effects=jnp.zeros_like(params.mixing_effects),
                             component_effects=jnp.zeros_like(params.component_effects))
    model = MixtureGLMM(3, mixing_random_effects=False, component_random_effects=False)
    _, objective = jax.jit(model.em_step)(params, design)
    want = np.log(np.exp(brute_force_joint(params, design)).sum(1)).sum()
    np.testing.assert_allclose(objective, want, rtol=1e-12)


def test_halved_step_takes_the_first_halving_that_does_not_lose():
    from mtl_jax.models.mixture_glmm.em import halved_step

    def length(objective):
        return float(jax.jit(lambda: halved_step(objective, (jnp.zeros(()),), (jnp.ones(()),))[0])())

    assert length(lambda x: -(x - 0.3) ** 2) == 0.5  # the full step loses, half of it gains
    assert length(lambda x: x) == 1.0  # no loss at the full step
    assert length(lambda x: -x) == 0.0  # every step loses: the point stays
    assert length(lambda x: jnp.where(x > 0.1, jnp.nan, -(x - 0.3) ** 2)) == 0.0625  # NaN counts as a loss


def test_mixture_loglik_matches_enumeration_of_labels():
    """L1 = log of the complete-data likelihood summed over all g^n label vectors."""
    params, design = random_problem(p=1, g=2, n=6)
    model = MixtureGLMM(2)
    joint = brute_force_joint(params, design)
    total = sum(np.exp(sum(joint[j, z[j]] for j in range(6))) for z in itertools.product(range(2), repeat=6))
    l1 = jax.nn.logsumexp(model.log_joint(params, design), axis=1).sum()
    np.testing.assert_allclose(l1, np.log(total), rtol=1e-10)


def test_laplace_is_exact_for_linear_mixed_model():
    """g = 1 with component effects: the marginal is y_i ~ N(X_i w, Sigma (x) I + 1 1^T (x) Phi)."""
    params, design = random_problem(p=2, g=1, K=3, n=12, seed=3)
    model = MixtureGLMM(1, mixing_random_effects=False)
    P = jax.tree_util.tree_map(np.asarray, params)
    y, x, task = map(np.asarray, (design.y, design.x_comp, design.task))
    expected = 0.0
    for i in range(3):
        rows = task == i
        m = rows.sum()
        mean = (x[rows] @ P.component_coef[0]).ravel()
        cov = np.kron(np.eye(m), P.component_cov[0]) + np.kron(np.ones((m, m)), P.component_effects_cov[0])
        expected += multivariate_normal(mean, cov).logpdf(y[rows].ravel())
    np.testing.assert_allclose(model.score(params, design), expected, rtol=1e-10)


def test_laplace_matches_quadrature_for_a_mixture():
    """Mixing effects only: per-task Laplace values agree with 1-D numerical integration."""
    study = simulate_study(jax.random.key(11), 2, num_tasks=3, n_per_task=60)
    model = MixtureGLMM(2, component_random_effects=False, residual_update="ml")
    params = em_fit(model, study.train, jax.random.key(0), n_init=2, max_iter=200).params
    grid = jnp.linspace(-10, 10, 4001)

    def per_task_log_integrand(a):  # every task's effect set to a: f_i(a) for all i at once
        moved = params._replace(mixing_effects=jnp.full_like(params.mixing_effects, a))
        obs = jax.nn.logsumexp(model.log_joint(moved, study.train), axis=1)
        lam = params.mixing_cov[0, 0]
        prior = -0.5 * (np.log(2 * np.pi * lam) + a**2 / lam)
        return jax.ops.segment_sum(obs, study.train.task, num_segments=3) + prior

    values = np.asarray(jax.vmap(per_task_log_integrand)(grid))  # [grid, K]
    top = values.max(0)
    exact = np.sum(np.log(np.trapezoid(np.exp(values - top), np.asarray(grid), axis=0)) + top)
    laplace = float(model.score(params, study.train))
    assert abs(laplace - exact) < 0.02 * 3, (laplace, exact)


@pytest.mark.parametrize("effects", [(True, True), (False, True), (False, False)])
def test_em_objective_never_decreases_with_variance_components_fixed(effects):
    study = simulate_study(jax.random.key(1), 2, n_per_task=150)
    model = MixtureGLMM(2, mixing_random_effects=effects[0], component_random_effects=effects[1],
                        residual_update="ml")
    step = jax.jit(lambda prm: model.em_step(prm, study.train, update_variance_components=False)[0])
    objective = jax.jit(lambda prm: model.objective(prm, study.train))
    for seed in range(3):
        params = model.init(jax.random.key(seed), study.train)
        trace = []
        for _ in range(60):
            params = step(params)
            trace.append(float(objective(params)))
        trace = np.asarray(trace)
        assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:])), np.diff(trace).min()
        assert trace[-1] > trace[0] + 1.0  # the steps did move


def test_parameters_are_recovered_on_simulated_data():
    study = simulate_study(jax.random.key(7), 2)
    model = MixtureGLMM(2)
    result = em_fit(model, study.train, jax.random.key(0), n_init=4)
    assert bool(result.converged)
    order = match_components(result.params.component_coef, study.truth.component_coef)
    est = model.relabel(result.params, order)
    # Slopes are identified sharply; intercepts share their level with the task effects.
    np.testing.assert_allclose(est.component_coef[:, 1:], study.truth.component_coef[:, 1:], atol=0.06)
    np.testing.assert_allclose(est.mixing_coef[:, 1:], study.truth.mixing_coef[:, 1:], atol=0.15)
    np.testing.assert_allclose(est.component_cov.ravel(), 0.5, atol=0.05)
    np.testing.assert_allclose(est.component_effects[:, :, 0] + est.component_coef[None, :, 0],
                               study.truth.component_effects[:, :, 0] + study.truth.component_coef[None, :, 0],
                               atol=0.1)
    fitted = explained_variance(study.test.y, model.predict(result.params, study.test))
    oracle = explained_variance(study.test.y, model.predict(study.truth, study.test))
    assert oracle - fitted < 1.0


def test_every_permutation_of_components_is_a_symmetry():
    """All g! orders at g = 3: objective, marginal, predictions and scores are unchanged.

    The old diagonal re-expression of the mixing variances changed the marginal by several nats."""
    params, design = random_problem(p=1, g=3, K=3, n=30)
    model = MixtureGLMM(3)
    unseen = design.__class__(design.y, design.x_comp, design.x_mix, design.task + 3, 6)  # tasks 3..5 unseen
    reference = [model.objective(params, design), model.score(params, design),
                 model.predict(params, design), model.log_predictive(params, design),
                 model.predict(params, unseen), model.log_predictive(params, unseen)]
    assert np.isfinite(reference[1])
    for order in itertools.permutations(range(3)):
        moved = model.relabel(params, np.array(order))
        values = [model.objective(moved, design), model.score(moved, design),
                  model.predict(moved, design), model.log_predictive(moved, design),
                  model.predict(moved, unseen), model.log_predictive(moved, unseen)]
        for k, (got, want) in enumerate(zip(values, reference)):
            tolerance = 1e-9 if k < 4 else 1e-5  # unseen tasks: quadrature in another basis
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(moved.component_coef, params.component_coef[np.array(order)])
    back = model.relabel(model.relabel(params, np.array([2, 0, 1])), np.array([1, 2, 0]))
    np.testing.assert_allclose(back.mixing_coef, params.mixing_coef, atol=1e-12)


def test_em_fit_traces_once_for_repeated_calls():
    model = MixtureGLMM(2)
    study = simulate_study(jax.random.key(3), 2, n_per_task=50)
    em_fit(model, study.train, jax.random.key(0), n_init=2, max_iter=20)
    size = em_fit._cache_size()
    other = simulate_study(jax.random.key(4), 2, n_per_task=50)
    em_fit(model, other.train, jax.random.key(1), n_init=2, max_iter=20)
    assert em_fit._cache_size() == size


def test_float32_fit_is_stable_and_close_to_float64():
    study = simulate_study(jax.random.key(5), 4, n_per_task=150)
    model = MixtureGLMM(4)
    r64 = em_fit(model, study.train, jax.random.key(0), n_init=2, max_iter=200)
    train32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, study.train)
    r32 = em_fit(model, train32, jax.random.key(0), n_init=2, max_iter=200)
    assert r32.params.component_coef.dtype == jnp.float32
    assert all(np.all(np.isfinite(leaf)) for leaf in r32.params)
    assert abs(float(r32.loglik) - float(r64.loglik)) < 1e-3 * abs(float(r64.loglik))


def test_table1_params_shapes():
    params = table1_params(8)
    assert params.mixing_coef.shape == (7, 5)
    assert params.component_coef.shape == (8, 5, 1)


@pytest.mark.parametrize("g, p", [(3, 1), (2, 2), (3, 2)])
def test_models_without_random_effects_fit_for_any_g_and_p(g, p):
    """The independence model (Table 2's baseline) at g >= 3 or p > 1 through the public fit().

    Its score is the plain mixture log-likelihood, checked against the scipy loop; with the
    ML residual update (an exact M-step) EM must not decrease it.
    """
    from mtl_jax import fit

    _, design = random_problem(p=p, g=g, K=3, n=60, seed=2)
    model = MixtureGLMM(g, mixing_random_effects=False, component_random_effects=False, residual_update="ml")
    result = fit(model, design, "em", n_init=2, max_iter=100)
    params = jax.tree_util.tree_map(jnp.asarray, result.params)
    want = np.log(np.exp(brute_force_joint(params, design)).sum(1)).sum()
    np.testing.assert_allclose(result.loglik, want, rtol=1e-10)
    assert np.all(np.diff(result.trace) >= -1e-8 * np.abs(result.trace[1:]))
    assert result.trace[-1] > result.trace[0] + 1.0


def _finite_difference_gradient(function, point: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar ``function`` at ``point``, entry by entry."""
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        shift = np.zeros_like(point)
        shift[index] = step
        grad[index] = (function(point + shift) - function(point - shift)) / (2 * step)
    return grad


@pytest.mark.parametrize("p", [1, 2])
def test_em_ends_where_the_loglik_is_flat_in_the_mixing_coefficients(p):
    """g = 3 through the public fit(): two mixing logits, so the Newton step's weights have
    off-diagonal blocks. At a converged EM fit the scipy loop's log-likelihood has zero
    gradient in v (central differences), as EM's fixed point must."""
    from mtl_jax import fit

    _, design = random_problem(p=p, g=3, K=3, n=60, seed=2)
    model = MixtureGLMM(3, mixing_random_effects=False, component_random_effects=False, residual_update="ml")
    result = fit(model, design, "em", n_init=2, max_iter=1000)
    assert result.converged
    params = jax.tree_util.tree_map(np.asarray, result.params)

    def loglik(v):
        return np.log(np.exp(brute_force_joint(params._replace(mixing_coef=v), design)).sum(1)).sum()

    grad = _finite_difference_gradient(loglik, params.mixing_coef)
    assert np.max(np.abs(grad)) < 1e-2, grad
    assert np.max(np.abs(_finite_difference_gradient(loglik, params.mixing_coef + 0.5))) > 0.1  # the check can fail


def test_newton_ascent_stops_at_the_modes_without_halving_on_rounding_noise():
    """Concave quadratics f_i(u) = c_i - (u - m_i)^T A_i (u - m_i) / 2 with a large constant c_i
    (so float32 rounding of f_i is far above a converged step's gain): the modes m_i are
    found (Newton is exact in one step), and the ascent makes only a few passes over the
    tasks instead of halving every step down to 2^-20 on rounding noise."""
    from mtl_jax.models.mixture_glmm.likelihood import newton_ascent

    rng = np.random.default_rng(0)
    K, r = 200, 3
    roots = rng.normal(size=(K, r, r))
    A = np.einsum("kij,klj->kil", roots, roots) + 0.5 * np.eye(r)
    m = rng.normal(size=(K, r))
    c = rng.uniform(1e4, 1e5, size=K)
    A32, m32, c32 = (jnp.asarray(a, jnp.float32) for a in (A, m, c))
    calls = {"value": 0}

    def count():
        calls["value"] += 1

    def task_value(u):
        jax.debug.callback(count)
        d = u - m32
        return c32 - 0.5 * jnp.einsum("ki,kij,kj->k", d, A32, d)

    def task_derivatives(u):
        return -jnp.einsum("kij,kj->ki", A32, u - m32), -A32

    u, decrement = jax.jit(lambda u0: newton_ascent(task_value, task_derivatives, u0, 20))(jnp.zeros((K, r), jnp.float32))
    np.testing.assert_allclose(np.asarray(u), m, atol=2e-4 * np.abs(m).max())
    assert np.all(np.abs(np.asarray(decrement)) <= 16 * np.finfo(np.float32).eps * (1 + c))
    assert calls["value"] <= 4  # the start, one step, and at most two more (the old loop made 20 x 21)


def test_newton_ascent_leaves_a_saddle_for_a_maximum():
    """f(u) = -u1^2/2 + u2^2/2 - u2^4/4 (maxima at u2 = +-1, a saddle at u2 = 0) started on the
    saddle's axis: the gradient along u2 is zero there, so a plain (shifted) Newton step
    stays on it; the ascent must step along the negative curvature to a true maximum."""
    from mtl_jax.models.mixture_glmm.likelihood import newton_ascent

    def task_value(u):
        return -0.5 * u[:, 0] ** 2 + 0.5 * u[:, 1] ** 2 - 0.25 * u[:, 1] ** 4

    def task_derivatives(u):
        grad = jnp.stack([-u[:, 0], u[:, 1] - u[:, 1] ** 3], axis=1)
        hess = jax.vmap(lambda b: jnp.diag(jnp.stack([-1.0, 1.0 - 3.0 * b ** 2])))(u[:, 1])
        return grad, hess

    start = jnp.array([[0.5, 0.0], [-2.0, 0.0], [0.3, 0.5]])
    u, decrement = newton_ascent(task_value, task_derivatives, start, 20)
    np.testing.assert_allclose(np.abs(np.asarray(u)), [[0, 1], [0, 1], [0, 1]], atol=1e-8)
    assert np.all(np.abs(np.asarray(decrement)) < 1e-12)  # at a maximum: -H positive definite there
