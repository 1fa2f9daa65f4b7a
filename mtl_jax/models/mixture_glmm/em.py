r"""EM for the mixture GLMM (paper, section 3): BLUP M-steps and approximate REML.

One iteration maximises :math:`L = L_1 + L_2` (eq. 7) over the fixed and random effects
with the component labels as missing data:

* E-step (eq. 9): :math:`\tau_{hij} = \pi_h f_h / \sum_l \pi_l f_l`.
* Mixing part: one penalised Newton (IRLS) step for :math:`(v, a)` with step halving.
* Component part: Henderson's mixed-model equations for :math:`(W_h, b_h)` per component.
* Variance components by approximate REML, :math:`\Lambda = K^{-1}\sum_i(\hat a_i\hat a_i^T
  + H_{a_i a_i})`, :math:`\phi_{hk} = K^{-1}\sum_i(\hat b_{hik}^2 + H_{b_{hi}b_{hi},kk})`,
  with :math:`H` the inverse of the penalised information, and the residual covariances
  :math:`\Sigma_h` (with the REML posterior-covariance correction). A mixing covariance
  heading to 0 (where EM only creeps) jumps to its floor when the Laplace marginal of the
  mixing effects prefers the boundary (:func:`boundary_aware_covariance`).

Every bordered fixed/random system is solved by :func:`mtl_jax.linalg.kron_bordered_solve`,
which centres each task's rows before the fixed effects are coupled, so the updates keep
their accuracy in float32 when a task's own information dominates. Variances live on a
floor (:attr:`MixtureGLMM.variance_floor` times a scale: 1 for the logit-scale
:math:`\Lambda`, the response variance for :math:`\phi` and :math:`\Sigma`).

The stopping quantity is the adjusted profile h-likelihood
:math:`h_A = L - \tfrac12\sum_i \log\det(D_i / 2\pi)`, with :math:`D_i` the penalised
information of task ``i``'s random effects. It is the Laplace approximation of the
marginal log-likelihood with the complete-data Hessian (exact for the linear mixed
model) and, unlike :math:`L`, it does not drift as a variance component heads to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from mtl_jax.linalg import (
    BorderedSolution,
    diag_embed,
    is_positive_definite,
    kron_bordered_solve,
    kron_rows,
    psd_cholesky,
    psd_inverse,
    psd_logdet,
    psd_solve,
    row_covariance,
    segment_sum,
)
from mtl_jax.models.mixture_glmm.likelihood import (
    LOG_2PI,
    linear_predictors,
    log_joint,
    mixing_logits,
    mvn_zero_logpdf,
    normal_logpdf,
)
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams


def complete_objective(model, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
    """``L = L1 + L2`` (eq. 7): the function the EM steps increase."""
    logits, means = linear_predictors(params, design, params.mixing_effects, params.component_effects)
    l1 = jax.nn.logsumexp(log_joint(logits, means, params.component_cov, design.y), axis=-1).sum()
    return l1 + effects_log_prior(model, params)


def effects_log_prior(model, params: MixtureParams) -> Float[Array, ""]:
    """``L2``: log density of the predicted random effects under their covariances."""
    total = jnp.zeros((), params.component_coef.dtype)
    if model.has_mixing_effects:
        total += mvn_zero_logpdf(params.mixing_effects, params.mixing_cov).sum()
    if model.component_random_effects:
        total += normal_logpdf(params.component_effects, params.component_var).sum()
    return total


def em_step(model, params: MixtureParams, design: MixtureDesign, update_variance_components: bool = True):
    """One EM iteration; returns the new parameters and ``h_A`` at the old ones (module docstring)."""
    logits, means = linear_predictors(params, design, params.mixing_effects, params.component_effects)
    joint = log_joint(logits, means, params.component_cov, design.y)
    tau = jax.nn.softmax(joint, axis=-1)
    objective = jax.nn.logsumexp(joint, axis=-1).sum() + effects_log_prior(model, params)
    adjustment = jnp.zeros((), objective.dtype)
    if model.num_components > 1:
        params, mixing_logdet = mixing_m_step(model, params, design, tau, update_variance_components)
        adjustment += mixing_logdet
    params, component_logdet = component_m_step(model, params, design, tau, update_variance_components)
    adjustment += component_logdet
    return params, objective - 0.5 * adjustment


def mixing_m_step(model, params: MixtureParams, design: MixtureDesign, tau, update_variance_components: bool):
    """Penalised Newton (IRLS) step for ``(v, a)`` with step halving, then ``Lambda``.

    Returns:
        The updated parameters and :math:`\\sum_i \\log\\det(D_i/2\\pi)` of the mixing
        effects at the start of the step (zero without mixing effects).
    """
    g1 = model.num_components - 1
    K = design.num_tasks
    with_effects = model.has_mixing_effects
    dtype = design.y.dtype
    v, a, lam = params.mixing_coef, params.mixing_effects, params.mixing_cov
    prior_prec = psd_inverse(lam) if with_effects else jnp.zeros((0, 0), dtype)

    def q_mix(v, a):
        logits = mixing_logits(v, design.x_mix, a[design.task])
        value = (tau * jax.nn.log_softmax(logits, axis=-1)).sum()
        if with_effects:
            value += mvn_zero_logpdf(a, lam).sum()
        return value

    pi = jax.nn.softmax(mixing_logits(v, design.x_mix, a[design.task]), axis=-1)[:, :g1]
    weights = diag_embed(pi) - pi[:, :, None] * pi[:, None, :]  # -d2 Q / d eta2, [n, g1, g1]
    grads = tau[:, :g1] - pi  # d Q / d eta
    solution = kron_bordered_solve(
        design.x_mix,
        weights,
        grads,
        design.task,
        K,
        prior_prec,
        random_prior_grad=-(a @ prior_prec) if with_effects else None,
        fixed_prior_prec=_ridge(model, design.x_mix.shape[1] * g1, design.y.shape[0], dtype),
        random_intercepts=with_effects,
    )
    step_v = solution.fixed.reshape(design.x_mix.shape[1], g1).T
    step_a = solution.random if with_effects else jnp.zeros_like(a)

    base = q_mix(v, a)

    def halve(state):
        t, _ = state
        t = t / 2
        return t, q_mix(v + t * step_v, a + t * step_a)

    def needs_halving(state):
        t, value = state
        return (~(value >= base)) & (t > 2.0**-30)

    one = jnp.ones((), dtype)
    t, value = jax.lax.while_loop(needs_halving, halve, (one, q_mix(v + step_v, a + step_a)))
    t = jnp.where(value >= base, t, 0.0)
    v, a = v + t * step_v, a + t * step_a
    logdet = jnp.zeros((), dtype)
    if with_effects:
        logdet = _sum_logdet(solution)
        if update_variance_components:
            lam = (jnp.einsum("ih,ik->hk", a, a) + solution.random_cov.sum(0)) / K
            lam = 0.5 * (lam + lam.T) + model.variance_floor * jnp.eye(g1, dtype=dtype)
            info = segment_sum(weights, design.task, K)
            score_at_zero = segment_sum(grads, design.task, K) + jnp.einsum("ihk,ik->ih", info, params.mixing_effects)
            lam, a = boundary_aware_covariance(lam, a, info, score_at_zero, model.variance_floor)
    return params._replace(mixing_coef=v, mixing_effects=a, mixing_cov=lam), logdet


def effects_surrogate(cov, info, score_at_zero):
    r"""Laplace marginal of Gaussian task effects under a quadratic likelihood, as a function of their covariance.

    With task ``i``'s log-likelihood expanded to second order around the current effects,
    :math:`\ell_i(a) \approx \ell_i(0) + u_i^T a - \tfrac12 a^T I_i a`, the marginal gain over
    effects fixed at zero is

    .. math:: f(\Lambda) = \sum_i \tfrac12 u_i^T(\Lambda^{-1} + I_i)^{-1}u_i
              - \tfrac12\log\det(I + I_i\Lambda),

    which tends to 0 as :math:`\Lambda \to 0`. Computed through :math:`\Lambda = LL^T` and
    :math:`M_i = I + L^T I_i L` so that it stays accurate for a tiny :math:`\Lambda`.

    Args:
        cov: :math:`\Lambda` ``[r, r]``.
        info: :math:`I_i` ``[K, r, r]``.
        score_at_zero: :math:`u_i` ``[K, r]``.

    Returns:
        ``(f, mode)``: the scalar :math:`f(\Lambda)` and the effects' modes
        :math:`(\Lambda^{-1} + I_i)^{-1}u_i` ``[K, r]``.
    """
    chol = psd_cholesky(cov)
    whitened_info = jnp.einsum("ba,ibc,cd->iad", chol, info, chol) + jnp.eye(cov.shape[0], dtype=cov.dtype)
    whitened_score = score_at_zero @ chol
    solved = psd_solve(whitened_info, whitened_score)
    value = 0.5 * jnp.sum(jnp.einsum("ik,ik->i", whitened_score, solved) - psd_logdet(whitened_info))
    return value, solved @ chol.T


def boundary_aware_covariance(cov, effects, info, score_at_zero, floor: float, grid_size: int = 24):
    r"""EM's covariance update, unless the boundary (or a way off it) is better.

    Near :math:`\Lambda = 0` the EM update shrinks by a factor :math:`1 - O(\Lambda)` per
    iteration, so it creeps towards the boundary without reaching it. The Laplace surrogate
    :func:`effects_surrogate` decides instead:

    * at the floor, :math:`\Lambda = \delta I`, when it is at least as good as EM's update
      (the variance is then reported at its boundary, as lme4 reports a singular fit);
    * when EM's update sits within :math:`100\delta` of the floor but the surrogate rises off
      the boundary (:math:`G = \sum_i(u_iu_i^T - I_i)` has a positive eigenvalue), the best
      point of a log-spaced ray :math:`\Lambda + t\,ee^T` along :math:`G`'s top eigenvector,
      so that a fit once at the floor can leave it.

    Where the surrogate replaces EM's covariance, the effects move to their surrogate modes.

    Args:
        cov: EM's updated covariance ``[r, r]`` (at or above ``floor * I``).
        effects: EM's updated effects ``[K, r]``.
        info, score_at_zero: :math:`I_i` ``[K, r, r]`` and :math:`u_i` ``[K, r]`` of the
            quadratic expansion (see :func:`effects_surrogate`).
        floor: :math:`\delta`.
        grid_size: points of the ray.

    Returns:
        ``(cov, effects)``.
    """
    eye = jnp.eye(cov.shape[0], dtype=cov.dtype)
    value_em, _ = effects_surrogate(cov, info, score_at_zero)
    value_floor, mode_floor = effects_surrogate(floor * eye, info, score_at_zero)
    rise, directions = jnp.linalg.eigh(jnp.einsum("ih,ik->hk", score_at_zero, score_at_zero) - info.sum(0))
    top = directions[:, -1]
    steps = jnp.logspace(jnp.log10(floor), 3.0, grid_size, dtype=cov.dtype)
    ray = cov + steps[:, None, None] * jnp.outer(top, top)
    ray_values, ray_modes = jax.vmap(effects_surrogate, in_axes=(0, None, None))(ray, info, score_at_zero)
    best = jnp.argmax(ray_values)
    near_floor = is_positive_definite(100 * floor * eye - cov)  # every eigenvalue of cov <= 100 floor
    leave_floor = near_floor & (rise[-1] > 0) & (ray_values[best] > value_em)
    to_floor = (value_floor >= value_em) & ~leave_floor
    cov = jnp.where(to_floor, floor * eye, jnp.where(leave_floor, ray[best], cov))
    effects = jnp.where(to_floor, mode_floor, jnp.where(leave_floor, ray_modes[best], effects))
    return cov, effects


def component_m_step(model, params: MixtureParams, design: MixtureDesign, tau, update_variance_components: bool):
    """Mixed-model equations for each component, then ``Sigma`` and ``phi``.

    Returns:
        The updated parameters and :math:`\\sum_{h,i} \\log\\det(D_{hi}/2\\pi)` of the
        component effects (zero without them).
    """
    scale = jnp.var(design.y, axis=0) + jnp.finfo(design.y.dtype).tiny  # response variances [p]
    update = jax.vmap(
        lambda t, cov, var: _component_update(model, design, t, cov, var, scale, update_variance_components),
        in_axes=(1, 0, 0),
    )
    coef, effects, cov, var, logdet = update(tau, params.component_cov, params.component_var)
    return (
        params._replace(
            component_coef=coef,
            component_effects=jnp.swapaxes(effects, 0, 1),
            component_cov=cov,
            component_var=var,
        ),
        logdet.sum(),
    )


def _component_update(model, design: MixtureDesign, tau, cov, var, scale, update_var: bool):
    r"""M-step of one Gaussian component (weights ``tau [n]``).

    Henderson's equations for :math:`\beta=\operatorname{vec}(W_h)` (index ``(a, k)``,
    covariate ``a``, response ``k``) and the task intercepts :math:`b_i`: each row adds
    :math:`A_j (\tau_j S) A_j^T` with :math:`A_j = x_j\otimes I_p`, :math:`S=\Sigma_h^{-1}`,
    and the prior precision of :math:`b_i` is :math:`\operatorname{diag}(\phi_h)^{-1}`.
    The residual covariance is :math:`(\sum_j\tau_j r_jr_j^T + M + \delta n\,\mathrm{diag}(s^2))/(\sum_j\tau_j + \delta n)`
    (a prior count of :math:`\delta n` rows, :math:`\delta` the variance floor), where for
    REML :math:`M = \sum_j \tau_j \operatorname{cov}(\hat\eta_j)` is the posterior
    covariance of the fitted means (:func:`mtl_jax.linalg.row_covariance`).
    """
    y, x, task, K = design.y, design.x_comp, design.task, design.num_tasks
    n, p = y.shape
    q = x.shape[1]
    dtype = y.dtype
    with_effects = model.component_random_effects
    prec = psd_inverse(cov)
    weights = tau[:, None, None] * prec
    fixed_rows = kron_rows(x, p)
    random_rows = jnp.broadcast_to(jnp.eye(p, dtype=dtype)[: p if with_effects else 0], (n, p if with_effects else 0, p))
    prior_prec = diag_embed(1.0 / var) if with_effects else jnp.zeros((0, 0), dtype)
    ridge = _ridge(model, q * p, n, dtype) * jnp.max(jnp.diagonal(prec))
    solution = kron_bordered_solve(x, weights, y @ prec * tau[:, None], task, K, prior_prec, fixed_prior_prec=ridge,
                                   random_intercepts=with_effects)
    coef = solution.fixed.reshape(q, p)
    effects = solution.random if with_effects else jnp.zeros((K, p), dtype)
    resid = y - x @ coef - effects[task]
    scatter = jnp.einsum("n,nk,nl->kl", tau, resid, resid)
    if model.residual_update == "reml":
        scatter += jnp.einsum("n,nkl->kl", tau, row_covariance(solution, fixed_rows, random_rows, task))
    # A prior count of delta * n rows at the response variance keeps an empty component's
    # covariance at the data's scale instead of 0 / 0 (negligible for a component with rows).
    prior_count = model.variance_floor * n
    new_cov = (scatter + prior_count * diag_embed(scale)) / (tau.sum() + prior_count)
    new_cov = new_cov + model.variance_floor * diag_embed(scale)
    logdet = _sum_logdet(solution) if with_effects else jnp.zeros((), dtype)
    if with_effects and update_var:
        var = (jnp.sum(effects**2, axis=0) + jnp.einsum("ikk->k", solution.random_cov)) / K
        var = jnp.maximum(var, model.variance_floor * scale)
    return coef, effects, new_cov, var, logdet


def _ridge(model, m: int, n: int, dtype):
    r"""A ridge :math:`\delta n I_m` on the fixed effects, :math:`\delta` the variance floor.

    Negligible next to the information of a component with data (of order ``n``), it keeps
    the fixed effects of an empty or degenerate component finite (shrunk to zero) instead
    of dividing by a vanishing information; :meth:`MixtureGLMM.check` reports such a component.
    """
    return model.variance_floor * n * jnp.eye(m, dtype=dtype)


def _sum_logdet(solution: BorderedSolution) -> Float[Array, ""]:
    r""":math:`\sum_i \log\det(D_i / 2\pi)` from the stored :math:`D_i^{-1}`."""
    r = solution.random_prec_inv.shape[-1]
    return -jnp.sum(psd_logdet(solution.random_prec_inv)) - solution.random_prec_inv.shape[0] * r * LOG_2PI


def init(model, key: Array, design: MixtureDesign, init_var: float = 1.0) -> MixtureParams:
    """Random start: soft assignment by distance to ``g`` random OLS residuals, then one M-step.

    The least-squares fit of the component design gives residuals ``r``; ``g``
    observations are drawn at random and each observation is softly assigned to them by
    ``exp(-g^2 |r_j - r_c|^2 / 2 s^2)`` with ``s`` the residual sd. One M-step from these
    responsibilities gives the starting parameters. The component-effect variances start
    at ``init_var`` times the residual variance, the mixing covariance at ``init_var * I``.
    """
    g, K = model.num_components, design.num_tasks
    y, x = design.y, design.x_comp
    n, p = y.shape
    dtype = y.dtype
    ols = jnp.linalg.lstsq(x, y)[0]
    resid = y - x @ ols
    scale = resid.std(axis=0) + jnp.finfo(dtype).tiny
    centres = resid[jax.random.choice(key, n, (g,), replace=False)]
    dist2 = (((resid[:, None, :] - centres[None]) / scale) ** 2).sum(-1)
    tau = jax.nn.softmax(-dist2 * g**2 / 2.0, axis=-1)
    resid_cov = jnp.cov(resid.T).reshape(p, p)
    params = MixtureParams(
        mixing_coef=jnp.zeros((g - 1, design.x_mix.shape[1]), dtype),
        component_coef=jnp.broadcast_to(ols, (g,) + ols.shape),
        component_cov=jnp.broadcast_to(resid_cov, (g, p, p)),
        mixing_cov=init_var * jnp.eye(g - 1, dtype=dtype) * (1.0 if model.has_mixing_effects else 0.0),
        component_var=jnp.broadcast_to(init_var * jnp.diagonal(resid_cov), (g, p))
        * (1.0 if model.component_random_effects else 0.0),
        mixing_effects=jnp.zeros((K, g - 1), dtype),
        component_effects=jnp.zeros((K, g, p), dtype),
    )
    if g > 1:
        params, _ = mixing_m_step(model, params, design, tau, update_variance_components=False)
    params, _ = component_m_step(model, params, design, tau, update_variance_components=False)
    return params
