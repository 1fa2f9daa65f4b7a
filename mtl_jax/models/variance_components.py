r"""Asymptotic covariance of the REML variance components of the mixture GLMM.

Section 3 of the mixture-GLMM paper: with :math:`\Pi` the negative Hessian of
:math:`L = L_1 + L_2` with respect to :math:`v|w|a|b` and :math:`H = \Pi^{-1}`
partitioned conformally, each variance component :math:`\theta_c` (a :math:`\lambda_h`
or a :math:`\phi_{hk}`) owns one random-effect coordinate per task, i.e. a ``K x K``
block :math:`H_c` of :math:`H`, and two components :math:`c, d` share the off-diagonal
block :math:`H_{cd}`. The REML information is

.. math::

    R_{cc} = \theta_c^{-2}\operatorname{tr}(I_K - H_c/\theta_c)^2, \qquad
    R_{cd} = \theta_c^{-1}\theta_d^{-1}\operatorname{tr}(H_{cd}H_{cd}^T),

and :math:`\operatorname{cov}(\hat\theta) = 2R^{-1}`.

The ``K x K`` blocks are never formed. With the Schur blocks of :math:`\Pi` (fixed
part :math:`P`, per-task :math:`F_i = H_{f r_i}`), the task blocks of :math:`H` are
:math:`H_{r_i r_k} = \delta_{ik}D_i^{-1} + F_i^T P F_k`, so every trace reduces to sums
over tasks and :math:`\sum_{i,k}(f_{is}^T P f_{kt})^2 = \operatorname{tr}(P G_t P G_s)`
with :math:`G_s = \sum_i f_{is} f_{is}^T`: time and memory :math:`O(n + K)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from mtl_jax.models.mixture_glmm import (
    MixtureDesign,
    MixtureGLMM,
    MixtureParams,
    _diag_embed,
    _mvn_logpdf,
    _schur_solve,
    _segment_sum,
)


def observed_information(model: MixtureGLMM, params: MixtureParams, design: MixtureDesign):
    r"""Negative Hessian :math:`\Pi` of ``L`` in bordered block form.

    The observed log-likelihood depends on the parameters only through the linear
    predictors :math:`\eta_j = (\text{logits}_{1..g-1}, \text{means}_{g \times p})`, so
    :math:`\Pi = \sum_j J_j^T(-\nabla^2_\eta \ell_j)J_j + \text{prior precision}`, with
    :math:`J_j` the (covariate) Jacobian. Fixed effects are ordered
    ``(v [g-1, q_m], W [g, q_c, p])`` flattened; the random effects of task ``i`` are
    ``(a_i [g-1], b_i [g, p])`` where present. The dispersion ``Sigma`` is held fixed.

    Returns:
        ``(info_ff [m, m], info_fr [K, m, r], info_rr [K, r, r], prior_var [r])``.
    """
    g = model.num_components
    n, p = design.y.shape
    qm, qc = design.x_mix.shape[1], design.x_comp.shape[1]
    g1 = g - 1
    logits, means = model.linear_predictors(params, design)
    eta = jnp.concatenate([logits[:, :g1], means.reshape(n, g * p)], axis=1)

    def obs_loglik(eta_j, y_j):
        full = jnp.concatenate([eta_j[:g1], jnp.zeros((1,), eta_j.dtype)])
        mean = eta_j[g1:].reshape(g, p)
        return jax.nn.logsumexp(jax.nn.log_softmax(full) + _mvn_logpdf(y_j, mean, params.component_cov))

    neg_hess = -jax.vmap(jax.hessian(obs_loglik))(eta, design.y)  # [n, d, d]
    h_mm = neg_hess[:, :g1, :g1]
    h_mb = neg_hess[:, :g1, g1:].reshape(n, g1, g, p)
    h_bb = neg_hess[:, g1:, g1:].reshape(n, g, p, g, p)
    xm, xc = design.x_mix, design.x_comp
    m_v, m_w = g1 * qm, g * qc * p
    f_vv = jnp.einsum("nhk,na,nc->hakc", h_mm, xm, xm).reshape(m_v, m_v)
    f_vw = jnp.einsum("nhHK,na,nc->haHcK", h_mb, xm, xc).reshape(m_v, m_w)
    f_ww = jnp.einsum("nhkHK,na,nc->hakHcK", h_bb, xc, xc).reshape(m_w, m_w)
    info_ff = jnp.block([[f_vv, f_vw], [f_vw.T, f_ww]])

    coords = _random_coordinates(model, p)
    cols = neg_hess[:, :, coords]  # [n, d, r]
    fr_v = jnp.einsum("nhs,na->nhas", cols[:, :g1], xm).reshape(n, m_v, -1)
    fr_w = jnp.einsum("nhks,na->nhaks", cols[:, g1:].reshape(n, g, p, -1), xc).reshape(n, m_w, -1)
    info_fr = _segment_sum(jnp.concatenate([fr_v, fr_w], axis=1), design.task, design.num_tasks)
    prior_var = _prior_variances(model, params)
    info_rr = _segment_sum(cols[:, coords], design.task, design.num_tasks) + _diag_embed(
        jnp.broadcast_to(1.0 / prior_var, (design.num_tasks, len(coords)))
    )
    return info_ff, info_fr, info_rr, prior_var


@functools.partial(jax.jit, static_argnums=0)
def variance_component_covariance(
    model: MixtureGLMM, params: MixtureParams, design: MixtureDesign
) -> Float[Array, "c c"]:
    r"""``cov(theta_hat) = 2 R^{-1}`` for ``theta = (lambda_1..lambda_{g-1}, phi_11..phi_gp)``.

    Only the variance components the model has (switched-on parts) are included, in
    that order; see :func:`variance_component_names`.
    """
    info_ff, info_fr, info_rr, theta = observed_information(model, params, design)
    K = design.num_tasks
    blocks = _schur_solve(info_ff, info_fr, info_rr, jnp.zeros(info_ff.shape[0]), jnp.zeros(info_rr.shape[:2]))
    schur = jnp.linalg.inv(blocks.fixed_cov)  # P
    f = blocks.cross_cov  # F_i = H_{f r_i}, [K, m, r]
    within = jnp.einsum("imr,mn,ins->irs", f, schur, f)  # F_i^T P F_i
    gram = jnp.einsum("imr,inr->rmn", f, f)  # G_s, [r, m, m]
    cross_all = jnp.einsum("mn,tnk,kl,slm->st", schur, gram, schur, gram)  # sum_ik (f_is^T P f_kt)^2
    sq_trace = jnp.sum(blocks.random_cov**2, axis=0) - jnp.sum(within**2, axis=0) + cross_all  # tr(H_st H_st^T)
    trace = jnp.einsum("iss->s", blocks.random_cov)
    inv_theta = 1.0 / theta
    diag = inv_theta**2 * (K - 2.0 * trace * inv_theta + sq_trace.diagonal() * inv_theta**2)
    reml_info = jnp.outer(inv_theta, inv_theta) * sq_trace
    reml_info = reml_info - jnp.diag(reml_info.diagonal()) + jnp.diag(diag)
    return 2.0 * jnp.linalg.inv(reml_info)


def variance_component_names(model: MixtureGLMM, response_names=("y",)) -> list[str]:
    """Names in the order of :func:`variance_component_covariance`, e.g. ``lambda[1]``."""
    names = [f"lambda[{h + 1}]" for h in range(model.num_components - 1)] if model.has_mixing_effects else []
    if model.component_random_effects:
        p = len(response_names)
        names += [f"phi[{h + 1}" + (f", {r}]" if p > 1 else "]")
                  for h in range(model.num_components) for r in response_names]
    return names


def _random_coordinates(model: MixtureGLMM, p: int) -> jnp.ndarray:
    """Positions of the random effects ``(a_i, b_i)`` inside ``eta``."""
    g1 = model.num_components - 1
    coords = list(range(g1)) if model.has_mixing_effects else []
    if model.component_random_effects:
        coords += list(range(g1, g1 + model.num_components * p))
    return jnp.asarray(coords, dtype=jnp.int32)


def _prior_variances(model: MixtureGLMM, params: MixtureParams):
    parts = [params.mixing_var] if model.has_mixing_effects else []
    if model.component_random_effects:
        parts.append(params.component_var.reshape(-1))
    return jnp.concatenate(parts)
