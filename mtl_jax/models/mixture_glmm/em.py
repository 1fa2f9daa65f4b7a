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
    KronWeights,
    MultinomialWeights,
    bordered_solve,
    diag_embed,
    is_positive_definite,
    kron_bordered_solve,
    kron_row_covariance_sum,
    kron_rows,
    psd_cholesky,
    psd_inverse,
    psd_logdet,
    psd_solve,
    row_covariance,
    row_products,
    segment_sum,
)
from mtl_jax.models.mixture_glmm.likelihood import (
    LOG_2PI,
    class_log_marginals,
    component_log_density,
    linear_predictors,
    log_joint,
    mixing_logits,
    mvn_zero_logpdf,
    row_effects,
    shifted_logits,
    task_log_proportions,
)
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams


def complete_objective(model, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
    """``L = L1 + L2`` (eq. 7): the function the EM steps increase."""
    logits, eta = linear_predictors(params, design, params.mixing_effects, params.component_effects)
    joint = log_joint(model.response_family, logits, eta, params.component_cov, design)
    return jax.nn.logsumexp(joint, axis=-1).sum() + effects_log_prior(model, params)


def effects_log_prior(model, params: MixtureParams) -> Float[Array, ""]:
    """``L2``: log density of the predicted random effects under their covariances."""
    total = jnp.zeros((), params.component_coef.dtype)
    if model.has_mixing_effects:
        total += mvn_zero_logpdf(params.mixing_effects, params.mixing_cov).sum()
    if model.component_random_effects:
        K, g = params.component_effects.shape[:2]
        effects = jnp.swapaxes(params.component_effects.reshape(K, g, -1), 0, 1)  # [g, K, d]
        total += jax.vmap(mvn_zero_logpdf)(effects, params.component_effects_cov).sum()
    return total


def task_responsibilities(model, params: MixtureParams, design: MixtureDesign):
    r"""E-step of membership per task: :math:`\tau_{ih} \propto \pi_h(x^m_i)\, m_{ih}`.

    :math:`m_{ih}` is the marginal density of task ``i``'s rows under component ``h``
    (:func:`~mtl_jax.models.mixture_glmm.likelihood.class_log_marginals`: exact for the
    Gaussian family, Laplace or adaptive quadrature otherwise).

    Returns:
        ``(log_tau [K, g], marginal)``: the log posterior class probabilities and the
        marginal log-likelihood :math:`\sum_i\log\sum_h\pi_h m_{ih}`.
    """
    log_m, _ = class_log_marginals(params, design, model.response_family,
                                   use_component=model.component_random_effects,
                                   quadrature_points=model.quadrature_points, derivatives=False)
    joint = task_log_proportions(params, design) + log_m
    total = jax.nn.logsumexp(joint, axis=-1)
    return joint - total[:, None], total.sum()


def em_step(model, params: MixtureParams, design: MixtureDesign, update_variance_components: bool = True):
    """One EM iteration; returns the new parameters and the stopping quantity at the old ones.

    Membership per observation: the responsibilities of eq. (9) given the predicted
    effects, and ``h_A`` (module docstring). Membership per task: the task-level
    responsibilities (:func:`task_responsibilities`) and the marginal log-likelihood; all
    rows of a task carry its responsibilities, and each task enters the mixing part once.
    """
    K = design.num_tasks
    if model.membership == "task":
        log_tau, objective = task_responsibilities(model, params, design)
        tau_tasks = jnp.exp(log_tau)
        tau = tau_tasks[design.task]
        counts = segment_sum(jnp.ones_like(design.task, design.y.dtype), design.task, K)
        row_weight = 1.0 / counts[design.task]
        params = params._replace(class_logits=log_tau)
    else:
        logits, eta = linear_predictors(params, design, params.mixing_effects, params.component_effects)
        # log pi_h f_h = joint_h - log(partition): the partition cancels in tau, and each
        # row's log-likelihood is top + log(sum_h exp(joint_h - top) / partition), one logarithm
        shifted, partition = shifted_logits(logits)
        joint = shifted + component_log_density(model.response_family, design.y, eta, params.component_cov,
                                                design.trials)
        top = jnp.max(joint, axis=-1, keepdims=True)
        weights = jnp.exp(joint - top)
        total = weights.sum(-1)
        # One component: every row's weight is the constant 1, which keeps the weighted sums
        # over the rows out of the EM loop (XLA computes loop-invariant values once).
        tau = weights / total[:, None] if model.num_components > 1 else jnp.ones(joint.shape, joint.dtype)
        objective = (top[:, 0] + jnp.log(total / partition)).sum() + effects_log_prior(model, params)
        tau_tasks, row_weight = None, None
    adjustment = jnp.zeros((), objective.dtype)
    if model.num_components > 1:
        params, mixing_logdet = mixing_m_step(model, params, design, tau, update_variance_components, row_weight)
        adjustment += mixing_logdet
    params, component_logdet = component_m_step(model, params, design, tau, update_variance_components, tau_tasks)
    adjustment += component_logdet
    if model.membership == "task":
        return params, objective
    return params, objective - 0.5 * adjustment


def mixing_m_step(model, params: MixtureParams, design: MixtureDesign, tau, update_variance_components: bool,
                  row_weight=None):
    """Penalised Newton (IRLS) step for ``(v, a)`` with step halving, then ``Lambda``.

    ``row_weight [n]`` (default ones) weights each row's term ``tau_j log pi(x_j)``; with
    membership per task it is ``1 / n_i``, so each task counts once.

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
    if row_weight is not None:
        tau = tau * row_weight[:, None]
    mass = tau.sum(-1)  # each row's total weight (1 unless weighted)

    def q_mix_at(logits, a):
        value = (tau * jax.nn.log_softmax(logits, axis=-1)).sum()
        if with_effects:
            value += mvn_zero_logpdf(a, lam).sum()
        return value

    def q_mix(v, a):
        return q_mix_at(mixing_logits(v, design.x_mix, row_effects(a, design.task)), a)

    logits = mixing_logits(v, design.x_mix, row_effects(a, design.task))
    pi = jax.nn.softmax(logits, axis=-1)[:, :g1]
    grads = tau[:, :g1] - mass[:, None] * pi  # d Q / d eta
    solution = kron_bordered_solve(
        design.x_mix,
        MultinomialWeights(mass, pi),  # -d2 Q / d eta2
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

    v, a = halved_step(q_mix, (v, a), (step_v, step_a), base=q_mix_at(logits, a))
    logdet = jnp.zeros((), dtype)
    if with_effects:
        logdet = _sum_logdet(solution)
        if update_variance_components:
            lam = (jnp.einsum("ih,ik->hk", a, a) + solution.random_cov.sum(0)) / K
            lam = 0.5 * (lam + lam.T) + model.variance_floor * jnp.eye(g1, dtype=dtype)
            info = solution.random_info
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


def boundary_aware_covariance(cov, effects, info, score_at_zero, floor: float, grid_size: int = 24,
                              jump_below: float | None = None):
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
    The surrogate is local: with ``jump_below`` the floor is only considered once every
    variance of EM's update is below it (decided early, before the other parameters settle,
    a jump can trap EM at the floor).

    Args:
        cov: EM's updated covariance ``[r, r]`` (at or above ``floor * I``).
        effects: EM's updated effects ``[K, r]``.
        info, score_at_zero: :math:`I_i` ``[K, r, r]`` and :math:`u_i` ``[K, r]`` of the
            quadratic expansion (see :func:`effects_surrogate`).
        floor: :math:`\delta`.
        grid_size: points of the ray.
        jump_below: consider the floor only when ``cov <= jump_below * I`` (``None``: always).

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
    if jump_below is not None:
        to_floor &= is_positive_definite(jump_below * eye - cov)
    cov = jnp.where(to_floor, floor * eye, jnp.where(leave_floor, ray[best], cov))
    effects = jnp.where(to_floor, mode_floor, jnp.where(leave_floor, ray_modes[best], effects))
    return cov, effects


def component_m_step(model, params: MixtureParams, design: MixtureDesign, tau, update_variance_components: bool,
                     tau_tasks=None):
    """The M-step of every component (vmapped), then ``Sigma`` and ``Phi``.

    Args:
        tau: row responsibilities ``[n, g]``.
        tau_tasks: membership per task: the task responsibilities ``[K, g]``, which also
            weight each task's effects prior (so each task's effects are its posterior
            mode given the component); ``None`` for membership per observation.

    Returns:
        The updated parameters and :math:`\\sum_{h,i} \\log\\det(D_{hi}/2\\pi)` of the
        component effects (zero without them).
    """
    K = design.num_tasks
    dtype = design.y.dtype
    if tau_tasks is None:
        task_weight = jnp.ones((K, model.num_components), dtype)
    else:  # a task almost surely elsewhere keeps a tiny weight, so its system stays regular
        task_weight = jnp.maximum(tau_tasks, jnp.finfo(dtype).eps)
    update = jax.vmap(
        lambda t, w, coef, effects, cov, phi: _component_update(
            model, design, t, w, coef, effects, cov, phi, update_variance_components),
        in_axes=(1, 1, 0, 1, 0, 0),
    )
    coef, effects, cov, phi, logdet = update(tau, task_weight, params.component_coef, params.component_effects,
                                             params.component_cov, params.component_effects_cov)
    return (
        params._replace(
            component_coef=coef,
            component_effects=jnp.swapaxes(effects, 0, 1),
            component_cov=cov,
            component_effects_cov=phi,
        ),
        logdet.sum(),
    )


def effects_scale(model, design: MixtureDesign) -> Float[Array, " d"]:
    """The scale of each component effect ``(a, k)`` for its floor: ``var(y_k)`` (Gaussian) or 1 (link scale)."""
    p = design.y.shape[1]
    if model.response_family.is_gaussian:
        response = jnp.var(design.y, axis=0) + jnp.finfo(design.y.dtype).tiny
    else:
        response = jnp.ones((p,), design.y.dtype)
    return jnp.tile(response, design.z_comp.shape[1])


def _kron_structured(model) -> bool:
    """Whether a component's system has the :func:`~mtl_jax.linalg.kron_bordered_solve` structure (random intercepts or none)."""
    return not model.component_random_effects or model.random_intercept_only


def _solve_component(model, design: MixtureDesign, weights: KronWeights, grads, prior_prec, prior_grad, ridge):
    """The bordered fixed/random system of one component (random intercepts by the fast path).

    ``weights``: the rows' :math:`W_j = w_j S`.
    """
    y, x, z = design.y, design.x_comp, design.z_comp
    p = y.shape[1]
    if _kron_structured(model):
        return kron_bordered_solve(x, weights, grads, design.task, design.num_tasks, prior_prec,
                                   random_prior_grad=prior_grad, fixed_prior_prec=ridge,
                                   random_intercepts=model.component_random_effects)
    dense = weights.rows[:, None, None] * weights.shared
    return bordered_solve(kron_rows(x, p), kron_rows(z, p), dense, grads, design.task, design.num_tasks,
                          prior_prec, random_prior_grad=prior_grad, fixed_prior_prec=ridge)


def _component_update(model, design: MixtureDesign, tau, task_weight, coef, effects, cov, phi, update_var: bool):
    r"""M-step of one component (row weights ``tau [n]``, task weights ``omega = task_weight [K]``).

    With :math:`\eta_j = W^Tx_j + B_{t_j}^Tz_j + o_j` and :math:`\beta = \operatorname{vec} W`,
    the penalised log-likelihood

    .. math:: Q(W, B) = \sum_j \tau_j \log f(y_j\mid\eta_j)
              - \tfrac12\sum_i \omega_i \operatorname{vec}(B_i)^T\Phi^{-1}\operatorname{vec}(B_i)

    is maximised over :math:`(W, B)` (:math:`\omega_i = 1` for membership per observation).

    * Gaussian: in closed form, Henderson's equations (each row adds
      :math:`A_j(\tau_jS)A_j^T`, :math:`A_j = x_j\otimes I_p`, :math:`S = \Sigma^{-1}`; the
      effects have rows :math:`z_j\otimes I_p`); then the residual covariance
      :math:`(\sum_j\tau_jr_jr_j^T + M + \delta n\,\mathrm{diag}(s^2))/(\sum_j\tau_j + \delta n)`
      (a prior count of :math:`\delta n` rows, :math:`\delta` the variance floor), where for
      REML :math:`M = \sum_j\tau_j\omega_{t_j}\operatorname{cov}(\hat\eta_j)` is the posterior
      covariance of the fitted means (:func:`mtl_jax.linalg.row_covariance`); for ML,
      :math:`M = 0` per observation (the maximiser of ``L`` given the effects) and the
      effects' part :math:`\sum_j\tau_j\omega_{t_j}Z_j^TD_{t_j}^{-1}Z_j` per task or for
      ``g = 1`` (the EM update of the marginal likelihood).
    * Other families: one penalised IRLS (Newton) step with the canonical-link score and
      weight (:class:`~mtl_jax.models.mixture_glmm.families.Family`), halved until ``Q``
      does not decrease: PQL's working-response step.

    Then the approximate REML update of the effects' covariance,
    :math:`\Phi = \sum_i\omega_i(\hat b_i\hat b_i^T + \omega_i H_{b_ib_i})/\sum_i\omega_i`
    (:math:`\hat b_i = \operatorname{vec}\hat B_i`, :math:`H` the inverse penalised
    information; for ML, :math:`D_i^{-1}` in place of :math:`H_{b_ib_i}`, the effects'
    spread given the fixed effects: the EM update of the marginal likelihood), restricted to its diagonal or to a multiple of the identity when the
    model asks, each variance at or above its floor.
    """
    family = model.response_family
    y, x, z, task, K = design.y, design.x_comp, design.z_comp, design.task, design.num_tasks
    n, p = y.shape
    q, r_c = x.shape[1], z.shape[1]
    dtype = y.dtype
    with_effects = model.component_random_effects
    d = r_c * p if with_effects else 0
    effect_rows = z if not model.random_intercept_only else jnp.ones((n, 1), dtype)
    prior_prec = (task_weight[:, None, None] * psd_inverse(phi)[None]) if with_effects else jnp.zeros((0, 0), dtype)
    if family.is_gaussian:
        prec = psd_inverse(cov)
        weights = KronWeights(tau, prec)
        target = y - design.offset[:, None]
        # In units of the data's second moment, not of the residual precision: the random
        # effects share the intercept, whose information (the Schur complement, about K / phi)
        # can be far below n / sigma^2, and a ridge in those units would shrink an intercept
        # far from zero into the task effects.
        ridge = _ridge(model, q * p, n, dtype) / jnp.max(jnp.mean(target**2, axis=0) + jnp.finfo(dtype).tiny)
        solution = _solve_component(model, design, weights, target @ prec * tau[:, None], prior_prec, None, ridge)
        coef = solution.fixed.reshape(q, p)
        effects = solution.random.reshape(K, r_c, p) if with_effects else jnp.zeros((K, r_c, p), dtype)
        resid = target - row_products(x, coef) - jnp.einsum("nr,nrp->np", z, effects[task])
        scatter = jnp.einsum("n,nk,nl->kl", tau, resid, resid)
        random_rows = kron_rows(effect_rows, p)[:, :d]
        if model.residual_update == "reml" and _kron_structured(model):
            # per observation the row weights are the solve's, whose sums XLA then shares
            # (one scatter and one product over the rows fewer per component)
            row_weights = tau if model.membership == "observation" else tau * task_weight[task]
            scatter += kron_row_covariance_sum(solution, x, task, row_weights)
        elif model.residual_update == "reml":
            row_cov = row_covariance(solution, kron_rows(x, p), random_rows, task)
            scatter += jnp.einsum("n,nkl->kl", tau * task_weight[task], row_cov)
        elif model.per_task_marginal and with_effects:  # EM for the marginal: the effects' posterior spread
            row_cov = jnp.einsum("nrd,nrs,nse->nde", random_rows, solution.random_prec_inv[task], random_rows)
            scatter += jnp.einsum("n,nkl->kl", tau * task_weight[task], row_cov)
        # A prior count of delta * n rows at the response variance keeps an empty component's
        # covariance at the data's scale instead of 0 / 0 (negligible for a component with rows).
        scale = jnp.var(y, axis=0) + jnp.finfo(dtype).tiny
        prior_count = model.variance_floor * n
        cov = (scatter + prior_count * diag_embed(scale)) / (tau.sum() + prior_count)
        cov = cov + model.variance_floor * diag_embed(scale)
    else:
        solution, coef, effects = _irls_step(model, design, tau, task_weight, coef, effects, phi, prior_prec)
    logdet = _sum_logdet(solution) if with_effects else jnp.zeros((), dtype)
    if with_effects and update_var:
        flat = effects.reshape(K, d)
        total = task_weight.sum()
        spread = solution.random_cov if model.residual_update == "reml" else solution.random_prec_inv
        phi = (jnp.einsum("i,ik,il->kl", task_weight, flat, flat)
               + jnp.einsum("i,ikl->kl", task_weight**2, spread)) / total
        phi = _structured(model, 0.5 * (phi + phi.T), model.variance_floor * effects_scale(model, design))
        if d == 1 and model.membership == "observation":
            # EM creeps towards phi = 0 by a factor 1 - O(phi) per step: step to the boundary when
            # the Laplace surrogate prefers it, once phi is below 1% of its scale (unrestricted,
            # a g = 4 fit whose true phi_4 = 1 jumped early and stayed at the floor).
            posterior_prec = solution.random_info + prior_prec
            scale = effects_scale(model, design)[0]
            phi, flat = boundary_aware_covariance(phi, flat, solution.random_info,
                                                  jnp.einsum("ikl,il->ik", posterior_prec, flat),
                                                  model.variance_floor * scale, jump_below=1e-2 * scale)
            effects = flat.reshape(K, r_c, p)
    return coef, effects, cov, phi, logdet


def _irls_step(model, design: MixtureDesign, tau, task_weight, coef, effects, phi, prior_prec):
    """One penalised IRLS step of a non-Gaussian component with step halving (see :func:`_component_update`)."""
    family = model.response_family
    x, z, task, K = design.x_comp, design.z_comp, design.task, design.num_tasks
    n, q = x.shape
    dtype = x.dtype
    with_effects = model.component_random_effects
    r_c = z.shape[1]
    y = design.y[:, 0]

    def predictor(w, b):
        return row_products(x, w[:, 0]) + jnp.einsum("nr,nr->n", z, b[task][..., 0]) + design.offset

    def objective(w, b):
        value = (tau * family.log_density(y, predictor(w, b), design.trials)).sum()
        if with_effects:
            flat = b.reshape(K, -1)
            value -= 0.5 * jnp.einsum("ik,ikl,il->", flat, prior_prec, flat)
        return value

    score, weight = family.working(y, predictor(coef, effects), design.trials)
    prior_grad = -jnp.einsum("ikl,il->ik", prior_prec, effects.reshape(K, -1)) if with_effects else None
    solution = _solve_component(model, design, KronWeights(tau * weight, jnp.ones((1, 1), dtype)),
                                (tau * score)[:, None], prior_prec, prior_grad, _ridge(model, q, n, dtype))
    step_w = solution.fixed.reshape(q, 1)
    step_b = solution.random.reshape(K, r_c, 1) if with_effects else jnp.zeros_like(effects)
    coef, effects = halved_step(objective, (coef, effects), (step_w, step_b))
    return solution, coef, effects


def halved_step(objective, point: tuple, step: tuple, base=None) -> tuple:
    """``point + t step`` with ``t = 1, 1/2, 1/4, ...`` the first that does not decrease
    ``objective(*point)`` (down to ``2^-30``; else ``t = 0``, the point stays).

    ``base`` is ``objective(*point)`` where the caller has it already (computed if ``None``)."""
    base = objective(*point) if base is None else base

    def moved(t):
        return tuple(x + t * dx for x, dx in zip(point, step))

    def halve(state):
        t, _ = state
        return t / 2, objective(*moved(t / 2))

    def needs_halving(state):
        t, value = state
        return (~(value >= base)) & (t > 2.0**-30)

    one = jnp.ones((), base.dtype)
    t, value = jax.lax.while_loop(needs_halving, halve, (one, objective(*moved(one))))
    return moved(jnp.where(value >= base, t, 0.0))


def _structured(model, phi, floor):
    """``Phi`` restricted to the model's structure (full, diagonal, a multiple of ``I``), variances at or above ``floor``."""
    variances = jnp.diagonal(phi)
    if model.random_effects_covariance == "identity":
        variances = jnp.full_like(variances, variances.mean())
    if model.random_effects_covariance != "full":
        phi = jnp.zeros_like(phi)
    return phi + diag_embed(jnp.maximum(variances, floor) - jnp.diagonal(phi))


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


def working_response(model, design: MixtureDesign) -> Float[Array, "n p"]:
    """The responses on the linear-predictor scale, offset removed: ``y`` (Gaussian) or an empirical link.

    ``logit((y + 1/2) / (m + 1))`` for binomial responses, ``log(y + 1/2)`` for counts.
    """
    y = design.y
    if model.family == "poisson":
        y = jnp.log(y + 0.5)
    elif model.family in ("bernoulli", "binomial"):
        y = model.response_family.link((y + 0.5) / (design.trials[:, None] + 1.0))
    return y - design.offset[:, None]


def init(model, key: Array, design: MixtureDesign, init_var: float = 1.0) -> MixtureParams:
    """Random start: soft assignment by distance to ``g`` random OLS residuals, then one M-step.

    (One component: every row's weight is 1, and the start does not depend on ``key``.)

    The least-squares fit of the component design to the working response
    (:func:`working_response`) gives residuals ``r``; ``g`` observations are drawn at random
    and each observation is softly assigned to them by ``exp(-g^2 |r_j - r_c|^2 / 2 s^2)``
    with ``s`` the residual sd (membership per task: the squared distances averaged over
    the task's rows). One M-step from these responsibilities gives the starting
    parameters. The component-effect variances start at ``init_var`` times the residual
    variance (Gaussian) or ``init_var`` (link scale), the mixing covariance at ``init_var * I``.
    """
    g, K = model.num_components, design.num_tasks
    x = design.x_comp
    y = working_response(model, design)
    n, p = y.shape
    r_c = design.z_comp.shape[1]
    dtype = y.dtype
    ols = jnp.linalg.lstsq(x, y)[0]
    resid = y - x @ ols
    scale = resid.std(axis=0) + jnp.finfo(dtype).tiny
    if g == 1:  # every weight is 1: no centres to draw (a draw without replacement sorts all n rows)
        tau = jnp.ones((n, 1), dtype)
        tau_tasks = jnp.ones((K, 1), dtype) if model.membership == "task" else None
    else:
        centres = resid[jax.random.choice(key, n, (g,), replace=False)]
        dist2 = (((resid[:, None, :] - centres[None]) / scale) ** 2).sum(-1)
        tau_tasks = None
        if model.membership == "task":
            counts = segment_sum(jnp.ones((n,), dtype), design.task, K)
            tau_tasks = jax.nn.softmax(-segment_sum(dist2, design.task, K) / counts[:, None] * g**2 / 2.0, axis=-1)
            tau = tau_tasks[design.task]
        else:
            tau = jax.nn.softmax(-dist2 * g**2 / 2.0, axis=-1)
    resid_cov = jnp.cov(resid.T).reshape(p, p)
    family = model.response_family
    variances = jnp.diagonal(resid_cov) if family.is_gaussian else jnp.ones((p,), dtype)
    effects_cov = init_var * diag_embed(jnp.tile(variances, r_c)) * (1.0 if model.component_random_effects else 0.0)
    params = MixtureParams(
        mixing_coef=jnp.zeros((g - 1, design.x_mix.shape[1]), dtype),
        component_coef=jnp.broadcast_to(ols, (g,) + ols.shape),
        component_cov=jnp.broadcast_to(resid_cov if family.is_gaussian else jnp.eye(p, dtype=dtype), (g, p, p)),
        mixing_cov=init_var * jnp.eye(g - 1, dtype=dtype) * (1.0 if model.has_mixing_effects else 0.0),
        component_effects_cov=jnp.broadcast_to(effects_cov, (g,) + effects_cov.shape),
        mixing_effects=jnp.zeros((K, g - 1), dtype),
        component_effects=jnp.zeros((K, g, r_c, p), dtype),
        class_logits=jnp.zeros((K, g), dtype),
    )
    if g > 1:
        row_weight = None if tau_tasks is None else 1.0 / segment_sum(jnp.ones((n,), dtype), design.task, K)[design.task]
        params, _ = mixing_m_step(model, params, design, tau, False, row_weight)
    params, _ = component_m_step(model, params, design, tau, False, tau_tasks)
    return params
