"""MAP training of the multitask net with the NumPyro program's priors as its penalty: the
empirical-Bayes refresh of the head scale against the exact evidence maximum (linear
Gaussian heads) and the Laplace fixed point (logistic heads), the objective against the
program's log joint density, and the public fit() learning the scale."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from numpyro.infer.util import log_density
from scipy import optimize, stats

from mtl_jax import fit
from mtl_jax.data.personal import PersonData
from mtl_jax.models.mtl_net import MTLNet, empirical_bayes


def task_frame(seed, people, rows, head_sd, binary=False, q=3):
    """Linear per-person heads: a shared slope plus N(0, head_sd^2) deviations."""
    rng = np.random.default_rng(seed)
    n = people * rows
    X = rng.normal(size=(n, q))
    person = np.repeat(np.arange(people), rows)
    slopes = np.array([1.0, -0.5, 0.25][:q]) + head_sd * rng.normal(size=(people, q))
    intercepts = 0.3 + head_sd * rng.normal(size=people)
    eta = np.einsum("nq,nq->n", X, slopes[person]) + intercepts[person]
    if binary:
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    else:
        y = eta + 0.5 * rng.normal(size=n)
    frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(q)])
    frame.insert(0, "user", [f"p{k}" for k in person])
    frame["y_Label"] = y
    return frame


def unit_features(data, H):
    """``[X, 1] * u`` with u = (1/sqrt(H), ..., 1): the features whose coefficients have prior N(0, tau^2 I)."""
    X = np.asarray(data.X)
    return np.c_[X / np.sqrt(H), np.ones(len(X))]


def heads_at(data, seed):
    model = MTLNet(hidden=())
    params = model.init(jax.random.key(seed), data)
    K = data.num_tasks
    return model, eqx.tree_at(lambda p: (p.population_weight, p.population_bias, p.log_noise_sd), params,
                              (jnp.array([0.9, -0.4, 0.3]), jnp.asarray(0.2), jnp.linspace(-0.8, -0.5, K)))


def test_gaussian_heads_refresh_to_the_exact_evidence_maximum():
    rows = 25
    data = PersonData.from_dataframe(task_frame(0, people=8, rows=rows, head_sd=0.4), person="user")
    model, params = heads_at(data, 0)
    ones = jnp.ones_like(data.y)
    pi = 1.0 / rows  # the program's N(0, 1) prior on the standardised population head v, over m rows
    refreshed = empirical_bayes.refresh(params, data.X, data.y, data.task, jnp.zeros(len(ones), bool), ones,
                                        "relu", jnp.full(4, pi), rounds=400)
    # reference: maximise log N(y_k - phi_k v; 0, s_k^2 I + tau^2 phi_k phi_k^T) summed over tasks,
    # plus log N(v; 0, I), over (log tau, v), written out with scipy
    phi, task, y = unit_features(data, 3), np.asarray(data.task), np.asarray(data.y)
    noise = np.exp(2 * np.asarray(params.log_noise_sd))

    def minus_log_posterior(theta):
        log_tau, v = theta[0], theta[1:]
        total = -0.5 * v @ v
        for k in range(data.num_tasks):
            f, r = phi[task == k], (y - phi @ v)[task == k]
            cov = noise[k] * np.eye(len(r)) + np.exp(2 * log_tau) * f @ f.T
            total += stats.multivariate_normal.logpdf(r, np.zeros(len(r)), cov)
        return -total

    best = optimize.minimize(minus_log_posterior, np.zeros(5), method="BFGS", options={"gtol": 1e-9})
    tau = float(np.exp(refreshed.head_log_scale))
    v = np.r_[np.asarray(refreshed.population_weight) * np.sqrt(3), float(refreshed.population_bias)]
    np.testing.assert_allclose(tau, np.exp(best.x[0]), rtol=1e-5)
    np.testing.assert_allclose(v, best.x[1:], atol=1e-6)
    # and the deviations are each task's posterior mean at that scale
    zeta = np.asarray(empirical_bayes.standardised_deviations(refreshed))
    for k in range(data.num_tasks):
        f, r = phi[task == k], (y - phi @ v)[task == k]
        mean = tau**2 * f.T @ np.linalg.solve(noise[k] * np.eye(len(r)) + tau**2 * f @ f.T, r)
        np.testing.assert_allclose(zeta[k], mean, rtol=1e-7, atol=1e-9)


def test_logistic_heads_refresh_to_the_laplace_evidence_fixed_point():
    rows = 40
    data = PersonData.from_dataframe(task_frame(1, people=6, rows=rows, head_sd=0.8, binary=True), person="user")
    model, params = heads_at(data, 1)
    ones = jnp.ones_like(data.y)
    pi = np.r_[np.full(3, 0.02), 0.0]  # an L2 weight on the population slopes, none on its intercept
    refreshed = empirical_bayes.refresh(params, data.X, data.y, data.task, jnp.ones(len(ones), bool), ones,
                                        "relu", jnp.asarray(pi), rounds=300)
    tau = float(np.exp(refreshed.head_log_scale))
    zeta = np.asarray(empirical_bayes.standardised_deviations(refreshed))
    v = np.r_[np.asarray(refreshed.population_weight) * np.sqrt(3), float(refreshed.population_bias)]
    phi, task, y = unit_features(data, 3), np.asarray(data.task), np.asarray(data.y)
    determined, squares = 0.0, 0.0
    for k in range(data.num_tasks):
        f, yk = phi[task == k], y[task == k]

        def penalised(z):  # zeta_k minimises the penalised Bernoulli NLL (scipy, from zero)
            eta = f @ (v + z)
            return np.sum(np.logaddexp(0, eta) - yk * eta) + z @ z / (2 * tau**2)

        np.testing.assert_allclose(zeta[k], optimize.minimize(penalised, np.zeros(4), method="BFGS",
                                                              options={"gtol": 1e-10}).x, atol=1e-5)
        p = 1 / (1 + np.exp(-f @ (v + zeta[k])))
        eigenvalues = np.linalg.eigvalsh(f.T @ (f * (p * (1 - p))[:, None]))
        determined += np.sum(eigenvalues * tau**2 / (1 + eigenvalues * tau**2))
        squares += zeta[k] @ zeta[k]
    # MacKay: tau^2 = sum ||zeta||^2 / gamma, the stationary point of the Laplace evidence
    np.testing.assert_allclose(tau**2, squares / determined, rtol=1e-6)
    # the shift v + mu, zeta - mu cannot lower sum ||zeta_k||^2 / (2 tau^2 m) + pi v^2 / 2
    np.testing.assert_allclose(zeta.sum(0) / (tau**2 * rows), pi * v, atol=1e-8)


def test_default_objective_is_the_program_log_joint_up_to_a_constant():
    frame = task_frame(2, people=4, rows=30, head_sd=0.5, binary=True)
    data = PersonData.from_dataframe(frame, person="user")
    model = MTLNet(hidden=(3,), prior_scale=0.8)
    assert model.l2_shared is None and model.l2_task is None
    ones = jnp.ones_like(data.y)
    m = 30.0  # rows per task, all labels observed

    def difference(seed):
        params = model.init(jax.random.key(seed), data)
        params = jax.tree_util.tree_map(lambda leaf: leaf + 0.3 * jax.random.normal(jax.random.key(seed + 9), leaf.shape),
                                        params)
        params = eqx.tree_at(lambda p: p.head_log_scale, params, jnp.log(jnp.asarray(0.6)))  # tau held fixed
        objective = jnp.sum(model.task_losses(params, data, ones)) + model.penalty(params, data, ones)
        values = model.site_values(params)
        values["head_scale"] = jnp.asarray(0.6)
        log_joint, _ = log_density(model.numpyro_model, (data,), {"centred": True}, values)
        return float(m * objective + log_joint)

    first, second = difference(0), difference(1)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-9 * abs(first))


def test_fit_learns_a_small_scale_for_identical_tasks_and_a_large_one_for_different_tasks():
    scales = {}
    for head_sd in (0.0, 1.0):
        data = PersonData.from_dataframe(task_frame(3, people=20, rows=30, head_sd=head_sd), person="user")
        fitted = fit(MTLNet(hidden=()), data, method="map", max_steps=1500)
        scales[head_sd] = float(np.exp(fitted.params.head_log_scale))
    # identical tasks: tau at its floor. Head sd 1 (features of sd about 1): the standardised
    # deviations zeta = (delta * sqrt(3), epsilon) have root-mean-square sqrt((3 * 3 + 1) / 4) = 1.58
    assert scales[0.0] < 0.01
    assert 1.2 < scales[1.0] < 2.0


def test_refresh_in_float32_matches_float64_with_many_heads():
    frame = task_frame(4, people=1000, rows=6, head_sd=0.5, binary=True)
    results = {}
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            data = PersonData.from_dataframe(frame, person="user")
            model, params = heads_at(data, 4)
            params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, data.X.dtype), params)
            refreshed = jax.jit(empirical_bayes.refresh, static_argnames=("activation", "rounds"))(
                params, data.X, data.y, data.task, jnp.ones(len(data.y), bool), jnp.ones_like(data.y), "relu",
                jnp.full(4, 1.0 / 6, data.X.dtype), 20)
            results[dtype] = (float(np.exp(refreshed.head_log_scale)), np.asarray(refreshed.head_weight, np.float64))
    np.testing.assert_allclose(results["float32"][0], results["float64"][0], rtol=1e-4)
    np.testing.assert_allclose(results["float32"][1], results["float64"][1], atol=1e-4)
