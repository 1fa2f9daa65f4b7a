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

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from mtl_jax.linalg import (
    cho_solve,
    cholesky,
    psd_cholesky,
    row_products,
    segment_sum,
    segment_sums,
    solve_triangular,
)
from mtl_jax.models.mixture_glmm.families import Family
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams

LOG_2PI = 1.8378770664093453


def mixing_logits(v, x_mix, a_rows):
    """Logits ``[n, g]``: ``v_h^T x + a_h`` for ``h < g`` and ``0`` for the reference."""
    logits = row_products(x_mix, v.T) + a_rows
    return jnp.concatenate([logits, jnp.zeros(logits.shape[:1] + (1,), logits.dtype)], axis=1)


def shifted_logits(logits: Float[Array, "... g"]) -> tuple[Float[Array, "... g"], Float[Array, "..."]]:
    r"""``(logits - m, sum_h exp(logits_h - m))`` with ``m`` each row's largest logit.

    :math:`\log\pi_h` is ``shifted_h - log(partition)``, the partition in ``[1, g]``. The
    E-step divides it out of the row's likelihood and takes one logarithm per row (XLA's
    CPU code computes a float64 logarithm by a scalar library call, the costliest operation
    of a mixture's EM step at ``n = 10^5``).
    """
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return shifted, jnp.exp(shifted).sum(-1)


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
    """Mixing logits ``[n, g]`` and component linear predictors ``[n, g, p]`` given effects ``a``, ``b``.

    ``eta_hj = W_h^T x_j + B_hi^T z_j + o_j`` with ``b [K, g, r, p]`` and the offset ``o``.
    """
    logits = mixing_logits(params.mixing_coef, design.x_mix, row_effects(a, design.task))
    means = (row_products(design.x_comp, jnp.moveaxis(params.component_coef, 1, 0))
             + jnp.einsum("nr,ngrp->ngp", design.z_comp, row_effects(b, design.task))
             + design.offset[:, None, None])
    return logits, means


def component_log_density(family: Family, y, eta, cov, trials) -> Float[Array, "n g"]:
    """``log f_h(y_j | eta_hj)`` of every row under every component, ``[n, g]``.

    Args:
        family: the components' family.
        y: responses ``[n, p]``.
        eta: linear predictors ``[n, g, p]``.
        cov: residual covariances ``[g, p, p]`` (Gaussian family only).
        trials: binomial trials ``[n]``.
    """
    if family.is_gaussian:
        return mvn_logpdf(y[:, None, :], eta, cov)
    return family.log_density(y[:, None, 0], eta[..., 0], trials[:, None])


def log_joint(family: Family, logits, eta, cov, design: MixtureDesign):
    """``log pi_h + log f_h(y)``, ``[n, g]``."""
    return jax.nn.log_softmax(logits, axis=-1) + component_log_density(family, design.y, eta, cov, design.trials)


def mvn_logpdf(y, mean, cov):
    """``log N_p(y; mean_h, Sigma_h)`` for ``mean [..., g, p]``, ``cov [..., g, p, p]`` (broadcast).

    Each ``Sigma_h`` is factorised once and the residuals whitened by a triangular solve;
    a distribution object would factorise it for every observation.
    """
    chol = psd_cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    inv_chol = solve_triangular(chol, eye)
    white = jnp.einsum("...gkl,...gl->...gk", inv_chol, y - mean)
    half_logdet = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return -0.5 * (cov.shape[-1] * LOG_2PI + jnp.sum(white**2, axis=-1)) - half_logdet


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


# ----------------------------------------------------------------------- Newton modes
def newton_ascent(task_value, task_derivatives, u0, steps: int):
    r"""Per-task damped Newton ascent of concave-near-the-mode functions :math:`f_i(u_i)`.

    Each step solves :math:`(-\nabla^2 f_i + s_i I)\,\delta_i = \nabla f_i` (the shift
    :math:`s_i` makes the matrix positive definite far from the mode) and halves the step
    of each task until :math:`f_i` does not decrease, so every accepted step is an ascent.
    Near the mode the gain of a step, half the Newton decrement
    :math:`\lambda_i = \nabla f_i^T\delta_i`, drowns in the rounding of :math:`f_i`, and
    comparing values would halve good steps at random; there, in Newton's region of
    quadratic convergence, :math:`\lambda_i \le \sqrt{\varepsilon}(1 + |f_i|)`, the full
    step is taken. A task with :math:`\lambda_i \le 16\varepsilon(1 + |f_i|)` is at its
    mode and takes no more steps; the ascent stops when every task is there (a few steps
    from the BLUPs), or after ``steps`` steps.

    A mixture likelihood need not be concave in a task's effects, and a small gradient
    does not make a maximum: where :math:`-\nabla^2 f_i` is not positive definite (a saddle
    or a ridge), the step also goes along its eigenvector :math:`e_i` of least curvature,
    uphill (:math:`\operatorname{sign}(\nabla f_i^T e_i)\,e_i`, unit length, then halved
    until :math:`f_i` rises), and the task is not at its mode whatever its decrement.

    Args:
        task_value: ``u [K, r] -> [K]``.
        task_derivatives: ``u [K, r] -> (grad [K, r], hess [K, r, r])``.
        u0: start ``[K, r]``.
        steps: most Newton steps (static).

    Returns:
        ``(u, decrement)``: the end point and the Newton decrement there ``[K]`` (zero at a
        mode; ``inf`` where the end point is not a maximum).
    """
    K, r = u0.shape
    dtype = u0.dtype
    eps = jnp.finfo(dtype).eps

    def direction(u, value):
        """The Newton step of every task not yet at its mode (zero for the others), and the decrements."""
        grad, hess = task_derivatives(u)
        neg = -hess
        eig, vectors = jnp.linalg.eigh(neg)
        concave = eig[:, 0] > 0
        shift = jnp.where(concave, 0.0, 1e-3 * (1.0 + jnp.abs(eig[:, -1])) - eig[:, 0])
        neg_chol = psd_cholesky(neg + shift[:, None, None] * jnp.eye(r, dtype=dtype))
        step = cho_solve(neg_chol, grad[..., None])[..., 0]
        decrement = jnp.einsum("ir,ir->i", grad, step)
        flattest = vectors[:, :, 0]
        uphill = jnp.where(jnp.einsum("ir,ir->i", grad, flattest) < 0, -1.0, 1.0)
        step = jnp.where(concave[:, None], step, step + uphill[:, None] * flattest)
        moving = ~concave | ~(jnp.abs(decrement) <= 16 * eps * (1.0 + jnp.abs(value)))
        return jnp.where(moving[:, None], step, 0.0), jnp.where(concave, decrement, jnp.inf)

    def newton(state):
        count, u, value, step, decrement = state
        quadratic = jnp.abs(decrement) <= jnp.sqrt(eps) * (1.0 + jnp.abs(value))  # never where not concave

        def ascends(new_value):
            return (new_value >= value) | quadratic

        def halve(halving):
            t, new_value = halving
            t = jnp.where(ascends(new_value), t, t / 2)
            return t, task_value(u + t[:, None] * step)

        def needs_halving(halving):
            t, new_value = halving
            return jnp.any(~ascends(new_value) & (t > 2.0**-20))

        t, new_value = jax.lax.while_loop(needs_halving, halve, (jnp.ones((K,), dtype), task_value(u + step)))
        accept = ascends(new_value) & jnp.isfinite(new_value)
        u = jnp.where(accept[:, None], u + t[:, None] * step, u)
        value = jnp.where(accept, new_value, value)
        return (count + 1, u, value, *direction(u, value))

    def keep_going(state):
        count, _, _, step, _ = state
        return (count < steps) & jnp.any(step != 0)

    value = task_value(u0)
    _, u, _, _, decrement = jax.lax.while_loop(
        keep_going, newton, (jnp.zeros((), jnp.int32), u0, value, *direction(u0, value)))
    return u, decrement


def implicit_newton_steps(task_derivatives, mode: Float[Array, "K r"], steps: int = 2) -> Float[Array, "K r"]:
    r"""The mode :math:`\hat u(\theta)` with its derivatives in the parameters, its value unchanged.

    ``mode`` is a maximum of every :math:`f_i(\cdot;\theta_0)`, found without derivatives
    (its inputs gradient-stopped). Each of ``steps`` Newton steps
    :math:`u \leftarrow u + \delta(u, \theta)`, :math:`\delta = (-\nabla^2 f_i)^{-1}\nabla f_i`,
    is taken as :math:`\delta - \operatorname{stop\_gradient}(\delta)`: zero in value, so the
    returned point is ``mode`` to the last bit, but carrying the step's derivatives. Newton's
    quadratic convergence makes one step from :math:`\hat u(\theta_0)` agree with
    :math:`\hat u(\theta)` to first order in :math:`\theta - \theta_0` (the implicit
    function theorem's :math:`\partial\hat u = (-\nabla^2 f)^{-1}\,\partial\nabla f`) and
    two steps to third order, so a Laplace value evaluated at the result has exact first and
    second derivatives in :math:`\theta` (its log-determinant term needs
    :math:`\partial^2\hat u`). Differentiating the damped ascent itself instead would
    trace its loops, eigendecompositions and line searches into every derivative.

    Args:
        task_derivatives: ``u [K, r] -> (grad [K, r], hess [K, r, r])`` of the live
            (differentiable) :math:`f_i`.
        mode: ``[K, r]``, gradient-stopped.
        steps: Newton steps (two for second derivatives).

    Returns:
        ``[K, r]``, equal to ``mode``; a task whose :math:`-\nabla^2 f_i` is not positive
        definite there (no valid Laplace value) gets no derivative.
    """
    def newton(_, u):
        grad, hess = task_derivatives(u)
        step = cho_solve(cholesky(-hess), grad[..., None])[..., 0]
        step = jnp.where(jnp.isfinite(step), step, 0.0)
        return u + (step - jax.lax.stop_gradient(step))

    return jax.lax.fori_loop(0, steps, newton, jax.lax.stop_gradient(mode))


def differentiable_mode(task_functions, args: tuple, start: Float[Array, "K r"], steps: int):
    """Each task's mode, by :func:`newton_ascent` on the functions of the gradient-stopped ``args``,
    carrying its derivatives in ``args`` (:func:`implicit_newton_steps` of the live functions).

    Args:
        task_functions: ``*args -> (task_value, task_derivatives, ...)``.
        args: the arguments the functions depend on (differentiated).
        start: ``[K, r]``.
        steps: most Newton steps of the ascent (static).

    Returns:
        ``(u, decrement)`` as from :func:`newton_ascent`.
    """
    frozen_value, frozen_derivatives = task_functions(*jax.lax.stop_gradient(args))[:2]
    u, decrement = newton_ascent(frozen_value, frozen_derivatives, jax.lax.stop_gradient(start), steps)
    return implicit_newton_steps(task_functions(*args)[1], u), decrement


def _laplace_terms(values, hess, decrement, counts, r: int):
    r"""Per-task Laplace values :math:`f_i + \tfrac r2\log2\pi - \tfrac12\log\det(-H_i)` and validity.

    Valid when every :math:`-H_i` is positive definite and every Newton decrement is below
    :math:`\sqrt{\varepsilon}(1 + n_i)` (the mode was reached).
    """
    eps = jnp.finfo(values.dtype).eps
    neg_chol = cholesky(-hess)
    positive = jnp.all(jnp.isfinite(neg_chol)) & jnp.all(jnp.diagonal(neg_chol, axis1=-2, axis2=-1) > 0)
    reached = jnp.all(jnp.abs(decrement) <= jnp.sqrt(eps) * (1.0 + counts))
    logdet = 2.0 * jnp.log(jnp.diagonal(neg_chol, axis1=-2, axis2=-1)).sum(-1)
    return values + 0.5 * r * LOG_2PI - 0.5 * logdet, positive & reached


# --------------------------------------------------------------------- Laplace marginal
def laplace_log_marginal(
    params: MixtureParams,
    design: MixtureDesign,
    family: Family,
    *,
    use_mixing: bool,
    use_component: bool,
    newton_steps: int = 20,
) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    r"""Per-task Laplace approximation of the log-likelihood with the random effects integrated out
    (membership per observation).

    For each task, with :math:`f_i(u)` its log-likelihood plus the log prior of
    :math:`u = (a_i, \operatorname{vec} B_{1i}, \dots, \operatorname{vec} B_{gi})` (dimension ``r``):

    .. math::

        \log\int e^{f_i(u)}\,du \approx f_i(\hat u) + \tfrac r2\log 2\pi
            - \tfrac12 \log\det(-\nabla^2 f_i(\hat u)).

    The mode :math:`\hat u` is found from the BLUPs by :func:`newton_ascent`, its
    derivatives in the parameters by :func:`implicit_newton_steps` (the value's first and
    second derivatives are exact; the ascent itself is never differentiated). Exact when
    the integrand is Gaussian (the linear mixed model).

    Returns:
        ``(value, ok)``: the approximation and whether it is valid: every task's mode was
        reached (Newton decrement below ``sqrt(eps)`` relative to the task's size) and
        every :math:`-\nabla^2 f_i(\hat u)` is positive definite. A caller must not use
        ``value`` when ``ok`` is false.
    """
    K = params.mixing_effects.shape[0]
    dtype = design.y.dtype
    # Rows of unseen tasks have no effects of their own here: they are left out.
    task = jnp.where(design.task < K, design.task, K)
    functions = functools.partial(_joint_task_functions, design=design, family=family, task=task,
                                  use_mixing=use_mixing, use_component=use_component)
    task_value, task_derivatives, r = functions(params)
    parts = ([params.mixing_effects] if use_mixing else []) + (
        [params.component_effects.reshape(K, -1)] if use_component else [])
    u, decrement = differentiable_mode(functions, (params,), jnp.concatenate(parts, axis=1), newton_steps)
    counts = segment_sum(jnp.ones_like(design.task, dtype), task, K + 1)[:K]
    values, ok = _laplace_terms(task_value(u), task_derivatives(u)[1], decrement, counts, r)
    value = jnp.sum(values)
    if design.num_tasks > K:  # rows of tasks without effects: integrate them out per row
        unseen_rows = population_log_predictive(params, design, family, use_mixing, use_component)
        value = value + jnp.sum(jnp.where(design.task >= K, unseen_rows, 0.0))
    return value, ok & jnp.isfinite(value)


def _joint_task_functions(params: MixtureParams, design: MixtureDesign, family: Family, task, use_mixing: bool,
                          use_component: bool):
    r"""``(task_value, task_derivatives, r)`` of :math:`f_i(u)`, task ``i``'s log-likelihood plus the
    log prior of all its effects :math:`u = (a_i, \operatorname{vec} B_{1i}, \dots)` ``[K, r]``
    (membership per observation; rows with ``task == K`` left out)."""
    g = params.component_coef.shape[0]
    K = params.mixing_effects.shape[0]
    effect_shape = params.component_effects.shape[2:]  # [r, p]
    dtype = design.y.dtype
    zeros_a, zeros_b = jnp.zeros_like(params.mixing_effects), jnp.zeros_like(params.component_effects)
    base_logits, base_means = linear_predictors(params, design, zeros_a, zeros_b)
    prior_cov = _effects_prior_cov(params, use_mixing, use_component)
    r = prior_cov.shape[0]
    prior_chol = psd_cholesky(prior_cov)
    prior_prec = cho_solve(prior_chol, jnp.eye(r, dtype=dtype))
    prior_logdet = 2.0 * jnp.log(jnp.diagonal(prior_chol)).sum()

    def unpack(u):  # u: [r] -> (a [g-1], B [g, r_c, p])
        a = u[: g - 1] if use_mixing else jnp.zeros((g - 1,), u.dtype)
        if use_component:
            b = u[(g - 1) if use_mixing else 0:].reshape((g,) + effect_shape)
        else:
            b = jnp.zeros((g,) + effect_shape, u.dtype)
        return a, b

    def row_loglik(u, logits, means, y, z, trials):
        a, b = unpack(u)
        full = logits + jnp.concatenate([a, jnp.zeros((1,), a.dtype)])
        eta = means + jnp.einsum("r,grp->gp", z, b)
        dens = component_log_density(family, y[None], eta[None], params.component_cov, trials[None])[0]
        return jax.nn.logsumexp(jax.nn.log_softmax(full) + dens)

    row_value = jax.vmap(row_loglik)
    row_grad = jax.vmap(jax.grad(row_loglik))
    row_hess = jax.vmap(jax.hessian(row_loglik))

    def rows(u):
        return u[jnp.minimum(task, K - 1)], base_logits, base_means, design.y, design.z_comp, design.trials

    def task_value(u):
        prior = -0.5 * (r * LOG_2PI + prior_logdet + jnp.einsum("ir,rs,is->i", u, prior_prec, u))
        return segment_sum(row_value(*rows(u)), task, K + 1)[:K] + prior

    def task_derivatives(u):
        grad, hess = segment_sums(task, K + 1, row_grad(*rows(u)), row_hess(*rows(u)))
        return grad[:K] - u @ prior_prec, hess[:K] - prior_prec

    return task_value, task_derivatives, r


def _effects_prior_cov(params: MixtureParams, use_mixing: bool, use_component: bool):
    """Block-diagonal prior covariance of one task's ``u = (a_i, vec B_1i, ..., vec B_gi)`` ``[r, r]``."""
    blocks = ([params.mixing_cov] if use_mixing else []) + (
        list(params.component_effects_cov) if use_component else [])
    return jax.scipy.linalg.block_diag(*blocks)


# ------------------------------------------------------- per-task, per-class marginals
def class_log_marginals(
    params: MixtureParams,
    design: MixtureDesign,
    family: Family,
    *,
    use_component: bool,
    quadrature_points: int = 1,
    newton_steps: int = 20,
    derivatives: bool = True,
) -> tuple[Float[Array, "K g"], Bool[Array, ""]]:
    r"""Log marginal density of each task's rows under each component, :math:`\log m_{ih}`.

    .. math::

        m_{ih} = \int \prod_{j\in i} f_h(y_j \mid W_h^Tx_j + B^Tz_j + o_j)\,
                 \mathcal N(\operatorname{vec}B;\ 0, \Phi_h)\, dB,

    the density of task ``i`` when all its rows belong to component ``h`` (membership per
    task; for ``g = 1`` the GLMM's marginal). The integral is by Laplace at the mode found
    by :func:`newton_ascent` (exact for the Gaussian family), or, with
    ``quadrature_points > 1`` and a scalar effect, by adaptive Gauss-Hermite quadrature
    centred at the mode and scaled by the curvature there:

    .. math::

        m_{ih} \approx \sqrt2\,\hat\sigma \sum_k w_k e^{x_k^2} e^{f(\hat u + \sqrt2\hat\sigma x_k)},
        \qquad \hat\sigma = (-f''(\hat u))^{-1/2},

    which is the Laplace approximation for one point. Without component effects
    :math:`m_{ih}` is the plain product of densities.

    With ``derivatives`` (static) the modes carry their derivatives in the parameters
    (:func:`implicit_newton_steps`), so that :math:`\log m_{ih}` has exact first and second
    derivatives (standard errors); without, two Newton steps fewer (the EM E-step, which
    differentiates nothing).

    Returns:
        ``(log_m [K, g], ok)``; ``ok`` as in :func:`laplace_log_marginal`.
    """
    g = params.component_coef.shape[0]
    K = params.component_effects.shape[0]
    dtype = design.y.dtype
    zeros_b = jnp.zeros_like(params.component_effects)
    _, base = linear_predictors(params, design, jnp.zeros_like(params.mixing_effects), zeros_b)  # [n, g, p]
    task = jnp.where(design.task < K, design.task, K)
    counts = segment_sum(jnp.ones_like(design.task, dtype), task, K + 1)[:K]
    if not use_component:
        dens = component_log_density(family, design.y, base, params.component_cov, design.trials)
        return segment_sum(dens, task, K + 1)[:K], jnp.all(jnp.isfinite(dens))
    r_c, p = params.component_effects.shape[2:]
    d = r_c * p

    def one_component(means, cov, effects_cov, start):
        def functions(means, cov, effects_cov):
            return _class_functions(family, design, task, K, means, cov, effects_cov, r_c)

        task_value, task_derivatives = functions(means, cov, effects_cov)
        if derivatives:
            u, decrement = differentiable_mode(functions, (means, cov, effects_cov), start, newton_steps)
        else:
            u, decrement = newton_ascent(task_value, task_derivatives, start, newton_steps)
        hess = task_derivatives(u)[1]
        values, ok = _laplace_terms(task_value(u), hess, decrement, counts, d)
        if quadrature_points > 1:
            x, w = np.polynomial.hermite.hermgauss(quadrature_points)
            scale = jnp.sqrt(2.0 / -hess[:, 0, 0])  # sqrt(2) sigma-hat [K]
            at_nodes = jax.vmap(lambda node: task_value(u + (scale * node)[:, None]))(jnp.asarray(x, dtype))
            log_w = jnp.asarray(np.log(w) + x**2, dtype)
            values = jnp.log(scale) + jax.nn.logsumexp(at_nodes + log_w[:, None], axis=0)
        return values, ok

    start = params.component_effects.reshape(K, g, d).swapaxes(0, 1)
    values, ok = jax.vmap(one_component, in_axes=(1, 0, 0, 0))(
        base, params.component_cov, params.component_effects_cov, start)
    return values.T, jnp.all(ok)


def _class_functions(family: Family, design: MixtureDesign, task, K: int, means, cov, effects_cov, r_c: int):
    r"""``(task_value, task_derivatives)`` of :math:`f_i(u) = \sum_{j\in i}\log f(y_j\mid\eta_j + Z_j^Tu)
    + \log\mathcal N(u; 0, \Phi)` for one component (``means`` its predictors ``[n, p]``
    without effects; rows with ``task == K`` left out); ``u [K, d]``."""
    dtype = design.y.dtype
    p = means.shape[-1]
    d = r_c * p
    prior_chol = psd_cholesky(effects_cov)
    prior_prec = cho_solve(prior_chol, jnp.eye(d, dtype=dtype))
    prior_logdet = 2.0 * jnp.log(jnp.diagonal(prior_chol)).sum()

    def row_loglik(u, mean, y, z, trials):
        eta = mean + z @ u.reshape(r_c, p)
        return component_log_density(family, y[None], eta[None, None], cov[None], trials[None])[0, 0]

    def rows(u):
        return u[jnp.minimum(task, K - 1)], means, design.y, design.z_comp, design.trials

    def task_value(u):
        prior = -0.5 * (d * LOG_2PI + prior_logdet + jnp.einsum("ir,rs,is->i", u, prior_prec, u))
        return segment_sum(jax.vmap(row_loglik)(*rows(u)), task, K + 1)[:K] + prior

    def task_derivatives(u):
        grad, hess = segment_sums(task, K + 1, jax.vmap(jax.grad(row_loglik))(*rows(u)),
                                  jax.vmap(jax.hessian(row_loglik))(*rows(u)))
        return grad[:K] - u @ prior_prec, hess[:K] - prior_prec

    return task_value, task_derivatives


def class_effect_precisions(params: MixtureParams, design: MixtureDesign, family: Family) -> Float[Array, "g K d d"]:
    r"""Membership per task: :math:`-\nabla^2 f_{ih}` at the stored effects, the precision of
    each task's effects given its component (their conditional covariance is the inverse)."""
    g, K = params.component_coef.shape[0], params.component_effects.shape[0]
    r_c, p = params.component_effects.shape[2:]
    _, base = linear_predictors(params, design, jnp.zeros_like(params.mixing_effects),
                                jnp.zeros_like(params.component_effects))
    task = jnp.where(design.task < K, design.task, K)

    def one_component(means, cov, effects_cov, effects):
        _, task_derivatives = _class_functions(family, design, task, K, means, cov, effects_cov, r_c)
        return -task_derivatives(effects)[1]

    effects = params.component_effects.reshape(K, g, r_c * p).swapaxes(0, 1)
    return jax.vmap(one_component, in_axes=(1, 0, 0, 0))(base, params.component_cov,
                                                         params.component_effects_cov, effects)


def task_log_proportions(params: MixtureParams, design: MixtureDesign) -> Float[Array, "K g"]:
    r"""Each task's :math:`\log\pi_h(x^m_i)` (membership per task: covariates constant within a task).

    The row log-proportions averaged over the task's rows (equal to any one row's).
    """
    K = params.component_effects.shape[0]
    logits = mixing_logits(params.mixing_coef, design.x_mix, jnp.zeros(design.x_mix.shape[:1] + (
        params.mixing_coef.shape[0],), design.y.dtype))
    task = jnp.where(design.task < K, design.task, K)
    counts, total = segment_sums(task, K + 1, jnp.ones_like(design.task, design.y.dtype),
                                 jax.nn.log_softmax(logits, axis=-1))
    return total[:K] / jnp.maximum(counts[:K], 1.0)[:, None]


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


def population_proportions(params, design, use_mixing: bool) -> Float[Array, "n g"]:
    r"""Mixing proportions with the mixing effects integrated out, :math:`E_a\,\pi_h(x^m, a)`, ``[n, g]``."""
    g1 = params.mixing_coef.shape[0]
    nodes, log_w = gauss_hermite_nodes(g1 if use_mixing else 0, design.y.dtype)
    nodes = jnp.asarray(nodes) @ psd_cholesky(params.mixing_cov).T if use_mixing else jnp.zeros((1, g1), design.y.dtype)
    logits = (design.x_mix @ params.mixing_coef.T)[None] + nodes[:, None, :]
    logits = jnp.concatenate([logits, jnp.zeros(logits.shape[:2] + (1,), logits.dtype)], axis=-1)
    return jnp.einsum("m,mng->ng", jnp.exp(jnp.asarray(log_w)), jax.nn.softmax(logits, axis=-1))


def _effect_nodes(params: MixtureParams, dtype):
    """Gauss-Hermite nodes of each component's ``vec B ~ N(0, Phi_h)``: ``[g, m, r, p]`` and log weights ``[m]``."""
    g, r_c, p = params.component_effects.shape[1:]
    nodes, log_w = gauss_hermite_nodes(r_c * p, dtype)
    scaled = jnp.einsum("me,gde->gmd", jnp.asarray(nodes), psd_cholesky(params.component_effects_cov))
    return scaled.reshape(g, -1, r_c, p), jnp.asarray(log_w)


def population_log_predictive(params, design, family: Family, use_mixing: bool,
                              use_component: bool) -> Float[Array, " n"]:
    r"""Log density of each row with its task's effects integrated out, ``[n]``.

    As the mixing effects ``a`` and the component effects ``B`` are independent,

    .. math::

        p(y) = \sum_h E_a[\pi_h(x^m, a)]\; E_B[f_h(y \mid W_h^Tx^c + B^Tz + o)],

    :math:`E_a` by Gauss-Hermite quadrature (:func:`population_proportions`); :math:`E_B`
    in closed form for the Gaussian family (covariance :math:`\Sigma_h + Z^T\Phi_hZ`, with
    :math:`Z = z\otimes I_p`) and by Gauss-Hermite quadrature over ``vec B`` otherwise.
    """
    log_pi = jnp.log(population_proportions(params, design, use_mixing))
    zeros_b = jnp.zeros_like(params.component_effects)
    _, base = linear_predictors(params, design, jnp.zeros_like(params.mixing_effects), zeros_b)
    z = design.z_comp
    if not use_component:
        dens = component_log_density(family, design.y, base, params.component_cov, design.trials)
    elif family.is_gaussian:
        p = design.y.shape[1]
        rows = jnp.einsum("nr,kl->nrkl", z, jnp.eye(p, dtype=z.dtype)).reshape(z.shape[0], -1, p)  # Z_j [n, d, p]
        cov = params.component_cov[None] + jnp.einsum("ndk,gde,nel->ngkl", rows, params.component_effects_cov, rows)
        dens = mvn_logpdf(design.y[:, None, :], base, cov)
    else:
        nodes, log_w = _effect_nodes(params, design.y.dtype)
        eta = base[:, :, None, :] + jnp.einsum("nr,gmrp->ngmp", z, nodes)  # [n, g, m, p]
        per_node = family.log_density(design.y[:, None, None, 0], eta[..., 0], design.trials[:, None, None])
        dens = jax.nn.logsumexp(per_node + log_w, axis=-1)
    return jax.nn.logsumexp(log_pi + dens, axis=-1)


def population_means(params, design, family: Family, use_mixing: bool, use_component: bool) -> Float[Array, "n p"]:
    r"""Mean response of each row with its task's effects integrated out, :math:`\sum_h E_a[\pi_h] E_B[\mu(\eta_h)]`."""
    pi = population_proportions(params, design, use_mixing)
    zeros_b = jnp.zeros_like(params.component_effects)
    _, base = linear_predictors(params, design, jnp.zeros_like(params.mixing_effects), zeros_b)
    if family.is_gaussian or not use_component:
        mean = family.mean(base)
    else:
        nodes, log_w = _effect_nodes(params, design.y.dtype)
        eta = base[:, :, None, :] + jnp.einsum("nr,gmrp->ngmp", design.z_comp, nodes)
        mean = jnp.einsum("m,ngmp->ngp", jnp.exp(log_w), family.mean(eta))
    return jnp.einsum("ng,ngp->np", pi, mean)
