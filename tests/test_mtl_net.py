"""The hard-shared multitask net: stacked heads, masked labels, task weighting, the NumPyro
program against the MAP objective, save/load, unseen people, and the CLI."""

import json
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpyro.infer.util import log_density
from scipy import stats

from mtl_jax import Fit, fit
from mtl_jax.data.personal import PersonData
from mtl_jax.infer.task_weighting import gradnorm_weight_gradient, pcgrad_coefficients, renormalise
from mtl_jax.models.mtl_net import MTLNet, PooledNet
from mtl_jax.models.mtl_net import network
from support import cli_fit_predict_score


def person_frame(seed=0, people=4, rows=30, q=3, missing_label=0.1):
    """Binary labels from a per-person logistic model on shared features."""
    rng = np.random.default_rng(seed)
    n = people * rows
    X = rng.normal(size=(n, q))
    person = np.repeat([f"p{i}" for i in range(people)], rows)
    slopes = rng.normal(size=(people, q)) + np.array([1.0, -1.0, 0.5][:q])
    logit = np.einsum("nq,nq->n", X, slopes[np.repeat(np.arange(people), rows)])
    label = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(float)
    label[rng.uniform(size=n) < missing_label] = np.nan
    frame = pd.DataFrame(X, columns=[f"phys_x{j}" for j in range(q)])
    frame.insert(0, "user_id", person)
    frame["stress_Label"] = label
    return frame


@pytest.fixture(scope="module")
def data():
    return PersonData.from_dataframe(person_frame(), person="user_id")


def test_stacked_heads_equal_a_loop_over_tasks(data):
    params = network.init_params(jax.random.key(1), 3, (5,), data.num_tasks, jnp.float64)
    params = eqx.tree_at(lambda p: (p.head_weight, p.head_bias), params,
                         (jax.random.normal(jax.random.key(2), params.head_weight.shape),
                          jax.random.normal(jax.random.key(3), params.head_bias.shape)))
    task = jnp.concatenate([data.task, jnp.array([data.num_tasks, data.num_tasks + 3])])  # two unseen rows
    X = jnp.concatenate([data.X, data.X[:2]])
    eta, _ = network.linear_predictor(params, X, task)
    layer = params.trunk[0]
    for k in range(data.num_tasks + 4):
        rows = np.flatnonzero(np.asarray(task) == k)
        h = np.maximum(np.asarray(X[rows]) @ np.asarray(layer.weight).T + np.asarray(layer.bias), 0.0)
        w = np.asarray(params.population_weight) + (np.asarray(params.head_weight[k]) if k < data.num_tasks else 0)
        b = float(params.population_bias) + (float(params.head_bias[k]) if k < data.num_tasks else 0.0)
        np.testing.assert_allclose(np.asarray(eta)[rows], h @ w + b, rtol=1e-12)


def test_masked_label_contributes_nothing_to_loss_or_gradient(data):
    model = MTLNet(hidden=(4,))
    params = model.init(jax.random.key(0), data)
    masked = int(np.flatnonzero(np.asarray(data.weight) == 0)[0])
    changed = PersonData(data.X.at[masked].set(100.0), data.y.at[masked].set(1.0 - data.y[masked]), data.weight,
                         data.task, data.split, data.task_binary, data.task_names, data.num_labels, data.schema)
    ones = jnp.ones_like(data.y)

    def total(p, d):
        return jnp.sum(model.task_losses(p, d, ones)) + model.penalty(p, d, ones)

    assert float(total(params, data)) == float(total(params, changed))
    grads, grads_changed = jax.grad(total)(params, data), jax.grad(total)(params, changed)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_changed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the per-task mean divides by the observed labels only
    losses = model.task_losses(params, data, ones)
    eta, _ = network.linear_predictor(params, data.X, data.task)
    nll = -(np.asarray(data.y) * np.asarray(eta) - np.logaddexp(0, np.asarray(eta)))
    for k in range(data.num_tasks):
        rows = (np.asarray(data.task) == k) & (np.asarray(data.weight) > 0)
        np.testing.assert_allclose(float(losses[k]), nll[rows].mean(), rtol=1e-12)


def test_pcgrad_two_tasks_by_hand():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    # g1.g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum (0.5, 1.5)
    gram = jnp.array([[g1 @ g1, g1 @ g2], [g2 @ g1, g2 @ g2]])
    a = np.asarray(pcgrad_coefficients(gram, jax.random.key(0)))
    np.testing.assert_allclose(a[0] * g1 + a[1] * g2, [0.5, 1.5], rtol=1e-12)
    # no conflict: plain sum
    gram = jnp.array([[1.0, 0.5], [0.5, 2.0]])
    np.testing.assert_allclose(np.asarray(pcgrad_coefficients(gram, jax.random.key(0))), [1.0, 1.0])


def test_gradnorm_two_tasks_by_hand():
    w, norms = jnp.array([1.0, 1.0]), jnp.array([2.0, 1.0])
    losses, initial = jnp.array([0.5, 0.9]), jnp.array([1.0, 1.0])
    # G = (2, 1), mean 1.5; r = (0.5, 0.9) / 0.7; alpha = 1: target = 1.5 r = (1.0714, 1.9286)
    # sign(G - target) * norms = (+2, -1)
    np.testing.assert_allclose(np.asarray(gradnorm_weight_gradient(w, norms, losses, initial, 1.0)), [2.0, -1.0])
    np.testing.assert_allclose(np.asarray(renormalise(jnp.array([1.0, 3.0]))), [0.5, 1.5])


def test_numpyro_log_density_is_the_log_likelihood_plus_priors(data):
    model = MTLNet(hidden=(3,), prior_scale=0.7)
    params = model.init(jax.random.key(4), data)
    params = jax.tree_util.tree_map(lambda leaf: leaf + 0.1 * jax.random.normal(jax.random.key(5), leaf.shape), params)
    values = model.site_values(params)
    total, _ = log_density(model.numpyro_model, (data,), {}, values)
    # reference: Bernoulli log-likelihood of the observed labels + the priors, written out here
    layer = params.trunk[0]
    h = np.maximum(np.asarray(data.X) @ np.asarray(layer.weight).T + np.asarray(layer.bias), 0.0)
    task = np.asarray(data.task)
    w = np.asarray(params.population_weight) + np.asarray(params.head_weight)[task]
    eta = np.einsum("nh,nh->n", h, w) + float(params.population_bias) + np.asarray(params.head_bias)[task]
    y, mask = np.asarray(data.y), np.asarray(data.weight)
    loglik = np.sum(mask * (y * eta - np.logaddexp(0, eta)))
    s, q, H = 0.7, 3, 3
    tau = float(values["head_scale"])
    unit = np.r_[np.full(H, 1 / np.sqrt(H)), 1.0]
    dev = np.c_[np.asarray(params.head_weight), np.asarray(params.head_bias)]
    prior = (stats.norm.logpdf(np.asarray(layer.weight), 0, s / np.sqrt(q)).sum()
             + stats.norm.logpdf(np.asarray(layer.bias), 0, s).sum()
             + stats.norm.logpdf(np.asarray(params.population_weight), 0, s / np.sqrt(H)).sum()
             + stats.norm.logpdf(float(params.population_bias), 0, s)
             + stats.halfnorm.logpdf(tau, scale=s)
             + stats.norm.logpdf(dev / (tau * unit)).sum()  # non-centred z sites
             + stats.norm.logpdf(float(params.population_log_noise_sd))
             + stats.norm.logpdf(np.asarray(params.log_noise_sd), float(params.population_log_noise_sd)).sum())
    np.testing.assert_allclose(float(total), loglik + prior, rtol=1e-10)
    # the log-likelihood part is minus the unnormalised MAP data term (per-task sums of the losses)
    sums = np.asarray(model.task_losses(params, data, jnp.ones_like(data.y))) * np.bincount(task, weights=mask)
    np.testing.assert_allclose(-sums.sum(), loglik, rtol=1e-10)


@pytest.mark.parametrize("weighting", ["equal", "uncertainty", "gradnorm", "pcgrad"])
def test_map_training_beats_the_pooled_net_and_stops_early(weighting):
    frame = person_frame(seed=3, people=5, rows=200, missing_label=0.0)
    rng = np.random.default_rng(1)
    frame["split"] = np.where(rng.uniform(size=len(frame)) < 0.7, "train", "test")
    data = PersonData.from_dataframe(frame, person="user_id", split="split")
    test = frame[frame.split == "test"]
    mtl = fit(MTLNet(hidden=(8,)), data, method="map", task_weighting=weighting, max_steps=3000)
    assert mtl.converged and mtl.diagnostics["early_stopped"]
    assert mtl.n_iter < 3000
    pooled = fit(PooledNet(hidden=(8,)), data, method="map", max_steps=3000)
    assert np.mean(mtl.score(test)) > np.mean(pooled.score(test))


def test_one_task_per_step_visits_every_task_once_per_pass(data):
    model = MTLNet(hidden=(2,))
    res = fit(model, data, method="map", task_sampling="one", max_steps=40, eval_every=4, validation_fraction=0.0)
    assert res.n_iter == 40 and np.all(np.isfinite(res.trace))


def test_save_load_predict_bit_identical(data, tmp_path):
    res = fit(MTLNet(hidden=(4,)), data, method="map", max_steps=100)
    frame = person_frame(seed=9)
    frame.loc[0, "user_id"] = "newcomer"
    before = res.predict(frame)
    path = tmp_path / "net.json"
    res.save(path)
    loaded = Fit.load(path)
    np.testing.assert_array_equal(loaded.predict(frame), before)
    np.testing.assert_array_equal(loaded.score(frame), res.score(frame))


def test_unseen_person_gets_the_population_head(data):
    res = fit(MTLNet(hidden=(4,)), data, method="map", max_steps=100)
    frame = person_frame(seed=9).iloc[:3].copy()
    frame["user_id"] = "newcomer"
    params = res.params
    layer = params.trunk[0]
    X = (frame[[f"phys_x{j}" for j in range(3)]].to_numpy() - np.asarray(data.schema.mean)) / np.asarray(data.schema.sd)
    h = np.maximum(X @ np.asarray(layer.weight).T + np.asarray(layer.bias), 0)
    expected = 1 / (1 + np.exp(-(h @ np.asarray(params.population_weight) + float(params.population_bias))))
    np.testing.assert_allclose(res.predict(frame)[:, 0], expected, rtol=1e-10)


def test_svi_and_nuts_fit_the_same_program(data):
    model = MTLNet(hidden=(2,))
    svi = fit(model, data, method="svi", num_steps=300, num_samples=50)
    assert svi.draws is not None and np.all(np.isfinite(svi.predict(person_frame(seed=2))))
    nuts = fit(model, data, method="nuts", num_warmup=30, num_samples=30, num_chains=1)
    assert nuts.draws is not None and np.all(np.isfinite(nuts.predict(person_frame(seed=2))))
    # predictive draws: one prediction per draw; their mean is the prediction of the mean draw only for a
    # linear predictor, so compare with draws pushed through the model by hand
    frame = person_frame(seed=2)
    draws = nuts.predict_draws(frame)
    assert draws.shape == (30, len(frame), 1)
    design = model.design(model.data_from_frame(frame, labels=nuts.labels, schema=nuts.schema))
    for s in (0, 17):
        point = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf[0, s]), nuts.draws)
        np.testing.assert_allclose(draws[s], np.asarray(model.predict(point, design)), rtol=1e-12)
    with pytest.raises(ValueError, match="no posterior draws"):
        fit(model, data, method="map", max_steps=20).predict_draws(frame)


def test_cli_fit_predict_score(tmp_path):
    frame = person_frame(seed=5)
    saved, table = cli_fit_predict_score(tmp_path, frame, ["--model", "mtl-net", "--task", "user_id", "--hidden", "4",
                                                           "--method", "map", "--max-steps", "200"], "stress_Label")
    assert saved["model"]["name"] == "mtl-net" and set(saved["task_heads"]) == {f"p{i}" for i in range(4)}
    loglik = table["loglik"].to_numpy()
    missing = frame["stress_Label"].isna().to_numpy()
    assert np.all(loglik[missing] == 0.0) and np.all(loglik[~missing] < 0.0)  # a missing label scores nothing


def test_cli_reads_task_dict_pickles_only_with_allow_pickle(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    tasks = [{"Name": f"u{k}", "X": rng.normal(size=(20, 3)), "Y": rng.integers(0, 2, 20), "ModalityDict": {"phys": 0}}
             for k in range(3)]
    path = tmp_path / "tasks.pkl"
    path.write_bytes(pickle.dumps(tasks))
    out = tmp_path / "fit.json"
    run = [sys.executable, "-m", "mtl_jax.cli", "fit", str(path), "--model", "mtl-net", "--task", "task",
           "--response", "Y", "--hidden", "2", "--method", "map", "--max-steps", "50", "--out", str(out)]
    refused = subprocess.run(run, capture_output=True, text=True)
    assert refused.returncode == 2 and "allow_pickle=True" in refused.stderr and not out.exists()
    accepted = subprocess.run([*run, "--allow-pickle"], capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(out.read_text())["labels"]["task_names"] == ["u0", "u1", "u2"]


def test_dropout_only_in_training_and_the_best_validation_point_is_kept(data):
    model = MTLNet(hidden=(16,), dropout=0.5)
    params = model.init(jax.random.key(0), data)
    ones = jnp.ones_like(data.y)
    with_dropout = [model.task_losses(params, data, ones, jax.random.key(s)) for s in (1, 2)]
    assert not np.allclose(with_dropout[0], with_dropout[1])  # a fresh mask per key
    np.testing.assert_array_equal(model.task_losses(params, data, ones), model.task_losses(params, data, ones))
    # the returned point is the best one seen on the validation rows, not the last
    from mtl_jax.infer.optimize import train

    result = train(model, data, jax.random.key(3), max_steps=400, eval_every=20, patience=50)
    _, validation = model.split_rows(data, jax.random.split(jax.random.key(3), 3)[1], 0.2)
    best = float(jnp.sum(model.task_losses(result.params, data, validation)))
    np.testing.assert_allclose(best, result.diagnostics["best_validation_loss"], rtol=1e-10)
    assert result.diagnostics["best_step"] < result.n_iter  # it overfits later: the kept point is not the last


def test_a_second_fit_compiles_nothing_new(data):
    from mtl_jax.infer.optimize import train_chunk

    model = MTLNet(hidden=(3,))
    fit(model, data, method="map", max_steps=40, eval_every=20, seed=0)
    compiled = train_chunk._cache_size()
    fit(model, data, method="map", max_steps=40, eval_every=20, seed=1)
    assert train_chunk._cache_size() == compiled
