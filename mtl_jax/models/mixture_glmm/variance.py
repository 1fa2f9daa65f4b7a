r"""Asymptotic standard errors of an EM fit of the mixture GLMM (paper, section 3).

**Fixed effects** ``v`` and ``W``: with :math:`\Pi` the negative Hessian of the observed
:math:`L = L_1 + L_2` in :math:`(v, W, a, b)` (the dispersion held at its estimate), the
covariance of the fixed effects is the fixed block :math:`H_{ff} = P^{-1}` of
:math:`H = \Pi^{-1}`, :math:`P` the Schur complement over the random effects. For the
linear mixed model this is :math:`(X^T V^{-1} X)^{-1}`.

**Variance components** (:math:`\Lambda` entries, :math:`\phi_{hk}`): the REML information
in the random-effect space. With :math:`G` the prior covariance of all random effects,
:math:`T = H_{rr}` their posterior covariance and :math:`X = G^{-1} - G^{-1}TG^{-1}`,

.. math::

    \mathcal I_{cd} = \tfrac12 \operatorname{tr}\big(X\,\partial_c G\,X\,\partial_d G\big),
    \qquad \operatorname{cov}(\hat\theta) = \mathcal I^{-1}.

For a scalar effect per task this is the paper's :math:`R_{cc} = \theta_c^{-2}
\operatorname{tr}(I_K - H_c/\theta_c)^2` (with :math:`\operatorname{cov} = 2R^{-1}`); the
off-diagonal entries are :math:`\tfrac12\theta_c^{-2}\theta_d^{-2}\operatorname{tr}(H_{cd}
H_{cd}^T)`, where the paper prints the powers as :math:`-1` (dimensionally inconsistent
with its diagonal). For the linear mixed model :math:`\mathcal I` is exactly the expected
REML information :math:`\tfrac12\operatorname{tr}(P V_c P V_d)`.

The ``K x K`` blocks are never formed: :math:`T_{ii'} = \delta_{ii'}D_i^{-1} +
\bar A_i^T P^{-1}\bar A_{i'}` (the centres of :func:`mtl_jax.linalg.bordered_solve`), so
with :math:`Q = G_0^{-1}` per task, :math:`Z_i = Q D_i^{-1} M_i` (:math:`M_i` the data
information of task ``i``) and :math:`Y_i = \bar A_i Q`, every trace is a sum over tasks
plus :math:`\operatorname{tr}(P^{-1}S_cP^{-1}S_d)`, :math:`S_c = \sum_i Y_i E_c Y_i^T`:
time and memory :math:`O(n + K)`.

**Residual covariances** :math:`\Sigma_h`: the observed information of the Laplace
marginal log-likelihood in the dispersion parameters :math:`(\Sigma, \Lambda, \phi)`,
inverted jointly (forward-mode second derivatives).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mtl_jax.linalg import bordered_solve, kron_rows, psd_inverse, segment_sum
from mtl_jax.models.mixture_glmm.likelihood import _effects_prior_cov, linear_predictors, mvn_logpdf
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams


def _random_coordinates(model, p: int) -> list[int]:
    """Positions of the random effects ``(a_i, b_i)`` inside ``eta = (logits[:g-1], means)``."""
    g1 = model.num_components - 1
    coords = list(range(g1)) if model.has_mixing_effects else []
    if model.component_random_effects:
        coords += list(range(g1, g1 + model.num_components * p))
    return coords


def variance_parameters(model, p: int) -> list[tuple[str, tuple[int, int]]]:
    """``(kind, (k, l))`` per variance component, in the order of the covariance.

    ``("lambda", (k, l))`` for ``k <= l`` entries of ``Lambda``; ``("phi", (h, k))``.
    """
    g = model.num_components
    out = []
    if model.has_mixing_effects:
        out += [("lambda", (k, l)) for k in range(g - 1) for l in range(k, g - 1)]
    if model.component_random_effects:
        out += [("phi", (h, k)) for h in range(g) for k in range(p)]
    return out


def _selectors(model, p: int) -> np.ndarray:
    """``E_c = dG_0 / d theta_c`` as ``[c, r, r]`` (symmetric 0/1 matrices)."""
    g1 = model.num_components - 1
    r = len(_random_coordinates(model, p))
    offset = g1 if model.has_mixing_effects else 0
    mats = []
    for kind, (k, l) in variance_parameters(model, p):
        e = np.zeros((r, r))
        if kind == "lambda":
            e[k, l] = e[l, k] = 1.0
        else:
            i = offset + k * p + l
            e[i, i] = 1.0
        mats.append(e)
    return np.stack(mats) if mats else np.zeros((0, r, r))


@functools.partial(jax.jit, static_argnums=0)
def fixed_and_variance_covariance(model, params: MixtureParams, design: MixtureDesign):
    """``(cov_v [g-1, q_m, g-1, q_m], cov_W [g, q_c, p, g, q_c, p], cov_theta [c, c])``.

    See the module docstring; ``theta`` is ordered as :func:`variance_parameters`.
    """
    g = model.num_components
    g1 = g - 1
    n, p = design.y.shape
    qm, qc = design.x_mix.shape[1], design.x_comp.shape[1]
    dtype = design.y.dtype
    logits, means = linear_predictors(params, design, params.mixing_effects, params.component_effects)
    eta = jnp.concatenate([logits[:, :g1], means.reshape(n, g * p)], axis=1)

    def row_loglik(eta_j, y_j):
        full = jnp.concatenate([eta_j[:g1], jnp.zeros((1,), eta_j.dtype)])
        mean = eta_j[g1:].reshape(g, p)
        return jax.nn.logsumexp(jax.nn.log_softmax(full) + mvn_logpdf(y_j, mean, params.component_cov))

    neg_hess = -jax.vmap(jax.hessian(row_loglik))(eta, design.y)  # [n, d, d]
    d = g1 + g * p
    mix_rows = kron_rows(design.x_mix, g1)  # [n, qm*g1, g1]
    comp_rows = kron_rows(design.x_comp, g * p)  # [n, qc*g*p, g*p]
    fixed_rows = jnp.concatenate(
        [jnp.pad(mix_rows, ((0, 0), (0, 0), (0, g * p))), jnp.pad(comp_rows, ((0, 0), (0, 0), (g1, 0)))], axis=1
    )
    coords = _random_coordinates(model, p)
    r = len(coords)
    select = jnp.eye(d, dtype=dtype)[jnp.asarray(coords, dtype=jnp.int32)] if r else jnp.zeros((0, d), dtype)
    random_rows = jnp.broadcast_to(select, (n, r, d))
    prior_cov = _effects_prior_cov(params, model.has_mixing_effects, model.component_random_effects)
    prior_prec = psd_inverse(prior_cov) if r else jnp.zeros((0, 0), dtype)
    solution = bordered_solve(
        fixed_rows, random_rows, neg_hess, jnp.zeros((n, d), dtype), design.task, design.num_tasks, prior_prec
    )
    m_v = qm * g1
    cov_ff = solution.fixed_cov
    cov_v = cov_ff[:m_v, :m_v].reshape(qm, g1, qm, g1).transpose(1, 0, 3, 2)
    cov_w = cov_ff[m_v:, m_v:].reshape(qc, g, p, qc, g, p).transpose(1, 0, 2, 4, 3, 5)

    selectors = jnp.asarray(_selectors(model, p), dtype)
    if selectors.shape[0] == 0:
        return cov_v, cov_w, jnp.zeros((0, 0), dtype)
    data_info = segment_sum(jnp.einsum("nrd,nde,nse->nrs", random_rows, neg_hess, random_rows), design.task,
                            design.num_tasks)  # M_i
    z = jnp.einsum("rs,ist,itu->iru", prior_prec, solution.random_prec_inv, data_info)  # Q D^-1 M
    z = 0.5 * (z + jnp.swapaxes(z, 1, 2))
    y_blocks = jnp.einsum("imr,rs->ims", solution.centre, prior_prec)  # Y_i = Abar_i Q
    fixed_cov = solution.fixed_cov
    v_blocks = jnp.einsum("imr,mn,ins->irs", y_blocks, fixed_cov, y_blocks)  # Y^T P^-1 Y
    s_mats = jnp.einsum("imr,crs,ins->cmn", y_blocks, selectors, y_blocks)  # S_c
    ps = jnp.einsum("mn,cnk->cmk", fixed_cov, s_mats)  # P^-1 S_c
    zz = jnp.einsum("irs,cst,itu,dur->cd", z, selectors, z, selectors)
    zv = jnp.einsum("irs,cst,itu,dur->cd", z, selectors, v_blocks, selectors)
    cross = jnp.einsum("cmk,dkm->cd", ps, ps)
    info = 0.5 * (zz - zv - zv.T + cross)
    return cov_v, cov_w, jnp.linalg.inv(info)


@functools.partial(jax.jit, static_argnums=0)
def residual_covariance_se(model, params: MixtureParams, design: MixtureDesign) -> Float[Array, "g p p"]:
    """Standard errors of the entries of each ``Sigma_h`` (module docstring)."""
    g, p = params.component_cov.shape[:2]
    upper = np.triu_indices(p)
    use_a, use_b = model.has_mixing_effects, model.component_random_effects
    g1 = g - 1
    lam_upper = np.triu_indices(g1)

    def pack(prm):
        parts = [prm.component_cov[:, upper[0], upper[1]].reshape(-1)]
        if use_a:
            parts.append(prm.mixing_cov[lam_upper])
        if use_b:
            parts.append(prm.component_var.reshape(-1))
        return jnp.concatenate(parts)

    def unpack(theta):
        k = g * len(upper[0])
        sig = jnp.zeros((g, p, p), theta.dtype).at[:, upper[0], upper[1]].set(theta[:k].reshape(g, -1))
        sig = sig + jnp.swapaxes(jnp.triu(sig, 1), 1, 2)
        out = params._replace(component_cov=sig)
        if use_a:
            m = len(lam_upper[0])
            lam = jnp.zeros((g1, g1), theta.dtype).at[lam_upper].set(theta[k:k + m])
            out = out._replace(mixing_cov=lam + jnp.triu(lam, 1).T)
            k += m
        if use_b:
            out = out._replace(component_var=theta[k:].reshape(g, p))
        return out

    def marginal(theta):
        value, _ = model.laplace(unpack(theta), design)
        return value

    theta = pack(params)
    hess = jax.jacfwd(jax.jacfwd(marginal))(theta)
    cov = jnp.linalg.inv(-hess)
    k = g * len(upper[0])
    se = jnp.sqrt(jnp.diagonal(cov)[:k]).reshape(g, -1)
    full = jnp.zeros((g, p, p), se.dtype).at[:, upper[0], upper[1]].set(se)
    return full + jnp.swapaxes(jnp.triu(full, 1), 1, 2)


def standard_errors(model, params: MixtureParams, design: MixtureDesign, labels: dict) -> dict[str, float]:
    """Standard errors by the names of :meth:`MixtureGLMM.named_parameters`."""
    cov_v, cov_w, cov_theta = fixed_and_variance_covariance(model, params, design)
    se_sigma = residual_covariance_se(model, params, design)
    se = params._replace(
        mixing_coef=jnp.sqrt(_diag_pairs_v(cov_v)),
        component_coef=jnp.sqrt(_diag_pairs_w(cov_w)),
        component_cov=se_sigma,
        mixing_cov=jnp.zeros_like(params.mixing_cov),
        component_var=jnp.zeros_like(params.component_var),
    )
    theta_se = np.sqrt(np.diagonal(np.asarray(cov_theta)))
    p = params.component_cov.shape[-1]
    lam_se = np.zeros(params.mixing_cov.shape)
    phi_se = np.zeros(params.component_var.shape)
    for value, (kind, (k, l)) in zip(theta_se, variance_parameters(model, p)):
        if kind == "lambda":
            lam_se[k, l] = lam_se[l, k] = value
        else:
            phi_se[k, l] = value
    se = se._replace(mixing_cov=jnp.asarray(lam_se), component_var=jnp.asarray(phi_se))
    named = model.named_parameters(se, labels)
    return {name: float(value) for name, value in named.items()}


def _diag_pairs_v(cov_v):
    """Variances of ``v [h, a]`` from ``cov_v [h, a, h', a']``."""
    g1, qm = cov_v.shape[:2]
    flat = cov_v.reshape(g1 * qm, g1 * qm)
    return jnp.diagonal(flat).reshape(g1, qm)


def _diag_pairs_w(cov_w):
    """Variances of ``W [h, a, k]`` from ``cov_w [h, a, k, h', a', k']``."""
    g, qc, p = cov_w.shape[:3]
    flat = cov_w.reshape(g * qc * p, g * qc * p)
    return jnp.diagonal(flat).reshape(g, qc, p)
