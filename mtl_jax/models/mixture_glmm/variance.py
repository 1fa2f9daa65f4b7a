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
marginal log-likelihood in the dispersion parameters :math:`(\Sigma, \Lambda, \Phi)`,
inverted jointly (forward-mode second derivatives).

**Membership per task**: every standard error from the observed information of the
marginal log-likelihood (exact for Gaussian components, Laplace otherwise) in all free
population parameters :math:`(v, W, \Sigma, \Phi)`, inverted jointly.

In both, the marginal's second derivatives include the modes' own derivatives in the
parameters (the Laplace value sits at the mode :math:`\hat u(\theta)`, which moves with
:math:`\theta`): :func:`~mtl_jax.models.mixture_glmm.likelihood.implicit_newton_steps`,
never the derivatives of the Newton ascent's loop (which stops where it starts when the
stored effects already are the modes, and then holds them fixed).

**Conditional sds of the effects** (:func:`effect_sds`, lme4's ``condVar``): the square
roots of the diagonal of :math:`D_i^{-1}`, the inverse penalised information of task
``i``'s effects given the fixed effects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from mtl_jax.infer.program_cache import cached_program
from mtl_jax.linalg import bordered_solve, kron_rows, psd_inverse, segment_sum
from mtl_jax.models.mixture_glmm.likelihood import (
    _effects_prior_cov,
    class_effect_precisions,
    component_log_density,
    linear_predictors,
)
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams


def variance_parameters(model, p: int, d: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(kind, index)`` per variance component, in the order of the covariance.

    ``("lambda", (k, l))`` for ``k <= l`` entries of ``Lambda``; ``("phi", (h, e, f))`` for
    the free entries ``e <= f`` of ``Phi_h`` (diagonal: ``e = f``; identity: ``(h, -1, -1)``,
    the common variance).
    """
    g = model.num_components
    out = []
    if model.has_mixing_effects:
        out += [("lambda", (k, l)) for k in range(g - 1) for l in range(k, g - 1)]
    if model.component_random_effects:
        structure = model.random_effects_covariance
        for h in range(g):
            if structure == "identity":
                out.append(("phi", (h, -1, -1)))
            else:
                out += [("phi", (h, e, f)) for e in range(d) for f in range(e, d)
                        if structure == "full" or e == f]
    return out


def _selectors(model, p: int, d: int) -> np.ndarray:
    """``E_c = dG_0 / d theta_c`` as ``[c, r, r]`` (symmetric 0/1 matrices) over one task's effects."""
    g1 = model.num_components - 1
    offset = g1 if model.has_mixing_effects else 0
    r = offset + (model.num_components * d if model.component_random_effects else 0)
    mats = []
    for kind, index in variance_parameters(model, p, d):
        e = np.zeros((r, r))
        if kind == "lambda":
            k, l = index
            e[k, l] = e[l, k] = 1.0
        elif index[1] < 0:
            block = offset + index[0] * d + np.arange(d)
            e[block, block] = 1.0
        else:
            h, a, b = index
            e[offset + h * d + a, offset + h * d + b] = e[offset + h * d + b, offset + h * d + a] = 1.0
        mats.append(e)
    return np.stack(mats) if mats else np.zeros((0, r, r))


def _random_rows(model, design: MixtureDesign) -> Float[Array, "n r D"]:
    """How each task effect enters row ``j``'s predictors ``(logits[:g-1], vec eta [g p])``: ``[n, r, D]``.

    A mixing effect ``a_h`` adds to logit ``h``; a component effect ``(h, a, k)`` adds
    ``z_ja`` to ``eta_hk``.
    """
    g = model.num_components
    g1 = g - 1
    n, p = design.y.shape
    dtype = design.y.dtype
    D = g1 + g * p
    blocks = []
    if model.has_mixing_effects:
        blocks.append(jnp.broadcast_to(jnp.eye(g1, D, dtype=dtype), (n, g1, D)))
    if model.component_random_effects:
        z = design.z_comp
        eye = jnp.eye(g * p, dtype=dtype).reshape(g, p, g * p)
        rows = jnp.einsum("na,hkm->nhakm", z, eye).reshape(n, -1, g * p)
        blocks.append(jnp.pad(rows, ((0, 0), (0, 0), (g1, 0))))
    if not blocks:
        return jnp.zeros((n, 0, D), dtype)
    return jnp.concatenate(blocks, axis=1)


def _row_information(model, params: MixtureParams, design: MixtureDesign):
    """``-d2 log p(y_j | eta_j) / d eta_j2`` at the fit, ``[n, D, D]`` (``eta = (logits[:g-1], vec eta)``)."""
    g = model.num_components
    g1 = g - 1
    n, p = design.y.shape
    logits, means = linear_predictors(params, design, params.mixing_effects, params.component_effects)
    eta = jnp.concatenate([logits[:, :g1], means.reshape(n, g * p)], axis=1)
    family = model.response_family

    def row_loglik(eta_j, y_j, trials_j):
        full = jnp.concatenate([eta_j[:g1], jnp.zeros((1,), eta_j.dtype)])
        mean = eta_j[g1:].reshape(1, g, p)
        dens = component_log_density(family, y_j[None], mean, params.component_cov, trials_j[None])[0]
        return jax.nn.logsumexp(jax.nn.log_softmax(full) + dens)

    return -jax.vmap(jax.hessian(row_loglik))(eta, design.y, design.trials)


def _bordered_information(model, params: MixtureParams, design: MixtureDesign):
    """The observed penalised information of ``(v, W, a, B)`` as a bordered solve, and its rows."""
    g = model.num_components
    g1 = g - 1
    n, p = design.y.shape
    dtype = design.y.dtype
    neg_hess = _row_information(model, params, design)
    mix_rows = kron_rows(design.x_mix, g1)  # [n, qm*g1, g1]
    comp_rows = kron_rows(design.x_comp, g * p)  # [n, qc*g*p, g*p]
    fixed_rows = jnp.concatenate(
        [jnp.pad(mix_rows, ((0, 0), (0, 0), (0, g * p))), jnp.pad(comp_rows, ((0, 0), (0, 0), (g1, 0)))], axis=1
    )
    random_rows = _random_rows(model, design)
    r = random_rows.shape[1]
    prior_cov = _effects_prior_cov(params, model.has_mixing_effects, model.component_random_effects)
    prior_prec = psd_inverse(prior_cov) if r else jnp.zeros((0, 0), dtype)
    solution = bordered_solve(
        fixed_rows, random_rows, neg_hess, jnp.zeros((n, neg_hess.shape[-1]), dtype), design.task,
        design.num_tasks, prior_prec
    )
    return solution, neg_hess, random_rows, prior_prec


@functools.partial(jax.jit, static_argnums=0)
def fixed_and_variance_covariance(model, params: MixtureParams, design: MixtureDesign):
    """``(cov_v [g-1, q_m, g-1, q_m], cov_W [g, q_c, p, g, q_c, p], cov_theta [c, c])`` (membership per observation).

    See the module docstring; ``theta`` is ordered as :func:`variance_parameters`.
    """
    g = model.num_components
    g1 = g - 1
    p = design.y.shape[1]
    qm, qc = design.x_mix.shape[1], design.x_comp.shape[1]
    dtype = design.y.dtype
    solution, neg_hess, random_rows, prior_prec = _bordered_information(model, params, design)
    m_v = qm * g1
    cov_ff = solution.fixed_cov
    cov_v = cov_ff[:m_v, :m_v].reshape(qm, g1, qm, g1).transpose(1, 0, 3, 2)
    cov_w = cov_ff[m_v:, m_v:].reshape(qc, g, p, qc, g, p).transpose(1, 0, 2, 4, 3, 5)

    selectors = jnp.asarray(_selectors(model, p, design.z_comp.shape[1] * p), dtype)
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


def _packing(model, params: MixtureParams, fields: tuple[str, ...]):
    """``(pack, unpack)`` between ``params`` and the vector of the free entries of ``fields``.

    Free entries: all of ``mixing_coef`` and ``component_coef``; the upper triangles of
    ``component_cov`` (Gaussian family) and ``mixing_cov``; of ``component_effects_cov``
    the entries its structure leaves free (identity: the common variance).
    """
    structure = model.random_effects_covariance

    def free(field, value):
        if field in ("mixing_coef", "component_coef"):
            return value.reshape(-1)
        if field == "component_effects_cov" and structure == "identity":
            return value[:, 0, 0]
        upper = np.triu_indices(value.shape[-1])
        if field == "component_effects_cov" and structure == "diagonal":
            upper = (np.arange(value.shape[-1]),) * 2
        return value[..., upper[0], upper[1]].reshape(-1)

    def rebuild(field, template, vector):
        if field in ("mixing_coef", "component_coef"):
            return vector.reshape(template.shape)
        dim = template.shape[-1]
        if field == "component_effects_cov" and structure == "identity":
            return vector[:, None, None] * jnp.eye(dim, dtype=vector.dtype)
        upper = np.triu_indices(dim)
        if field == "component_effects_cov" and structure == "diagonal":
            upper = (np.arange(dim),) * 2
        batch = template.shape[:-2]
        out = jnp.zeros(template.shape, vector.dtype).at[..., upper[0], upper[1]].set(vector.reshape(batch + (-1,)))
        return out + jnp.swapaxes(jnp.triu(out, 1), -1, -2)

    sizes = [free(field, getattr(params, field)).shape[0] for field in fields]

    def pack(prm):
        return jnp.concatenate([free(field, getattr(prm, field)) for field in fields])

    def unpack(theta):
        out, start = params, 0
        for field, size in zip(fields, sizes):
            out = out._replace(**{field: rebuild(field, getattr(params, field), theta[start:start + size])})
            start += size
        return out

    return pack, unpack, dict(zip(fields, sizes))


def _dispersion_fields(model) -> tuple[str, ...]:
    """The covariance fields with free entries in this model."""
    return (("component_cov",) if model.response_family.is_gaussian else ()) + (
        ("mixing_cov",) if model.has_mixing_effects else ()) + (
        ("component_effects_cov",) if model.component_random_effects else ())


@functools.partial(jax.jit, static_argnums=(0, 3))
def marginal_covariance(model, params: MixtureParams, design: MixtureDesign, fields: tuple[str, ...]):
    """Inverse observed information of the marginal log-likelihood in the free entries of ``fields``.

    Returns:
        The covariance ``[m, m]`` in the order of :func:`_packing`.
    """
    pack, unpack, _ = _packing(model, params, fields)

    def marginal(theta):
        value, _ = model.laplace(unpack(theta), design)
        return value

    hess = jax.jacfwd(jax.jacfwd(marginal))(pack(params))
    return jnp.linalg.inv(-hess)


def _unpacked_standard_errors(model, params: MixtureParams, fields: tuple[str, ...], cov) -> MixtureParams:
    """``params`` with the entries of ``fields`` replaced by their standard errors (diagonal of ``cov``)."""
    _, unpack, _ = _packing(model, params, fields)
    return unpack(jnp.sqrt(jnp.diagonal(cov)))


@cached_program(static_argnames="model")
def standard_error_params(model, params: MixtureParams, design: MixtureDesign) -> MixtureParams:
    """Every standard error of the module docstring in one program, shaped as ``params``.

    Entries without one (the predicted effects, fixed structure) are 0; NaN where the
    observed information is not positive definite.
    """
    dispersion = _dispersion_fields(model)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    if model.membership == "task":
        fields = ("mixing_coef", "component_coef") + dispersion
        return _unpacked_standard_errors(model, zero, fields, marginal_covariance(model, params, design, fields))
    cov_v, cov_w, cov_theta = fixed_and_variance_covariance(model, params, design)
    se = zero._replace(mixing_coef=jnp.sqrt(_diagonal(cov_v, 2)), component_coef=jnp.sqrt(_diagonal(cov_w, 3)))
    if dispersion:
        se_dispersion = _unpacked_standard_errors(model, zero, dispersion,
                                                  marginal_covariance(model, params, design, dispersion))
        se = se._replace(component_cov=se_dispersion.component_cov)
    theta_se = jnp.sqrt(jnp.diagonal(cov_theta))
    kinds = variance_parameters(model, design.y.shape[1], params.component_effects_cov.shape[-1])
    lam = [(i, index) for i, (kind, index) in enumerate(kinds) if kind == "lambda"]
    phi = [(i, index) for i, (kind, index) in enumerate(kinds) if kind == "phi"]
    if lam:
        at, (k, l) = np.array([i for i, _ in lam]), np.array([index for _, index in lam]).T
        se = se._replace(mixing_cov=se.mixing_cov.at[k, l].set(theta_se[at]).at[l, k].set(theta_se[at]))
    if phi:
        at, (h, e, f) = np.array([i for i, _ in phi]), np.array([index for _, index in phi]).T
        if model.random_effects_covariance == "identity":  # one common variance per component
            d = params.component_effects_cov.shape[-1]
            se = se._replace(component_effects_cov=theta_se[at][:, None, None] * jnp.eye(d, dtype=theta_se.dtype))
        else:
            se = se._replace(component_effects_cov=se.component_effects_cov.at[h, e, f].set(theta_se[at])
                             .at[h, f, e].set(theta_se[at]))
    return se


def standard_errors(model, params: MixtureParams, design: MixtureDesign, labels: dict) -> dict[str, float]:
    """Standard errors by the names of :meth:`MixtureGLMM.named_parameters` (module docstring)."""
    se = jax.tree_util.tree_map(np.asarray, standard_error_params(model, params, design))
    return {name: float(value) for name, value in model.named_parameters(se, labels).items()}


def _diagonal(cov, axes: int):
    """Variances of a parameter array of ``axes`` axes from its covariance ``[*shape, *shape]``."""
    shape = cov.shape[:axes]
    size = int(np.prod(shape))
    return jnp.diagonal(cov.reshape(size, size)).reshape(shape)


@cached_program(static_argnames="model")
def effect_sds(model, params: MixtureParams, design: MixtureDesign):
    """Conditional sds of the predicted effects: ``(mixing [K, g-1], component [K, g, r, p])`` (module docstring).

    Membership per observation: from :math:`D_i^{-1}` of the penalised information of
    :math:`(a_i, B_i)` at the fit; per task: from each component's precision of the task's
    effects given that component.
    """
    K, g, r_c, p = params.component_effects.shape
    mixing = jnp.zeros_like(params.mixing_effects)
    if model.membership == "task":
        if not model.component_random_effects:
            return mixing, jnp.zeros_like(params.component_effects)
        precision = class_effect_precisions(params, design, model.response_family)  # [g, K, d, d]
        variances = jnp.diagonal(psd_inverse(precision), axis1=-2, axis2=-1)  # [g, K, d]
        return mixing, jnp.sqrt(jnp.swapaxes(variances, 0, 1)).reshape(K, g, r_c, p)
    if not model.has_random_effects:
        return mixing, jnp.zeros_like(params.component_effects)
    solution, _, _, _ = _bordered_information(model, params, design)
    sds = jnp.sqrt(jnp.diagonal(solution.random_prec_inv, axis1=-2, axis2=-1))  # [K, r]
    g1 = g - 1 if model.has_mixing_effects else 0
    if g1:
        mixing = sds[:, :g1]
    component = sds[:, g1:].reshape(K, g, r_c, p) if model.component_random_effects else jnp.zeros_like(
        params.component_effects)
    return mixing, component
