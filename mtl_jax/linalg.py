r"""Small-block linear algebra for mixed models: stable bordered block-diagonal solves.

EM and Newton steps for mixed models solve systems in the fixed effects
:math:`\beta\in\mathbb R^m`, which couple all tasks, and per-task random effects
:math:`b_i\in\mathbb R^r`, :math:`i=0,\dots,K-1`. The information is a sum of per-row
contributions: row :math:`j` (task :math:`t_j`) has a fixed-effect design block
:math:`A_j` ``[m, d]``, a random-effect design block :math:`B_j` ``[r, d]``, a PSD weight
:math:`W_j` ``[d, d]`` and a gradient (working response) :math:`u_j` ``[d]``; the linear
predictor of the row is :math:`\eta_j = A_j^T\beta + B_j^T b_{t_j}` ``[d]``. The system is

.. math::

    \begin{bmatrix} F & C_1 & \cdots & C_K \\ C_i^T & D_i & & \end{bmatrix}
    \begin{bmatrix} \beta \\ b_i \end{bmatrix}
    = \begin{bmatrix} g_f \\ g_{r,i} \end{bmatrix},

with :math:`F = \sum_j A_j W_j A_j^T + F_0` (:math:`F_0` an optional fixed prior
precision), :math:`C_i = \sum_{j\in i} A_j W_j B_j^T`, :math:`M_i = \sum_{j\in i} B_j W_j
B_j^T`, :math:`D_i = M_i + Q_i` (:math:`Q_i` the prior precision of :math:`b_i`),
:math:`g_f = \sum_j A_j u_j` and :math:`g_{r,i} = \sum_{j\in i} B_j u_j + h_i`
(:math:`h_i` a prior gradient, e.g. :math:`-Q_i b_i` for a Newton step, or zero). It is
the stationarity condition of the concave quadratic

.. math::

    L(\beta, b) = \sum_j \big(u_j^T\eta_j - \tfrac12 \eta_j^T W_j \eta_j\big)
        + \sum_i \big(h_i^T b_i - \tfrac12 b_i^T Q_i b_i\big) - \tfrac12 \beta^T F_0 \beta .

**Why not the plain Schur complement.** :math:`P = F - \sum_i C_i D_i^{-1} C_i^T` is a
small difference of huge numbers when a task's own information dominates
(:math:`n_i\phi/\sigma^2 \gg 1`), above all for an intercept far from zero: in float32 the
fixed-intercept information is lost at :math:`n_i\phi/\sigma^2\approx 10^6`, and the
right-hand side :math:`g_f - \sum_i C_i D_i^{-1} g_{r,i}` and the posterior covariances
cancel the same way.

**Stable form.** With the per-task *centre* :math:`\bar A_i = C_i D_i^{-1}` ``[m, r]``
(defined for every task because :math:`Q_i \succ 0`) and the centred rows
:math:`\tilde A_j = A_j - \bar A_{t_j} B_j`, exactly

.. math::

    P = F_0 + \sum_i P_i, \qquad
    P_i = \sum_{j\in i} \tilde A_j W_j \tilde A_j^T + \bar A_i Q_i \bar A_i^T,

a sum of PSD terms (proof: :math:`\sum_{j\in i}\tilde A_j W_j\tilde A_j^T = F_i - C_i\bar
A_i^T - \bar A_i C_i^T + \bar A_i M_i \bar A_i^T`; adding :math:`\bar A_i Q_i\bar A_i^T`
gives :math:`F_i - 2C_iD_i^{-1}C_i^T + C_iD_i^{-1}C_i^T`). As a function of
:math:`\bar A_i` this expression is minimised at :math:`C_iD_i^{-1}`, so an error
:math:`\delta` in the centre changes :math:`P` only by :math:`\delta D_i\delta^T`
(second order). Further

.. math::

    g_f - \sum_i C_iD_i^{-1}g_{r,i} = \sum_j \tilde A_j u_j - \sum_i \bar A_i h_i,\qquad
    \beta = P^{-1}\Big(\sum_j \tilde A_j u_j - \sum_i \bar A_i h_i\Big),\qquad
    b_i = D_i^{-1} g_{r,i} - \bar A_i^T\beta,

and the inverse has :math:`H_{ff} = P^{-1}`, :math:`H_{f r_i} = -P^{-1}\bar A_i`,
:math:`H_{r_ir_i} = D_i^{-1} + \bar A_i^T P^{-1}\bar A_i`; the posterior covariance of
:math:`\eta_j` is :math:`\tilde A_j^T P^{-1}\tilde A_j + B_j^T D_{t_j}^{-1} B_j`.

**Iterative refinement.** Unlike :math:`P`, the right-hand side is first order in the
error of the centre (:math:`-\delta\, g_{r,i}`, and :math:`g_{r,i}` is huge), so one
float32 solve still loses a few percent at :math:`n_i\phi/\sigma^2\approx10^6`.
:func:`bordered_solve` therefore refines the solution: in the coordinates
:math:`(\beta, c_i = b_i + \bar A_i^T\beta)` the system is block diagonal,
``diag(P, D_1, ..., D_K)``, so one refinement step is

.. math::

    r_j = u_j - W_j\eta_j,\quad
    \gamma_i = \sum_{j\in i} B_j r_j + h_i - Q_i b_i,\quad
    \tilde\gamma = \sum_j \tilde A_j r_j - \sum_i \bar A_i (h_i - Q_i b_i) - F_0\beta,

    \Delta\beta = P^{-1}\tilde\gamma,\qquad
    \Delta b_i = D_i^{-1}\gamma_i - \bar A_i^T\Delta\beta,

with the gradients evaluated row by row from the residuals, where the centre's error now
multiplies the small :math:`\sum_{j\in i} r_j` instead of :math:`g_{r,i}`. The step
started from :math:`\beta = 0, b = 0` is exactly the closed form above. The refinement
also removes the bias of the Cholesky jitter from the solution. That bias matters for the
centre: a relative jitter :math:`c\varepsilon` on :math:`D_i` acts like a change of
:math:`Q_i` by :math:`c\varepsilon M_i`, so the centre is polished once against the
un-jittered :math:`D_i`, :math:`\bar A_i \leftarrow \bar A_i + (C_i - \bar A_i D_i)
(D_i + J_i)^{-1}`, which leaves only the rounding of :math:`M_i + Q_i` itself and makes
the refinement converge fast: in float32, for a random-intercept model with
:math:`n_i\phi/\sigma^2 = 10^6`, the fixed effects are off by a few percent after the
closed form and by about :math:`10^{-7}` (relative) after one refinement step
(:math:`10^{-5}` at :math:`10^8`).

All per-task work is a ``[K, ...]`` stack of small blocks (segment sums over the task ids,
batched small Cholesky factorisations); no ``K x K`` or dense ``(m + K r)`` matrix is ever
formed. Per-task sums of row products, such as :math:`\sum_{j\in i}\tilde x_j\otimes W_j`, are
one matrix product with the task indicator when there are few tasks
(:func:`segment_outer_sum`), so that the ``[n, q, d, d]`` products are never written out.
Cost :math:`O(n (m^2 + r^2) d^2 + K (m r^2 + r^3) + m^3)` per pass over the rows.
Everything is pure ``jax.numpy``: jittable (``num_tasks`` static) and vmappable, in float32
and float64. :func:`kron_bordered_solve` solves the same system for the common structure
:math:`A_j = x_j\otimes I_d`, :math:`B_j = I_d` (shared covariates, random intercepts) in
:math:`O(n q^2 d^2)`. The small factorisations (:func:`cholesky`, :func:`solve_triangular`)
are loops of vector operations rather than LAPACK calls (see :func:`cholesky` for why).
"""

from __future__ import annotations

import functools
import math

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "BorderedSolution",
    "bordered_solve",
    "cho_solve",
    "cholesky",
    "diag_embed",
    "is_positive_definite",
    "kron_bordered_solve",
    "kron_row_covariance_sum",
    "kron_rows",
    "KronWeights",
    "MultinomialWeights",
    "packed_weights",
    "psd_cholesky",
    "psd_inverse",
    "psd_logdet",
    "psd_solve",
    "row_covariance",
    "row_products",
    "segment_outer_sum",
    "segment_sum",
    "segment_sums",
    "solve_triangular",
    "unpack_symmetric",
]

# ``c`` in the Cholesky jitter ``c * eps(dtype) * M_kk`` (see psd_cholesky)
_JITTER_SCALE = 10.0


# ----------------------------------------------------------------------------- helpers
def segment_sum(
    values: Float[Array, "n *rest"], task: Int[Array, " n"], num_tasks: int
) -> Float[Array, "K *rest"]:
    r"""Sums rows per task, :math:`S_i = \sum_{j:\,t_j=i} v_j`.

    Args:
        values: per-row values ``[n, ...]``.
        task: task id of each row ``[n]``, integers in ``[0, num_tasks)``.
        num_tasks: ``K`` (static).

    Returns:
        ``[K, ...]`` per-task sums (zero for tasks without rows).
    """
    return jax.ops.segment_sum(values, task, num_segments=num_tasks)


def segment_sums(task: Int[Array, " n"], num_tasks: int, *values: Array) -> tuple[Array, ...]:
    r"""Several per-task sums over the same rows in one pass: :func:`segment_sum` of each of ``values``.

    The rows of every array (``[n, ...]``, any trailing shape) are laid side by side and
    summed by a single scatter, then split again. A scatter over the rows costs several
    times a plain pass over them on the CPU whatever its width, so one wide sum is much
    cheaper than several narrow ones (an EM step needs a few such passes, not one per
    statistic). Sums are the same as separate ones (in the common dtype of ``values``).

    Returns:
        One ``[K, ...]`` array per input, in order.
    """
    n = task.shape[0]
    dtype = jnp.result_type(*values)
    widths = [int(np.prod(v.shape[1:], dtype=int)) for v in values]
    rows = jnp.concatenate([jnp.reshape(v, (n, w)).astype(dtype) for v, w in zip(values, widths)], axis=1)
    sums = segment_sum(rows, task, num_tasks)
    parts = jnp.split(sums, np.cumsum(widths)[:-1], axis=1)
    return tuple(part.reshape((num_tasks,) + v.shape[1:]) for part, v in zip(parts, values))


#: The most tasks for which :func:`segment_outer_sum` is one matrix product with the task
#: indicator instead of a scatter of the products (see there).
INDICATOR_PRODUCT_MAX_TASKS = 32


def segment_outer_sum(
    left: Float[Array, "n a"], right: Float[Array, "n *rest"], task: Int[Array, " n"], num_tasks: int
) -> Float[Array, "K a *rest"]:
    r"""Per-task sums of row-wise outer products, :math:`S_i = \sum_{j:\,t_j=i} l_j\otimes r_j`.

    The same sums as ``segment_sum(left[:, :, None] * right, task, K)``, without writing
    the ``[n, a, w]`` products (``w`` the size of a row of ``right``) to memory when that
    costs more than the arithmetic: for few tasks, :math:`K \le \min(w,`
    :data:`INDICATOR_PRODUCT_MAX_TASKS`:math:`)`, it is one matrix product over the rows,

    .. math:: S = \big(e_{t_j}\otimes l_j\big)_j^T\,\big(r_j\big)_j,
              \qquad [n, K a]^T\,[n, w] \to [K a, w],

    whose left factor (``e`` the task indicator) is no wider than the products and, being
    a function of the design alone where ``left`` is, is shared by a ``vmap`` over
    ``right`` (e.g. the components of a mixture). Rows are then read once, not written
    and read back: on the CPU 4-10x faster for ``[10^4, 5 x 49]`` products, more under
    ``vmap``, where the products outgrow the caches. Otherwise (many tasks or narrow
    rows) it is :func:`segment_sum` of the products. The product runs at full float32
    precision on every backend (``Precision.HIGHEST``: no TF32/bfloat16 passes).

    Args:
        left: ``[n, a]``.
        right: ``[n, ...]``.
        task: task id of each row ``[n]``, integers in ``[0, num_tasks)``.
        num_tasks: ``K`` (static).

    Returns:
        ``[K, a, ...]``.
    """
    n, a = left.shape
    rest = right.shape[1:]
    width = int(np.prod(rest, dtype=int))
    flat = jnp.reshape(right, (n, width))
    if num_tasks <= min(width, INDICATOR_PRODUCT_MAX_TASKS):
        indicator = (task[:, None] == jnp.arange(num_tasks)).astype(left.dtype)  # [n, K]
        rows = jnp.reshape(indicator[:, :, None] * left[:, None, :], (n, num_tasks * a))
        sums = jnp.einsum("nm,nw->mw", rows, flat, precision=jax.lax.Precision.HIGHEST)
    else:
        sums = segment_sum(left[:, :, None] * flat[:, None, :], task, num_tasks)
    return jnp.reshape(sums, (num_tasks, a) + rest)


def diag_embed(x: Float[Array, "*batch k"]) -> Float[Array, "*batch k k"]:
    """Diagonal matrices from their diagonals, ``[..., k] -> [..., k, k]``.

    Args:
        x: diagonals ``[..., k]``.

    Returns:
        ``[..., k, k]`` with ``x`` on the diagonal and zeros elsewhere.
    """
    x = jnp.asarray(x)
    return x[..., :, None] * jnp.eye(x.shape[-1], dtype=x.dtype)


def _as_float(x) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _symmetrise(matrix: Float[Array, "*batch k k"]) -> Float[Array, "*batch k k"]:
    return 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))


def psd_cholesky(matrix: Float[Array, "*batch k k"]) -> Float[Array, "*batch k k"]:
    r"""Lower Cholesky factor of a (numerically) positive semi-definite matrix.

    Factorises :math:`M + \operatorname{diag}(j)` with the dtype-scaled jitter

    .. math::

        j_k = c\,\varepsilon\,\big(|M_{kk}| + \varepsilon\,\operatorname{tr}(M)/\dim\big),
        \qquad c = 10,\ \varepsilon = \operatorname{eps}(\text{dtype}),

    i.e. :math:`c\,\varepsilon\,\operatorname{tr}(\tilde M)/\dim` for the equilibrated
    matrix :math:`\tilde M = S^{-1} M S^{-1}`, :math:`S = \operatorname{diag}(M)^{1/2}`
    (whose diagonal is one), scaled back. This relative perturbation of each diagonal
    entry is of the size of Cholesky's own backward error, so it does not cost accuracy
    even when the diagonal entries differ by many orders of magnitude (a jitter of
    :math:`c\varepsilon\operatorname{tr}(M)/\dim` would swamp the small ones: for the
    fixed-effect information of an intercept next to a covariate with strong within-task
    information, the ratio is :math:`n_i\phi/\sigma^2`). The
    :math:`\varepsilon^2\operatorname{tr}(M)/\dim` floor keeps exactly singular matrices
    (zero rows) finite.

    Args:
        matrix: symmetric ``[..., k, k]`` (batched over leading axes).

    Returns:
        Lower-triangular ``L [..., k, k]`` with :math:`LL^T = M + \operatorname{diag}(j)`;
        NaNs where the jittered matrix is not positive definite.
    """
    matrix = _as_float(matrix)
    eps = jnp.finfo(matrix.dtype).eps
    diag = jnp.abs(jnp.diagonal(matrix, axis1=-2, axis2=-1))
    mean_diag = jnp.mean(diag, axis=-1, keepdims=True)
    jitter = _JITTER_SCALE * eps * (diag + eps * mean_diag)
    return cholesky(matrix + diag_embed(jitter))


@jax.jit  # called eagerly too (checks, naming): a cached program instead of a new loop body per call
def cholesky(matrix: Float[Array, "*batch k k"]) -> Float[Array, "*batch k k"]:
    r"""Lower Cholesky factor :math:`L L^T = M` of small, batched matrices, in plain ``jax.numpy``.

    Column by column (:math:`L_{jj} = (M_{jj} - \sum_{p<j} L_{jp}^2)^{1/2}`,
    :math:`L_{ij} = (M_{ij} - \sum_{p<j} L_{ip}L_{jp}) / L_{jj}`), vectorised over the
    leading axes. Why not ``jnp.linalg.cholesky``: on the CPU, jaxlib 0.10's batched LAPACK
    kernels split a batch over the XLA thread pool and wait for it, so two of them running
    at once (independent parts of one program, e.g. an EM step vmapped over restarts and
    replicates) can occupy every pool thread and wait forever. These matrices are tiny
    (random-effect and fixed-effect blocks) and batched over tasks, restarts and
    replicates, where a loop of vector operations also beats one LAPACK call per matrix.

    Args:
        matrix: symmetric ``[..., k, k]``; only the lower triangle is read.

    Returns:
        ``L [..., k, k]``, lower triangular; NaN from the first column where the matrix is
        not positive definite (as LAPACK's failure is reported by ``jnp.linalg.cholesky``).
    """
    matrix = _as_float(matrix)
    k = matrix.shape[-1]
    rows = jnp.arange(k)

    def column(j, chol):
        row_j = jax.lax.dynamic_index_in_dim(chol, j, axis=-2, keepdims=False)  # L[j, :], zero from j on
        column_j = jax.lax.dynamic_index_in_dim(matrix, j, axis=-1, keepdims=False)
        rest = column_j - jnp.einsum("...ip,...p->...i", chol, row_j)
        pivot = jnp.sqrt(jax.lax.dynamic_index_in_dim(rest, j, axis=-1, keepdims=True))
        values = jnp.where(rows == j, pivot, rest / pivot)
        values = jnp.where(rows >= j, values, 0.0)
        return jax.lax.dynamic_update_index_in_dim(chol, values[..., :, None], j, axis=-1)

    return jax.lax.fori_loop(0, k, column, jnp.zeros_like(matrix))


@functools.partial(jax.jit, static_argnames="transpose")  # see cholesky
def solve_triangular(chol: Float[Array, "*b k k"], rhs: Float[Array, "*b k j"], *, transpose: bool = False):
    r"""Solves :math:`L X = B` (or :math:`L^T X = B`) for lower-triangular ``L``, in plain ``jax.numpy``.

    Substitution row by row, vectorised over the leading axes and the columns of ``B``
    (see :func:`cholesky` for why not LAPACK's batched kernel).

    Args:
        chol: lower-triangular ``[..., k, k]``.
        rhs: ``[..., k, j]``; leading axes broadcast against ``chol``'s.
        transpose: solve with :math:`L^T` (back substitution) instead.

    Returns:
        ``X [..., k, j]``.
    """
    batch = jnp.broadcast_shapes(chol.shape[:-2], rhs.shape[:-2])
    chol = jnp.broadcast_to(chol, batch + chol.shape[-2:])
    rhs = jnp.broadcast_to(rhs, batch + rhs.shape[-2:]).astype(chol.dtype)
    k = chol.shape[-1]
    if transpose:
        chol = jnp.swapaxes(chol, -1, -2)  # upper triangular: solve from the last row up

    def row(step, solution):
        i = k - 1 - step if transpose else step
        chol_i = jax.lax.dynamic_index_in_dim(chol, i, axis=-2, keepdims=False)  # [..., k]
        known = jnp.einsum("...p,...pj->...j", chol_i, solution)  # unsolved rows are still zero
        rhs_i = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False)
        pivot = jax.lax.dynamic_index_in_dim(chol_i, i, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(solution, ((rhs_i - known) / pivot)[..., None, :], i, axis=-2)

    return jax.lax.fori_loop(0, k, row, jnp.zeros_like(rhs))


def cho_solve(chol: Float[Array, "*b k k"], rhs: Float[Array, "*b k j"]) -> Float[Array, "*b k j"]:
    """Solves ``L L^T X = rhs`` by two triangular solves (leading axes broadcast)."""
    return solve_triangular(chol, solve_triangular(chol, rhs), transpose=True)


def _cho_solve_vec(chol: Float[Array, "*b k k"], rhs: Float[Array, "*b k"]) -> Float[Array, "*b k"]:
    return cho_solve(chol, rhs[..., None])[..., 0]


def _cho_inverse(chol: Float[Array, "*b k k"]) -> Float[Array, "*b k k"]:
    eye = jnp.eye(chol.shape[-1], dtype=chol.dtype)
    return _symmetrise(cho_solve(chol, jnp.broadcast_to(eye, chol.shape)))


def psd_inverse(matrix: Float[Array, "*batch k k"]) -> Float[Array, "*batch k k"]:
    r"""Inverse of a PSD matrix through :func:`psd_cholesky` (never ``inv``).

    Args:
        matrix: symmetric PSD ``[..., k, k]``.

    Returns:
        :math:`(M + \operatorname{diag}(j))^{-1}` ``[..., k, k]``, symmetrised; finite for
        singular PSD input thanks to the jitter.
    """
    return _cho_inverse(psd_cholesky(matrix))


def psd_solve(matrix: Float[Array, "*batch k k"], rhs: Array) -> Array:
    r"""Solves :math:`M x = y` for a PSD matrix through :func:`psd_cholesky`.

    Args:
        matrix: symmetric PSD ``[..., k, k]``.
        rhs: ``[..., k]`` (vectors, when ``rhs.ndim == matrix.ndim - 1``) or
            ``[..., k, j]`` (matrices); leading axes broadcast against ``matrix``'s.

    Returns:
        The solution, shaped like ``rhs`` (after broadcasting).
    """
    matrix = _as_float(matrix)
    rhs = jnp.asarray(rhs)
    chol = psd_cholesky(matrix)
    if rhs.ndim == matrix.ndim - 1:
        return _cho_solve_vec(chol, rhs)
    return cho_solve(chol, rhs)


def _factor_ok(chol: Float[Array, "*batch k k"]) -> Bool[Array, "*batch"]:
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    return jnp.all(jnp.isfinite(diag) & (diag > 0), axis=-1)


def is_positive_definite(matrix: Float[Array, "*batch k k"]) -> Bool[Array, "*batch"]:
    """Whether :func:`psd_cholesky` succeeds (finite, positive diagonal).

    That is positive definiteness up to the jitter: an exactly singular PSD matrix counts
    as positive definite, an eigenvalue below about ``-c * eps * max_k M_kk`` does not.

    Args:
        matrix: symmetric ``[..., k, k]``.

    Returns:
        Boolean ``[...]``.
    """
    return _factor_ok(psd_cholesky(matrix))


def psd_logdet(matrix: Float[Array, "*batch k k"]) -> Float[Array, "*batch"]:
    r"""Log-determinant :math:`\log\det M = 2\sum_k \log L_{kk}` via :func:`psd_cholesky`.

    Args:
        matrix: symmetric ``[..., k, k]``.

    Returns:
        ``[...]``; NaN where the matrix is not positive definite (the factor has a
        non-finite or non-positive diagonal), never a log-determinant with a dropped sign.
    """
    chol = psd_cholesky(matrix)
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    ok = _factor_ok(chol)
    safe = jnp.where(ok[..., None], diag, jnp.ones_like(diag))
    logdet = 2.0 * jnp.sum(jnp.log(safe), axis=-1)
    return jnp.where(ok, logdet, jnp.nan)


#: Largest ``q`` and ``q * m`` for which :func:`row_products` writes ``x @ w`` out as a sum of
#: columns (measured: with the 16 columns of the ILEA design an EM fit compiled ~4 s longer).
_UNROLLED_PRODUCT_COLUMNS, _UNROLLED_PRODUCT_SIZE = 8, 64


def row_products(x: Float[Array, "n q"], w: Float[Array, "q *m"]) -> Float[Array, "n *m"]:
    r"""``x @ w`` for a narrow design and few outputs: :math:`\sum_k x_{jk} w_k` per row.

    With few outputs (``m``: mixture components, logits) XLA's CPU matrix product is a pass
    over the ``n`` rows of its own and writes ``[n, m]`` to memory; written as a sum of the
    ``q`` scaled columns (unrolled at trace time, ``q <= 8`` and ``q * m <= 64``), the product is
    elementwise and fuses into what consumes it (a residual, a log-density). Larger
    products are left to ``jnp.tensordot``.
    """
    q = x.shape[-1]
    if not 0 < q <= _UNROLLED_PRODUCT_COLUMNS or q * math.prod(w.shape[1:]) > _UNROLLED_PRODUCT_SIZE:
        return jnp.tensordot(x, w, axes=1)
    columns = x.reshape(x.shape + (1,) * (w.ndim - 1))  # [n, q, 1, ...] against w [q, *m]
    return sum((columns[:, k] * w[k] for k in range(1, q)), start=columns[:, 0] * w[0])


def kron_rows(x: Float[Array, "n q"], d: int) -> Float[Array, "n qd d"]:
    r"""Fixed-effect row blocks :math:`A_j = x_j \otimes I_d` for shared covariates.

    With a coefficient matrix :math:`W` ``[q, d]`` flattened row-major
    (:math:`\beta_{a d + k} = W_{ak}`), :math:`A_j^T\beta = W^T x_j`. Random intercepts
    use :math:`B_j = I_d`, ``jnp.broadcast_to(jnp.eye(d), (n, d, d))``.

    Args:
        x: covariates ``[n, q]``.
        d: number of outputs (static).

    Returns:
        ``[n, q*d, d]`` with element ``[j, a*d + k, l] = x[j, a] * (k == l)``.
    """
    x = _as_float(x)
    n, q = x.shape
    return (x[:, :, None, None] * jnp.eye(d, dtype=x.dtype)).reshape(n, q * d, d)


# ----------------------------------------------------------------------------- solve
class BorderedSolution(NamedTuple):
    r"""Solution and inverse blocks of a bordered block-diagonal system.

    The properties also work on a solution batched over leading axes (from ``jax.vmap``).

    Attributes:
        fixed: :math:`\beta` ``[m]``.
        random: :math:`b_i` ``[K, r]``.
        fixed_cov: :math:`H_{ff} = P^{-1}` ``[m, m]``.
        centre: :math:`\bar A_i = C_i D_i^{-1}` ``[K, m, r]``.
        random_prec_inv: :math:`D_i^{-1}` ``[K, r, r]``.
        random_info: the rows' part of :math:`D_i`, :math:`M_i = \sum_{j\in i} B_jW_jB_j^T`
            ``[K, r, r]`` (the task's information about its effects, without the prior).
    """

    fixed: Float[Array, " m"]
    random: Float[Array, "K r"]
    fixed_cov: Float[Array, "m m"]
    centre: Float[Array, "K m r"]
    random_prec_inv: Float[Array, "K r r"]
    random_info: Float[Array, "K r r"]

    @property
    def cross_cov(self) -> Float[Array, "K m r"]:
        r""":math:`H_{f r_i} = -P^{-1}\bar A_i` ``[K, m, r]``."""
        return -jnp.einsum("...mn,...inr->...imr", self.fixed_cov, self.centre)

    @property
    def random_cov(self) -> Float[Array, "K r r"]:
        r""":math:`H_{r_i r_i} = D_i^{-1} + \bar A_i^T P^{-1}\bar A_i` ``[K, r, r]``."""
        spread = jnp.einsum("...imr,...mn,...ins->...irs", self.centre, self.fixed_cov, self.centre)
        return self.random_prec_inv + _symmetrise(spread)


def bordered_solve(
    fixed_rows: Float[Array, "n m d"],
    random_rows: Float[Array, "n r d"],
    weights: Float[Array, "n d d"],
    grads: Float[Array, "n d"],
    task: Int[Array, " n"],
    num_tasks: int,
    random_prior_prec: Float[Array, "r r"] | Float[Array, "K r r"],
    random_prior_grad: Float[Array, "K r"] | None = None,
    fixed_prior_prec: Float[Array, "m m"] | None = None,
    *,
    refinement_steps: int = 1,
) -> BorderedSolution:
    r"""Solves the bordered block-diagonal mixed-model system in the stable centred form.

    Forms, without any subtraction of large numbers (see the module docstring),

    .. math::

        \bar A_i = C_i D_i^{-1},\quad \tilde A_j = A_j - \bar A_{t_j} B_j,\quad
        P = F_0 + \sum_j \tilde A_j W_j \tilde A_j^T + \sum_i \bar A_i Q_i \bar A_i^T,

        \beta = P^{-1}\Big(\sum_j \tilde A_j u_j - \sum_i \bar A_i h_i\Big),\qquad
        b_i = D_i^{-1} g_{r,i} - \bar A_i^T \beta,

    followed by ``refinement_steps`` steps of iterative refinement with row-wise
    residuals :math:`r_j = u_j - W_j\eta_j`. Two passes over the rows for the blocks
    (first :math:`C_i, M_i`, then the centred rows) and one more per refinement step.
    With ``r == 0`` it is weighted least squares, :math:`\beta = P^{-1} g_f`,
    :math:`P = F + F_0`, and the random parts are empty.

    Args:
        fixed_rows: :math:`A_j` ``[n, m, d]``.
        random_rows: :math:`B_j` ``[n, r, d]`` (``r`` may be 0).
        weights: PSD :math:`W_j` ``[n, d, d]``.
        grads: :math:`u_j` ``[n, d]``.
        task: task id of each row ``[n]``, integers in ``[0, num_tasks)``.
        num_tasks: ``K`` (static).
        random_prior_prec: :math:`Q_i`, ``[r, r]`` shared by all tasks or ``[K, r, r]``;
            positive definite (it makes :math:`D_i` invertible for every task).
        random_prior_grad: :math:`h_i` ``[K, r]``; ``None`` for zeros.
        fixed_prior_prec: :math:`F_0` ``[m, m]``; ``None`` for none.
        refinement_steps: iterative-refinement steps after the closed-form solve
            (static). 0 gives the closed form alone (exact in exact arithmetic, but in
            float32 a few percent off at :math:`n_i\phi/\sigma^2\approx10^6`); the
            default 1 brings the float32 fixed effects to about :math:`10^{-7}` relative
            there. Each step is one more pass over the rows.

    Returns:
        :class:`BorderedSolution` with ``fixed [m]``, ``random [K, r]``,
        ``fixed_cov = P^{-1} [m, m]``, ``centre [K, m, r]`` and
        ``random_prec_inv = D^{-1} [K, r, r]``.
    """
    A = _as_float(fixed_rows)
    dtype = jnp.result_type(A, random_rows, weights, grads)
    A = A.astype(dtype)
    B = jnp.asarray(random_rows, dtype)
    W = jnp.asarray(weights, dtype)
    u = jnp.asarray(grads, dtype)
    task = jnp.asarray(task)
    K = num_tasks
    m, r = A.shape[1], B.shape[1]
    Q = jnp.broadcast_to(jnp.asarray(random_prior_prec, dtype), (K, r, r))
    h = jnp.zeros((K, r), dtype) if random_prior_grad is None else jnp.asarray(random_prior_grad, dtype)
    F0 = None if fixed_prior_prec is None else jnp.asarray(fixed_prior_prec, dtype)

    # pass 1: the per-task blocks C_i, M_i and the centres
    if r > 0:
        BW = jnp.einsum("nrd,nde->nre", B, W)
        C, M = segment_sums(task, K, jnp.einsum("nme,nre->nmr", jnp.einsum("nmd,nde->nme", A, W), B),
                            jnp.einsum("nre,nse->nrs", BW, B))
        D = M + Q
        chol_D = psd_cholesky(_symmetrise(D))
        random_prec_inv = _cho_inverse(chol_D)
        # centre^T = D^{-1} C^T, polished once against the un-jittered D (see module doc)
        centre_t = cho_solve(chol_D, jnp.swapaxes(C, -1, -2))  # [K, r, m]
        defect = jnp.swapaxes(C, -1, -2) - jnp.einsum("irs,ism->irm", D, centre_t)
        centre = jnp.swapaxes(centre_t + cho_solve(chol_D, defect), -1, -2)  # [K, m, r]
        centred = A - jnp.einsum("nmr,nrd->nmd", centre[task], B)
    else:
        chol_D = random_prec_inv = M = jnp.zeros((K, 0, 0), dtype)
        centre = jnp.zeros((K, m, 0), dtype)
        centred = A

    # pass 2: the Schur complement as a sum of PSD terms
    info = jnp.einsum("nme,nke->mk", jnp.einsum("nmd,nde->nme", centred, W), centred)
    if r > 0:
        info = info + jnp.einsum("imr,irs,iks->mk", centre, Q, centre)
    if F0 is not None:
        info = info + F0
    chol_P = psd_cholesky(_symmetrise(info))
    fixed_cov = _cho_inverse(chol_P)

    def predict(beta, b):
        return jnp.einsum("nmd,m->nd", A, beta) + jnp.einsum("nrd,nr->nd", B, b[task])

    def row_gradients(resid):
        return jnp.einsum("nmd,nd->m", centred, resid), segment_sum(jnp.einsum("nrd,nd->nr", B, resid), task, K)

    beta, b = _refined_solve(predict, row_gradients, lambda eta: jnp.einsum("nde,ne->nd", W, eta), u, Q, h, F0,
                             chol_P, chol_D, centre, refinement_steps)
    return BorderedSolution(beta, b, fixed_cov, centre, random_prec_inv, M)


class KronWeights(NamedTuple):
    r"""Row weights that factor as :math:`W_j = w_j S`: a scalar per row times one shared matrix.

    A Gaussian component's :math:`\tau_j\Sigma^{-1}`. :func:`kron_bordered_solve` then sums
    the scalar weights over the rows and multiplies by :math:`S` after the sum (sums of
    ``[n]`` and ``[n, q]`` rows instead of ``[n, d, d]`` and ``[n, q, d, d]``), and its
    row sums do not change with :math:`S`: where the row weights are constant (one
    component, :math:`\tau_j = 1`) XLA computes them once, outside an EM loop.

    Attributes:
        rows: :math:`w_j` ``[n]``.
        shared: symmetric PSD :math:`S` ``[d, d]``.
    """

    rows: Float[Array, " n"]
    shared: Float[Array, "d d"]


class MultinomialWeights(NamedTuple):
    r"""Row weights of a multinomial logit, :math:`W_j = m_j\,(\operatorname{diag}\pi_j - \pi_j\pi_j^T)`.

    The negative Hessian of :math:`m_j \log\operatorname{softmax}` in the ``d`` non-reference
    logits (:math:`\pi_j` their probabilities). :func:`kron_bordered_solve` then never forms
    the ``[n, d, d]`` blocks: :math:`W_j\eta_j = m_j\,\pi_j\odot(\eta_j - \pi_j^T\eta_j)`
    costs ``O(d)`` per row, and its sums over the rows are taken over the ``d(d+1)/2``
    distinct entries (:func:`packed_weights`).

    Attributes:
        mass: :math:`m_j` ``[n]``.
        probs: :math:`\pi_j` ``[n, d]``.
    """

    mass: Float[Array, " n"]
    probs: Float[Array, "n d"]


def kron_bordered_solve(
    x: Float[Array, "n q"],
    weights: Float[Array, "n d d"] | KronWeights | MultinomialWeights,
    grads: Float[Array, "n d"],
    task: Int[Array, " n"],
    num_tasks: int,
    random_prior_prec: Float[Array, "d d"] | Float[Array, "K d d"],
    random_prior_grad: Float[Array, "K d"] | None = None,
    fixed_prior_prec: Float[Array, "m m"] | None = None,
    *,
    random_intercepts: bool = True,
    refinement_steps: int = 1,
) -> BorderedSolution:
    r""":func:`bordered_solve` for shared covariates, :math:`A_j = x_j\otimes I_d`, and intercepts, :math:`B_j = I_d`.

    The same system and solution as ``bordered_solve(kron_rows(x, d), eye_rows, ...)``
    (``r = d``; ``r = 0`` with ``random_intercepts=False``), in
    :math:`O(n q^2 d^2)` per pass over the rows instead of :math:`O(n q^2 d^3)`: the
    dense form multiplies the ``[m, d]`` blocks of :math:`A_j`, mostly zeros, row by row,
    which dominates an EM step of a mixture with many components (``d = g - 1`` mixing
    logits).

    The centred rows are formed from the covariates centred within each task,
    :math:`\tilde x_j = x_j - \bar x_{t_j}` (:math:`\bar x_i` the task's mean row):
    :math:`\tilde A_j = A_j - \bar A_i = \tilde x_j\otimes I_d + E_i` with

    .. math::

        E_i = \bar x_i\otimes I_d - \bar A_i = \big(\bar x_i\otimes Q_i - \tilde C_i\big)D_i^{-1},
        \qquad \tilde C_i = \sum_{j\in i}\tilde x_j\otimes W_j,

    (from :math:`C_i = \bar x_i\otimes M_i + \tilde C_i` and :math:`D_i = M_i + Q_i`), which
    is small where the task's own information dominates and is computed without
    cancellation. Then

    .. math::

        \sum_{j\in i}\tilde A_j W_j\tilde A_j^T = \sum_{j\in i}(\tilde x_j\tilde x_j^T)\otimes W_j
            + \tilde C_i E_i^T + E_i\tilde C_i^T + E_i M_i E_i^T,
        \qquad \sum_{j\in i}\tilde A_j r_j = \sum_{j\in i}\tilde x_j\otimes r_j + E_i\sum_{j\in i} r_j,

    sums of terms of the size of the result (the covariates' offsets are gone), so the
    float32 accuracy of the stable form is kept (``tests/test_linalg.py``). Without random
    effects nothing is centred: :math:`P = F_0 + \sum_j (x_jx_j^T)\otimes W_j`.

    Args:
        x: shared covariates ``[n, q]``; :math:`\beta` is :math:`\operatorname{vec}` of a
            ``[q, d]`` coefficient matrix, row-major (the layout of :func:`kron_rows`).
        weights: :math:`W_j` ``[n, d, d]`` (symmetric), or :class:`KronWeights` when they
            factor, or :class:`MultinomialWeights` for a multinomial logit.
        grads, task, num_tasks, random_prior_prec, random_prior_grad,
        fixed_prior_prec, refinement_steps: as in :func:`bordered_solve`, with ``r = d``.
        random_intercepts: whether the tasks have random intercepts :math:`b_i\in\mathbb R^d`
            (static); ``False`` gives weighted least squares, as ``r = 0`` does there.

    Returns:
        :class:`BorderedSolution`, as from :func:`bordered_solve`.
    """
    dtype = jnp.result_type(*map(_as_float, jax.tree_util.tree_leaves(weights)), _as_float(x), grads)
    weights = jax.tree_util.tree_map(lambda w: jnp.asarray(w, dtype), weights)
    x = jnp.asarray(x, dtype)
    u = jnp.asarray(grads, dtype)
    task = jnp.asarray(task)
    K = num_tasks
    q, d = x.shape[1], _weights_size(weights)
    m, r = q * d, d if random_intercepts else 0
    Q = jnp.broadcast_to(jnp.asarray(random_prior_prec, dtype), (K, r, r))
    h = jnp.zeros((K, r), dtype) if random_prior_grad is None else jnp.asarray(random_prior_grad, dtype)
    F0 = None if fixed_prior_prec is None else jnp.asarray(fixed_prior_prec, dtype)
    eye = jnp.eye(d, dtype=dtype)

    x_mean, x_rows = _centred_within_tasks(x, task, K) if r > 0 else (None, x)
    M, c_tilde, gram = _weighted_task_sums(weights, x_rows, task, K, with_tasks=r > 0)
    if r > 0:
        D = M + Q
        chol_D = psd_cholesky(_symmetrise(D))
        random_prec_inv = _cho_inverse(chol_D)
        numerator_t = jnp.swapaxes(jnp.einsum("ia,irs->iars", x_mean, Q).reshape(K, m, r) - c_tilde, -1, -2)
        # E^T = D^{-1} (xbar (x) Q - C~)^T, polished once against the un-jittered D (module doc)
        offset_t = cho_solve(chol_D, numerator_t)  # [K, r, m]
        offset_t = offset_t + cho_solve(chol_D, numerator_t - jnp.einsum("irs,ism->irm", D, offset_t))
        offset = jnp.swapaxes(offset_t, -1, -2)  # E [K, m, r]
        centre = jnp.einsum("ia,kl->iakl", x_mean, eye).reshape(K, m, r) - offset
    else:
        chol_D = random_prec_inv = M = jnp.zeros((K, 0, 0), dtype)
        centre = offset = jnp.zeros((K, m, 0), dtype)

    info = jnp.swapaxes(gram, 1, 2).reshape(m, m)
    if r > 0:
        cross = jnp.einsum("imd,ikd->mk", c_tilde, offset)
        info = (info + cross + cross.T + jnp.einsum("imr,irs,iks->mk", offset, M, offset)
                + jnp.einsum("imr,irs,iks->mk", centre, Q, centre))
    if F0 is not None:
        info = info + F0
    chol_P = psd_cholesky(_symmetrise(info))
    fixed_cov = _cho_inverse(chol_P)

    def predict(beta, b):
        eta = row_products(x, beta.reshape(q, d))
        return eta + b[task] if r > 0 else eta

    def row_gradients(resid):
        grad_f = _design_product(x_rows, resid).reshape(m)
        if r == 0:
            return grad_f, jnp.zeros((K, 0), dtype)
        resid_sums = segment_sum(resid, task, K)
        return grad_f + jnp.einsum("imr,ir->m", offset, resid_sums), resid_sums

    beta, b = _refined_solve(predict, row_gradients, _weighting(weights), u, Q, h, F0, chol_P, chol_D, centre,
                             refinement_steps)
    return BorderedSolution(beta, b, fixed_cov, centre, random_prec_inv, M)


def _weights_size(weights) -> int:
    """``d`` of the ``[d, d]`` row weights of :func:`kron_bordered_solve`."""
    if isinstance(weights, KronWeights):
        return weights.shared.shape[-1]
    if isinstance(weights, MultinomialWeights):
        return weights.probs.shape[-1]
    return weights.shape[-1]


def _weighting(weights):
    r""":math:`\eta \mapsto (W_j\eta_j)_j`, ``[n, d] -> [n, d]``."""
    if isinstance(weights, KronWeights):
        return lambda eta: weights.rows[:, None] * jnp.einsum("de,ne->nd", weights.shared, eta)
    if isinstance(weights, MultinomialWeights):
        mass, probs = weights
        return lambda eta: (mass[:, None] * probs) * (eta - jnp.einsum("nd,nd->n", probs, eta)[:, None])
    return lambda eta: jnp.einsum("nde,ne->nd", weights, eta)


def packed_weights(weights: Float[Array, "n d d"] | MultinomialWeights) -> Float[Array, "n s"]:
    r"""The distinct entries :math:`W_{j,kl}`, :math:`k \le l`, of symmetric row weights, ``[n, d(d+1)/2]``.

    Sums over the rows of symmetric ``[d, d]`` blocks need only these (:func:`unpack_symmetric`
    restores the blocks): for the ``d = g - 1`` mixing logits of a mixture, about half the
    products and memory of the full blocks. :class:`MultinomialWeights` are formed here
    entry by entry, :math:`m\pi_k(1 - \pi_k)` on the diagonal and :math:`-m\pi_k\pi_l` off it.
    """
    if isinstance(weights, MultinomialWeights):
        mass, probs = weights
        first, second = np.triu_indices(probs.shape[-1])
        scaled = mass[:, None] * probs[:, first]
        return scaled * jnp.where(first == second, 1.0 - probs[:, second], -probs[:, second])
    first, second = np.triu_indices(weights.shape[-1])
    return weights[:, first, second]


def unpack_symmetric(packed: Float[Array, "*batch s"], d: int) -> Float[Array, "*batch d d"]:
    """Symmetric ``[d, d]`` blocks from their upper triangles (:func:`packed_weights`' order)."""
    first, second = np.triu_indices(d)
    index = np.zeros((d, d), int)
    index[first, second] = index[second, first] = np.arange(first.size)
    return packed[..., index]


def _weighted_task_sums(weights, x_rows, task, num_tasks: int, *, with_tasks: bool):
    r"""The weighted sums over the rows of :func:`kron_bordered_solve`.

    :math:`M_i = \sum_{j\in i}W_j` ``[K, d, d]``, :math:`\tilde C_i = \sum_{j\in i}\tilde x_j\otimes W_j`
    ``[K, q d, d]`` (both only ``with_tasks``, else ``None``) and the Gram blocks
    :math:`\sum_j \tilde x_j\tilde x_j^T\otimes W_j` as ``[q, q, d, d]``. With
    :class:`KronWeights` the scalar weights are summed and :math:`S` multiplies the sums;
    otherwise the sums run over the distinct entries of the symmetric blocks (:func:`packed_weights`).
    """
    K = num_tasks
    q = x_rows.shape[1]
    if isinstance(weights, KronWeights):
        w, S = weights
        d = S.shape[-1]
        gram = jnp.einsum("ab,kl->abkl", _weighted_gram(x_rows, w), S)
        if not with_tasks:
            return None, None, gram
        weight_sums, weighted_x = _task_sums_with_covariates(x_rows, w, task, K)
        return (weight_sums[:, None, None] * S, jnp.einsum("ia,kl->iakl", weighted_x, S).reshape(K, q * d, d), gram)
    d = _weights_size(weights)
    rows = packed_weights(weights)
    gram = unpack_symmetric(_weighted_gram(x_rows, rows), d)
    if not with_tasks:
        return None, None, gram
    weight_sums, weighted_x = _task_sums_with_covariates(x_rows, rows, task, K)
    return unpack_symmetric(weight_sums, d), unpack_symmetric(weighted_x, d).reshape(K, q * d, d), gram


def _task_sums_with_covariates(x_rows: Float[Array, "n q"], rows: Float[Array, "n ..."], task, num_tasks: int):
    r"""Per task, :math:`\sum_{j\in i} r_j` ``[K, ...]`` and :math:`\sum_{j\in i}\tilde x_j\otimes r_j`
    ``[K, q, ...]``: one per-task sum (:func:`segment_outer_sum`) of :math:`(1, \tilde x_j)\otimes r_j`."""
    sums = segment_outer_sum(jnp.concatenate([jnp.ones_like(x_rows[:, :1]), x_rows], axis=1), rows, task, num_tasks)
    return sums[:, 0], sums[:, 1:]


#: Largest number of covariates for which :func:`_weighted_gram` sums precomputed row products.
_PAIRWISE_GRAM_COVARIATES = 8


def _weighted_gram(x: Float[Array, "n q"], weights: Float[Array, "n *k"]) -> Float[Array, "q q *k"]:
    r"""The weighted Gram matrices :math:`\sum_j x_jx_j^T\otimes w_j` over the rows, ``[q, q, *k]``.

    For a few covariates the products :math:`x_{ja}x_{jb}` (:math:`a \le b`, ``[n, q(q+1)/2]``)
    depend on the design alone, so inside an EM loop XLA computes them once, outside it, and
    each step is one product of the weights with them: no ``[n, q, *k]`` array of weighted
    rows is written per step (under ``vmap`` over restarts and components, a transposed
    copy of it), and the batch of weights is the product's left factor. With many
    covariates (more than :data:`_PAIRWISE_GRAM_COVARIATES`) the pairs would outweigh the
    rows, and the rows are weighted instead.
    """
    n, q = x.shape
    rows = weights.reshape(n, -1)
    if q > _PAIRWISE_GRAM_COVARIATES:
        return _design_product(x, x[:, :, None] * rows[:, None]).reshape((q, q) + weights.shape[1:])
    first, second = np.triu_indices(q)
    pair = np.zeros((q, q), int)
    pair[first, second] = pair[second, first] = np.arange(first.size)  # (a, b) -> its pair's column
    sums = jnp.einsum("nk,np->pk", rows, x[:, first] * x[:, second])  # [q(q+1)/2, k]
    return sums[pair].reshape((q, q) + weights.shape[1:])


def _design_product(x: Float[Array, "n q"], rows: Float[Array, "n ..."]) -> Float[Array, "q ..."]:
    r""":math:`\sum_j x_j \otimes v_j`, ``x^T rows`` over the rows, with the design ``x`` as the left factor.

    XLA on the CPU lays the left factor of a product over the rows out transposed, a copy
    of it: of ``x``, which does not change in an EM loop, the copy is made once outside it
    (a weighted ``rows`` on the left cost a transposed copy of ``[n, ...]`` per step, the
    Gram matrices of an ``n = 10^6`` step ~2x slower).
    """
    return jnp.einsum("na,nm->am", x, rows.reshape(rows.shape[0], -1)).reshape(x.shape[1:] + rows.shape[1:])


def _centred_within_tasks(x: Float[Array, "n q"], task: Int[Array, " n"], num_tasks: int):
    """The task means of the covariates ``[K, q]`` and the rows centred by them ``[n, q]``.

    A function of the design alone, apart from any weights, so that it stays outside a
    ``vmap`` over weights (the components of a mixture) and out of the EM loop.
    """
    counts, x_sums = segment_sums(task, num_tasks, jnp.ones(x.shape[:1], x.dtype), x)
    x_mean = x_sums / jnp.maximum(counts, 1.0)[:, None]
    return x_mean, x - x_mean[task]


def _refined_solve(predict, row_gradients, weigh, u, Q, h, F0, chol_P, chol_D, centre, refinement_steps: int):
    r"""The closed-form solve (the step from zero) and ``refinement_steps`` refinement steps.

    Shared by :func:`bordered_solve` and :func:`kron_bordered_solve`, which differ only in
    how the rows enter: ``weigh(eta)`` gives :math:`W_j\eta_j` ``[n, d]``,
    ``predict(beta, b)`` gives :math:`\eta_j` ``[n, d]`` and
    ``row_gradients(resid)`` gives :math:`(\sum_j \tilde A_j r_j\ [m],\ \sum_{j\in i} B_j r_j\ [K, r])`
    (module docstring, "Iterative refinement").

    Returns:
        ``(beta [m], b [K, r])``.
    """
    K, m, r = centre.shape
    beta = jnp.zeros((m,), u.dtype)
    b = jnp.zeros((K, r), u.dtype)
    for step in range(1 + refinement_steps):
        resid = u if step == 0 else u - weigh(predict(beta, b))
        grad_f, grad_r = row_gradients(resid)
        if F0 is not None:
            grad_f = grad_f - F0 @ beta
        if r > 0:
            prior_resid = h - jnp.einsum("irs,is->ir", Q, b)
            grad_r = grad_r + prior_resid
            grad_f = grad_f - jnp.einsum("imr,ir->m", centre, prior_resid)
        step_f = _cho_solve_vec(chol_P, grad_f)
        beta = beta + step_f
        if r > 0:
            b = b + _cho_solve_vec(chol_D, grad_r) - jnp.einsum("imr,m->ir", centre, step_f)
    return beta, b


def row_covariance(
    solution: BorderedSolution,
    fixed_rows: Float[Array, "n m d"],
    random_rows: Float[Array, "n r d"],
    task: Int[Array, " n"],
) -> Float[Array, "n d d"]:
    r"""Posterior covariance of each row's linear predictor :math:`\eta_j`.

    .. math::

        \operatorname{Cov}(\eta_j) = \tilde A_j^T P^{-1}\tilde A_j + B_j^T D_{t_j}^{-1} B_j,
        \qquad \tilde A_j = A_j - \bar A_{t_j} B_j,

    equal to :math:`L_j^T H^{-1} L_j` for :math:`\eta_j = L_j^T(\beta, b)`, without
    cancellation.

    Args:
        solution: from :func:`bordered_solve`.
        fixed_rows: :math:`A_j` ``[n, m, d]``.
        random_rows: :math:`B_j` ``[n, r, d]``.
        task: task ids ``[n]``.

    Returns:
        ``[n, d, d]``.
    """
    dtype = solution.fixed_cov.dtype
    A = jnp.asarray(fixed_rows, dtype)
    B = jnp.asarray(random_rows, dtype)
    centred = A - jnp.einsum("nmr,nrd->nmd", solution.centre[task], B)
    cov = jnp.einsum("nmd,mk,nke->nde", centred, solution.fixed_cov, centred)
    cov = cov + jnp.einsum("nrd,nrs,nse->nde", B, solution.random_prec_inv[task], B)
    return _symmetrise(cov)


def kron_row_covariance_sum(
    solution: BorderedSolution,
    x: Float[Array, "n q"],
    task: Int[Array, " n"],
    row_weights: Float[Array, " n"],
) -> Float[Array, "d d"]:
    r"""Weighted sum of the rows' :func:`row_covariance` for a :func:`kron_bordered_solve` solution.

    For :math:`A_j = x_j\otimes I_d` and :math:`B_j = I_d` (or no random part),
    :math:`\sum_j w_j\operatorname{Cov}(\eta_j)` without a ``[d, d]`` block per row. With
    the covariates centred within tasks, :math:`\tilde x_j = x_j - \bar x_{t_j}`, the centred
    rows are :math:`\tilde A_j = \tilde x_j\otimes I_d + E_{t_j}`,
    :math:`E_i = \bar x_i\otimes I_d - \bar A_i` (as in :func:`kron_bordered_solve`), so

    .. math::

        \sum_j w_j\operatorname{Cov}(\eta_j) = \sum_{a,b} G_{ab} P^{-1}_{(a\cdot),(b\cdot)}
            + \sum_i \big(X_i^T P^{-1}E_i + E_i^T P^{-1}X_i
            + \omega_i (E_i^T P^{-1}E_i + D_i^{-1})\big),

    with :math:`G = \sum_j w_j\tilde x_j\tilde x_j^T` ``[q, q]``,
    :math:`X_i = (\sum_{j\in i} w_j\tilde x_j)\otimes I_d` and
    :math:`\omega_i = \sum_{j\in i} w_j`: one product over the rows and two per-task sums.
    Without random effects nothing is centred, :math:`\sum_{a,b} G_{ab} P^{-1}_{(a\cdot),(b\cdot)}`
    with :math:`G = \sum_j w_j x_jx_j^T`.

    Args:
        solution: from :func:`kron_bordered_solve` with covariates ``x``.
        x: the shared covariates ``[n, q]``.
        task: task ids ``[n]``.
        row_weights: :math:`w_j` ``[n]``.

    Returns:
        ``[d, d]``, equal to ``einsum("n,nde->de", w, row_covariance(solution, kron_rows(x, d), eye_rows, task))``.
    """
    dtype = solution.fixed_cov.dtype
    K, m, r = solution.centre.shape
    x = jnp.asarray(x, dtype)
    w = jnp.asarray(row_weights, dtype)
    q = x.shape[1]
    d = m // q
    fixed_cov = solution.fixed_cov.reshape(q, d, q, d)
    if r == 0:
        return _symmetrise(jnp.einsum("ab,akbl->kl", _weighted_gram(x, w), fixed_cov))
    x_mean, x_rows = _centred_within_tasks(x, task, K)
    offset = jnp.einsum("ia,kl->iakl", x_mean, jnp.eye(d, dtype=dtype)).reshape(K, m, d) - solution.centre
    weight_sums, weighted_x = _task_sums_with_covariates(x_rows, w, task, K)  # omega_i [K], [K, q]
    cov_offset = jnp.einsum("akm,imr->iakr", fixed_cov.reshape(q, d, m), offset)  # P^{-1} E_i [K, q, d, d]
    cross = jnp.einsum("ia,iakr->kr", weighted_x, cov_offset)
    total = (jnp.einsum("ab,akbl->kl", _weighted_gram(x_rows, w), fixed_cov)
             + cross + cross.T
             + jnp.einsum("i,imk,imr->kr", weight_sums, offset, cov_offset.reshape(K, m, d))
             + jnp.einsum("i,ikl->kl", weight_sums, solution.random_prec_inv))
    return _symmetrise(total)
