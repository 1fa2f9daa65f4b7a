r"""Densities of the mixture GLMM: the complete-data terms, the Laplace marginal, and the
population-level predictive for tasks unseen in training.

For row ``j`` of task ``i`` with random effects :math:`u_i = (a_i, b_i)`:

.. math::

    \log p(y_j \mid u_i) = \log\sum_h \pi_h(x^m_j, a_i)\,
        \mathcal N_p(y_j;\ W_h^T x^c_j + b_{hi},\ \Sigma_h),
    \qquad a_i \sim \mathcal N(0, \Lambda),\quad b_{hik} \sim \mathcal N(0, \phi_{hk}).

Rows whose task id is at or above ``K`` (the number of tasks of the parameters) belong to
tasks unseen in training: their random effects are integrated out (component effects in
closed form, mixing effects by Gauss-Hermite quadrature).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from mtl_jax.linalg import cho_solve, cholesky, diag_embed, psd_cholesky, segment_sum, solve_triangular
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams

LOG_2PI = 1.8378770664093453


def mixing_logits(v, x_mix, a_rows):
    """Logits ``[n, g]``: ``v_h^T x + a_h`` for ``h < g`` and ``0`` for the reference."""
    logits = x_mix @ v.T + a_rows
    return jnp.concatenate([logits, jnp.zeros(logits.shape[:1] + (1,), logits.dtype)], axis=1)


def row_effects(effects: Array, task: Array) -> Array:
    """Each row's task effects ``effects[task]``, zero for unseen tasks (``task >= K``)."""
    num_tasks = effects.shape[0]
    seen = task < num_tasks
    rows = effects[jnp.minimum(task, max(num_tasks - 1, 0))] if num_tasks else jnp.zeros(
        task.shape + effects.shape[1:], effects.dtype)
    return jnp.where(seen.reshape(seen.shape + (1,) * (rows.ndim - 1)), rows, 0.0)


def seen_rows(params: MixtureParams, design: MixtureDesign) -> Bool[Array, " n"]:
    """Whether each row's task was seen in training (has predicted random effects)."""
    return design.task < params.mixing_effects.shape[0]


def linear_predictors(params: MixtureParams, design: MixtureDesign, a, b):
    """Mixing logits ``[n, g]`` and component means ``[n, g, p]`` given effects ``a``, ``b``."""
    logits = mixing_logits(params.mixing_coef, design.x_mix, row_effects(a, design.task))
    means = jnp.einsum("nq,gqp->ngp", design.x_comp, params.component_coef) + row_effects(b, design.task)
    return logits, means


def log_joint(logits, means, cov, y):
    """``log pi_h + log N(y; mean_h, Sigma_h)``, ``[n, g]``."""
    return jax.nn.log_softmax(logits, axis=-1) + mvn_logpdf(y[:, None, :], means, cov)


def mvn_logpdf(y, mean, cov):
    """``log N_p(y; mean_h, Sigma_h)`` for ``mean [..., g, p]``, ``cov [g, p, p]``.

    Each ``Sigma_h`` is factorised once and the residuals whitened by a triangular solve;
    a distribution object would factorise it for every observation.
    """
    chol = psd_cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    inv_chol = solve_triangular(chol, eye)
    white = jnp.einsum("gkl,...gl->...gk", inv_chol, y - mean)
    half_logdet = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return -0.5 * (cov.shape[-1] * LOG_2PI + jnp.sum(white**2, axis=-1)) - half_logdet


def normal_logpdf(x, var):
    """Elementwise ``log N(x; 0, var)``; zero where ``var`` is zero (effects switched off)."""
    safe = jnp.where(var > 0, var, 1.0)
    return jnp.where(var > 0, -0.5 * (LOG_2PI + jnp.log(safe) + x**2 / safe), 0.0)


def mvn_zero_logpdf(x: Float[Array, "K d"], cov: Float[Array, "d d"]) -> Float[Array, " K"]:
    """``log N_d(x_i; 0, cov)`` per row; zeros for ``d = 0`` or an all-zero (switched-off) ``cov``."""
    d = cov.shape[-1]
    if d == 0:
        return jnp.zeros(x.shape[:1], x.dtype)
    active = jnp.trace(cov) > 0
    chol = psd_cholesky(jnp.where(active, cov, jnp.eye(d, dtype=cov.dtype)))
    white = solve_triangular(chol, x.T)
    value = -0.5 * (d * LOG_2PI + jnp.sum(white**2, axis=0)) - jnp.log(jnp.diagonal(chol)).sum()
    return jnp.where(active, value, 0.0)


# --------------------------------------------------------------------- Laplace marginal
def laplace_log_marginal(
    params: MixtureParams,
    design: MixtureDesign,
    *,
    use_mixing: bool,
    use_component: bool,
    newton_steps: int = 20,
) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    r"""Per-task Laplace approximation of the log-likelihood with the random effects integrated out.

    For each task, with :math:`f_i(u)` its log-likelihood plus the log prior of
    :math:`u = (a_i, b_i)` (dimension ``r``):

    .. math::

        \log\int e^{f_i(u)}\,du \approx f_i(\hat u) + \tfrac r2\log 2\pi
            - \tfrac12 \log\det(-\nabla^2 f_i(\hat u)).

    The mode :math:`\hat u` is found from the BLUPs by Newton steps with step halving
    (every accepted step increases :math:`f_i`). Exact when the integrand is Gaussian
    (the linear mixed model).

    Returns:
        ``(value, ok)``: the approximation and whether it is valid: every task's mode was
        reached (Newton decrement below ``sqrt(eps)`` relative to the task's size) and
        every :math:`-\nabla^2 f_i(\hat u)` is positive definite. A caller must not use
        ``value`` when ``ok`` is false.
    """
    g = params.component_coef.shape[0]
    K = params.mixing_effects.shape[0]
    p = design.y.shape[1]
    dtype = design.y.dtype
    zeros_a, zeros_b = jnp.zeros_like(params.mixing_effects), jnp.zeros_like(params.component_effects)
    base_logits, base_means = linear_predictors(params, design, zeros_a, zeros_b)
    prior_cov = _effects_prior_cov(params, use_mixing, use_component)
    r = prior_cov.shape[0]
    prior_chol = psd_cholesky(prior_cov)
    prior_prec = cho_solve(prior_chol, jnp.eye(r, dtype=dtype))
    prior_logdet = 2.0 * jnp.log(jnp.diagonal(prior_chol)).sum()

    def unpack(u):  # u: [r] -> (a [g-1], b [g, p])
        a = u[: g - 1] if use_mixing else jnp.zeros((g - 1,), u.dtype)
        b = u[(g - 1) if use_mixing else 0:].reshape(g, p) if use_component else jnp.zeros((g, p), u.dtype)
        return a, b

    def row_loglik(u, logits, means, y):
        a, b = unpack(u)
        full = logits + jnp.concatenate([a, jnp.zeros((1,), a.dtype)])
        return jax.nn.logsumexp(jax.nn.log_softmax(full) + mvn_logpdf(y, means + b, params.component_cov))

    row_value = jax.vmap(row_loglik)
    row_grad = jax.vmap(jax.grad(row_loglik))
    row_hess = jax.vmap(jax.hessian(row_loglik))
    # Rows of unseen tasks have no effects of their own here: they are left out.
    task = jnp.where(design.task < K, design.task, K)

    def task_value(u):
        rows = (u[jnp.minimum(task, K - 1)], base_logits, base_means, design.y)
        prior = -0.5 * (r * LOG_2PI + prior_logdet + jnp.einsum("ir,rs,is->i", u, prior_prec, u))
        return segment_sum(row_value(*rows), task, K + 1)[:K] + prior

    def task_derivatives(u):
        rows = (u[jnp.minimum(task, K - 1)], base_logits, base_means, design.y)
        grad = segment_sum(row_grad(*rows), task, K + 1)[:K] - u @ prior_prec
        hess = segment_sum(row_hess(*rows), task, K + 1)[:K] - prior_prec
        return grad, hess

    def newton_direction(u):
        grad, hess = task_derivatives(u)
        # Modified Newton: where -H is not positive definite (far from the mode), shift
        # its spectrum so the step is still an ascent direction.
        neg = -hess
        eig = jnp.linalg.eigvalsh(neg)
        shift = jnp.where(eig[:, 0] > 0, 0.0, 1e-3 * (1.0 + jnp.abs(eig[:, -1])) - eig[:, 0])
        neg_chol = psd_cholesky(neg + shift[:, None, None] * jnp.eye(r, dtype=dtype))
        step = cho_solve(neg_chol, grad[..., None])[..., 0]
        return step, jnp.einsum("ir,ir->i", grad, step)

    def newton(_, u):
        step, _ = newton_direction(u)
        value = task_value(u)

        def halve(state):
            t, new_value = state
            t = jnp.where(new_value >= value, t, t / 2)
            return t, task_value(u + t[:, None] * step)

        def needs_halving(state):
            t, new_value = state
            return jnp.any(~(new_value >= value) & (t > 2.0**-20))

        one = jnp.ones((K,), dtype)
        t, new_value = jax.lax.while_loop(needs_halving, halve, (one, task_value(u + step)))
        accept = new_value >= value
        return jnp.where(accept[:, None], u + t[:, None] * step, u)

    parts = ([params.mixing_effects] if use_mixing else []) + (
        [params.component_effects.reshape(K, -1)] if use_component else [])
    u = jax.lax.fori_loop(0, newton_steps, newton, jnp.concatenate(parts, axis=1))
    _, hess = task_derivatives(u)
    _, decrement = newton_direction(u)
    eps = jnp.finfo(dtype).eps
    neg_chol = cholesky(-hess)
    positive = jnp.all(jnp.isfinite(neg_chol)) & jnp.all(jnp.diagonal(neg_chol, axis1=-2, axis2=-1) > 0)
    values = task_value(u)
    counts = segment_sum(jnp.ones_like(design.task, dtype), task, K + 1)[:K]
    reached = jnp.all(jnp.abs(decrement) <= jnp.sqrt(eps) * (1.0 + counts))
    logdet = 2.0 * jnp.log(jnp.diagonal(neg_chol, axis1=-2, axis2=-1)).sum(-1)
    value = jnp.sum(values + 0.5 * r * LOG_2PI - 0.5 * logdet)
    if design.num_tasks > K:  # rows of tasks without effects: integrate them out per row
        unseen_rows = population_log_predictive(params, design, use_mixing, use_component)
        value = value + jnp.sum(jnp.where(design.task >= K, unseen_rows, 0.0))
    return value, positive & reached & jnp.isfinite(value)


def _effects_prior_cov(params: MixtureParams, use_mixing: bool, use_component: bool):
    """Block-diagonal prior covariance of one task's ``u = (a_i, b_i)`` ``[r, r]``."""
    blocks = ([params.mixing_cov] if use_mixing else []) + (
        [diag_embed(params.component_var.reshape(-1))] if use_component else [])
    return jax.scipy.linalg.block_diag(*blocks)


# ------------------------------------------------------------- unseen tasks (population)
def gauss_hermite_nodes(dim: int, dtype, budget: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    r"""Tensor-product Gauss-Hermite rule for :math:`E f(z)`, :math:`z \sim \mathcal N(0, I_{dim})`.

    ``k`` points per dimension with ``k^dim <= budget`` (``k`` between 3 and 60):
    60 points for one dimension, 60 for two, 16 for three, 3 for seven.

    Returns:
        ``nodes [k^dim, dim]`` and ``log_weights [k^dim]`` (the weights sum to one).
    """
    if dim == 0:
        return np.zeros((1, 0), dtype), np.zeros((1,), dtype)
    k = int(np.clip(np.floor(budget ** (1.0 / dim)), 3, 60))
    x, w = np.polynomial.hermite.hermgauss(k)
    nodes = np.array(list(itertools.product(x * np.sqrt(2.0), repeat=dim)))
    log_w = np.log(np.array(list(itertools.product(w / np.sqrt(np.pi), repeat=dim)))).sum(-1)
    return nodes.astype(dtype), log_w.astype(dtype)


def population_mixing(params: MixtureParams, design: MixtureDesign, use_mixing: bool):
    """Nodes of the mixing effects ``a = L z`` and their log weights, for integrating ``a`` out."""
    g1 = params.mixing_coef.shape[0]
    dim = g1 if use_mixing else 0
    nodes, log_w = gauss_hermite_nodes(dim, design.y.dtype)
    if dim:
        nodes = jnp.asarray(nodes) @ psd_cholesky(params.mixing_cov).T
    else:
        nodes = jnp.zeros((1, g1), design.y.dtype)
    return nodes, jnp.asarray(log_w)


def population_log_predictive(params, design, use_mixing: bool, use_component: bool) -> Float[Array, " n"]:
    r"""Log density of each row with its task's effects integrated out, ``[n]``.

    .. math::

        \log \int \sum_h \pi_h(x^m, a)\, \mathcal N_p(y;\ W_h^T x^c,\ \Sigma_h +
        \operatorname{diag}\phi_h)\ \mathcal N(a; 0, \Lambda)\, da,

    the component effects in closed form and ``a`` by Gauss-Hermite quadrature
    (:func:`gauss_hermite_nodes`).
    """
    nodes, log_w = population_mixing(params, design, use_mixing)
    base = design.x_mix @ params.mixing_coef.T  # [n, g-1]
    logits = base[None] + nodes[:, None, :]  # [m, n, g-1]
    logits = jnp.concatenate([logits, jnp.zeros(logits.shape[:2] + (1,), logits.dtype)], axis=-1)
    cov = params.component_cov + (diag_embed(params.component_var) if use_component else 0.0)
    means = jnp.einsum("nq,gqp->ngp", design.x_comp, params.component_coef)
    dens = mvn_logpdf(design.y[:, None, :], means, cov)  # [n, g]
    per_node = jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + dens[None], axis=-1)  # [m, n]
    return jax.nn.logsumexp(per_node + log_w[:, None], axis=0)


def population_proportions(params, design, use_mixing: bool) -> Float[Array, "n g"]:
    r"""Mixing proportions with the mixing effects integrated out, :math:`E_a\,\pi_h(x^m, a)`, ``[n, g]``."""
    nodes, log_w = population_mixing(params, design, use_mixing)
    base = design.x_mix @ params.mixing_coef.T
    logits = base[None] + nodes[:, None, :]
    logits = jnp.concatenate([logits, jnp.zeros(logits.shape[:2] + (1,), logits.dtype)], axis=-1)
    return jnp.einsum("m,mng->ng", jnp.exp(log_w), jax.nn.softmax(logits, axis=-1))
