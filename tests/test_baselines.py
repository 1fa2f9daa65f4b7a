"""The single-task and pooled baselines on the model protocol ("logistic", "pooled-logistic",
"lssvm", "stl-net") through the public ``fit``, against references written here: per-task
logistic fits by ``scipy.optimize.minimize`` with a cross-validation of their own on the
same folds, the L1 fit's subgradient conditions, the LS-SVM by a dense solve of its KKT
system, the median heuristic by ``scipy.spatial.distance.pdist``; masked labels, no
sharing between the per-task nets, save/load, unseen people, bad labels and the CLI.

One data set (four people, 40 rows each, train/validation/test splits, 10% missing labels)
serves every test, and each model is fitted once (module fixture), so that the jitted
programs compile once.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.spatial.distance import pdist
from scipy.special import expit

from mtl_jax import DataError, Fit, fit
from mtl_jax.cli import _parser
from mtl_jax.data.personal import PersonData
from mtl_jax.evaluate import within_task_folds
from mtl_jax.models.baselines import PerTaskLogistic, PerTaskLSSVM, PooledLogistic, STLNet
from support import run_main

COLUMNS = ["phys_x0", "phys_x1", "phys_x2"]
PEOPLE = [f"p{i}" for i in range(4)]
GRID = (0.01, 0.1, 1.0, 10.0)
MODELS = {
    "logistic": PerTaskLogistic(C=GRID),
    "logistic-global": PerTaskLogistic(C=GRID, select="global"),
    "logistic-l1": PerTaskLogistic(penalty="l1", C=(0.2,)),
    "pooled-logistic": PooledLogistic(C=(1.0,)),
    "lssvm": PerTaskLSSVM(),
    "lssvm-rbf": PerTaskLSSVM(kernel="rbf", gamma=2.0),
    "stl-net": STLNet(hidden=(3,)),
}
NET_OPTIONS = {"max_steps": 100, "eval_every": 50}
pytestmark = pytest.mark.filterwarnings("ignore:map did not converge")  # the short net trainings; asserted elsewhere


def person_frame(seed=0, rows=40, missing_label=0.1):
    """Binary labels from a per-person logistic model; splits 70/15/15 at random."""
    rng = np.random.default_rng(seed)
    n = len(PEOPLE) * rows
    X = rng.normal(size=(n, len(COLUMNS)))
    person = np.repeat(PEOPLE, rows)
    slopes = rng.normal(size=(len(PEOPLE), len(COLUMNS))) + np.array([1.5, -1.0, 0.5])
    logit = 0.3 + np.einsum("nq,nq->n", X, slopes[np.repeat(np.arange(len(PEOPLE)), rows)])
    label = (rng.uniform(size=n) < expit(logit)).astype(float)
    label[rng.uniform(size=n) < missing_label] = np.nan
    frame = pd.DataFrame(X, columns=COLUMNS)
    frame.insert(0, "user_id", person)
    frame["split"] = rng.choice(["train", "validation", "test"], size=n, p=[0.7, 0.15, 0.15])
    frame["stress_Label"] = label
    return frame


def new_frame():
    """Fresh rows of the four people and of an unseen one (``newcomer``)."""
    frame = person_frame(seed=9, rows=5)
    frame.loc[frame.index[:4], "user_id"] = "newcomer"
    return frame


def options(name):
    return NET_OPTIONS if name == "stl-net" else {}


@pytest.fixture(scope="module")
def frame():
    return person_frame()


@pytest.fixture(scope="module")
def data(frame):
    return PersonData.from_dataframe(frame, person="user_id", split="split")


@pytest.fixture(scope="module")
def fits(data):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit(MODELS[name], data, method="map", **options(name))
        return cache[name]

    return get


def arrays(data):
    return (np.asarray(data.X), np.asarray(data.y), np.asarray(data.weight), np.asarray(data.task),
            np.asarray(data.split))


def replace(data, **changes):
    fields = dict(X=data.X, y=data.y, weight=data.weight, task=data.task, split=data.split,
                  task_binary=data.task_binary)
    fields.update(changes)
    return PersonData(**fields, task_names=data.task_names, num_labels=data.num_labels, schema=data.schema)


# ---------------------------------------------------------------- references
def ref_logistic_l2(X, y, C):
    """``argmin sum log(1 + e^eta) - y eta + |beta|^2 / (2C)``, eta = b + X beta, by trust-region Newton."""
    Z = np.column_stack([np.ones(len(X)), X])
    P = np.r_[0.0, np.full(X.shape[1], 1.0 / C)]

    def value(theta):
        eta = Z @ theta
        return (np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * np.sum(P * theta ** 2),
                Z.T @ (expit(eta) - y) + P * theta)

    def hessian(theta):
        p = expit(Z @ theta)
        return (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(P)

    res = minimize(value, np.zeros(Z.shape[1]), jac=True, hess=hessian, method="trust-exact",
                   options={"gtol": 1e-10})
    theta = res.x
    for _ in range(3):  # polish: full Newton steps from the trust-region answer (its gtol stops short)
        theta = theta - np.linalg.solve(hessian(theta), value(theta)[1])
    assert np.max(np.abs(value(theta)[1])) < 1e-9, res.message
    return theta[0], theta[1:]


def log_loss(b, beta, X, y):
    eta = b + X @ beta
    return np.sum(np.logaddexp(0.0, eta) - y * eta)


def reference_cv_losses(data, grid, num_folds=3, seed=0):
    """``[G, K]`` summed validation log-loss: folds of the labelled training rows within tasks."""
    X, y, w, task, split = arrays(data)
    rows = (w > 0) & (split == 0)
    folds = np.full(len(y), -1)
    folds[rows] = within_task_folds(task[rows], num_folds, seed=seed, stratify=y[rows])
    losses = np.zeros((len(grid), data.num_tasks))
    for g, C in enumerate(grid):
        for k in range(data.num_tasks):
            for f in range(num_folds):
                train = rows & (task == k) & (folds != f)
                valid = rows & (task == k) & (folds == f)
                b, beta = ref_logistic_l2(X[train], y[train], C)
                losses[g, k] += log_loss(b, beta, X[valid], y[valid])
    return losses


def fit_rows(data):
    X, y, w, task, split = arrays(data)
    return (w > 0) & (split <= 1)


# ------------------------------------------------------------------- logistic
@pytest.mark.parametrize("name", ["logistic", "logistic-global"])
def test_per_task_logistic_equals_scipy_per_task_with_its_cv_choice(data, fits, name):
    res = fits(name)
    assert res.converged
    X, y, _, task, _ = arrays(data)
    losses = reference_cv_losses(data, GRID)
    np.testing.assert_allclose(MODELS[name].cv_losses(data), losses, rtol=1e-6)
    chosen = np.searchsorted(GRID, np.asarray(res.params.C))
    if name == "logistic":
        best = losses.min(axis=0)
        assert np.all(losses[chosen, np.arange(4)] <= best + 1e-7), (chosen, losses)
        assert len(set(chosen.tolist())) > 1  # the choice is per task here
    else:
        total = losses.sum(axis=1)
        assert np.all(chosen == chosen[0]) and total[chosen[0]] <= total.min() + 1e-7
    rows = fit_rows(data)
    for k in range(4):
        mine = rows & (task == k)
        b, beta = ref_logistic_l2(X[mine], y[mine], GRID[chosen[k]])
        np.testing.assert_allclose(res.params.intercept[k], b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.params.beta[k], beta, rtol=1e-5, atol=1e-6)
    report = res.to_dict()
    assert report["chosen_C"] == {f"p{k}": GRID[chosen[k]] for k in range(4)}
    assert report["task_coefficients"]["p2"]["phys_x1"] == pytest.approx(float(res.params.beta[2, 1]))


def test_l1_logistic_meets_its_subgradient_conditions(data, fits):
    res = fits("logistic-l1")
    assert res.converged
    X, y, _, task, _ = arrays(data)
    rows, C = fit_rows(data), 0.2
    zeros = 0
    for k in range(4):
        mine = rows & (task == k)
        b, beta = float(res.params.intercept[k]), np.asarray(res.params.beta[k])
        residual = expit(b + X[mine] @ beta) - y[mine]
        assert abs(residual.sum()) < 1e-7  # intercept unpenalised
        g = X[mine].T @ residual
        active = beta != 0
        np.testing.assert_allclose(g[active], -np.sign(beta[active]) / C, atol=1e-6)
        assert np.all(np.abs(g[~active]) <= 1 / C + 1e-8)
        zeros += int((~active).sum())
    assert zeros > 0  # the penalty is strong enough to set some coefficient exactly to 0


def test_pooled_logistic_equals_scipy_on_all_rows_and_serves_every_task(data, fits):
    res = fits("pooled-logistic")
    X, y, _, _, _ = arrays(data)
    rows = fit_rows(data)
    b, beta = ref_logistic_l2(X[rows], y[rows], 1.0)
    np.testing.assert_allclose(res.params.intercept, [b], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.params.beta, [beta], rtol=1e-6, atol=1e-8)
    frame = new_frame()
    same_rows = pd.concat([frame.iloc[:4].assign(user_id=person) for person in [*PEOPLE, "newcomer"]])
    predictions = res.predict(same_rows)[:, 0].reshape(5, 4)
    np.testing.assert_allclose(predictions, np.broadcast_to(predictions[0], (5, 4)), rtol=1e-13)


# ---------------------------------------------------------------------- LSSVM
def kkt_scores(X_train, labels, X_new, gamma, kernel):
    """Dense solve of [[0, 1^T], [1, K + I / gamma]] [b, alpha] = [0, y]; scores of the new rows."""
    m = len(labels)
    A = np.zeros((m + 1, m + 1))
    A[0, 1:] = A[1:, 0] = 1.0
    A[1:, 1:] = kernel(X_train, X_train) + np.eye(m) / gamma
    solution = np.linalg.solve(A, np.r_[0.0, np.where(labels > 0.5, 1.0, -1.0)])
    return kernel(X_new, X_train) @ solution[1:] + solution[0]


@pytest.mark.parametrize("name", ["lssvm", "lssvm-rbf"])
def test_lssvm_scores_equal_a_dense_kkt_solve_and_probabilities_increase_with_them(data, fits, name):
    res = fits(name)
    assert res.converged
    model = MODELS[name]
    X, y, _, task, _ = arrays(data)
    rows = fit_rows(data)
    if model.kernel == "rbf":
        h = np.median(pdist(X[rows]))
        assert float(res.params.bandwidth) == pytest.approx(h, rel=1e-12)

        def kernel(A, B):
            return np.exp(-((A[:, None, :] - B[None, :, :]) ** 2).sum(-1) / (2 * h * h))
    else:
        def kernel(A, B):
            return A @ B.T
    scores = np.asarray(model.score_columns(res.params, data)["decision_score"])
    probabilities = res.predict(person_frame())[:, 0]
    for k in range(4):
        mine = task == k  # every row of the task: training, validation, test, masked
        expected = kkt_scores(X[rows & mine], y[rows & mine], X[mine], model.gamma, kernel)
        np.testing.assert_allclose(scores[mine], expected, rtol=1e-8, atol=1e-10)
        order = np.argsort(scores[mine])
        assert np.all(np.diff(probabilities[mine][order]) >= 0)
        assert probabilities[mine].min() < 0.5 < probabilities[mine].max()
    table = res.score_table(person_frame())
    np.testing.assert_allclose(table["decision_score"], scores, rtol=1e-12)


# ----------------------------------------------------------------------- nets
def test_stl_net_task_predictions_do_not_depend_on_other_tasks_labels(frame):
    frame = frame.drop(columns="split")  # no validation rows: no (joint) early stopping
    changed = frame.copy()
    p1 = changed.user_id == "p1"
    changed.loc[p1, "stress_Label"] = 1.0 - changed.loc[p1, "stress_Label"]
    model = STLNet(hidden=(3,))
    runs = [fit(model, PersonData.from_dataframe(f, person="user_id"), method="map", validation_fraction=0.0,
                **NET_OPTIONS) for f in (frame, changed)]
    new = new_frame()
    new = new[new.user_id != "newcomer"]
    before, after = (run.predict(new)[:, 0] for run in runs)
    others = (new.user_id != "p1").to_numpy()
    np.testing.assert_allclose(after[others], before[others], rtol=1e-12, atol=1e-15)
    assert np.max(np.abs(after[~others] - before[~others])) > 0.05


# -------------------------------------------------------------- every model
@pytest.mark.parametrize("name", list(MODELS))
def test_masked_labels_change_nothing(data, fits, name):
    masked = np.flatnonzero(np.asarray(data.weight) == 0)
    assert masked.size > 5
    changed = replace(data, X=data.X.at[masked].add(1.5), y=data.y.at[masked].set(1.0 - data.y[masked]))
    res, other = fits(name), fit(MODELS[name], changed, method="map", **options(name))
    for a, b in zip(jax_leaves(res.params), jax_leaves(other.params)):
        np.testing.assert_array_equal(a, b)
    assert res.loglik == other.loglik


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_predict_and_score_bit_identical(fits, name, tmp_path):
    res = fits(name)
    frame = new_frame()
    path = tmp_path / "fit.json"
    res.save(path)
    loaded = Fit.load(path)
    assert loaded.model == res.model
    np.testing.assert_array_equal(loaded.predict(frame), res.predict(frame))
    np.testing.assert_array_equal(loaded.score(frame), res.score(frame))
    pd.testing.assert_frame_equal(loaded.score_table(frame), res.score_table(frame))
    assert np.all(np.isfinite(res.predict(frame))) and set(loaded.named_parameters()) == set(res.named_parameters())


@pytest.mark.parametrize("name", ["logistic", "logistic-l1", "lssvm", "lssvm-rbf", "stl-net"])
def test_unseen_person_gets_the_documented_population_answer(data, fits, name):
    res = fits(name)
    frame = new_frame()  # (all frames here have its shape: the answers compile once)
    unseen = (frame.user_id == "newcomer").to_numpy()
    answer = res.predict(frame)[unseen, 0]
    if name.startswith("logistic"):  # the average coefficient vector
        X = (frame[COLUMNS].to_numpy()[unseen] - np.asarray(data.schema.mean)) / np.asarray(data.schema.sd)
        b, beta = np.mean(res.params.intercept), np.mean(res.params.beta, axis=0)
        np.testing.assert_allclose(answer, expit(b + X @ beta), rtol=1e-12)
        return
    as_each = np.stack([res.predict(frame.assign(user_id=person))[unseen, 0] for person in PEOPLE])
    np.testing.assert_allclose(answer, as_each.mean(axis=0), rtol=1e-12)  # the average of the task answers
    assert np.ptp(as_each, axis=0).max() > 1e-3
    loglik = res.score(frame)[unseen]
    y = frame.stress_Label.to_numpy()[unseen]
    assert not np.isnan(y).all()
    expected = np.where(np.isnan(y), 0.0, np.log(np.where(y == 1, as_each, 1 - as_each).mean(axis=0)))
    np.testing.assert_allclose(loglik, expected, rtol=1e-12)
    if name.startswith("lssvm"):
        scores = [res.score_table(frame.assign(user_id=person))["decision_score"][unseen] for person in PEOPLE]
        np.testing.assert_allclose(res.score_table(frame)["decision_score"][unseen], np.mean(scores, axis=0),
                                   rtol=1e-12)


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("name", ["logistic", "pooled-logistic", "lssvm"])
def test_single_class_task_is_a_data_error_naming_it(data, name):
    y = np.asarray(data.y).copy()
    y[np.asarray(data.task) == 3] = 0.0
    one_class = replace(data, y=jnp.asarray(y))
    if name == "pooled-logistic":  # one class over all tasks
        with pytest.raises(DataError, match="all tasks"):
            fit(MODELS[name], replace(data, y=jnp.zeros_like(data.y)), method="map")
        return
    with pytest.raises(DataError, match=r"'p3': 0 positive"):
        fit(MODELS[name], one_class, method="map")
    not_binary = replace(data, task_binary=data.task_binary.at[1].set(False))
    with pytest.raises(DataError, match=r"'p1' is not binary"):
        fit(MODELS[name], not_binary, method="map")


def test_stl_net_fits_a_single_class_task(data):
    y = np.asarray(data.y).copy()
    y[np.asarray(data.task) == 3] = 0.0
    res = fit(MODELS["stl-net"], replace(data, y=jnp.asarray(y)), method="map", **NET_OPTIONS)
    frame = new_frame()
    assert np.all(res.predict(frame)[(frame.user_id == "p3").to_numpy()] < 0.5)


# ------------------------------------------------------------------------ CLI
def test_cli_options_build_the_models():
    base = ["fit", "data.csv", "--task", "user_id", "--method", "map", "--out", "fit.json"]
    cases = {
        "logistic": (["--penalty", "l1", "--C", "0.1", "1", "10", "--cv-folds", "4", "--select", "global"],
                     PerTaskLogistic(penalty="l1", C=(0.1, 1.0, 10.0), cv_folds=4, select="global")),
        "pooled-logistic": (["--C", "2"], PooledLogistic(C=(2.0,))),
        "lssvm": (["--kernel", "rbf", "--gamma", "1", "--bandwidth", "2"],
                  PerTaskLSSVM(kernel="rbf", gamma=1.0, bandwidth=2.0)),
        "stl-net": (["--hidden", "16", "--l2", "0.01"], STLNet(hidden=(16,), l2=0.01)),
    }
    from mtl_jax.models import model_class

    for name, (argv, expected) in cases.items():
        args = _parser(name).parse_args([*base, "--model", name, *argv])
        assert model_class(name).from_arguments(args) == expected
    assert model_class("logistic").from_arguments(
        _parser("logistic").parse_args([*base, "--model", "logistic"])) == PerTaskLogistic()


def test_cli_fit_predict_equals_the_public_api(tmp_path, frame, fits):
    csv = tmp_path / "people.csv"
    frame.to_csv(csv, index=False)
    new = new_frame()
    new_csv = tmp_path / "new.csv"
    new.to_csv(new_csv, index=False)
    out, pred = tmp_path / "fit.json", tmp_path / "pred.csv"
    run = [sys.executable, "-m", "mtl_jax.cli"]
    env = {**os.environ, "JAX_ENABLE_X64": "1"}  # the float64 of this test process
    fitted = subprocess.run([*run, "fit", str(csv), "--model", "logistic", "--task", "user_id", "--split", "split",
                             "--C", *map(str, GRID), "--method", "map", "--out", str(out)],
                            capture_output=True, text=True, env=env)
    assert fitted.returncode == 0, fitted.stderr
    saved = json.loads(out.read_text())
    assert saved["model"]["name"] == "logistic" and set(saved["chosen_C"]) == set(PEOPLE)
    done = subprocess.run([*run, "predict", str(out), str(new_csv), "--out", str(pred)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(pd.read_csv(pred)["pred_stress_Label"], fits("logistic").predict(new)[:, 0],
                               rtol=1e-10)
    # lssvm in process: score writes the raw decision scores after loglik
    lssvm_fit, scored = tmp_path / "lssvm.json", tmp_path / "scored.csv"
    done = run_main(["fit", str(csv), "--model", "lssvm", "--task", "user_id", "--split", "split", "--method", "map",
                     "--out", str(lssvm_fit)])
    assert done.status == 0, done.err
    done = run_main(["score", str(lssvm_fit), str(new_csv), "--out", str(scored)])
    assert done.status == 0, done.err
    table = pd.read_csv(scored)
    assert list(table.columns[-2:]) == ["loglik", "decision_score"]
    np.testing.assert_allclose(table["decision_score"], fits("lssvm").score_table(new)["decision_score"], rtol=1e-10)
