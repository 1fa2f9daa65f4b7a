"""Multitask multiple-kernel learning ("mtmkl") against references written here: the per-task
LS-SVM by a dense ``numpy.linalg.solve`` of its bordered KKT system on kernels computed with
``scipy.spatial.distance``, the Danskin gradient and the Newton Hessian against ``jax.grad`` /
``jax.hessian`` through the solve, the optimiser against ``scipy.optimize.minimize(SLSQP)``,
float32 against float64 (and one compilation per shape), prediction against the in-training
scores, recovery of the informative modality, save/load, bad inputs and the CLI.

One small data set (four people with 30 to 55 rows, three modalities of widths 2, 3 and 2,
train/validation/test splits, some missing labels) serves every test; its label depends on
modality ``b`` only.
"""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.spatial.distance import cdist
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from mtl_jax import DataError, Fit, fit
from mtl_jax.data.personal import PersonData
from mtl_jax.experiments.cv_grid import split_params
from mtl_jax.models.baselines.common import fit_rows
from mtl_jax.models.baselines.solvers import pad_by_task
from mtl_jax.models.mtmkl import MTMKL
from mtl_jax.models.mtmkl import kernels, solver
from support import cli_fit_predict_score

COLUMNS = ["a_0", "a_1", "b_0", "b_1", "b_2", "c_0", "c_1"]
BLOCKS = {"a": slice(0, 2), "b": slice(2, 5), "c": slice(5, 7)}
PEOPLE = ["p0", "p1", "p2", "p3"]
SIZES = [30, 55, 40, 45]


def person_frame(seed=0, sizes=SIZES, missing_label=0.05):
    """Labels from modality ``b`` only (a per-person slope around a shared one); 65/15/20 splits."""
    rng = np.random.default_rng(seed)
    person = np.repeat(PEOPLE[: len(sizes)], sizes)
    n = len(person)
    X = rng.normal(size=(n, len(COLUMNS)))
    slopes = np.array([2.0, -1.5, 1.0]) + 0.3 * rng.normal(size=(len(sizes), 3))
    owner = np.repeat(np.arange(len(sizes)), sizes)
    label = (rng.uniform(size=n) < expit(2.0 * np.einsum("nq,nq->n", X[:, 2:5], slopes[owner]))).astype(float)
    label[rng.uniform(size=n) < missing_label] = np.nan
    frame = pd.DataFrame(X, columns=COLUMNS)
    frame.insert(0, "user_id", person)
    frame["split"] = rng.choice(["train", "validation", "test"], size=n, p=[0.65, 0.15, 0.2])
    frame["stress_Label"] = label
    return frame


@pytest.fixture(scope="module")
def frame():
    return person_frame()


@pytest.fixture(scope="module")
def data(frame):
    return PersonData.from_dataframe(frame, person="user_id", split="split")


def padded(data):
    rows = fit_rows(data)
    X = np.asarray(data.X)
    Xp, yp, wp, index = pad_by_task(X[rows], np.asarray(data.y)[rows], np.asarray(data.weight)[rows],
                                    np.asarray(data.task)[rows], data.num_tasks)
    return X[rows], Xp, yp, wp, index


def problem_of(data, kind, C=2.0, gamma=None, weights=None):
    Xrows, Xp, yp, wp, _ = padded(data)
    if weights is not None:
        wp = np.where(wp > 0, weights[: wp.size].reshape(wp.shape), 0.0)
    mask = kernels.modality_mask(data.schema.modalities, Xp.shape[2])
    g = jnp.asarray(kernels.default_gamma(mask, gamma))
    scale = kernels.kernel_scale(jnp.asarray(Xrows), jnp.asarray(mask), kind)
    return solver.build_problem(jnp.asarray(Xp), jnp.asarray(yp), jnp.asarray(wp), jnp.asarray(mask), g, scale, kind,
                                C), (Xp, yp, wp, np.asarray(g), np.asarray(scale))


def numpy_kernel(A, B, kind, gamma):
    """One modality's kernel written independently of the package."""
    if kind == "rbf":
        return np.exp(-gamma * cdist(A, B, "sqeuclidean"))
    if kind == "linear":
        return A @ B.T
    return 1.0 - cdist(A, B, "cosine")


def random_eta(K, P, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(P), size=K)


# ---------------------------------------------------------------- 1. batched LS-SVM
@pytest.mark.parametrize("kind", ["rbf", "linear", "cosine"])
def test_batched_lssvm_equals_numpy_solve_of_the_kkt_system(data, kind):
    C = 2.0
    weights = np.random.default_rng(5).uniform(0.5, 2.0, size=1000)
    problem, (Xp, yp, wp, gamma, scale) = problem_of(data, kind, C=C, weights=weights)
    eta = random_eta(data.num_tasks, 3, seed=1)
    alpha, b = solver.solve_tasks(jnp.asarray(eta), problem)
    Xrows = padded(data)[0]
    # The normalisation constants, independently: 1 / mean diagonal over all fit rows.
    for p, block in enumerate(BLOCKS.values()):
        diagonal = np.diag(numpy_kernel(Xrows[:, block], Xrows[:, block], kind, gamma[p]))
        np.testing.assert_allclose(scale[p], 1.0 / diagonal.mean(), rtol=1e-12)
    for t in range(data.num_tasks):
        inside = wp[t] > 0
        X, y, w = Xp[t][inside], np.where(yp[t][inside] > 0, 1.0, -1.0), wp[t][inside]
        K = sum(eta[t, p] * scale[p] * numpy_kernel(X[:, block], X[:, block], kind, gamma[p])
                for p, block in enumerate(BLOCKS.values()))
        n = len(y)
        system = np.zeros((n + 1, n + 1))
        system[0, 1:] = system[1:, 0] = 1.0
        system[1:, 1:] = K + np.diag(1.0 / (C * w))
        reference = np.linalg.solve(system, np.concatenate([[0.0], y]))
        np.testing.assert_allclose(float(b[t]), reference[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(alpha[t])[inside], reference[1:], rtol=1e-9, atol=1e-12)
        assert np.all(np.asarray(alpha[t])[~inside] == 0.0)  # padding takes no part


# ------------------------------------------------------- 2. Danskin gradient, regularisers
@pytest.mark.parametrize("kind", ["pull", "similarity"])
def test_danskin_gradient_and_newton_hessian_equal_autodiff_through_the_solve(data, kind):
    problem, _ = problem_of(data, "rbf")
    eta = jnp.asarray(random_eta(data.num_tasks, 3, seed=2))
    V = 0.7
    value, gradient, _, _ = solver.objective_and_gradient(eta, problem, V, kind)
    np.testing.assert_allclose(value, solver.objective(eta, problem, V, kind), rtol=1e-12)
    reference = jax.grad(solver.objective)(eta, problem, V, kind)  # differentiates the Cholesky solve
    np.testing.assert_allclose(gradient, reference, rtol=1e-8, atol=1e-10)
    # The dual value at the optimum is y'a / 2.
    alpha, _ = solver.solve_tasks(eta, problem)
    np.testing.assert_allclose(solver.dual_values(eta, alpha, problem), 0.5 * jnp.sum(alpha * problem.labels, 1),
                               rtol=1e-10)
    # The Newton blocks: the diagonal blocks of the Hessian of sum_t D_t.
    hessian = jax.hessian(solver.objective)(eta, problem, 0.0, kind)  # [K, P, K, P]
    _, _, blocks, _, _ = solver.objective_gradient_hessian(eta, problem, V, kind)
    for t in range(data.num_tasks):
        np.testing.assert_allclose(blocks[t], hessian[t, :, t, :], rtol=1e-7, atol=1e-9)
    assert float(jnp.max(jnp.abs(hessian[0, :, 1, :]))) == 0.0  # the tasks' dual values are separate


@pytest.mark.parametrize("kind", ["pull", "similarity"])
def test_regulariser_gradient_is_the_exact_gradient(kind):
    eta = jnp.asarray(random_eta(5, 4, seed=3))
    exact = jax.grad(solver.regulariser)(eta, kind)
    np.testing.assert_allclose(solver.regulariser_gradient(eta, kind), exact, rtol=1e-12, atol=1e-14)
    # The original project's gradients are half of these: a test that can tell.
    assert float(jnp.max(jnp.abs(0.5 * exact - exact))) > 0.1
    if kind == "pull":  # the original's L2 regulariser sum_{t,s} |eta_t - eta_s|^2 is 2K times this one
        original = jnp.sum((eta[:, None, :] - eta[None, :, :]) ** 2)
        np.testing.assert_allclose(original, 2 * eta.shape[0] * solver.regulariser(eta, kind), rtol=1e-12)
    else:
        brute = -sum(float(eta[t] @ eta[s]) for t in range(5) for s in range(5) if t != s)
        np.testing.assert_allclose(solver.regulariser(eta, kind), brute, rtol=1e-12)


@pytest.mark.parametrize("settings", [dict(kernel="rbf", C=1.0, V=0.1),
                                      dict(kernel="cosine", C=100.0, V=0.01, regulariser="similarity")])
def test_float32_fit_agrees_with_float64_and_compiles_once(data, settings):
    model = MTMKL(**settings)
    data32 = replace(data, X=data.X.astype(jnp.float32), y=data.y.astype(jnp.float32),
                     weight=data.weight.astype(jnp.float32))
    params64, _, _ = model.fit_details(data)
    params32, result32, _ = model.fit_details(data32)
    compiled = solver.fit_mtmkl._cache_size()
    assert params32.eta.dtype == jnp.float32 and bool(result32.converged)
    trace = np.asarray(result32.trace)[: int(result32.n_iter) + 1]
    assert np.all(np.diff(trace) <= 16 * np.finfo(np.float32).eps * abs(trace[0]))
    np.testing.assert_allclose(params32.eta, params64.eta, atol=3e-3)  # C = 100: the dual's condition ~1e3
    scores64 = np.asarray(model.decision_scores(params64, data))
    scores32 = np.asarray(model.decision_scores(params32, data32))
    assert np.max(np.abs(scores32 - scores64)) <= 2e-3 * np.max(np.abs(scores64))
    np.testing.assert_allclose(model.predict(params32, data32), model.predict(params64, data), atol=2e-3)
    model.fit_details(data32)  # the same shapes and dtypes again: no new compilation
    assert solver.fit_mtmkl._cache_size() == compiled


# ---------------------------------------------------------------------- 3. optimiser
def slsqp(problem, K, P, V, kind):
    function = jax.jit(lambda e: solver.objective_and_gradient(e.reshape(K, P), problem, V, kind)[:2])

    def fun(x):
        value, gradient = function(jnp.asarray(x))
        return float(value), np.asarray(gradient).ravel()

    constraints = [{"type": "eq", "fun": (lambda x, t=t: x[P * t:P * t + P].sum() - 1.0),
                    "jac": (lambda x, t=t: np.eye(K)[t].repeat(P))} for t in range(K)]
    return minimize(fun, np.full(K * P, 1.0 / P), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * (K * P),
                    constraints=constraints, options={"maxiter": 500, "ftol": 1e-14})


@pytest.mark.parametrize("V", [0.1, 3.0])
def test_optimiser_decreases_J_monotonically_to_the_slsqp_optimum(data, V):
    problem, _ = problem_of(data, "rbf")
    K, P = data.num_tasks, 3
    reference = slsqp(problem, K, P, V, "pull")
    assert reference.success
    for method, rtol in (("newton", 1e-9), ("eg", 1e-4)):
        result = solver.optimise_eta(problem, V, "pull", None, 1e-10, 2000, method)
        trace = np.asarray(result.trace)[: int(result.n_iter) + 1]
        assert np.all(np.isfinite(trace)) and np.all(np.isnan(np.asarray(result.trace)[int(result.n_iter) + 1:]))
        assert np.all(np.diff(trace) <= 1e-12 * abs(trace[0])), method
        eta = np.asarray(result.eta)
        assert np.all(eta >= 0) and np.allclose(eta.sum(axis=1), 1.0, atol=1e-12)
        assert bool(result.converged)
        np.testing.assert_allclose(float(result.objective), reference.fun, rtol=rtol)
    assert int(result.n_iter) > 10  # "eg" needs many steps ...
    newton = solver.optimise_eta(problem, V, "pull", None, 1e-10, 2000, "newton")
    assert int(newton.n_iter) <= 15  # ... Newton few
    np.testing.assert_allclose(np.asarray(newton.eta), reference.x.reshape(K, P), atol=1e-4)
    assert float(newton.gap) < 1e-6 * abs(reference.fun)


def test_similarity_regulariser_pulls_the_weights_together_monotonically(data):
    problem, _ = problem_of(data, "rbf")
    free = solver.optimise_eta(problem, 0.0, "similarity", None, 1e-10, 500)
    tied = solver.optimise_eta(problem, 50.0, "similarity", None, 1e-10, 500)
    trace = np.asarray(tied.trace)[: int(tied.n_iter) + 1]
    assert np.all(np.diff(trace) <= 1e-12 * abs(trace[0])) and bool(tied.converged)
    spread = lambda eta: float(np.sum(np.var(np.asarray(eta), axis=0)))  # noqa: E731
    assert spread(tied.eta) < 0.5 * spread(free.eta)


# ----------------------------------------------------- 4. kernels at training and prediction
@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_predicting_the_training_rows_reproduces_the_in_training_scores(data, kernel):
    model = MTMKL(kernel=kernel, C=2.0, V=0.5)
    params, result, _ = model.fit_details(data)
    problem, _ = problem_of(data, kernel, C=2.0)
    inside = np.asarray(problem.inside) > 0
    in_training = np.asarray(solver.in_sample_scores(result.eta, result.alpha, result.b, problem))
    # The KKT conditions: f(x_i) = y_i - a_i / (C w_i) on the fit rows.
    kkt = np.asarray(problem.labels - result.alpha * problem.ridge)
    np.testing.assert_allclose(in_training[inside], kkt[inside], rtol=1e-8, atol=1e-10)
    scores = np.asarray(model.decision_scores(params, data))
    index = padded(data)[4]
    fit_index = np.flatnonzero(fit_rows(data))
    np.testing.assert_allclose(scores[fit_index[index[inside]]], in_training[inside], rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(params.kernel_scale), np.asarray(problem_of(data, kernel)[1][4]))


# ------------------------------------------------------------- 5. the informative modality
def test_weights_concentrate_on_the_informative_modality_and_rank_held_out_rows(frame, data):
    res = fit(MTMKL(kernel="rbf", C=1.0, V=0.1), data, method="map")
    assert res.converged
    eta = np.asarray(res.params.eta)
    assert np.all(eta[:, 1] > 0.7), eta  # modality b carries the signal
    report = res.model.report(res.params, res.labels)
    assert set(report["eta"]) == set(PEOPLE) and set(report["eta"]["p0"]) == {"a", "b", "c"}
    test = (frame["split"] == "test").to_numpy() & frame["stress_Label"].notna().to_numpy()
    prob = res.predict(frame)[:, 0]
    assert roc_auc_score(frame["stress_Label"][test], prob[test]) > 0.8
    scores = res.score_table(frame)["decision_score"].to_numpy()
    assert roc_auc_score(frame["stress_Label"][test], scores[test]) > 0.8
    assert np.all((prob > 0) & (prob < 1))


# ---------------------------------------------------- 6. save/load, bad inputs, unseen, CLI
def new_frame():
    frame = person_frame(seed=9, sizes=[5, 5, 5, 5])
    frame.loc[frame.index[:4], "user_id"] = "newcomer"
    return frame


def test_save_load_predict_bit_identical_and_unseen_task_averages_probabilities(data, tmp_path):
    res = fit(MTMKL(kernel="cosine", V=1.0, regulariser="similarity"), data, method="map")
    frame = new_frame()
    before = res.predict(frame)
    path = tmp_path / "mtmkl.json"
    res.save(path)
    loaded = Fit.load(path)
    np.testing.assert_array_equal(loaded.predict(frame), before)
    np.testing.assert_array_equal(loaded.score(frame), res.score(frame))
    np.testing.assert_array_equal(loaded.score_table(frame)["decision_score"], res.score_table(frame)["decision_score"])
    unseen = (frame["user_id"] == "newcomer").to_numpy()
    per_task = [res.predict(frame.assign(user_id=person))[:, 0][unseen] for person in PEOPLE]
    np.testing.assert_allclose(before[unseen, 0], np.mean(per_task, axis=0), rtol=1e-12)
    named = res.model.named_parameters(res.params, res.labels)
    assert {f"eta[p0, {m}]" for m in "abc"} <= set(named)


def test_single_class_and_one_row_tasks_are_data_errors_naming_them(frame, data):
    y = np.asarray(data.y).copy()
    y[np.asarray(data.task) == 3] = 0.0
    with pytest.raises(DataError, match=r"'p3': 0 positive"):
        fit(MTMKL(), replace(data, y=jnp.asarray(y)), method="map")
    with pytest.raises(DataError, match=r"'p1' is not binary"):
        fit(MTMKL(), replace(data, task_binary=data.task_binary.at[1].set(False)), method="map")
    one_row = frame[(frame.user_id != "p2") | (frame.index == frame.index[frame.user_id == "p2"][0])].copy()
    one_row.loc[one_row.user_id == "p2", ["split", "stress_Label"]] = ["train", 1.0]
    with pytest.raises(DataError, match=r"'p2': 1 positive, 0 negative"):
        fit(MTMKL(), PersonData.from_dataframe(one_row, person="user_id", split="split"), method="map")


def test_options_are_grid_names_of_cv_grid():
    options, training = split_params("mtmkl", {"C": 1.0, "V": 0.1, "regulariser": "pull", "kernel": "rbf",
                                               "gamma": 0.01})
    assert training == {} and set(options) == {"C", "V", "regulariser", "kernel", "gamma"}
    with pytest.raises(ValueError, match="regulariser must be one of"):
        MTMKL(regulariser="L2")


def test_cli_fit_predict_score(tmp_path):
    saved, table = cli_fit_predict_score(tmp_path, person_frame(seed=5), [
        "--model", "mtmkl", "--task", "user_id", "--split", "split", "--kernel", "linear", "--C", "0.5",
        "--V", "2", "--regulariser", "pull", "--method", "map"], "stress_Label")
    assert saved["model"]["name"] == "mtmkl" and saved["model"]["config"]["C"] == 0.5
    assert set(saved["eta"]) == set(PEOPLE)
    assert "decision_score" in table.columns
