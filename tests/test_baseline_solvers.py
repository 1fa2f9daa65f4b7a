"""Tests for mtl_jax.models.baselines.solvers: single-task solvers, vmapped over padded tasks.

Every reference is written here in NumPy/SciPy, independently of the package: the logistic
objectives minimised by ``scipy.optimize.minimize`` (L-BFGS-B; the L1 objective made
smooth by splitting ``beta = p - m``, ``p, m >= 0``), the LS-SVM by a dense solve of its
bordered KKT system, padding by a Python loop over tasks. Float64 fits run with 64-bit
types on (as the suite does, tests/conftest.py), float32 fits with them off
(``jax.enable_x64(False)``, a fresh process's configuration), as in test_glmm_float32.py.

Shapes are shared between tests (``q = 4``; single tasks of 23, 16 and 9 rows, padded
blocks of 23) so that the jit-compiled solvers compile few times.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from mtl_jax.models.baselines.solvers import (
    fit_grid,
    fit_per_task,
    logistic_l1,
    logistic_l2,
    logistic_proba,
    lssvm,
    lssvm_row_scores,
    lssvm_scores,
    pad_by_task,
    unpad,
)

Q = 4
TASK_SIZES = np.array([23, 16, 0, 9])  # unequal, one task without rows
BETA_SPARSE = np.array([2.0, 0.0, -1.5, 0.0])


# ----------------------------------------------------------------------------------------
# Data and independent references
# ----------------------------------------------------------------------------------------


def logistic_data(n, *, q=Q, mean=0.0, beta=None, seed=0):
    """``(X [n, q], y [n])``: ``x ~ N(mean, 1)``, ``P(y = 1) = expit(0.4 + (x - mean)^T beta)``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(mean, 1.0, (n, q))
    beta = rng.normal(size=q) if beta is None else beta
    y = (rng.uniform(size=n) < expit(0.4 + (X - mean) @ beta)).astype(float)
    return X, y


def fit64(solver, *args, **kwargs):
    """The solver on float64 arrays with 64-bit types on; leaves returned as NumPy arrays."""
    with jax.enable_x64(True):
        out = solver(*(a if isinstance(a, str) else np.asarray(a, np.float64) for a in args), **kwargs)
        return jax.tree.map(np.asarray, out)


def fit32(solver, *args, **kwargs):
    """The solver on float32 arrays with 64-bit types off; leaves returned as NumPy arrays."""
    with jax.enable_x64(False):
        out = solver(*(a if isinstance(a, str) else np.asarray(a, np.float32) for a in args), **kwargs)
        return jax.tree.map(np.asarray, out)


def scipy_minimize(fun, x0, bounds=None):
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 50_000, "maxcor": 50, "ftol": 0.0, "gtol": 1e-12})
    return res.x


def nll_and_grad(X, y, w, b, beta):
    """Weighted log-loss ``sum w (log(1 + e^eta) - y eta)`` and its gradient in ``(b, beta)``."""
    eta = b + X @ beta
    r = w * (expit(eta) - y)
    return np.sum(w * (np.logaddexp(0.0, eta) - y * eta)), r.sum(), X.T @ r


def reference_l2(X, y, w, C):
    """``argmin sum w logloss + |beta|^2 / (2C)`` as ``(b, beta)``, by L-BFGS-B."""
    def fun(theta):
        f, gb, gbeta = nll_and_grad(X, y, w, theta[0], theta[1:])
        return f + theta[1:] @ theta[1:] / (2 * C), np.concatenate([[gb], gbeta + theta[1:] / C])

    theta = scipy_minimize(fun, np.zeros(X.shape[1] + 1))
    return theta[0], theta[1:]


def reference_l1(X, y, w, C):
    """``argmin sum w logloss + |beta|_1 / C`` as ``(b, beta)``.

    Smooth in ``(b, p, m)`` with ``beta = p - m``, ``p, m >= 0`` (bounds).
    """
    q = X.shape[1]

    def fun(z):
        p, m = z[1 : q + 1], z[q + 1 :]
        f, gb, gbeta = nll_and_grad(X, y, w, z[0], p - m)
        return f + (p.sum() + m.sum()) / C, np.concatenate([[gb], gbeta + 1 / C, -gbeta + 1 / C])

    z = scipy_minimize(fun, np.zeros(2 * q + 1), bounds=[(None, None)] + [(0.0, None)] * (2 * q))
    return z[0], z[1 : q + 1] - z[q + 1 :]


def kernel_matrix(A, B, kernel, bandwidth):
    if kernel == "linear":
        return A @ B.T
    return np.exp(-np.sum((A[:, None, :] - B[None, :, :]) ** 2, axis=-1) / (2 * bandwidth**2))


def reference_lssvm(X, y, gamma, kernel, bandwidth):
    """``(b, alpha)`` from a dense solve of ``[[0, 1^T], [1, K + I/gamma]] [b; alpha] = [0; y]``, y in -1/+1."""
    n = len(y)
    A = np.zeros((n + 1, n + 1))
    A[0, 1:] = A[1:, 0] = 1.0
    A[1:, 1:] = kernel_matrix(X, X, kernel, bandwidth) + np.eye(n) / gamma
    sol = np.linalg.solve(A, np.concatenate([[0.0], np.where(y > 0, 1.0, -1.0)]))
    return sol[0], sol[1:]


def assert_theta_close(fit, b, beta, rtol, atol=0.0):
    np.testing.assert_allclose(np.concatenate([[fit[0]], fit[1]]), np.concatenate([[b], beta]), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------


def test_pad_by_task_and_unpad_round_trip():
    rng = np.random.default_rng(1)
    K, n = len(TASK_SIZES), TASK_SIZES.sum()
    task = rng.permutation(np.repeat(np.arange(K), TASK_SIZES)).astype(np.int32)
    X = rng.normal(size=(n, Q))
    y = rng.integers(0, 2, n).astype(float)
    weight = rng.uniform(0.5, 2.0, n)
    weight[::5] = 0.0
    Xp, yp, wp, index = pad_by_task(X, y, weight, task, K)

    m = TASK_SIZES.max()
    assert Xp.shape == (K, m, Q) and yp.shape == wp.shape == index.shape == (K, m)
    assert Xp.dtype == X.dtype and index.dtype == np.int32
    for k in range(K):  # reference: each task's rows in their original order, then padding
        rows = np.flatnonzero(task == k)
        size = len(rows)
        np.testing.assert_array_equal(index[k, :size], rows)
        np.testing.assert_array_equal(index[k, size:], -1)
        np.testing.assert_array_equal(Xp[k, :size], X[rows])
        np.testing.assert_array_equal(yp[k, :size], y[rows])
        np.testing.assert_array_equal(wp[k, :size], weight[rows])
        assert not Xp[k, size:].any() and not yp[k, size:].any() and not wp[k, size:].any()

    np.testing.assert_array_equal(np.asarray(unpad(yp, index, n)), y)
    np.testing.assert_array_equal(np.asarray(unpad(Xp, index, n)), X)  # trailing axes too
    np.testing.assert_array_equal(np.asarray(jax.jit(unpad, static_argnums=2)(wp, index, n)), weight)

    with pytest.raises(ValueError, match="task ids"):
        pad_by_task(X, y, weight, np.where(task == 3, K, task), K)


# ----------------------------------------------------------------------------------------
# Logistic regression
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [0.3, 5.0])
def test_logistic_l2_matches_scipy(C):
    X, y = logistic_data(23, seed=2)
    w = np.random.default_rng(3).choice([0.5, 1.0, 2.0], 23)  # weights enter the objective
    fit = fit64(logistic_l2, X, y, w, C)
    assert fit.converged and fit.beta.dtype == np.float64
    b, beta = reference_l2(X, y, w, C)
    assert_theta_close(fit, b, beta, rtol=1e-6)


@pytest.mark.parametrize("solver", [logistic_l2, logistic_l1])
def test_logistic_zero_weight_rows_change_nothing(solver):
    X, y = logistic_data(23, seed=5)
    w = np.ones(23)
    masked = np.arange(23) % 3 == 1  # 7 rows masked: their labels missing, one row NaN altogether
    w[masked] = 0.0
    y_missing, X_missing = y.copy(), X.copy()
    y_missing[masked] = np.nan
    X_missing[1] = np.nan
    X_missing[4] = 1e30
    full = fit64(solver, X_missing, y_missing, w, 0.5)
    kept = fit64(solver, X[~masked], y[~masked], w[~masked], 0.5)
    assert full.converged and kept.converged
    assert_theta_close(full, kept.intercept, kept.beta, rtol=1e-10, atol=1e-12)


def test_logistic_l1_matches_split_scipy_with_exact_zeros():
    X, y = logistic_data(23, beta=BETA_SPARSE, seed=6)
    w = np.ones(23)
    C = 0.3
    fit = fit64(logistic_l1, X, y, w, C)
    assert fit.converged
    b, beta = reference_l1(X, y, w, C)
    zero = np.abs(beta) < 1e-9
    # The case is meaningful: zeros strictly inside the subgradient interval, others clearly nonzero.
    _, _, grad = nll_and_grad(X, y, w, b, beta)
    assert 1 <= zero.sum() < Q
    assert np.all(np.abs(grad[zero]) < 0.9 / C) and np.all(np.abs(beta[~zero]) > 1e-2)
    np.testing.assert_array_equal(fit.beta == 0.0, zero)  # soft-thresholding: exact zeros
    assert_theta_close(fit, b, beta, rtol=1e-5, atol=1e-5 * np.max(np.abs(beta)))

    # The L1 and L2 solvers do differ (the references would catch a swapped penalty).
    b2, beta2 = reference_l2(X, y, w, C)
    assert np.max(np.abs(beta2 - beta)) > 1e-2


# ----------------------------------------------------------------------------------------
# LS-SVM
# ----------------------------------------------------------------------------------------


LSSVM_CASES = [  # (kernel, bandwidth, rows, seed): the linear kernel with q < m (primal) and q >= m (dual)
    ("linear", 1.0, 23, 8),
    ("linear", 1.0, 4, 14),
    ("rbf", 1.5, 23, 8),
]


@pytest.mark.parametrize(("kernel", "bandwidth", "n", "seed"), LSSVM_CASES)
def test_lssvm_matches_dense_kkt_and_excludes_masked_rows(kernel, bandwidth, n, seed):
    rng = np.random.default_rng(7)
    X, y01 = logistic_data(n, seed=seed)
    gamma = 3.0
    X_new = rng.normal(size=(5, Q))
    w = np.ones(n)
    masked = np.zeros(n, bool)
    masked[[0, n // 2] if n > 4 else [0]] = True
    assert len(set(y01[~masked])) == 2  # both classes among the rows fitted
    w[masked] = 0.0
    y_missing = y01.copy()
    y_missing[masked] = np.nan
    X_missing = X.copy()
    X_missing[0] = np.nan

    b_ref, alpha_ref = reference_lssvm(X[~masked], y01[~masked], gamma, kernel, bandwidth)
    fit = fit64(lssvm, X_missing, y_missing, w, gamma, kernel, bandwidth)
    np.testing.assert_allclose(fit.b, b_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.alpha[~masked], alpha_ref, rtol=1e-10, atol=1e-12)
    assert np.all(fit.alpha[masked] == 0.0)
    # Labels given as -1/+1 give the same fit as 0/1.
    fit_pm = fit64(lssvm, X_missing, np.where(y_missing > 0, 1.0, -1.0), w, gamma, kernel, bandwidth)
    np.testing.assert_allclose(fit_pm.alpha, fit.alpha, rtol=1e-12, atol=1e-14)

    scores_ref = kernel_matrix(X_new, X[~masked], kernel, bandwidth) @ alpha_ref + b_ref
    scores = fit64(lssvm_scores, X_missing, fit.b, fit.alpha, X_new, kernel, bandwidth)
    np.testing.assert_allclose(scores, scores_ref, rtol=1e-10, atol=1e-12)

    # Weight 2 on a row is the row twice (the primal's weighted squared errors).
    w2 = w.copy()
    w2[1] = 2.0
    dup = np.concatenate([np.flatnonzero(~masked), [1]])
    b_dup, alpha_dup = reference_lssvm(X[dup], y01[dup], gamma, kernel, bandwidth)
    fit2 = fit64(lssvm, X_missing, y_missing, w2, gamma, kernel, bandwidth)
    np.testing.assert_allclose(fit2.b, b_dup, rtol=1e-10, atol=1e-12)
    scores2 = fit64(lssvm_scores, X_missing, fit2.b, fit2.alpha, X_new, kernel, bandwidth)
    np.testing.assert_allclose(scores2, kernel_matrix(X_new, X[dup], kernel, bandwidth) @ alpha_dup + b_dup,
                               rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Batched fits: vmap over tasks equals a loop of single-task fits
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks():
    """Flat rows of ``len(TASK_SIZES)`` tasks (one empty), some masked, and their padded blocks."""
    rng = np.random.default_rng(9)
    K, n = len(TASK_SIZES), TASK_SIZES.sum()
    task = rng.permutation(np.repeat(np.arange(K), TASK_SIZES)).astype(np.int32)
    X, y = logistic_data(n, seed=10)
    w = np.ones(n)
    w[rng.choice(n, 6, replace=False)] = 0.0
    Xp, yp, wp, index = pad_by_task(X, y, w, task, K)
    return {"X": X, "y": y, "w": w, "task": task, "K": K, "n": n, "Xp": Xp, "yp": yp, "wp": wp, "index": index}


SOLVER_CASES = [
    (logistic_l2, {"C": 0.7}),
    (logistic_l1, {"C": 0.7}),
    (lssvm, {"gamma": 2.0, "kernel": "linear"}),
    (lssvm, {"gamma": 2.0, "kernel": "rbf", "bandwidth": 1.5}),
]


@pytest.mark.parametrize(("solver", "hyper"), SOLVER_CASES, ids=["l2", "l1", "lssvm-linear", "lssvm-rbf"])
def test_vmapped_fit_equals_loop_of_single_task_fits(tasks, solver, hyper):
    """The loop fits each task's padded block (one compilation); that padding rows change nothing is
    checked against fits on the rows alone by the zero-weight tests and test_lssvm_row_scores."""
    t = tasks
    with jax.enable_x64(True):
        fits = jax.tree.map(np.asarray, fit_per_task(solver, t["Xp"], t["yp"], t["wp"], **hyper))
    for k in range(t["K"]):
        single = fit64(solver, t["Xp"][k], t["yp"][k], t["wp"][k], **hyper)
        for name, got, expected in zip(single._fields, fits, single):
            np.testing.assert_allclose(got[k], expected, rtol=1e-10, atol=1e-12, err_msg=name)
    if solver is lssvm:
        assert np.all(fits.alpha[t["wp"] == 0] == 0.0)
    else:
        assert fits.converged.all()
        assert np.all(fits.beta[2] == 0.0) and fits.intercept[2] == 0.0  # the empty task


def test_C_grids_and_logistic_predictions(tasks):
    t = tasks
    K = t["K"]
    grid = np.array([0.1, 1.0, 10.0])
    per_task_grid = grid[(np.arange(3)[:, None] + np.arange(K)[None, :]) % 3]  # [G, K], a per-task C in each row
    with jax.enable_x64(True):
        by_grid = jax.tree.map(np.asarray, fit_grid(logistic_l2, t["Xp"], t["yp"], t["wp"], grid))
        by_task = jax.tree.map(np.asarray, fit_grid(logistic_l2, t["Xp"], t["yp"], t["wp"], per_task_grid))
        proba = np.asarray(logistic_proba(t["X"], t["task"], by_task.intercept[0], by_task.beta[0]))
    assert by_grid.beta.shape == by_task.beta.shape == (3, K, Q)
    assert by_grid.intercept.shape == by_grid.converged.shape == (3, K)
    assert by_grid.converged.all() and by_task.converged.all()
    for k in range(K):
        for g in range(3):
            for fits, C in [(by_grid, grid[g]), (by_task, per_task_grid[g, k])]:
                single = fit64(logistic_l2, t["Xp"][k], t["yp"][k], t["wp"][k], C)
                assert_theta_close((fits.intercept[g, k], fits.beta[g, k]), single.intercept, single.beta,
                                   rtol=1e-10, atol=1e-12)
        rows = t["task"] == k
        expected = expit(by_task.intercept[0, k] + t["X"][rows] @ by_task.beta[0, k])
        np.testing.assert_allclose(proba[rows], expected, rtol=1e-12)
    assert not np.allclose(by_grid.beta[0], by_grid.beta[2])  # C matters


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_lssvm_row_scores(tasks, kernel):
    t = tasks
    bandwidth = 1.5
    new = np.random.default_rng(11).normal(size=(12, Q))
    new_task = np.arange(12) % t["K"]
    with jax.enable_x64(True):
        fits = fit_per_task(lssvm, t["Xp"], t["yp"], t["wp"], gamma=2.0, kernel=kernel, bandwidth=bandwidth)
        scores = lssvm_row_scores(t["Xp"], fits.b, fits.alpha, new, new_task, kernel, bandwidth, batch_size=5)
        scores = np.asarray(scores)
    for k in range(t["K"]):
        keep = (t["task"] == k) & (t["w"] > 0)
        if not keep.any():
            np.testing.assert_array_equal(scores[new_task == k], 0.0)  # an empty task: b = 0, alpha = 0
            continue
        b_ref, alpha_ref = reference_lssvm(t["X"][keep], t["y"][keep], 2.0, kernel, bandwidth)
        expected = kernel_matrix(new[new_task == k], t["X"][keep], kernel, bandwidth) @ alpha_ref + b_ref
        np.testing.assert_allclose(scores[new_task == k], expected, rtol=1e-10, atol=1e-12)


def test_degenerate_tasks_stay_finite():
    """One class only (intercept -> inf but for the eps ridge), all rows masked, separable."""
    X, _ = logistic_data(23, seed=12)
    ones, w = np.ones(23), np.ones(23)
    l2 = fit64(logistic_l2, X, ones, w, 1.0)
    assert l2.converged and np.all(np.isfinite(l2.beta)) and 20 < l2.intercept < 60
    np.testing.assert_allclose(l2.beta, 0.0, atol=1e-12)
    l1 = fit64(logistic_l1, X, ones, w, 1.0, max_iter=300)
    assert np.isfinite(l1.intercept) and l1.intercept > 5 and np.all(l1.beta == 0.0)
    empty = fit64(logistic_l2, X, ones, 0 * w, 1.0)
    assert empty.converged and empty.intercept == 0.0 and np.all(empty.beta == 0.0)
    separable = fit64(logistic_l2, X, (X[:, 0] > 0).astype(float), w, 1e4)
    assert separable.converged and separable.beta[0] > 5
    lssvm_one = fit64(lssvm, X, ones, w, 2.0, "rbf", 1.5)  # one class: b = 1, alpha = 0
    np.testing.assert_allclose(lssvm_one.b, 1.0, rtol=1e-12)
    np.testing.assert_allclose(lssvm_one.alpha, 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# float32 against float64
# ----------------------------------------------------------------------------------------


def relative_gap(a32, a64):
    a32, a64 = np.ravel(a32), np.ravel(a64)
    return np.max(np.abs(a32.astype(np.float64) - a64)) / np.max(np.abs(a64))


def test_float32_matches_float64_with_features_far_from_zero():
    """``x ~ N(5, 1)`` (an intercept column far from the features' spread), 23 rows.

    Measured gaps (relative to the largest float64 value; seeds 13-22): logistic L2 ``<= 1.1e-6``,
    L1 ``<= 1.5e-6`` (same zeros), LS-SVM ``alpha``/``b`` ``<= 2.5e-6``, scores ``<= 3.1e-5``
    (linear kernel: ``sum_i alpha_i x_i`` cancels, see lssvm_scores). Without the solvers'
    centring the L1 gap here was 1.2e-4.
    """
    X, y = logistic_data(23, mean=5.0, beta=BETA_SPARSE, seed=13)
    X_new = logistic_data(5, mean=5.0, seed=14)[0]
    w = np.ones(23)
    for solver, C in [(logistic_l2, 1.0), (logistic_l1, 0.3)]:
        f64, f32 = fit64(solver, X, y, w, C), fit32(solver, X, y, w, C)
        assert f32.beta.dtype == np.float32 and f64.beta.dtype == np.float64
        assert f32.converged and f64.converged
        theta64 = np.concatenate([[f64.intercept], f64.beta])
        theta32 = np.concatenate([[f32.intercept], f32.beta])
        assert relative_gap(theta32, theta64) < 1e-4, solver.__name__
        np.testing.assert_array_equal(f32.beta == 0, f64.beta == 0)
    assert (f64.beta == 0).sum() == 2  # the L1 case has zeros to agree on

    for kernel, bandwidth in [("linear", 1.0), ("rbf", 2.0)]:
        f64, f32 = fit64(lssvm, X, y, w, 1.0, kernel, bandwidth), fit32(lssvm, X, y, w, 1.0, kernel, bandwidth)
        assert f32.alpha.dtype == np.float32
        assert relative_gap(f32.alpha, f64.alpha) < 1e-4 and relative_gap(f32.b, f64.b) < 1e-4, kernel
        s64 = fit64(lssvm_scores, X, f64.b, f64.alpha, X_new, kernel, bandwidth)
        s32 = fit32(lssvm_scores, X, f32.b, f32.alpha, X_new, kernel, bandwidth)
        assert relative_gap(s32, s64) < 1e-4, kernel
