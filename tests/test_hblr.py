"""The Dirichlet-process HBLR: every VB update against the ELBO (monotone, stationary, exact),
the closed-form ELBO against Monte Carlo, the membership update's sign, cluster recovery and
AUC on synthetic tasks, the probit predictive, the NumPyro program by brute-force enumeration,
save/load, float32, awkward tasks, the CLI, SVI and NUTS."""

import itertools
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from jax.scipy import stats as jstats
from numpyro.infer.util import log_density
from scipy import stats

from mtl_jax import Fit, fit
from mtl_jax.data.personal import PersonData
from mtl_jax.data.tabular import DataError
from mtl_jax.metrics import adjusted_rand_index, roc_auc
from mtl_jax.models.hblr import HBLR, default_clusters, vb
from mtl_jax.models.hblr.vb import HBLRParams
from mtl_jax.models.protocol import model_class
from support import cli_fit_predict_score

TRUE_W = np.array([0.0, 2.0, -2.0, 1.0, 0.0])  # intercept, then 4 slopes; cluster 2 has -TRUE_W


def cluster_frame(seed=0, tasks=12, train=20, test=30, q=4):
    """``tasks`` people in two clusters with opposite decision boundaries (even / odd task ids)."""
    rng = np.random.default_rng(seed)
    parts = []
    for m in range(tasks):
        n = train + test
        X = rng.normal(size=(n, q))
        sign = 1.0 if m % 2 == 0 else -1.0
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-sign * X @ TRUE_W[1:q + 1]))).astype(float)
        part = pd.DataFrame(X, columns=[f"f_x{j}" for j in range(q)])
        part.insert(0, "user", f"t{m:02d}")
        part["split"] = ["train"] * train + ["test"] * test
        part["y_Label"] = y
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def random_state(seed=0, M=4, K=3, q=2, n=14, missing=2):
    """Random rows (some unused) and a random valid variational posterior."""
    rng = np.random.default_rng(seed)
    d = q + 1
    X = rng.normal(size=(n, q))
    y = (rng.uniform(size=n) < 0.5).astype(float)
    weight = np.ones(n)
    weight[:missing] = 0.0  # missing labels: contribute nothing
    split = np.zeros(n, dtype=np.int32)
    split[-1] = 2  # a test row: contributes nothing
    task = np.arange(n) % M
    data = vb.rows(jnp.asarray(X), jnp.asarray(y), jnp.asarray(weight), jnp.asarray(split),
                   jnp.asarray(task, dtype=jnp.int32), M)
    root = rng.normal(size=(K, d, d))
    params = HBLRParams(
        mean=jnp.asarray(rng.normal(size=(K, d))),
        cov=jnp.asarray(0.3 * root @ np.swapaxes(root, 1, 2) + 0.2 * np.eye(d)),
        membership=jnp.asarray(rng.dirichlet(np.ones(K), size=M)),
        cluster_weight=jnp.full((K,), 1.0 / K),
        stick_a=jnp.asarray(rng.uniform(0.5, 4.0, size=K - 1)),
        stick_b=jnp.asarray(rng.uniform(0.5, 4.0, size=K - 1)),
        alpha=jnp.asarray(rng.uniform(0.3, 3.0)),
    )
    prior = HBLR(prior_sd=1.5, intercept_sd=2.5, alpha_shape=2.0, alpha_rate=1.5).prior(q, jnp.float64)
    xi = jnp.asarray(rng.uniform(0.1, 3.0, size=(n, K)))  # a non-optimal xi
    return params, data, prior, xi


@pytest.fixture(scope="module")
def synthetic():
    frame = cluster_frame()
    data = PersonData.from_dataframe(frame, person="user", split="split")
    return frame, data, fit(HBLR(), data, method="vb")


# ---------------------------------------------------------------- 1. monotone VB
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_update_does_not_decrease_the_elbo(seed):
    params, data, prior, _ = random_state(seed)
    elbo = jax.jit(vb.elbo)
    value = elbo(params, data, prior)
    steps = [("W", jax.jit(lambda p: vb.update_weights(p, data, prior, vb.optimal_xi(p, data.x)))),
             ("c", jax.jit(lambda p: vb.update_membership(p, data, vb.optimal_xi(p, data.x)))),
             ("v", jax.jit(vb.update_sticks)),
             ("alpha", jax.jit(lambda p: vb.update_alpha(p, prior))),
             ("order", jax.jit(lambda p: vb.update_sticks_and_alpha(p, prior)))]
    for _ in range(3):
        for name, step in steps:
            params = step(params)
            new = elbo(params, data, prior)
            assert new >= value - 1e-9 * abs(value), (name, float(new), float(value))
            value = new


def test_relabelling_moves_a_large_cluster_forward_and_raises_the_elbo():
    params, data, prior, _ = random_state(6)
    K = params.membership.shape[1]
    phi = jnp.zeros_like(params.membership).at[:, K - 1].set(1.0)  # every task in the last cluster
    params = vb.update_alpha(vb.update_sticks(params._replace(membership=phi)), prior)
    better = vb.update_sticks_and_alpha(params, prior)
    assert float(better.membership[:, 0].min()) == 1.0  # moved to the front
    assert vb.elbo(better, data, prior) > vb.elbo(params, data, prior) + 0.05
    np.testing.assert_array_equal(np.asarray(better.mean[0]), np.asarray(params.mean[K - 1]))


def test_updates_are_stationary_points_of_the_elbo():
    """Each update zeroes the gradient of the ELBO (xi fixed) over its own factor."""
    params, data, prior, xi = random_state(3)
    grad = jax.jit(jax.grad(lambda q: vb.elbo(q, data, prior, xi)))
    update_weights = jax.jit(vb.update_weights)
    after_w = update_weights(params, data, prior, xi)
    g = grad(after_w)
    np.testing.assert_allclose(g.mean, 0.0, atol=1e-8)
    np.testing.assert_allclose((g.cov + jnp.swapaxes(g.cov, 1, 2)) / 2, 0.0, atol=1e-8)
    after_v = jax.jit(vb.update_sticks)(params)
    g = grad(after_v)
    np.testing.assert_allclose(g.stick_a, 0.0, atol=1e-8)
    np.testing.assert_allclose(g.stick_b, 0.0, atol=1e-8)
    after_alpha = jax.jit(vb.update_alpha)(params, prior)
    np.testing.assert_allclose(grad(after_alpha).alpha, 0.0, atol=1e-8)
    assert abs(float(grad(params).alpha)) > 1e-3  # the checks can fail: a random point is not stationary
    # an empty cluster gets its prior back, in place
    phi = params.membership.at[:, 1].set(0.0)
    empty = update_weights(params._replace(membership=phi / phi.sum(1, keepdims=True)), data, prior, xi)
    np.testing.assert_allclose(empty.mean[1], prior.mean, atol=1e-12)
    np.testing.assert_allclose(empty.cov[1], jnp.diag(prior.var), rtol=1e-12)


def test_whole_fit_trace_is_monotone(synthetic):
    _, _, res = synthetic
    trace = np.asarray(res.trace)
    assert res.converged and len(trace) > 3
    assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))


def test_test_rows_and_missing_labels_contribute_nothing():
    frame = cluster_frame(seed=4, tasks=4, train=8, test=4, q=2)
    frame.loc[[0, 13], "y_Label"] = np.nan
    data = PersonData.from_dataframe(frame, person="user", split="split")
    model = HBLR(clusters=3)
    params = model.init(jax.random.key(1), data)
    unused = (np.asarray(data.split) == 2) | (np.asarray(data.weight) == 0)
    changed = eqx.tree_at(lambda d: (d.y, d.X), data, (jnp.where(unused, 1.0 - data.y, data.y),
                                                       jnp.where(unused[:, None], 5.0, data.X)))
    step = jax.jit(model.em_step)
    (a, elbo_a), (b, elbo_b) = step(params, data), step(params, changed)
    assert float(elbo_a) == float(elbo_b)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    assert model.num_observations(data) == int(np.sum(~unused))


# ---------------------------------------------------- 2. closed form vs Monte Carlo
@jax.jit
def monte_carlo_values(key, params, data, prior, xi):
    """Bounded log joint minus log q at 100,000 draws from q (c, v, alpha, W), xi fixed."""
    M, K = params.membership.shape
    S, d = 100_000, params.mean.shape[1]
    keys = jax.random.split(key, 4)
    c = jax.random.categorical(keys[0], jnp.log(params.membership), shape=(S, M))  # [S, M]
    v = jax.random.beta(keys[1], params.stick_a, params.stick_b, shape=(S, K - 1))
    a = prior.alpha_shape + K - 1
    rate = a / params.alpha
    alpha = jax.random.gamma(keys[2], a, shape=(S,)) / rate
    W = params.mean + jnp.einsum("kde,ske->skd", jnp.linalg.cholesky(params.cov),
                                 jax.random.normal(keys[3], (S, K, d)))
    cn = c[:, data.task]  # [S, n]: the cluster of each row's task
    t = jnp.einsum("snd,nd->sn", jnp.take_along_axis(W, cn[..., None], axis=1), data.x)
    xin = jnp.take_along_axis(jnp.broadcast_to(xi, (S,) + xi.shape), cn[..., None], axis=2)[..., 0]
    h = jax.nn.log_sigmoid(xin) + (data.s * t - xin) / 2 - vb.jj_lambda(xin) * (t ** 2 - xin ** 2)
    log_pi = jax.vmap(lambda vv: vb.stick_breaking_log(jnp.log(vv), jnp.log1p(-vv)))(v)  # [S, K]
    log_joint = (jnp.sum(data.use * h, axis=1)
                 + jnp.sum(jnp.take_along_axis(log_pi, c, axis=1), axis=1)
                 + jnp.sum(jstats.beta.logpdf(v, 1.0, alpha[:, None]), axis=1)
                 + jstats.gamma.logpdf(alpha, prior.alpha_shape, scale=1 / prior.alpha_rate)
                 + jnp.sum(jstats.norm.logpdf(W, prior.mean, jnp.sqrt(prior.var)), axis=(1, 2)))
    log_q = (jnp.sum(jnp.log(jnp.take_along_axis(params.membership[None], c[..., None], axis=2)[..., 0]), axis=1)
             + jnp.sum(jstats.beta.logpdf(v, params.stick_a, params.stick_b), axis=1)
             + jstats.gamma.logpdf(alpha, a, scale=1 / rate)
             + jnp.sum(jax.vmap(jstats.multivariate_normal.logpdf, in_axes=(1, 0, 0), out_axes=1)(
                 W, params.mean, params.cov), axis=1))
    return log_joint - log_q


def test_closed_form_elbo_equals_monte_carlo():
    """At a random q and a non-optimal xi (so the lambda term and its sign are exercised)."""
    params, data, prior, xi = random_state(4)
    values = np.asarray(monte_carlo_values(jax.random.key(0), params, data, prior, xi))
    estimate, se = values.mean(), values.std() / math.sqrt(values.size)
    closed = float(vb.elbo(params, data, prior, xi))
    assert abs(estimate - closed) < 4 * se, (estimate, closed, se)
    assert se < 0.05  # the test has power: a wrong term of this size would show


# ------------------------------------------------------- 3. the exact q(c) update
def test_membership_update_is_the_exact_maximiser_and_the_flipped_sign_is_not():
    """The ELBO is linear in phi_m plus its entropy, so ELBO(phi*) - ELBO(phi) = sum_m KL(phi_m || phi*_m)
    exactly; the original project's update (+lambda) is off the maximum at a non-optimal xi."""
    params, data, prior, xi = random_state(5)
    best = vb.update_membership(params, data, xi)
    top = float(vb.elbo(best, data, prior, xi))
    rng = np.random.default_rng(0)
    for _ in range(5):
        phi = jnp.asarray(rng.dirichlet(np.ones(best.membership.shape[1]), size=best.membership.shape[0]))
        other = float(vb.elbo(best._replace(membership=phi), data, prior, xi))
        kl = float(jnp.sum(phi * (jnp.log(phi) - jnp.log(best.membership))))
        np.testing.assert_allclose(top - other, kl, rtol=1e-9, atol=1e-10)
    # the flipped sign: + lambda (E[t^2] - xi^2)
    mu, var = vb.linear_moments(params, data.x)
    flipped_bound = (jax.nn.log_sigmoid(xi) + (data.s[:, None] * mu - xi) / 2
                     + vb.jj_lambda(xi) * (var + mu ** 2 - xi ** 2))
    M = params.membership.shape[0]
    logits = vb.expected_log_pi(params)[None] + jax.ops.segment_sum(data.use[:, None] * flipped_bound, data.task, M)
    flipped = params._replace(membership=jax.nn.softmax(logits, axis=-1))
    assert float(vb.elbo(flipped, data, prior, xi)) < top - 1e-3


# ------------------------------------------------------------ 4. synthetic recovery
def test_recovers_two_clusters_and_beats_the_baselines(synthetic):
    frame, data, res = synthetic
    phi = res.task_tables["class_probabilities"]
    assert phi.index.name == "task" and list(phi.columns) == [str(k + 1) for k in range(default_clusters(12))]
    truth = np.arange(12) % 2
    ari = adjusted_rand_index(truth, phi.to_numpy().argmax(axis=1))
    assert ari >= 0.9
    saved = res.to_dict()
    assert saved["clusters"]["t00"]["cluster"] == int(phi.loc["t00"].to_numpy().argmax()) + 1
    assert saved["occupied_clusters"] == 2
    test = frame[frame["split"] == "test"]
    y = test["y_Label"].to_numpy()
    auc = {"hblr": roc_auc(y, res.predict(test)[:, 0])}
    for name in ("logistic", "pooled-logistic"):
        auc[name] = roc_auc(y, fit(model_class(name)(), data, method="map").predict(test)[:, 0])
    assert auc["hblr"] > auc["logistic"] + 0.02 and auc["hblr"] > auc["pooled-logistic"] + 0.2, auc


# ------------------------------------------------------------ 5. probit predictive
@pytest.mark.parametrize("mu,var", [(0.0, 1.0), (1.5, 0.5), (-2.0, 4.0), (3.0, 9.0), (0.7, 0.01)])
def test_probit_approximation_is_close_to_quadrature(mu, var):
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    exact = np.sum(weights * stats.logistic.cdf(mu + math.sqrt(var) * nodes)) / math.sqrt(2 * math.pi)
    approx = stats.logistic.cdf(mu / math.sqrt(1 + math.pi * var / 8))
    assert abs(exact - approx) < 0.02


def test_predict_is_the_probit_mixture_for_known_and_unseen_tasks(synthetic):
    frame, data, res = synthetic
    new = frame.iloc[[0, 1, 60]].copy()
    new.loc[new.index[2], "user"] = "newcomer"
    p = res.predict(new)[:, 0]
    params = jax.tree_util.tree_map(np.asarray, res.params)
    X = (new[[f"f_x{j}" for j in range(4)]].to_numpy() - np.asarray(data.schema.mean)) / np.asarray(data.schema.sd)
    x = np.column_stack([np.ones(3), X])
    mu = x @ params.mean.T
    var = np.einsum("nd,kde,ne->nk", x, params.cov, x)
    sig = stats.logistic.cdf(mu / np.sqrt(1 + np.pi * var / 8))
    weights = np.stack([params.membership[0], params.membership[0], params.cluster_weight])  # t00, t00, newcomer
    np.testing.assert_allclose(p, np.sum(weights * sig, axis=1), rtol=1e-10)
    np.testing.assert_allclose(params.cluster_weight.sum(), 1.0, rtol=1e-12)


def test_align_permutes_clusters_without_changing_predictions_or_a_points_score(synthetic):
    frame, data, res = synthetic
    model = res.model
    point = jax.tree_util.tree_map(jnp.asarray, res.params)
    point = point._replace(cov=jnp.zeros_like(point.cov))  # a draw-like point
    order = np.array([2, 0, 1, 4, 3, 6, 5])
    shuffled = point._replace(mean=point.mean[order], cov=point.cov[order], membership=point.membership[:, order],
                              cluster_weight=point.cluster_weight[order])
    aligned = model.align(shuffled, point)
    np.testing.assert_array_equal(np.asarray(aligned.membership), np.asarray(point.membership))
    design = model.design(data)
    np.testing.assert_allclose(model.predict(shuffled, design), model.predict(point, design), rtol=1e-12)
    np.testing.assert_allclose(model.score(shuffled, design), model.score(point, design), rtol=1e-12)


# --------------------------------------------------- 6. NumPyro program, brute force
def test_numpyro_log_density_equals_enumerated_joint():
    rng = np.random.default_rng(1)
    M, K, q, per = 3, 2, 2, 4
    frame = pd.DataFrame(rng.normal(size=(M * per, q)), columns=["a_1", "a_2"])
    frame.insert(0, "user", np.repeat(["u0", "u1", "u2"], per))
    frame["y_Label"] = (rng.uniform(size=M * per) < 0.5).astype(float)
    frame.loc[3, "y_Label"] = np.nan  # a missing label contributes nothing
    data = PersonData.from_dataframe(frame, person="user")
    model = HBLR(clusters=K, prior_sd=1.3, intercept_sd=2.1, alpha_shape=2.0, alpha_rate=0.7)
    W = rng.normal(size=(K, q + 1))
    v = np.array([0.35])
    alpha = 1.7
    got, _ = log_density(model.numpyro_model, (data,), {}, {"W": jnp.asarray(W), "v": jnp.asarray(v),
                                                              "alpha": jnp.asarray(alpha)})
    x = np.column_stack([np.ones(M * per), np.asarray(data.X)])
    y, w, task = np.asarray(data.y), np.asarray(data.weight), np.asarray(data.task)
    pi = np.array([v[0], 1 - v[0]])
    eta = x @ W.T
    row_ll = w[:, None] * (y[:, None] * stats.logistic.logcdf(eta) + (1 - y[:, None]) * stats.logistic.logcdf(-eta))
    total = []
    for c in itertools.product(range(K), repeat=M):
        total.append(sum(np.log(pi[c[m]]) + row_ll[task == m, c[m]].sum() for m in range(M)))
    likelihood = np.logaddexp.reduce(total)
    prior = (stats.norm.logpdf(W[:, 0], 0, 2.1).sum() + stats.norm.logpdf(W[:, 1:], 0, 1.3).sum()
             + stats.beta.logpdf(v, 1, alpha).sum() + stats.gamma.logpdf(alpha, 2.0, scale=1 / 0.7))
    np.testing.assert_allclose(float(got), likelihood + prior, rtol=1e-10)


# ---------------------------------------------------------- 7. save/load, float32
def test_save_load_predict_bit_identical(synthetic, tmp_path):
    frame, _, res = synthetic
    new = frame.iloc[::37].copy()
    new.loc[new.index[0], "user"] = "newcomer"
    path = tmp_path / "hblr.json"
    res.save(path)
    loaded = Fit.load(path)
    np.testing.assert_array_equal(loaded.predict(new), res.predict(new))
    np.testing.assert_array_equal(loaded.score(new), res.score(new))
    saved = json.loads(path.read_text())
    assert set(saved["clusters"]) == {f"t{m:02d}" for m in range(12)}
    pd.testing.assert_frame_equal(loaded.task_tables["class_probabilities"], res.task_tables["class_probabilities"])


def test_float32_fit_is_finite_and_close_to_float64(synthetic):
    """Same seed (the starts differ by precision; every restart reaches the same optimum here)."""
    frame = synthetic[0]
    res64 = synthetic[2]
    with jax.enable_x64(False):
        data32 = PersonData.from_dataframe(frame, person="user", split="split")
        assert data32.X.dtype == jnp.float32
        res32 = fit(HBLR(), data32, method="vb")
        p32 = res32.predict(frame)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(res32.params))
    np.testing.assert_allclose(p32, res64.predict(frame), atol=2e-3)
    np.testing.assert_allclose(res32.loglik, res64.loglik, rtol=1e-4)


def test_float32_in_a_hard_regime_large_tasks_and_steep_boundaries():
    """3,000 rows per task and slopes 4x the default (near-separable labels): q(W)'s precision
    sums thousands of rows and xi reaches the tens; float32 keeps the fit of float64."""
    frame = cluster_frame(seed=11, tasks=4, train=3000, test=0)
    X = frame[[f"f_x{j}" for j in range(4)]].to_numpy()
    sign = np.where(frame["user"].str[1:].astype(int) % 2 == 0, 1.0, -1.0)
    rng = np.random.default_rng(12)
    frame["y_Label"] = (rng.uniform(size=len(frame)) < 1 / (1 + np.exp(-4.0 * sign * (X @ TRUE_W[1:])))).astype(float)
    results = {}
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            data = PersonData.from_dataframe(frame, person="user", split="split")
            results[dtype] = fit(HBLR(clusters=3), data, method="vb", n_init=1)
    res32, res64 = results["float32"], results["float64"]
    assert res32.converged and res64.converged and np.isfinite(res32.loglik)
    np.testing.assert_allclose(res32.predict(frame), res64.predict(frame), atol=2e-3)
    np.testing.assert_allclose(res32.loglik, res64.loglik, rtol=1e-4)
    clusters = [res.task_tables["class_probabilities"].to_numpy().argmax(axis=1) for res in (res32, res64)]
    assert adjusted_rand_index(*clusters) == 1.0 and adjusted_rand_index(clusters[1], [0, 1, 0, 1]) == 1.0


# ----------------------------------------------------------- 8. awkward tasks
def test_single_class_and_single_row_tasks_stay_finite_and_join_a_cluster():
    frame = cluster_frame(seed=3, tasks=8, train=25, test=0)
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 4))
    X = X[X @ TRUE_W[1:] > 1.5][:10]  # cluster 1 (even tasks) labels these rows 1 with high probability
    same = pd.DataFrame(X, columns=[f"f_x{j}" for j in range(4)]).assign(user="same", split="train", y_Label=1.0)
    one = pd.DataFrame(rng.normal(size=(1, 4)), columns=[f"f_x{j}" for j in range(4)]).assign(
        user="one", split="train", y_Label=0.0)
    frame = pd.concat([frame, same, one], ignore_index=True)
    data = PersonData.from_dataframe(frame, person="user", split="split")
    res = fit(HBLR(), data, method="vb")
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(res.params))
    phi = res.task_tables["class_probabilities"]
    even = phi.loc["t00"].to_numpy().argmax()
    assert phi.loc["same"].to_numpy().argmax() == even
    np.testing.assert_allclose(phi.loc["one"].sum(), 1.0)
    p = res.predict(frame[frame["user"].isin(["same", "one"])])[:, 0]
    assert np.all((p > 0) & (p < 1)) and np.mean(p[:-1]) > 0.7


def test_non_binary_label_is_refused_naming_the_task():
    frame = cluster_frame(tasks=2, train=5, test=0)
    frame.loc[0, "y_Label"] = 2.0
    data = PersonData.from_dataframe(frame, person="user", split="split")
    with pytest.raises(DataError, match="hblr is a classifier.*'t00'"):
        fit(HBLR(), data, method="vb")


# --------------------------------------------------------- 9. CLI, SVI and NUTS
def test_cli_fit_predict_score(tmp_path):
    frame = cluster_frame(seed=5, tasks=6, train=12, test=4)
    saved, _ = cli_fit_predict_score(tmp_path, frame, [
        "--model", "hblr", "--task", "user", "--split", "split", "--method", "vb", "--clusters", "3",
        "--prior-sd", "1.5", "--alpha-shape", "2", "--alpha-rate", "2", "--n-init", "2"], "y_Label")
    assert saved["model"]["name"] == "hblr" and saved["model"]["config"]["clusters"] == 3
    assert saved["model"]["config"]["prior_sd"] == 1.5 and len(saved["clusters"]["t00"]["probabilities"]) == 3


def test_svi_and_nuts_run_and_predict_finitely():
    frame = cluster_frame(seed=2, tasks=4, train=10, test=3, q=2)
    data = PersonData.from_dataframe(frame, person="user", split="split")
    model = HBLR(clusters=2)
    start = model.init(jax.random.key(0), data)  # (skips the EM run that would start them otherwise)
    for method, options in (("svi", dict(num_steps=100, num_samples=10)),
                            ("nuts", dict(num_warmup=10, num_samples=10, num_chains=1))):
        res = fit(model, data, method=method, init_params=start, **options)
        assert res.draws is not None and np.all(np.asarray(res.params.cov) == 0)
        p = res.predict(frame)
        assert np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))
        assert np.isfinite(res.loglik)
        np.testing.assert_allclose(np.asarray(res.params.membership).sum(axis=1), 1.0, rtol=1e-9)
