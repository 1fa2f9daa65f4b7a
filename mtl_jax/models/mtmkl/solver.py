r"""MTMKL's solver: batched per-task LS-SVMs on weighted kernel sums, and the kernel weights.

**Per-task LS-SVM at fixed weights.** Task :math:`t` has rows :math:`S_t` (labelled rows
of splits 0 and 1), labels :math:`y_i \in \{-1, +1\}`, row weights :math:`w_i > 0` and the
kernel :math:`K_t = \sum_m \eta_{tm} K_{m,t}` (:math:`K_{m,t}` the normalised modality
kernels of :mod:`.kernels` on :math:`S_t`). Its LS-SVM (regularisation ``C``)

.. math::

    \min_{v, b, e}\ \tfrac12\|v\|^2 + \tfrac{C}{2}\sum_{i\in S_t} w_i e_i^2
    \quad\text{s.t.}\quad y_i = v^T\varphi_t(x_i) + b + e_i

has the Lagrangian dual (stationarity: :math:`v = \sum_i a_i\varphi_t(x_i)`,
:math:`\sum_i a_i = 0`, :math:`C w_i e_i = a_i`)

.. math::

    D_t(\eta_t) = \max_{a:\ 1^T a = 0}\ a^T y - \tfrac12 a^T (K_t + \Lambda) a,
    \qquad \Lambda = \mathrm{diag}\big(1/(C w_i)\big),

equal (strong duality) to the primal optimum. Its maximiser solves the KKT system
:math:`(K_t + \Lambda) a + b 1 = y`, :math:`1^T a = 0`, solved by Cholesky of
:math:`A = K_t + \Lambda \succ 0`: :math:`\eta = A^{-1}1`, :math:`\nu = A^{-1}y`,
:math:`b = 1^T\nu / 1^T\eta`, :math:`a = \nu - b\eta` (one step of iterative refinement),
by :func:`mtl_jax.models.baselines.solvers.bordered_kkt_solve`, the solve of ``lssvm`` with ``gamma = C``,
but on a precomputed kernel. At the optimum :math:`a^T(K_t+\Lambda)a = a^T y`, so
:math:`D_t = \tfrac12 y^T a`. (The original project writes the same system with
:math:`\alpha_i = a_i y_i`.)

**Batched.** Tasks are padded to the largest task (``m`` rows,
:func:`~mtl_jax.models.baselines.solvers.pad_by_task`); a padding row has its kernel row
and column zeroed, diagonal 1, label 0 and border 0, so :math:`a_i = 0` there and the
other unknowns are those of the unpadded system. One task is written once and
``jax.vmap``-ed over tasks: ``grams [K, P, m, m]`` are formed once, every evaluation of
the objective is ``K`` Cholesky factorisations of ``m x m`` in one batched call.

**The objective** over :math:`\eta \in \Delta^{P}\times\dots\times\Delta^{P}` (a simplex per task):

.. math::

    J(\eta) = \sum_t D_t(\eta_t) + V\,R(\eta),

with the regulariser ``"pull"``, :math:`R = \sum_t \|\eta_t - \bar\eta\|^2`
(:math:`\bar\eta = \frac1K\sum_s\eta_s`; the original's L2 regulariser
:math:`\sum_{t,s}\|\eta_t-\eta_s\|^2` is :math:`2K` times this), or ``"similarity"``,
:math:`R = -\sum_{t\neq s}\eta_t^T\eta_s` (the original's L1 regulariser sums over
:math:`t = s` too). Each :math:`D_t` is a maximum of functions affine in :math:`\eta_t`,
hence convex; with ``"pull"`` :math:`J` is convex, with ``"similarity"`` (concave in
:math:`\eta`) in general it is not. MTMKL *minimises* :math:`J` (min over kernels of the
max over the dual: the kernel that gives the smallest regularised risk).

**Gradient (Danskin).** :math:`D_t` is a maximum over :math:`a` of a function whose only
dependence on :math:`\eta_t` is :math:`-\frac12\sum_m\eta_{tm}a^TK_{m,t}a`, with a unique
maximiser :math:`a_t`; so

.. math::

    \frac{\partial D_t}{\partial\eta_{tm}} = -\tfrac12\,a_t^T K_{m,t}\,a_t \le 0,

no differentiation through the solve. A modality on which the current dual solution has a
large "alignment" :math:`a_t^TK_{m,t}a_t` (it separates the classes with large margin
contributions) has the most negative derivative, so descent moves weight towards it.
Regularisers, exactly: ``"pull"`` :math:`\partial R/\partial\eta_t = 2(\eta_t - \bar\eta)`
(the terms through :math:`\bar\eta` cancel since :math:`\sum_t(\eta_t-\bar\eta) = 0`);
``"similarity"`` :math:`\partial R/\partial\eta_t = -2\sum_{s\neq t}\eta_s`. (The
original's gradients, :math:`2\sum_s(\eta_t-\eta_s)` and :math:`-\sum_s\eta_s` for its own
regularisers, are half the true ones.)

**Optimiser** (:func:`optimise_eta`, one ``lax.while_loop``; from uniform weights). Every
step takes a feasible trial point, accepted by the Armijo test

.. math::

    J(\eta') \le J(\eta) + \sigma\,\langle g, \eta' - \eta\rangle + \epsilon_J,
    \qquad \sigma = 10^{-4},\ \langle g, \eta'-\eta\rangle < 0,

(:math:`\epsilon_J = 16\,\epsilon_{\rm dtype}|J|`, a rounding slack), so :math:`J` never
increases (beyond that slack). Two step rules:

* ``"newton"`` (default, the model's): a **projected Newton** step. The Hessian of
  :math:`D_t` in :math:`\eta_t` is exact and cheap (:func:`_newton_pieces`: ``P``
  triangular solves with the Cholesky factor of the solve); the quadratic model with these
  blocks plus the regulariser's curvature is minimised over the product of simplices
  (:func:`newton_direction`: FISTA with Euclidean projections onto the simplices), and the
  trial points are :math:`\eta + \tau d`, :math:`\tau = 1, 1/2, \dots` (feasible:
  convex combinations). Weights reach exact zeros, and the convergence is fast
  (typically 5 to 10 steps to the optimum of SLSQP to 1e-10 relative);
* ``"eg"``: **exponentiated gradient** (mirror descent with the entropy):
  :math:`\eta'_{tm} \propto \eta_{tm}\exp(-s g_{tm})` (log space), :math:`s` halved
  until accepted and doubled after each accepted step, first
  :math:`s_0 = 1/\max_t(\max_m g_{tm} - \min_m g_{tm})`;
  :math:`\langle g,\eta'-\eta\rangle \le -\mathrm{KL}(\eta'\|\eta)/s`. Simple, but
  slow (sublinear) when the optimum has weights at 0, which it approaches geometrically
  only; kept as a reference.

Both stop when an accepted step changes :math:`J` by at most ``tol`` relative to
:math:`\max(|J|, 1)` (converged), when no trial step is accepted in 40 halvings (converged
if the Frank-Wolfe gap :math:`\sum_t(\langle g_t,\eta_t\rangle - \min_m g_{tm})`, an
upper bound on :math:`J - J^*` for convex :math:`J`, is at most
:math:`\sqrt{\mathrm{tol}}(1+|J|)`), or after ``max_iter`` steps (not converged).
``tol`` is floored at :math:`10\,\epsilon_{\rm dtype}`. The relative change of :math:`J`
is a sound test for the Newton steps (full steps near the optimum); for ``"eg"`` it
stops early at a small step (the Frank-Wolfe gap in :class:`EtaResult` says how far).

**Scores and probabilities.** At the final weights, task :math:`t`'s decision score is
:math:`f_t(x) = \sum_i a_{ti}\sum_m\eta_{tm}c_m k_m(x_i, x) + b_t`; Platt scaling
(:func:`~mtl_jax.models.baselines.solvers.platt_scaling`) maps the in-sample scores to probabilities as the ``"lssvm"``
baseline does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import cho_solve
from jaxtyping import Array, Float

from mtl_jax.models.baselines.solvers import bordered_kkt_solve, platt_scaling
from mtl_jax.models.mtmkl.kernels import scaled_grams

REGULARISERS = ("pull", "similarity")
_HIGHEST = lax.Precision.HIGHEST
_dot = functools.partial(jnp.matmul, precision=_HIGHEST)
_ARMIJO = 1e-4
_HALVINGS = 40


class Problem(NamedTuple):
    """The padded per-task data of the eta optimisation (leading task axis ``K``).

    Attributes:
        grams: normalised modality kernels on each task's rows ``[K, P, m, m]``, zero in
            the rows and columns of padding.
        labels: :math:`\\pm1` on a task's rows, 0 on padding ``[K, m]``.
        ridge: :math:`1/(C w_i)` on a task's rows, 1 on padding ``[K, m]`` (the diagonal
            :math:`\\Lambda` of the dual, with padding made harmless).
        inside: 1 on a task's rows, 0 on padding ``[K, m]``.
    """

    grams: Array
    labels: Array
    ridge: Array
    inside: Array


class EtaResult(NamedTuple):
    """The optimised kernel weights and the LS-SVMs at them.

    Attributes:
        eta: kernel weights ``[K, P]`` (rows on the simplex).
        alpha: dual solutions :math:`a_t` ``[K, m]`` (0 on padding).
        b: biases ``[K]``.
        objective: :math:`J` at ``eta`` ``[]``.
        trace: :math:`J` after each accepted step, ``trace[0]`` at the start; NaN past the
            last step ``[max_iter + 1]``.
        n_iter: accepted steps ``[]``.
        converged: ``[]`` bool (module docstring).
        gap: the Frank-Wolfe gap at ``eta`` ``[]``.
    """

    eta: Array
    alpha: Array
    b: Array
    objective: Array
    trace: Array
    n_iter: Array
    converged: Array
    gap: Array


# ------------------------------------------------------------------------- problem
def build_problem(Xp, yp, wp, mask, gamma, scale, kind: str, C) -> Problem:
    """The padded problem from :func:`~mtl_jax.models.baselines.solvers.pad_by_task` blocks.

    Args:
        Xp: ``[K, m, q]`` rows; yp: ``[K, m]`` labels (0/1 or -1/+1; positive means +1);
        wp: ``[K, m]`` weights (0 on padding and masked rows).
        mask, gamma, scale: modality membership ``[P, q]``, RBF :math:`\\gamma_m` ``[P]``,
            normalisation constants :math:`c_m` ``[P]`` (:mod:`.kernels`).
        kind: the kernel (static).
        C: the LS-SVM regularisation ``[]``.
    """
    dtype = Xp.dtype
    inside = (wp > 0).astype(dtype)
    grams = jax.vmap(lambda X: scaled_grams(X, X, mask, gamma, scale, kind))(Xp)
    grams = grams * (inside[:, None, :, None] * inside[:, None, None, :])
    labels = jnp.where(wp > 0, jnp.where(yp > 0, 1.0, -1.0), 0.0).astype(dtype)
    ridge = jnp.where(wp > 0, 1.0 / (jnp.asarray(C, dtype) * jnp.where(wp > 0, wp, 1.0)), 1.0)
    return Problem(grams, labels, ridge, inside)


# ------------------------------------------------------------- LS-SVM, one task
def lssvm_kernel_solve(kernel: Float[Array, "m m"], labels: Float[Array, " m"], ridge: Float[Array, " m"],
                       inside: Float[Array, " m"]) -> tuple[Array, Array]:
    r"""One task's LS-SVM on a precomputed kernel: ``(a [m], b [])`` of
    :math:`(K + \Lambda)a + b1 = y`, :math:`1^Ta = 0` over the rows with ``inside = 1``.

    ``kernel`` must be zero in the rows and columns of padding, ``ridge`` 1 there.
    """
    alpha, b, _, _, _ = bordered_kkt_solve(kernel + jnp.diag(ridge), labels, inside)
    return alpha, b


def task_kernels(eta: Float[Array, "K P"], problem: Problem) -> Float[Array, "K m m"]:
    r""":math:`K_t = \sum_m \eta_{tm} K_{m,t}` for every task."""
    return jnp.einsum("kp,kpij->kij", eta, problem.grams, precision=_HIGHEST)


def solve_tasks(eta: Float[Array, "K P"], problem: Problem) -> tuple[Array, Array]:
    """Every task's LS-SVM at weights ``eta``: ``(a [K, m], b [K])`` (vmapped Cholesky solves)."""
    return jax.vmap(lssvm_kernel_solve)(task_kernels(eta, problem), problem.labels, problem.ridge, problem.inside)


def dual_values(eta, alpha, problem: Problem) -> Float[Array, " K"]:
    r""":math:`a_t^Ty - \frac12 a_t^T(K_t + \Lambda)a_t` per task (:math:`D_t` at the maximiser)."""
    Ka = jnp.einsum("kij,kj->ki", task_kernels(eta, problem), alpha, precision=_HIGHEST) + problem.ridge * alpha
    return jnp.sum(alpha * problem.labels, axis=1) - 0.5 * jnp.sum(alpha * Ka, axis=1)


def alignments(alpha, problem: Problem) -> Float[Array, "K P"]:
    r""":math:`a_t^T K_{m,t} a_t` ``[K, P]``."""
    return jnp.einsum("ki,kpij,kj->kp", alpha, problem.grams, alpha, precision=_HIGHEST)


# --------------------------------------------------------------------- regularisers
def regulariser(eta: Float[Array, "K P"], kind: str) -> Float[Array, ""]:
    r""":math:`R(\eta)`: ``"pull"`` :math:`\sum_t\|\eta_t-\bar\eta\|^2`,
    ``"similarity"`` :math:`-\sum_{t\ne s}\eta_t^T\eta_s`."""
    if kind == "pull":
        return jnp.sum((eta - jnp.mean(eta, axis=0)) ** 2)
    if kind == "similarity":
        total = jnp.sum(eta, axis=0)
        return -(jnp.sum(total * total) - jnp.sum(eta * eta))
    raise ValueError(f"regulariser must be one of {REGULARISERS}, not {kind!r}")


def regulariser_gradient(eta: Float[Array, "K P"], kind: str) -> Float[Array, "K P"]:
    r"""The exact :math:`\partial R/\partial\eta` ``[K, P]``: ``"pull"`` :math:`2(\eta_t-\bar\eta)`,
    ``"similarity"`` :math:`-2\sum_{s\ne t}\eta_s`."""
    if kind == "pull":
        return 2.0 * (eta - jnp.mean(eta, axis=0))
    if kind == "similarity":
        return -2.0 * (jnp.sum(eta, axis=0) - eta)
    raise ValueError(f"regulariser must be one of {REGULARISERS}, not {kind!r}")


# ------------------------------------------------------------------------ objective
def objective(eta, problem: Problem, V, kind: str) -> Float[Array, ""]:
    r""":math:`J(\eta) = \sum_t D_t(\eta_t) + V R(\eta)`, with :math:`D_t` from the solve
    (differentiable through the solve: the reference the Danskin gradient is tested against)."""
    alpha, _ = solve_tasks(eta, problem)
    return jnp.sum(dual_values(eta, alpha, problem)) + V * regulariser(eta, kind)


def objective_and_gradient(eta, problem: Problem, V, kind: str):
    r"""``(J, dJ/deta [K, P], a [K, m], b [K])``: the gradient by Danskin's theorem,
    :math:`-\frac12 a_t^TK_{m,t}a_t + V\,\partial R/\partial\eta_{tm}` (no derivative of the solve)."""
    alpha, b = solve_tasks(eta, problem)
    alpha, b = lax.stop_gradient(alpha), lax.stop_gradient(b)
    value = jnp.sum(dual_values(eta, alpha, problem)) + V * regulariser(eta, kind)
    gradient = -0.5 * alignments(alpha, problem) + V * regulariser_gradient(eta, kind)
    return value, gradient, alpha, b


def frank_wolfe_gap(eta, gradient) -> Float[Array, ""]:
    r""":math:`\sum_t(\langle g_t,\eta_t\rangle - \min_m g_{tm}) \ge 0`: zero exactly at a stationary point."""
    return jnp.sum(jnp.sum(gradient * eta, axis=1) - jnp.min(gradient, axis=1))


def _newton_pieces(kernel, grams, labels, ridge, inside):
    r"""One task: ``(a [m], b [], H [P, P])``, the LS-SVM and the Hessian of :math:`D_t` in :math:`\eta_t`.

    Differentiating the KKT system gives :math:`\partial a/\partial\eta_n = -\Pi K_n a` with
    :math:`\Pi = M^{-1} - M^{-1}11^TM^{-1}/(1^TM^{-1}1)`, :math:`M = K_t + \Lambda`, so
    :math:`H_{mn} = u_m^T\Pi u_n` with :math:`u_m = K_{m,t}a` (positive semi-definite: each
    :math:`D_t` is convex), from the same Cholesky factor as the solve (``P`` more
    triangular solves).
    """
    alpha, b, e, factor, safe = bordered_kkt_solve(kernel + jnp.diag(ridge), labels, inside)
    U = jnp.einsum("pij,j->ip", grams, alpha, precision=_HIGHEST)  # [m, P]
    Ue = _dot(U.T, e)
    H = _dot(U.T, cho_solve(factor, U)) - jnp.outer(Ue, Ue) / safe
    return alpha, b, 0.5 * (H + H.T)


def objective_gradient_hessian(eta, problem: Problem, V, kind: str):
    r"""``(J, dJ/deta [K, P], H [K, P, P], a [K, m], b [K])``: :func:`objective_and_gradient` plus the
    per-task Hessian blocks :math:`\partial^2 D_t/\partial\eta_t^2` (:func:`_newton_pieces`)."""
    alpha, b, H = jax.vmap(_newton_pieces)(task_kernels(eta, problem), problem.grams, problem.labels, problem.ridge,
                                            problem.inside)
    value = jnp.sum(dual_values(eta, alpha, problem)) + V * regulariser(eta, kind)
    gradient = -0.5 * alignments(alpha, problem) + V * regulariser_gradient(eta, kind)
    return value, gradient, H, alpha, b


def project_simplex(v: Float[Array, " P"]) -> Float[Array, " P"]:
    r"""Euclidean projection onto the simplex :math:`\{z \ge 0, 1^Tz = 1\}` (sort-based, Duchi et al. 2008)."""
    u = jnp.sort(v)[::-1]
    cumulative = jnp.cumsum(u) - 1.0
    index = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    rho = jnp.sum(u - cumulative / index > 0)
    theta = cumulative[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _model_hessian_product(d, H, V, kind: str):
    r""":math:`B d`: the blocks :math:`H_t d_t` plus :math:`V` times the regulariser's curvature
    (``"pull"``: its exact Hessian, :math:`2(d_t - \bar d)`; ``"similarity"``: its convex part
    :math:`2d_t`, the concave :math:`-2\sum_s d_s` dropped so that :math:`B \succeq 0`)."""
    curvature = 2.0 * (d - jnp.mean(d, axis=0)) if kind == "pull" else 2.0 * d
    return jnp.einsum("kpq,kq->kp", H, d, precision=_HIGHEST) + V * curvature


def newton_direction(eta, gradient, H, V, kind: str, iterations: int = 200):
    r"""The projected Newton direction :math:`d = z - \eta`, :math:`z` minimising the quadratic model

    .. math::

        m(z) = g^T(z-\eta) + \tfrac12(z-\eta)^TB(z-\eta)\quad\text{over the product of simplices}

    (:func:`_model_hessian_product`) by FISTA with per-task steps :math:`1/(\lambda_{\max}(H_t) + 2V)`
    (a block metric that dominates :math:`B`) and function-value restarts, from
    :math:`z = \eta`. Returns ``(d [K, P], m(z))``; ``d = 0`` when the model does not decrease.
    """
    dtype = eta.dtype
    lipschitz = jax.vmap(lambda h: jnp.linalg.eigvalsh(h)[-1])(H) + 2.0 * V
    inverse_step = jnp.maximum(lipschitz, jnp.finfo(dtype).eps * (1.0 + jnp.max(jnp.abs(gradient))))[:, None]

    def model(z):
        d = z - eta
        return jnp.sum(gradient * d) + 0.5 * jnp.sum(d * _model_hessian_product(d, H, V, kind))

    def body(_, carry):
        z, y, t, value = carry
        grad = gradient + _model_hessian_product(y - eta, H, V, kind)
        z_new = jax.vmap(project_simplex)(y - grad / inverse_step)
        value_new = model(z_new)
        restart = value_new > value
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = jnp.where(restart, z, z_new + ((t - 1.0) / t_new) * (z_new - z))
        return (jnp.where(restart, z, z_new), y_new, jnp.where(restart, 1.0, t_new),
                jnp.where(restart, value, value_new))

    start = (eta, eta, jnp.asarray(1.0, dtype), jnp.asarray(0.0, dtype))
    z, _, _, value = lax.fori_loop(0, iterations, body, start)
    return jnp.where(value < 0, z - eta, 0.0), jnp.minimum(value, 0.0)


class _State(NamedTuple):
    iteration: Array
    eta: Array
    value: Array
    gradient: Array
    hessian: Array
    alpha: Array
    b: Array
    step: Array
    stop: Array
    converged: Array
    trace: Array


OPTIMISERS = ("newton", "eg")


@functools.partial(jax.jit, static_argnames=("kind", "max_iter", "method"))
def optimise_eta(problem: Problem, V, kind: str, eta0=None, tol=1e-7, max_iter: int = 500,
                 method: str = "newton") -> EtaResult:
    """Minimises :math:`J` over the product of simplices from ``eta0 [K, P]`` (default uniform).

    ``method="newton"`` (default): projected Newton steps (:func:`newton_direction`,
    exact per-task Hessians) along :math:`\\eta + \\tau d`, :math:`\\tau \\in \\{1, 1/2,
    \\dots\\}`; ``"eg"``: exponentiated gradient (module docstring). Both accept a step by
    the Armijo test and stop on the relative change of :math:`J`.

    Args:
        problem: :func:`build_problem`.
        V: regulariser weight ``[]`` (``>= 0``).
        kind: ``"pull"`` or ``"similarity"`` (static).
        eta0: starting weights ``[K, P]`` on the simplices (positive entries for ``"eg"``).
        tol: relative change of :math:`J` that stops it (floored at ``10 eps``).
        max_iter: most accepted steps (static: the trace's length).
        method: ``"newton"`` or ``"eg"`` (static).

    Returns:
        :class:`EtaResult`.
    """
    if method not in OPTIMISERS:
        raise ValueError(f"method must be one of {OPTIMISERS}, not {method!r}")
    K, P = problem.grams.shape[:2]
    dtype = problem.grams.dtype
    eps = jnp.finfo(dtype).eps
    tol = jnp.maximum(jnp.asarray(tol, dtype), 10 * eps)
    V = jnp.asarray(V, dtype)
    eta0 = jnp.full((K, P), 1.0 / P, dtype) if eta0 is None else jnp.asarray(eta0, dtype)
    value0, gradient0, hessian0, alpha0, b0 = objective_gradient_hessian(eta0, problem, V, kind)
    spread = jnp.max(jnp.max(gradient0, axis=1) - jnp.min(gradient0, axis=1))
    step0 = (jnp.asarray(1.0, dtype) if method == "newton"
             else 1.0 / jnp.maximum(spread, jnp.finfo(dtype).tiny ** 0.5))
    trace0 = jnp.full((max_iter + 1,), jnp.nan, dtype).at[0].set(value0)

    def body(state: _State) -> _State:
        if method == "newton":
            direction, _ = newton_direction(state.eta, state.gradient, state.hessian, V, kind)
            first_step = jnp.asarray(1.0, dtype)
        else:
            first_step = state.step

        def candidate(step):
            if method == "newton":
                return state.eta + step * direction
            log_eta = jax.nn.log_softmax(jnp.log(state.eta) - step * state.gradient, axis=1)
            return jnp.exp(log_eta)

        def search_cond(carry):
            halvings, _, accept, _ = carry
            return ~accept & (halvings < _HALVINGS)

        def search_body(carry):
            halvings, step, _, _ = carry
            step = jnp.where(halvings > 0, 0.5 * step, step)
            eta = candidate(step)
            found = objective_gradient_hessian(eta, problem, V, kind)
            decrease = jnp.sum(state.gradient * (eta - state.eta))
            accept = ((found[0] <= state.value + _ARMIJO * decrease + 16 * eps * jnp.abs(state.value))
                      & (decrease < 0) & jnp.isfinite(found[0]))
            return halvings + 1, step, accept, (eta, *found)

        first = (jnp.asarray(0), first_step, jnp.asarray(False),
                 (state.eta, state.value, state.gradient, state.hessian, state.alpha, state.b))
        _, step, accept, (eta, value, gradient, hessian, alpha, b) = lax.while_loop(search_cond, search_body, first)
        change = jnp.abs(state.value - value) / jnp.maximum(jnp.abs(value), 1.0)
        gap = frank_wolfe_gap(state.eta, state.gradient)
        converged = jnp.where(accept, change <= tol, gap <= jnp.sqrt(tol) * (1.0 + jnp.abs(state.value)))
        iteration = state.iteration + accept.astype(state.iteration.dtype)
        keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        return _State(iteration, keep(eta, state.eta), keep(value, state.value), keep(gradient, state.gradient),
                      keep(hessian, state.hessian), keep(alpha, state.alpha), keep(b, state.b), 2.0 * step,
                      converged | ~accept, converged,
                      state.trace.at[iteration].set(jnp.where(accept, value, state.trace[iteration])))

    def cond(state: _State):
        return ~state.stop & (state.iteration < max_iter)

    start = _State(jnp.asarray(0), eta0, value0, gradient0, hessian0, alpha0, b0, step0, jnp.asarray(False),
                   jnp.asarray(False), trace0)
    final = lax.while_loop(cond, body, start)
    return EtaResult(final.eta, final.alpha, final.b, final.value, final.trace, final.iteration, final.converged,
                     frank_wolfe_gap(final.eta, final.gradient))


# ----------------------------------------------------------------------- Platt scaling
def in_sample_scores(eta, alpha, b, problem: Problem) -> Float[Array, "K m"]:
    r""":math:`f_t(x_i) = (K_t a_t)_i + b_t` on each task's own rows ``[K, m]`` (padding: ``b_t``)."""
    return jnp.einsum("kij,kj->ki", task_kernels(eta, problem), alpha, precision=_HIGHEST) + b[:, None]


@functools.partial(jax.jit, static_argnames=("kind", "regulariser_kind", "max_iter"))
def fit_mtmkl(Xp, yp, wp, mask, gamma, scale, kind: str, C, V, regulariser_kind: str, tol, max_iter: int, platt_C):
    """The whole fit in one compiled program: Gram matrices, eta optimisation, Platt scaling.

    Returns:
        ``(EtaResult, platt_slope [K], platt_intercept [K], platt_converged [])``.
    """
    problem = build_problem(Xp, yp, wp, mask, gamma, scale, kind, C)
    result = optimise_eta(problem, V, regulariser_kind, None, tol, max_iter, "newton")
    scores = in_sample_scores(result.eta, result.alpha, result.b, problem)
    slope, intercept, platt_converged = platt_scaling(scores, yp, wp, platt_C)
    return result, slope, intercept, platt_converged


__all__ = ["EtaResult", "Problem", "REGULARISERS", "alignments", "build_problem", "dual_values", "fit_mtmkl",
           "frank_wolfe_gap", "in_sample_scores", "lssvm_kernel_solve", "objective", "objective_and_gradient",
           "optimise_eta", "regulariser", "regulariser_gradient", "solve_tasks", "task_kernels"]
