r"""The mixture GLMM as a NumPyro program (SVI and NUTS), and the map from a parameter point to its sites.

With ``s_c``, ``s_sd``, ``eta`` from :class:`~mtl_jax.models.mixture_glmm.params.MixturePriors`
and ``m_k``, ``s_k`` the centre and spread of response ``k`` (Gaussian: the mean and sd of
the response; other families: the mean of the empirical link
:func:`~mtl_jax.models.mixture_glmm.em.working_response` and 1, the link scale):

.. math::

    W_{hck} \sim \mathcal N(m_k[c=0], (s_c s_k)^2),\quad v_{hc} \sim \mathcal N(0, s_c^2),

    \sigma_{hk} \sim \operatorname{HalfCauchy}(s_{sd} s_k)\ \text{(Gaussian)},\quad
    \sqrt{\Lambda_{hh}} \sim \operatorname{HalfCauchy}(s_{sd}),

    \Sigma_h = \operatorname{diag}(\sigma_h) L_h L_h^T \operatorname{diag}(\sigma_h),
    \ L_h \sim \operatorname{LKJCholesky}(p, \eta);\quad \Lambda \text{ likewise } (g > 2),

    \Phi_h = \operatorname{diag}(\tau_h) C_h C_h^T \operatorname{diag}(\tau_h),\quad
    \tau_{h,(a,k)} \sim \operatorname{HalfCauchy}(s_{sd} s_k),\ C_h \sim \operatorname{LKJCholesky}(d, \eta)

(full structure; diagonal: :math:`C_h = I`; identity: one :math:`\tau_h`), task effects
:math:`a_i \sim \mathcal N(0, \Lambda)`, :math:`\operatorname{vec}B_{hi} \sim \mathcal N(0, \Phi_h)`,
non-centred by default (:math:`a_i = \operatorname{chol}(\Lambda)\varepsilon^a_i`,
:math:`\operatorname{vec}B_{hi} = \operatorname{chol}(\Phi_h)\varepsilon^b_{ih}`: the
funnel-free geometry NUTS needs) or centred (the effects are the sites: a mean-field guide
then fits each effect apart from its variance, as variational EM does; see
:func:`mtl_jax.infer.svi.run_svi_backend`), and the
labels summed out by a ``factor`` named ``y``: per row, :math:`\sum_j\log\sum_h\pi_h(x^m_j)f_h(y_j\mid B_{hi})`
(membership per observation), per task, :math:`\sum_i\log\sum_h\pi_h(x^m_i)\prod_{j\in i}f_h(y_j\mid B_{hi})`
(membership per task). The densities are the EM likelihood's own
(:func:`~mtl_jax.models.mixture_glmm.likelihood.component_log_density`: each
:math:`\Sigma_h` factorised once, not per row): its gradient costs about a quarter of
NumPyro's ``MixtureSameFamily`` of ``MultivariateNormal`` rows (ILEA, float32, CPU: 2.7 ms
against 10.9 ms), which is NUTS's cost per leapfrog step. The intercept prior is centred only when the first component
column is the intercept (all ones).

Sampled sites: ``mixing_coef`` (``g > 1``), ``component_coef``, ``component_scale`` and
``component_corr_chol`` (``p > 1``) for the Gaussian family, ``mixing_effects_sd``,
``mixing_corr_chol`` (``g > 2``), ``component_effects_sd``, ``component_effects_corr_chol``
(full structure, ``d > 1``), and under ``plate("tasks", K)`` ``mixing_effects_z`` and
``component_effects_z`` (centred: ``mixing_effects_centred`` and ``component_effects_centred``). Every :class:`MixtureParams` field is a deterministic site of its
own name (zeros for switched-off parts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from mtl_jax.linalg import cholesky, segment_sum, solve_triangular
from mtl_jax.models.mixture_glmm.em import working_response
from mtl_jax.models.mixture_glmm.likelihood import component_log_density, linear_predictors, task_log_proportions
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams

#: Smallest random-effect sd used when mapping a point to the NumPyro sites: a variance
#: estimated at its floor would otherwise sit far out in the unconstrained space.
MIN_SD = 1e-3


def response_scale(model, design: MixtureDesign):
    """``(m, s)``: the centre and spread of each response on the linear-predictor scale ``[p]``."""
    dtype = design.y.dtype
    if model.response_family.is_gaussian:
        return design.y.mean(0), design.y.std(0) + jnp.finfo(dtype).tiny
    return working_response(model, design).mean(0), jnp.ones((design.y.shape[1],), dtype)


def _effects_cholesky(scale, concentration: float, with_correlation: bool):
    """Samples ``component_effects_sd`` ``[g, d]`` (and ``component_effects_corr_chol``); Cholesky factors ``[g, d, d]``."""
    import numpyro
    import numpyro.distributions as dist

    g, d = scale.shape
    sd = numpyro.sample("component_effects_sd", dist.HalfCauchy(scale).to_event(2))
    if with_correlation and d > 1:
        corr = numpyro.sample("component_effects_corr_chol", dist.LKJCholesky(d, concentration).expand((g,))
                              .to_event(1))
        return sd[..., :, None] * corr
    return sd[..., :, None] * jnp.eye(d, dtype=sd.dtype)


def _task_effects(name: str, chol, num_tasks: int, centred: bool):
    r"""Task effects ``[K, *batch, d]`` :math:`\sim \mathcal N(0, LL^T)` for Cholesky factors ``chol [*batch, d, d]``.

    Centred: the site ``{name}_centred`` is the effects themselves; otherwise the site
    ``{name}_z`` holds standard normals and the effects are :math:`Lz`.
    """
    import numpyro
    import numpyro.distributions as dist

    batch, d = chol.shape[:-2], chol.shape[-1]
    with numpyro.plate("tasks", num_tasks):
        if centred:
            effects = dist.MultivariateNormal(jnp.zeros(batch + (d,), chol.dtype), scale_tril=chol)
            return numpyro.sample(f"{name}_centred", effects.to_event(len(batch)))
        z = numpyro.sample(f"{name}_z", dist.Normal(0.0, 1.0).expand(batch + (d,)).to_event(len(batch) + 1))
    return jnp.einsum("...de,i...e->i...d", chol, z)


def numpyro_model(model, design: MixtureDesign, centred: bool = False) -> None:
    """The program of the module docstring (``centred``: see :func:`_task_effects`)."""
    import numpyro
    import numpyro.distributions as dist

    priors = model.priors
    family = model.response_family
    g, K = model.num_components, design.num_tasks
    p, q_comp, q_mix = design.y.shape[1], design.x_comp.shape[1], design.x_mix.shape[1]
    r_c = design.z_comp.shape[1]
    d = r_c * p
    dtype = design.y.dtype
    centre, spread = response_scale(model, design)
    has_intercept = jnp.all(design.x_comp[:, 0] == 1.0)
    coef_loc = jnp.zeros((g, q_comp, p), dtype).at[:, 0, :].set(jnp.where(has_intercept, centre, 0.0))
    coef_scale = priors.coef_scale * jnp.broadcast_to(spread, (g, q_comp, p))

    if g > 1:
        v = numpyro.sample("mixing_coef", dist.Normal(0.0, priors.coef_scale).expand((g - 1, q_mix)).to_event(2))
    else:
        v = numpyro.deterministic("mixing_coef", jnp.zeros((0, q_mix), dtype))
    w = numpyro.sample("component_coef", dist.Normal(coef_loc, coef_scale).to_event(3))
    if family.is_gaussian:
        scale = numpyro.sample("component_scale",
                               dist.HalfCauchy(priors.sd_scale * jnp.broadcast_to(spread, (g, p))).to_event(2))
        if p > 1:
            corr = numpyro.sample("component_corr_chol",
                                  dist.LKJCholesky(p, priors.lkj_concentration).expand((g,)).to_event(1))
            chol = scale[:, :, None] * corr
        else:
            chol = scale[:, :, None]
    else:
        chol = jnp.broadcast_to(jnp.eye(p, dtype=dtype), (g, p, p))
    cov = numpyro.deterministic("component_cov", chol @ jnp.swapaxes(chol, 1, 2))

    g1 = g - 1
    if model.has_mixing_effects:
        sd = numpyro.sample("mixing_effects_sd", dist.HalfCauchy(priors.sd_scale).expand((g1,)).to_event(1))
        if g1 > 1:
            corr = numpyro.sample("mixing_corr_chol", dist.LKJCholesky(g1, priors.lkj_concentration))
            lam_chol = sd[:, None] * corr
        else:
            lam_chol = sd[:, None]
        mixing_cov, a = lam_chol @ lam_chol.T, _task_effects("mixing_effects", lam_chol, K, centred)
    else:
        mixing_cov, a = jnp.zeros((g1, g1), dtype), jnp.zeros((K, g1), dtype)
    mixing_cov = numpyro.deterministic("mixing_cov", mixing_cov)
    a = numpyro.deterministic("mixing_effects", a)

    if model.component_random_effects:
        effect_scale = priors.sd_scale * jnp.tile(spread, r_c)
        structure = model.random_effects_covariance
        if structure == "identity":
            sd = numpyro.sample("component_effects_sd", dist.HalfCauchy(effect_scale[0] * jnp.ones((g,), dtype))
                                .to_event(1))
            phi_chol = sd[..., None, None] * jnp.eye(d, dtype=dtype)
        else:
            phi_chol = _effects_cholesky(jnp.broadcast_to(effect_scale, (g, d)), priors.lkj_concentration,
                                         structure == "full")
        phi = phi_chol @ jnp.swapaxes(phi_chol, -1, -2)
        b = _task_effects("component_effects", phi_chol, K, centred)
        b = b.reshape(b.shape[:-1] + (r_c, p))
    else:
        phi, b = jnp.zeros((g, d, d), dtype), jnp.zeros((K, g, r_c, p), dtype)
    phi = numpyro.deterministic("component_effects_cov", phi)
    b = numpyro.deterministic("component_effects", b)

    params = MixtureParams(v, w, cov, mixing_cov, phi, a, b, jnp.zeros((K, g), dtype))
    logits, eta = linear_predictors(params, design, a, b)
    if model.membership == "task":
        dens = component_log_density(family, design.y, eta, cov, design.trials)
        joint = task_log_proportions(params, design) + segment_sum(dens, design.task, K)
        total = jax.nn.logsumexp(joint, axis=-1)
        numpyro.deterministic("class_logits", joint - total[:, None])
        numpyro.factor("y", total.sum())
        return
    numpyro.deterministic("class_logits", jnp.zeros((K, g), dtype))
    dens = component_log_density(family, design.y, eta, cov, design.trials)
    numpyro.factor("y", jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + dens, axis=-1).sum())


def _sd_and_correlation(cov):
    """Standard deviations (floored at :data:`MIN_SD`) and the Cholesky factor of the correlation of ``cov``."""
    sd = jnp.maximum(jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1)), MIN_SD)
    corr = cov / (sd[..., :, None] * sd[..., None, :]) + 1e-6 * jnp.eye(cov.shape[-1], dtype=cov.dtype)
    corr_chol = cholesky(corr)
    return sd, corr_chol / jnp.linalg.norm(corr_chol, axis=-1, keepdims=True)


def site_values(model, params: MixtureParams) -> dict[str, Array]:
    r"""The sampled sites of :func:`numpyro_model` at the point ``params``.

    Standard deviations are floored at :data:`MIN_SD` (the floor only keeps the start
    finite); the non-centred effects are solved from ``effects = L z`` so the effects are
    reproduced. Both forms' effect sites are given (each program reads its own).
    """
    values = {"component_coef": params.component_coef}
    if model.num_components > 1:
        values["mixing_coef"] = params.mixing_coef
    if model.response_family.is_gaussian:
        cov = params.component_cov
        _, corr_chol = _sd_and_correlation(cov)
        values["component_scale"] = jnp.sqrt(jnp.diagonal(cov, axis1=1, axis2=2))
        if cov.shape[-1] > 1:
            values["component_corr_chol"] = corr_chol
    if model.has_mixing_effects:
        sd, corr_chol = _sd_and_correlation(params.mixing_cov)
        values["mixing_effects_sd"] = sd
        if sd.shape[0] > 1:
            values["mixing_corr_chol"] = corr_chol
        values["mixing_effects_z"] = solve_triangular(sd[:, None] * corr_chol, params.mixing_effects.T).T
        values["mixing_effects_centred"] = params.mixing_effects
    if model.component_random_effects:
        K, g = params.component_effects.shape[:2]
        effects = params.component_effects.reshape(K, g, -1)
        values["component_effects_centred"] = effects
        sd, corr_chol = _sd_and_correlation(params.component_effects_cov)
        structure = model.random_effects_covariance
        if structure == "identity":
            values["component_effects_sd"] = sd[:, 0]
            values["component_effects_z"] = effects / sd[None, :, :1]
        elif structure == "diagonal" or sd.shape[1] == 1:
            values["component_effects_sd"] = sd
            values["component_effects_z"] = effects / sd[None]
        else:
            values["component_effects_sd"] = sd
            values["component_effects_corr_chol"] = corr_chol
            chol = sd[:, :, None] * corr_chol
            values["component_effects_z"] = jnp.swapaxes(
                solve_triangular(chol, jnp.swapaxes(jnp.swapaxes(effects, 0, 1), 1, 2)), 1, 2).swapaxes(0, 1)
    return values
