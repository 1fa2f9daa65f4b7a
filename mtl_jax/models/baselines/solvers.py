r"""Pure-JAX solvers for single-task baselines, written for one task and vmapped over tasks.

**Data layout.** Observations are flat: ``X [n, q]`` (float), ``y [n]``, ``task [n]``
(int32 in ``0..K-1``) and ``weight [n]`` (``1.0`` observed, ``0.0`` a masked or missing
label). A row with weight 0 contributes exactly nothing to a fit: the solvers replace its
``x``, ``y`` (which may be NaN) and weight by zeros before any arithmetic and give it no
dual variable, so a fit with a zero-weight row equals the fit without it (to rounding).

**Tasks as padded blocks.** Each solver fits *one* task, ``X [m, q]``, ``y [m]``,
``w [m]``. :func:`pad_by_task` gathers the flat rows into blocks ``Xp [K, m, q]``,
``yp [K, m]``, ``wp [K, m]`` with ``m`` the largest task size (padding rows have weight 0,
hence no effect), and :func:`fit_per_task` is ``jax.vmap`` of a solver over the task
axis; :func:`unpad` scatters per-slot values ``[K, m]`` back to the flat rows. No solver
or helper loops over tasks in Python.

**Solvers** (each jit-compiled; the objective's intercept :math:`b` is unpenalised):

* :func:`logistic_l2`: :math:`\sum_i w_i\,\ell(y_i, b + x_i^T\beta) + \|\beta\|_2^2/(2C)`
  by damped Newton (Cholesky solve of the :math:`(q+1)\times(q+1)` Hessian), the
  objective of scikit-learn's ``LogisticRegression(C=C)``;
* :func:`logistic_l1`: :math:`\sum_i w_i\,\ell(y_i, b + x_i^T\beta) + \|\beta\|_1/C` by
  FISTA with adaptive restart (soft-thresholding, exact zeros);
* :func:`lssvm`: the least-squares SVM of Suykens (labels :math:`\pm1`), by a Cholesky
  solve of its KKT system; :func:`lssvm_scores` gives real-valued decision scores;

with :math:`\ell(y, \eta) = -y\log\sigma(\eta) - (1-y)\log\sigma(-\eta)` evaluated in log
space (``jax.nn.log_sigmoid``), ``y`` in ``{0, 1}`` (fractions in ``[0, 1]`` are allowed).

**Accuracy in float32.** The solvers work in the dtype of ``X`` (float32 unless ``X`` is
float64). The logistic solvers fit in coordinates centred at the weighted mean
:math:`\mu` of the rows, :math:`b + x^T\beta = b_c + (x-\mu)^T\beta` with
:math:`b = b_c - \mu^T\beta`; the penalty involves :math:`\beta` only, so this is the same
problem exactly, but the intercept column is then orthogonal to the features and a
feature far from zero (e.g. :math:`x \sim N(5, 1)`) no longer makes the Hessian or the
Lipschitz constant ill-conditioned. The LS-SVM kernels are evaluated on centred rows for
the same reason, and the linear LS-SVM with fewer features than rows is solved through
its primal normal equations (the same :math:`\alpha` and bias). Standardising the
features' scales is left to the caller (:func:`logistic_l1` rescales internally, an
exact change of variables). Measured float32 against float64, relative to the largest
parameter (random problems, 15 to 4000 rows, 1 to 24 features with means 0 to 15 and
scales 0.3 to 3, ``C`` from 0.01 to 100): logistic L2 ``<= 5e-6``, L1 ``<= 4e-5`` (same
zeros); LS-SVM (``x ~ N(5, 1)``, 23 and 60 rows, ``gamma = 1``) ``alpha`` and ``b``
``<= 3e-6``; see :func:`lssvm` and :func:`lssvm_scores` for the limits of the dual
representation.

**Hyperparameter grids.** :func:`fit_per_task` broadcasts scalar hyperparameters and maps
arrays with a leading task axis (a per-task ``C``); :func:`fit_grid` adds an outer vmap
over a grid of one hyperparameter, giving ``[G, K, ...]`` results in one computation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.scipy.linalg import cho_factor, cho_solve
from jax.typing import ArrayLike

KERNELS = ("linear", "rbf")
# Full float32 products: on recent GPUs JAX's default computes float32 matmuls in TF32
# (~1e-3 relative), which the float32 accuracy of these solvers cannot afford.
_HIGHEST = lax.Precision.HIGHEST
_dot = functools.partial(jnp.matmul, precision=_HIGHEST)
_LINE_SEARCH_STEPS = 12  # Newton step lengths tried: 1, 1/2, ..., 2^-11


class LogisticFit(NamedTuple):
    """A logistic fit (one task: scalars and ``beta [q]``; batched: leading axes added).

    Attributes:
        intercept: the unpenalised intercept :math:`b` ``[]``, in the original coordinates.
        beta: the coefficients :math:`\\beta` ``[q]``.
        converged: whether the stopping test was met before ``max_iter`` ``[]`` (bool).
    """

    intercept: Array
    beta: Array
    converged: Array


class LSSVMFit(NamedTuple):
    """An LS-SVM fit (one task: ``b []``, ``alpha [m]``; batched: leading axes added).

    Attributes:
        b: the bias ``[]``, in the original coordinates of ``X``.
        alpha: the support values ``[m]``; exactly 0 on rows with weight 0.
    """

    b: Array
    alpha: Array


# ----------------------------------------------------------------------------------------
# Padding flat rows into per-task blocks
# ----------------------------------------------------------------------------------------


def pad_by_task(
    X: ArrayLike, y: ArrayLike, weight: ArrayLike, task: ArrayLike, num_tasks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gathers flat rows into per-task padded blocks (host-side NumPy, no loop over tasks).

    Rows keep their order within a task (a stable argsort by task); task ``k``'s ``j``-th
    row goes to slot ``[k, j]``. Padding slots have ``x = 0``, ``y = 0``, weight 0 and
    index -1. Rows with weight 0 keep their slots (their predictions are usually wanted).

    Args:
        X: features ``[n, q]``.
        y: labels ``[n]``.
        weight: row weights ``[n]`` (0 for a masked row).
        task: task ids ``[n]``, integers in ``0..num_tasks-1``.
        num_tasks: ``K``; tasks without rows get blocks of padding only.

    Returns:
        ``(Xp [K, m, q], yp [K, m], wp [K, m], index [K, m])`` as NumPy arrays in the
        inputs' dtypes (``index`` int32), with ``m = max(1, largest task size)`` and
        ``index[k, j]`` the flat row in slot ``[k, j]`` (-1 for padding).

    Raises:
        ValueError: on mismatched shapes or task ids outside ``0..num_tasks-1``.
    """
    X, y, weight, task = (np.asarray(a) for a in (X, y, weight, task))
    if X.ndim != 2:
        raise ValueError(f"X must be [n, q], got shape {X.shape}")
    n = X.shape[0]
    if y.shape != (n,) or weight.shape != (n,) or task.shape != (n,):
        raise ValueError(f"y, weight and task must be [{n}], got {y.shape}, {weight.shape}, {task.shape}")
    if not np.issubdtype(task.dtype, np.integer):
        raise ValueError(f"task must hold integers, got {task.dtype}")
    if n and (task.min() < 0 or task.max() >= num_tasks):
        raise ValueError(f"task ids must lie in 0..{num_tasks - 1}, got {task.min()}..{task.max()}")
    counts = np.bincount(task, minlength=num_tasks)
    m = max(int(counts.max(initial=0)), 1)
    order = np.argsort(task, kind="stable")
    sorted_task = task[order]
    starts = np.cumsum(counts) - counts
    slot = np.arange(n) - starts[sorted_task]
    index = np.full((num_tasks, m), -1, np.int32)
    index[sorted_task, slot] = order
    Xp = np.zeros((num_tasks, m, X.shape[1]), X.dtype)
    yp = np.zeros((num_tasks, m), y.dtype)
    wp = np.zeros((num_tasks, m), weight.dtype)
    Xp[sorted_task, slot] = X[order]
    yp[sorted_task, slot] = y[order]
    wp[sorted_task, slot] = weight[order]
    return Xp, yp, wp, index


def unpad(values: ArrayLike, index: ArrayLike, n: int) -> Array:
    """Scatters per-slot values back to the flat rows: the inverse of :func:`pad_by_task`.

    Args:
        values: ``[K, m, ...]`` values per slot (padding slots are ignored).
        index: ``[K, m]`` flat row per slot, -1 for padding, from :func:`pad_by_task`.
        n: number of flat rows (static).

    Returns:
        ``[n, ...]`` with row ``index[k, j]`` equal to ``values[k, j]``; rows that appear in
        no slot are 0. Jit-compatible with ``n`` static.
    """
    values, index = jnp.asarray(values), jnp.asarray(index)
    flat_index = jnp.where(index >= 0, index, n).reshape(-1)
    flat_values = values.reshape(flat_index.shape[0], *values.shape[index.ndim :])
    out = jnp.zeros((n, *flat_values.shape[1:]), values.dtype)
    return out.at[flat_index].set(flat_values, mode="drop")


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


def _float_dtype(X) -> jnp.dtype:
    """The working dtype: ``X``'s if floating, else JAX's default float."""
    dtype = jnp.result_type(X)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _prepare(X, y, w):
    """``(dtype, X, y, w, observed)`` with every row of weight <= 0 (or NaN) zeroed out."""
    dtype = _float_dtype(X)
    X, y, w = (jnp.asarray(a, dtype) for a in (X, y, w))
    observed = w > 0
    w = jnp.where(observed, w, 0.0)
    y = jnp.where(observed, y, 0.0)
    X = jnp.where(observed[:, None], X, 0.0)
    return dtype, X, y, w, observed


def _centred_design(X, w, observed):
    r"""``(mu [q], Z [m, q+1])``: the weighted mean and the design :math:`[1, X - \mu]`."""
    total = jnp.sum(w)
    mu = _dot(w, X) / jnp.where(total > 0, total, 1.0)
    Xc = jnp.where(observed[:, None], X - mu, 0.0)
    Z = jnp.concatenate([jnp.ones_like(Xc[:, :1]), Xc], axis=1)
    return mu, Z


def _log_loss(eta, y):
    r""":math:`\ell(y, \eta) = -y\log\sigma(\eta) - (1-y)\log\sigma(-\eta)`, stable at large :math:`|\eta|`."""
    return -(y * jax.nn.log_sigmoid(eta) + (1.0 - y) * jax.nn.log_sigmoid(-eta))


def _log_loss_grad(eta, y):
    r""":math:`\partial\ell/\partial\eta = \sigma(\eta) - y`, computed as :math:`(1-y)\sigma(\eta) - y\sigma(-\eta)`.

    No cancellation for 0/1 labels (:math:`1 - \sigma(\eta)` is :math:`\sigma(-\eta)`, exact in the tail).
    """
    return (1.0 - y) * jax.nn.sigmoid(eta) - y * jax.nn.sigmoid(-eta)


def _intercept_ridge(w, dtype):
    """The intercept's ridge, ``eps * max(sum w, 1)``: keeps the optimum finite when one class is absent."""
    return jnp.finfo(dtype).eps * jnp.maximum(jnp.sum(w), 1.0)


def _initial_theta(y, w, q, dtype):
    """``(b_c, 0, ..., 0)`` with ``b_c`` the logit of the smoothed weighted mean label."""
    total = jnp.sum(w)
    pos = _dot(w, y) + 0.5
    b0 = jnp.log(pos) - jnp.log(total + 1.0 - pos)
    return jnp.zeros(q + 1, dtype).at[0].set(b0)


# ----------------------------------------------------------------------------------------
# L2-penalised logistic regression: Newton
# ----------------------------------------------------------------------------------------


@jax.jit
def logistic_l2(
    X: ArrayLike,
    y: ArrayLike,
    w: ArrayLike,
    C: ArrayLike,
    *,
    max_iter: int = 50,
    tol: float | None = None,
) -> LogisticFit:
    r"""L2-penalised logistic regression for one task, by damped Newton.

    Minimises

    .. math::

        F(b, \beta) = \sum_i w_i\,\ell(y_i, b + x_i^T\beta) + \frac{\|\beta\|_2^2}{2C}
            + \frac{\delta}{2} b_c^2,
        \qquad \ell(y, \eta) = -y\log\sigma(\eta) - (1-y)\log\sigma(-\eta),

    the objective of scikit-learn's ``LogisticRegression(C=C)`` (intercept unpenalised)
    plus a ridge :math:`\delta = \epsilon\max(\sum_i w_i, 1)` (:math:`\epsilon` the dtype's
    machine epsilon) on the centred intercept :math:`b_c = b + \mu^T\beta`
    (:math:`\mu = \sum_i w_i x_i / \sum_i w_i`). The ridge changes a regular fit by a
    relative :math:`O(\epsilon)` but keeps the optimum finite, and the Hessian positive
    definite, when the task has one class only (then :math:`b_c \approx \log(1/\epsilon)`).

    With :math:`\theta = (b_c, \beta)`, :math:`z_i = (1, x_i - \mu)`,
    :math:`\eta_i = z_i^T\theta`, :math:`P = \mathrm{diag}(\delta, 1/C, \dots, 1/C)`:

    .. math::

        g = \sum_i w_i(\sigma(\eta_i) - y_i) z_i + P\theta,\qquad
        H = \sum_i w_i\sigma(\eta_i)\sigma(-\eta_i) z_i z_i^T + P,\qquad
        d = -H^{-1}g

    (Cholesky), then :math:`\theta \leftarrow \theta + t d` with the largest
    :math:`t \in \{1, 1/2, \dots, 2^{-11}\}` passing an Armijo test (with a slack of a few
    :math:`\epsilon\,(|F| + \sum_i w_i)` for rounding), inside ``lax.while_loop``. It stops
    when :math:`\|d\|_\infty \le \mathrm{tol}\,(1 + \|\theta\|_\infty)` (converged; the
    step is taken, and Newton's quadratic convergence leaves an error of order
    :math:`\|d\|^2`), when no step length decreases :math:`F` (not converged), or after
    ``max_iter`` steps (not converged).

    Args:
        X: features ``[m, q]``; its dtype (if floating) is the working dtype.
        y: labels in ``{0, 1}`` (or fractions in ``[0, 1]``) ``[m]``; ignored where ``w <= 0``.
        w: row weights ``[m]``; a row with ``w <= 0`` contributes exactly nothing.
        C: inverse penalty strength ``[]`` (``> 0``; ``inf`` for no penalty on a
            full-rank design); may be traced (vmapped over tasks or a grid).
        max_iter: most Newton steps (may be traced: no recompilation per value).
        tol: step tolerance, relative; ``None`` for ``sqrt(eps) / 10`` of the working
            dtype (``3.5e-5`` in float32, ``1.5e-9`` in float64).

    Returns:
        :class:`LogisticFit` ``(intercept [], beta [q], converged [])``.
    """
    dtype, X, y, w, observed = _prepare(X, y, w)
    q = X.shape[1]
    eps = jnp.finfo(dtype).eps
    tol = jnp.asarray(np.sqrt(eps) / 10 if tol is None else tol, dtype)
    inv_C = 1.0 / jnp.asarray(C, dtype)
    mu, Z = _centred_design(X, w, observed)
    total = jnp.sum(w)
    penalty = jnp.concatenate([_intercept_ridge(w, dtype)[None], jnp.full((q,), inv_C, dtype)])
    steps = 0.5 ** jnp.arange(_LINE_SEARCH_STEPS, dtype=dtype)

    def objective(eta, theta):  # eta, theta with leading batch axes allowed
        return jnp.sum(w * _log_loss(eta, y), -1) + 0.5 * jnp.sum(penalty * theta**2, -1)

    def body(state):
        i, theta, _, _ = state
        eta = _dot(Z, theta)
        g = _dot(Z.T, w * _log_loss_grad(eta, y)) + penalty * theta
        s = w * jax.nn.sigmoid(eta) * jax.nn.sigmoid(-eta)
        H = _dot((Z * s[:, None]).T, Z) + jnp.diag(penalty)
        d = -cho_solve(cho_factor(H, lower=True), g)
        f0 = objective(eta, theta)
        f = objective(eta + steps[:, None] * _dot(Z, d), theta + steps[:, None] * d)
        slack = 16 * eps * (jnp.abs(f0) + total)
        accept = f <= f0 + 1e-4 * steps * _dot(g, d) + slack
        found = jnp.any(accept)
        t = jnp.where(found, steps[jnp.argmax(accept)], 0.0)
        theta = theta + t * d
        converged = jnp.max(jnp.abs(d)) <= tol * (1.0 + jnp.max(jnp.abs(theta)))
        return i + 1, theta, converged, converged | ~found

    def cond(state):
        i, _, _, stop = state
        return (i < max_iter) & ~stop

    theta0 = _initial_theta(y, w, q, dtype)
    _, theta, converged, _ = lax.while_loop(cond, body, (0, theta0, jnp.array(False), jnp.array(False)))
    beta = theta[1:]
    return LogisticFit(theta[0] - _dot(mu, beta), beta, converged)


# ----------------------------------------------------------------------------------------
# L1-penalised logistic regression: FISTA
# ----------------------------------------------------------------------------------------


def _soft_threshold(z, threshold):
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - threshold, 0.0)


@jax.jit
def logistic_l1(
    X: ArrayLike,
    y: ArrayLike,
    w: ArrayLike,
    C: ArrayLike,
    *,
    max_iter: int = 5000,
    tol: float | None = None,
) -> LogisticFit:
    r"""L1-penalised logistic regression for one task, by FISTA with adaptive restart.

    Minimises

    .. math::

        F(b, \beta) = \underbrace{\sum_i w_i\,\ell(y_i, b + x_i^T\beta)
            + \frac{\delta}{2} b_c^2}_{f} + \frac{\|\beta\|_1}{C}

    (intercept unpenalised but for the same tiny ridge :math:`\delta = \epsilon\max(\sum_i
    w_i, 1)` on the centred intercept as :func:`logistic_l2`), in centred and scaled
    coordinates: :math:`\theta = (b_c, \gamma)`, :math:`\gamma_j = s_j\beta_j`,
    :math:`z_i = (1, (x_{ij} - \mu_j)/s_j)_j` with :math:`s_j` the weighted RMS of the
    centred column :math:`j` (1 if it is 0), where the penalty is
    :math:`\sum_j|\gamma_j|/(C s_j)`: the same problem, but FISTA's rate no longer depends
    on the features' locations and scales. The gradient of :math:`f` is Lipschitz with

    .. math:: L = \lambda_{\max}\Big(\sum_i w_i z_i z_i^T\Big)/4 + \delta

    (``eigvalsh`` of the :math:`(q+1)\times(q+1)` matrix; :math:`\sigma' \le 1/4`). FISTA
    (Beck & Teboulle) with step :math:`1/L`:

    .. math::

        \theta_k = \mathrm{prox}(v_k - \nabla f(v_k)/L),\qquad
        t_{k+1} = \tfrac12\big(1 + \sqrt{1 + 4t_k^2}\big),\qquad
        v_{k+1} = \theta_k + \tfrac{t_k - 1}{t_{k+1}}(\theta_k - \theta_{k-1}),

    where the prox leaves :math:`b_c` alone and soft-thresholds :math:`\gamma_j` at
    :math:`1/(L C s_j)` (so coefficients are exactly 0 where the optimum has them at 0), and the
    momentum restarts (:math:`t = 1`, :math:`v = \theta_k`) when
    :math:`(v_k - \theta_k)^T(\theta_k - \theta_{k-1}) > 0` (O'Donoghue & Candès), which
    gives linear convergence near a strongly convex optimum. It stops, converged, when the
    gradient mapping :math:`G = L(v_k - \theta_k)` (:math:`\mathrm{dist}(0, \partial
    F(\theta_k)) \le 2\|G\|`) satisfies :math:`|G_j| \le \mathrm{tol}\sum_i w_i +
    2\epsilon L|\theta_{k,j}|` for every coordinate (the second term is the rounding error of
    computing :math:`v_k - \nabla f(v_k)/L`), or after ``max_iter`` steps (not converged).

    Limits: FISTA's rate depends on the conditioning of the problem (scale the features;
    a weak penalty on separable data converges slowly), and a task with one class only has
    its optimum at :math:`b_c \approx \log(1/\epsilon)`, approached slowly (float64 stops
    after ``max_iter`` steps, not converged, with :math:`|b|` around 15-20, i.e. the
    probabilities are already 1 to ~1e-7). In float32, "converged" can mean stationary to
    working precision (the rounding allowance).

    Args:
        X: features ``[m, q]``; its dtype (if floating) is the working dtype.
        y: labels in ``{0, 1}`` (or fractions in ``[0, 1]``) ``[m]``; ignored where ``w <= 0``.
        w: row weights ``[m]``; a row with ``w <= 0`` contributes exactly nothing.
        C: inverse penalty strength ``[]`` (``> 0``); may be traced.
        max_iter: most FISTA steps (may be traced: no recompilation per value).
        tol: tolerance on the gradient mapping (in the scaled coordinates) per unit of
            total weight; ``None`` for ``eps = 1.2e-7`` in float32 and ``1e-12`` in float64.

    Returns:
        :class:`LogisticFit` ``(intercept [], beta [q], converged [])``.
    """
    dtype, X, y, w, observed = _prepare(X, y, w)
    q = X.shape[1]
    eps = jnp.finfo(dtype).eps
    tol = jnp.asarray((1e-12 if eps < 1e-10 else eps) if tol is None else tol, dtype)
    inv_C = 1.0 / jnp.asarray(C, dtype)
    mu, Z = _centred_design(X, w, observed)
    total = jnp.sum(w)
    # Columns scaled to unit weighted RMS (gamma_j = s_j beta_j): the same problem, with
    # penalty |gamma_j| / (C s_j), and FISTA's rate no longer set by the features' scales.
    rms = jnp.sqrt(jnp.sum(w[:, None] * Z[:, 1:] ** 2, 0) / jnp.where(total > 0, total, 1.0))
    scale = jnp.concatenate([jnp.ones((1,), dtype), jnp.where(rms > 0, rms, 1.0)])
    Z = Z / scale
    ridge = _intercept_ridge(w, dtype)
    lipschitz = jnp.linalg.eigvalsh(_dot((Z * w[:, None]).T, Z))[-1] / 4 + ridge
    step = 1.0 / lipschitz
    threshold = step * inv_C / scale[1:]
    budget = tol * jnp.where(total > 0, total, 1.0)

    def grad(theta):
        g = _dot(Z.T, w * _log_loss_grad(_dot(Z, theta), y))
        return g.at[0].add(ridge * theta[0])

    def body(state):
        i, theta, v, t, _ = state
        z = v - step * grad(v)
        theta_new = jnp.concatenate([z[:1], _soft_threshold(z[1:], threshold)])
        rounding = 2 * eps * lipschitz * jnp.abs(theta_new)  # rounding of v - step * grad, per coordinate
        converged = jnp.all(jnp.abs(v - theta_new) * lipschitz <= budget + rounding)
        restart = _dot(v - theta_new, theta_new - theta) > 0
        t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
        momentum = jnp.where(restart, 0.0, (t - 1.0) / t_new)
        v_new = theta_new + momentum * (theta_new - theta)
        return i + 1, theta_new, v_new, t_new, converged

    def cond(state):
        i, *_, converged = state
        return (i < max_iter) & ~converged

    theta0 = _initial_theta(y, w, q, dtype)
    state = (0, theta0, theta0, jnp.asarray(1.0, dtype), jnp.array(False))
    _, theta, _, _, converged = lax.while_loop(cond, body, state)
    beta = theta[1:] / scale[1:]
    return LogisticFit(theta[0] - _dot(mu, beta), beta, converged)


# ----------------------------------------------------------------------------------------
# Least-squares SVM
# ----------------------------------------------------------------------------------------


def _gram(A, B, kernel: str, bandwidth):
    r"""Kernel matrix ``[a, b]``: :math:`A B^T` or :math:`\exp(-\|a - b\|^2 / (2h^2))`.

    For ``"rbf"`` the squared distances come from the Gram matrix, so the rows should be
    centred (as the callers do) to avoid cancellation; they are clipped at 0.
    """
    if kernel == "linear":
        return _dot(A, B.T)
    if kernel == "rbf":
        sq = jnp.sum(A * A, 1)[:, None] + jnp.sum(B * B, 1)[None, :] - 2.0 * _dot(A, B.T)
        return jnp.exp(-jnp.maximum(sq, 0.0) / (2.0 * bandwidth**2))
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _lssvm_linear_primal(X, labels, w, gamma, observed):
    r"""The linear LS-SVM through its primal normal equations (``q < m``): same solution, better conditioned.

    With :math:`\mu = \sum_i w_i x_i / \sum_i w_i`, :math:`\bar y = \sum_i w_i y_i /
    \sum_i w_i` and :math:`\tilde x_i = x_i - \mu`, the KKT conditions give
    :math:`(\sum_i w_i\tilde x_i\tilde x_i^T + I/\gamma)\,v = \sum_i w_i (y_i - \bar
    y)\tilde x_i`, :math:`e_i = y_i - \bar y - \tilde x_i^T v`,
    :math:`\alpha_i = \gamma w_i e_i` and :math:`b = \bar y - \mu^T v`.
    """
    total = jnp.sum(w)
    safe_total = jnp.where(total > 0, total, 1.0)
    mu = _dot(w, X) / safe_total
    y_bar = _dot(w, labels) / safe_total
    Xc = jnp.where(observed[:, None], X - mu, 0.0)
    M = _dot((Xc * w[:, None]).T, Xc) + jnp.eye(X.shape[1], dtype=X.dtype) / gamma
    rhs = _dot(Xc.T, w * (labels - y_bar))
    factor = cho_factor(M, lower=True)
    v = cho_solve(factor, rhs)
    v = v + cho_solve(factor, rhs - _dot(M, v))  # one step of iterative refinement
    e = jnp.where(observed, labels - y_bar - _dot(Xc, v), 0.0)
    return LSSVMFit(y_bar - _dot(mu, v), gamma * w * e)


def bordered_kkt_solve(A: Array, labels: Array, inside: Array):
    r"""The LS-SVM's KKT system :math:`A a + b 1 = y`, :math:`1^T a = 0` over the rows with
    ``inside = 1``, for :math:`A = K + \Lambda \succ 0` ``[m, m]`` (a padding row: kernel row and
    column 0, diagonal 1, label 0): by Cholesky, :math:`e = A^{-1}1`, :math:`\nu = A^{-1}y`
    (one step of iterative refinement), :math:`b = 1^T\nu / 1^Te`, :math:`a = \nu - b e`.

    Returns:
        ``(a [m] (0 outside), b [], e [m], Cholesky factor of A, 1^T e (1 when it is 0))``:
        the Hessian in the kernel weights (``"mtmkl"``) reuses the last three; with no row
        inside, ``a = 0`` and ``b = 0``.
    """
    factor = cho_factor(A, lower=True)
    rhs = jnp.stack([inside, labels], axis=1)
    sol = cho_solve(factor, rhs)
    sol = sol + cho_solve(factor, rhs - _dot(A, sol))  # one step of iterative refinement
    e, nu = sol[:, 0], sol[:, 1]
    denominator = _dot(inside, e)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    b = jnp.where(denominator > 0, _dot(inside, nu) / safe, 0.0)
    return jnp.where(inside > 0, nu - b * e, 0.0), b, e, factor, safe


@functools.partial(jax.jit, static_argnames=("kernel",))
def lssvm(
    X: ArrayLike,
    y: ArrayLike,
    w: ArrayLike,
    gamma: ArrayLike,
    kernel: str = "linear",
    bandwidth: ArrayLike = 1.0,
) -> LSSVMFit:
    r"""Least-squares SVM (Suykens & Vandewalle) for one task, by a Cholesky solve of its KKT system.

    Labels are mapped to :math:`y_i \in \{-1, +1\}` (``y > 0`` is :math:`+1`, so 0/1 and
    -1/+1 labels both work). Over the rows :math:`S = \{i : w_i > 0\}`, the fit solves

    .. math::

        \min_{v, b, e}\ \tfrac12\|v\|^2 + \tfrac{\gamma}{2}\sum_{i\in S} w_i e_i^2
        \quad\text{s.t.}\quad y_i = v^T\varphi(x_i) + b + e_i,

    whose KKT system (:math:`K_{ij} = k(x_i, x_j)`, :math:`D = \mathrm{diag}(1/(\gamma w_i))`,
    i.e. :math:`I/\gamma` for unit weights) is

    .. math::

        \begin{bmatrix} 0 & 1^T \\ 1 & K + D \end{bmatrix}
        \begin{bmatrix} b \\ \alpha \end{bmatrix}
        = \begin{bmatrix} 0 \\ y \end{bmatrix}.

    Rows outside :math:`S` (masked or padding) are excluded exactly: their kernel row and
    column and right-hand side are zeroed, their diagonal set to 1 and their entry of the
    border to 0, so that :math:`\alpha_i = 0` and the other unknowns are those of the
    system restricted to :math:`S`. With :math:`A = K + D \succ 0` (Cholesky) and
    :math:`1_S` the indicator of :math:`S`,

    .. math::

        \eta = A^{-1}1_S,\quad \nu = A^{-1}y,\quad
        b = \frac{1_S^T\nu}{1_S^T\eta},\quad \alpha = \nu - b\,\eta,

    with one step of iterative refinement. For the linear kernel with fewer features than
    rows (``q < m``, static shapes) the same solution is computed from the primal normal
    equations (:math:`(q \times q)`, see :func:`_lssvm_linear_primal`), whose condition
    number is that of the features' covariance rather than :math:`1 + \gamma\lambda_{\max}(K)`
    (in float32 at :math:`\gamma = 100`, 60 rows, the dual loses ~1e-4 relative in
    :math:`\alpha`, the primal 2e-7). The dual's condition number
    :math:`\approx 1 + \gamma\lambda_{\max}(K)` limits the RBF kernel the same way (float32,
    :math:`\gamma = 100`, 60 rows: :math:`\alpha` 2.5e-5 relative). Kernels: ``"linear"``
    :math:`k(x, x') = x^Tx'` and ``"rbf"`` :math:`k(x, x') = \exp(-\|x - x'\|^2 / (2h^2))`,
    :math:`h` = ``bandwidth``. Both are evaluated on rows centred at their mean over
    :math:`S` (exact for the RBF kernel; for the linear kernel :math:`\alpha` is unchanged
    and the bias is mapped back to the original coordinates).

    Args:
        X: features ``[m, q]``; its dtype (if floating) is the working dtype.
        y: labels ``[m]`` (0/1 or -1/+1); ignored where ``w <= 0``.
        w: row weights ``[m]``; rows with ``w <= 0`` are excluded; positive weights scale
            the rows' squared errors (1 for the standard LS-SVM).
        gamma: regularisation constant :math:`\gamma > 0` ``[]``; may be traced.
        kernel: ``"linear"`` or ``"rbf"`` (static).
        bandwidth: RBF bandwidth :math:`h` ``[]`` (unused by the linear kernel).

    Returns:
        :class:`LSSVMFit` ``(b [], alpha [m])``; with no row in :math:`S`, ``b = 0`` and
        ``alpha = 0``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    dtype, X, y, w, observed = _prepare(X, y, w)
    gamma = jnp.asarray(gamma, dtype)
    inside = observed.astype(dtype)
    labels = jnp.where(observed, jnp.where(y > 0, 1.0, -1.0), 0.0).astype(dtype)
    m, q = X.shape
    if kernel == "linear" and q < m:
        return _lssvm_linear_primal(X, labels, w, gamma, observed)
    mu = _dot(inside, X) / jnp.maximum(jnp.sum(inside), 1.0)
    Xc = jnp.where(observed[:, None], X - mu, 0.0)
    K = _gram(Xc, Xc, kernel, jnp.asarray(bandwidth, dtype)) * (inside[:, None] * inside[None, :])
    A = K + jnp.diag(jnp.where(observed, 1.0 / (gamma * jnp.where(observed, w, 1.0)), 1.0))
    alpha, b, _, _, _ = bordered_kkt_solve(A, labels, inside)
    if kernel == "linear":
        b = b - _dot(mu, _dot(Xc.T, alpha))
    return LSSVMFit(b, alpha)


@functools.partial(jax.jit, static_argnames=("kernel",))
def lssvm_scores(
    X_train: ArrayLike,
    b: ArrayLike,
    alpha: ArrayLike,
    X_new: ArrayLike,
    kernel: str = "linear",
    bandwidth: ArrayLike = 1.0,
) -> Array:
    r"""Real-valued LS-SVM decision scores :math:`f(x) = \sum_i \alpha_i k(x_i, x) + b` for new rows.

    The predicted label is :math:`\mathrm{sign} f(x)`. Rows of ``X_train`` with
    :math:`\alpha_i = 0` (masked or padding rows of :func:`lssvm`) do not enter. Both sets
    of rows are centred at the mean :math:`\mu` of the training rows with
    :math:`\alpha_i \neq 0`, which leaves :math:`f` unchanged (for the linear kernel because
    :math:`\sum_i\alpha_i = 0`) and avoids cancellation; the linear kernel is evaluated as
    :math:`f(x) = x^T v + b`, :math:`v = \sum_i \alpha_i (x_i - \mu)`.

    Accuracy: :math:`v` is a small remainder of the terms :math:`\alpha_i (x_i - \mu)`
    (:math:`\alpha_i = \gamma w_i e_i` with residuals :math:`e` nearly orthogonal to the
    features), so rounding in :math:`\alpha` and in the sum costs a relative
    :math:`\epsilon\sum_i|\alpha_i|\|x_i - \mu\| / \|v\|`, which grows with the rows and
    :math:`\gamma`: measured in float32 (``x ~ N(5, 1)``) ~3e-5 relative at 23 rows and
    ``gamma = 1``, 5e-5 at 60 rows, 5e-4 to 2e-3 at 60 rows and ``gamma = 100``, while
    ``alpha`` and ``b`` themselves agree to ~3e-7. Use float64 for linear scores at large
    ``gamma``.

    Args:
        X_train: the task's training rows ``[m, q]`` (as passed to :func:`lssvm`).
        b: the fit's bias ``[]``.
        alpha: the fit's support values ``[m]``.
        X_new: rows to score ``[r, q]``.
        kernel: ``"linear"`` or ``"rbf"`` (static), as fitted.
        bandwidth: RBF bandwidth, as fitted.

    Returns:
        Scores ``[r]`` in the dtype of ``X_train`` (if floating).
    """
    dtype = _float_dtype(X_train)
    X_train, alpha, X_new = (jnp.asarray(a, dtype) for a in (X_train, alpha, X_new))
    b = jnp.asarray(b, dtype)
    active = alpha != 0
    mu = jnp.sum(jnp.where(active[:, None], X_train, 0.0), 0) / jnp.maximum(jnp.sum(active), 1).astype(dtype)
    Xt = jnp.where(active[:, None], X_train - mu, 0.0)
    if kernel == "linear":
        return _dot(X_new, _dot(Xt.T, alpha)) + b
    return _dot(_gram(X_new - mu, Xt, kernel, jnp.asarray(bandwidth, dtype)), alpha) + b


# ----------------------------------------------------------------------------------------
# Batched fits
# ----------------------------------------------------------------------------------------


def _is_mapped(value) -> bool:
    return getattr(value, "ndim", 0) >= 1


def fit_per_task(
    solver: Callable[..., Any],
    Xp: ArrayLike,
    yp: ArrayLike,
    wp: ArrayLike,
    **hyper: Any,
) -> Any:
    """Fits one model per task: ``jax.vmap`` of a single-task solver over the task axis.

    Hyperparameters that are arrays with at least one axis (NumPy or JAX, e.g. a per-task
    ``C [K]``) are mapped over their leading axis, which must have length ``K``; everything
    else (Python or 0-d scalars, ``kernel`` strings, ``max_iter``) is passed to every task
    unchanged. Lists and tuples are converted to arrays first.

    Args:
        solver: a single-task solver ``solver(X [m, q], y [m], w [m], **hyper)``, e.g.
            :func:`logistic_l2`, :func:`logistic_l1`, :func:`lssvm`.
        Xp: per-task features ``[K, m, q]`` (from :func:`pad_by_task`).
        yp: per-task labels ``[K, m]``.
        wp: per-task weights ``[K, m]`` (0 on padding).
        **hyper: the solver's hyperparameters, broadcast or per task.

    Returns:
        The solver's result with a leading task axis on every leaf, e.g.
        ``LogisticFit(intercept [K], beta [K, q], converged [K])``.
    """
    hyper = {k: jnp.asarray(v) if isinstance(v, (list, tuple)) else v for k, v in hyper.items()}
    mapped = {k: v for k, v in hyper.items() if _is_mapped(v)}
    fixed = {k: v for k, v in hyper.items() if not _is_mapped(v)}

    def one_task(X, y, w, per_task):
        return solver(X, y, w, **per_task, **fixed)

    return jax.vmap(one_task)(Xp, yp, wp, mapped)


def fit_grid(
    solver: Callable[..., Any],
    Xp: ArrayLike,
    yp: ArrayLike,
    wp: ArrayLike,
    grid: ArrayLike,
    *,
    param: str = "C",
    **hyper: Any,
) -> Any:
    """Fits every task at every value of a hyperparameter grid in one vmapped computation.

    Args:
        solver: a single-task solver, as for :func:`fit_per_task`.
        Xp: per-task features ``[K, m, q]``.
        yp: per-task labels ``[K, m]``.
        wp: per-task weights ``[K, m]``.
        grid: values of ``param``: ``[G]`` (the same for every task) or ``[G, K]`` (a grid
            per task).
        param: the name of the gridded hyperparameter (``"C"`` for the logistic solvers,
            ``"gamma"`` for :func:`lssvm`).
        **hyper: the other hyperparameters, as for :func:`fit_per_task`.

    Returns:
        The solver's result with leading ``[G, K]`` axes on every leaf, e.g.
        ``LogisticFit(intercept [G, K], beta [G, K, q], converged [G, K])``.
    """
    grid = jnp.asarray(grid)
    if grid.ndim not in (1, 2):
        raise ValueError(f"grid must be [G] or [G, K], got shape {grid.shape}")
    return jax.vmap(lambda value: fit_per_task(solver, Xp, yp, wp, **{param: value}, **hyper))(grid)


# ----------------------------------------------------------------------------------------
# Predictions for flat rows
# ----------------------------------------------------------------------------------------


def logistic_logits(
    X: ArrayLike,
    task: ArrayLike,
    intercept: ArrayLike,
    beta: ArrayLike,
) -> Array:
    r"""Log-odds :math:`\eta_i = b_{t_i} + x_i^T\beta_{t_i}` of flat rows under per-task fits (a gather, no loop).

    Args:
        X: features ``[n, q]``.
        task: task id of each row ``[n]``.
        intercept: per-task intercepts ``[K]`` (``LogisticFit.intercept`` of :func:`fit_per_task`).
        beta: per-task coefficients ``[K, q]``.

    Returns:
        ``[n]`` log-odds.
    """
    intercept, beta = jnp.asarray(intercept), jnp.asarray(beta)
    task = jnp.asarray(task)
    return intercept[task] + jnp.einsum("nq,nq->n", jnp.asarray(X, beta.dtype), beta[task], precision=_HIGHEST)


def logistic_proba(
    X: ArrayLike,
    task: ArrayLike,
    intercept: ArrayLike,
    beta: ArrayLike,
) -> Array:
    r""":math:`P(y_i = 1) = \sigma(b_{t_i} + x_i^T\beta_{t_i})` for flat rows; arguments as :func:`logistic_logits`."""
    return jax.nn.sigmoid(logistic_logits(X, task, intercept, beta))


@functools.partial(jax.jit, static_argnames=("kernel", "batch_size"))
def lssvm_row_scores(
    Xp: ArrayLike,
    b: ArrayLike,
    alpha: ArrayLike,
    X: ArrayLike,
    task: ArrayLike,
    kernel: str = "linear",
    bandwidth: ArrayLike = 1.0,
    batch_size: int = 256,
) -> Array:
    r"""LS-SVM decision scores of flat rows, each under its own task's fit (no loop over tasks).

    Row :math:`i` gets :math:`f_{t_i}(x_i) = \sum_j \alpha_{t_i j} k(x_{t_i j}, x_i) + b_{t_i}`
    (:func:`lssvm_scores` with task :math:`t_i`'s padded training block). For the linear
    kernel this is :math:`x_i^T v_{t_i} + b_{t_i}` with the per-task weight vectors
    :math:`v_k` computed once; for the RBF kernel the rows are scored in batches of
    ``batch_size`` (``lax.map``), each gathering its tasks' blocks (memory
    ``batch_size * m * q``).

    Args:
        Xp: per-task training blocks ``[K, m, q]``, as fitted.
        b: per-task biases ``[K]`` (``LSSVMFit.b`` of :func:`fit_per_task`).
        alpha: per-task support values ``[K, m]``.
        X: rows to score ``[n, q]``.
        task: task id of each row ``[n]``.
        kernel: ``"linear"`` or ``"rbf"`` (static), as fitted.
        bandwidth: RBF bandwidth, as fitted (a scalar).
        batch_size: rows per batch for the RBF kernel (static).

    Returns:
        ``[n]`` real-valued scores (the sign is the predicted label).
    """
    task = jnp.asarray(task)
    if kernel == "linear":
        weights = jax.vmap(lambda Xt, a: lssvm_scores(Xt, 0.0, a, jnp.eye(Xt.shape[1], dtype=Xt.dtype)))(Xp, alpha)
        rows = jnp.einsum("nq,nq->n", jnp.asarray(X, weights.dtype), weights[task], precision=_HIGHEST)
        return rows + jnp.asarray(b)[task]

    def one_row(args):
        x, t = args
        return lssvm_scores(Xp[t], b[t], alpha[t], x[None], kernel, bandwidth)[0]

    Xp, b, alpha = jnp.asarray(Xp), jnp.asarray(b), jnp.asarray(alpha)
    return lax.map(one_row, (jnp.asarray(X, Xp.dtype), task), batch_size=batch_size)


def platt_scaling(scores: Array, yp, wp, platt_C):
    r"""Platt's per-task logistic regression of the labels ``yp [K, m]`` on the scores ``[K, m]`` ``-> (slope [K], intercept [K], converged)``.

    The targets are Platt's smoothed labels :math:`(N_+ + 1)/(N_+ + 2)` for positives and
    :math:`1/(N_- + 2)` for negatives (``N`` the weighted class counts of the task's rows
    ``wp > 0``), the slope penalised by :math:`a^2/(2C_P)`; :func:`logistic_l2` vmapped over
    tasks. Used by the ``"lssvm"`` baseline and ``"mtmkl"``.
    """
    positive = (yp > 0.5) & (wp > 0)
    n_pos = jnp.sum(jnp.where(positive, wp, 0.0), axis=1, keepdims=True)
    n_neg = jnp.sum(jnp.where(positive, 0.0, wp), axis=1, keepdims=True)
    targets = jnp.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    platt = fit_per_task(logistic_l2, scores[..., None], targets, wp, C=platt_C)
    return platt.beta[:, 0], platt.intercept, jnp.all(platt.converged)
