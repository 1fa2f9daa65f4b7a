r"""Mixture of Gaussian GLMs with task-level random effects (multitask mixture GLMM).

For task :math:`i` and observation :math:`j` with mixing covariates
:math:`x^m_{ij}\in\mathbb R^{q_m}` and component covariates :math:`x^c_{ij}\in\mathbb R^{q_c}`:

.. math::

    \pi_h(x^m_{ij}, a_i) = \operatorname{softmax}_h\big(v_1^T x^m_{ij} + A_{1i}, \dots,
        v_{g-1}^T x^m_{ij} + A_{(g-1)i},\; 0\big),

    y_{ij} \mid z_{ij}=h \sim \mathcal N_p\big(W_h^T x^c_{ij} + B_{hi},\; \Sigma_h\big),

    A_{hi} \sim \mathcal N(0, \lambda_h), \qquad B_{hi} \sim \mathcal N_p\big(0, \operatorname{diag}(\phi_h)\big).

With :math:`p=1` this is equations (3), (5) and (10) of the mixture-GLMM paper. For
:math:`p>1` the component random intercept is a :math:`p`-vector with one variance per
response dimension. Either random-effect part can be switched off: without both it is
the mixture of regressions with concomitant covariates (the paper's "independence"
model); with ``num_components=1`` and component effects it is the linear mixed model.

Estimation (paper, section 3) maximises :math:`L = L_1 + L_2` (eq. 7) over the fixed
and random effects by EM with the component labels as missing data, then updates the
variance components by approximate REML, :math:`\lambda_h = K^{-1}(\operatorname{tr}
H_{a_h} + \hat a_h^T\hat a_h)` and :math:`\phi_h = K^{-1}(\operatorname{tr}H_{b_h} +
\hat b_h^T\hat b_h)`, where :math:`H` is the inverse of the penalised (complete-data)
information. All per-task algebra is written for the ``[K, ...]`` stack of small blocks
and the fixed effects are coupled through a Schur complement: memory and time are
:math:`O(n + K)` and no ``K x K`` matrix is formed.

Shapes: ``n`` observations, ``K`` tasks, ``g`` components, ``p`` responses, ``q_c``
component covariates, ``q_m`` mixing covariates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import cho_factor, cho_solve
from jaxtyping import Array, Float, Int

_LOG_2PI = 1.8378770664093453


class MixtureDesign(eqx.Module):
    """The arrays one mixture-GLMM fit reads, in flat per-observation storage.

    Attributes:
        y: responses ``[n, p]``.
        x_comp: component-mean design ``[n, q_c]`` (first column the intercept).
        x_mix: mixing-proportion design ``[n, q_m]`` (first column the intercept).
        task: task id of each observation ``[n]``, integers in ``[0, num_tasks)``.
        num_tasks: ``K`` (static).
    """

    y: Float[Array, "n p"]
    x_comp: Float[Array, "n qc"]
    x_mix: Float[Array, "n qm"]
    task: Int[Array, " n"]
    num_tasks: int = eqx.field(static=True)


class MixtureParams(NamedTuple):
    """Fixed effects, dispersion, variance components and predicted random effects.

    Attributes:
        mixing_coef: ``v``, ``[g-1, q_m]`` (component ``g`` is the reference).
        component_coef: ``W``, ``[g, q_c, p]``.
        component_cov: ``Sigma``, ``[g, p, p]``.
        mixing_var: ``lambda``, ``[g-1]`` (zeros when mixing effects are off).
        component_var: ``phi``, ``[g, p]`` (zeros when component effects are off).
        mixing_effects: BLUPs ``a``, ``[K, g-1]``.
        component_effects: BLUPs ``b``, ``[K, g, p]``.
    """

    mixing_coef: Float[Array, "gm1 qm"]
    component_coef: Float[Array, "g qc p"]
    component_cov: Float[Array, "g p p"]
    mixing_var: Float[Array, " gm1"]
    component_var: Float[Array, "g p"]
    mixing_effects: Float[Array, "K gm1"]
    component_effects: Float[Array, "K g p"]


@dataclasses.dataclass(frozen=True)
class MixtureGLMM:
    """Static description of a multitask mixture of Gaussian GLMs.

    Attributes:
        num_components: ``g``.
        covariates: source columns of the component means (``None``: all columns).
        mixing_covariates: source columns of the mixing proportions (``None``: all).
        mixing_random_effects: task random intercepts ``A_hi`` in the mixing logits.
        component_random_effects: task random intercepts ``B_hi`` in the component means.
        residual_update: ``"reml"`` adds the posterior-covariance correction of the
            fixed and random effects to the residual covariance update (the
            REML-consistent EM update; exact REML for the linear mixed model);
            ``"ml"`` is the plain weighted residual covariance.
        variance_floor: added to the diagonal of each updated ``Sigma_h`` so that a
            collapsing component cannot drive the likelihood to infinity.
    """

    num_components: int
    covariates: tuple[str, ...] | None = None
    mixing_covariates: tuple[str, ...] | None = None
    mixing_random_effects: bool = True
    component_random_effects: bool = True
    residual_update: Literal["reml", "ml"] = "reml"
    variance_floor: float = 1e-6

    def __post_init__(self):
        if self.num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {self.num_components}")
        if self.residual_update not in ("reml", "ml"):
            raise ValueError(f"residual_update must be 'reml' or 'ml', got {self.residual_update!r}")
        for name in ("covariates", "mixing_covariates"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def has_mixing_effects(self) -> bool:
        """Whether mixing random effects are present (they need ``g >= 2``)."""
        return self.mixing_random_effects and self.num_components > 1

    # ------------------------------------------------------------------ design
    def design(self, data) -> MixtureDesign:
        """Select this model's covariate columns from a :class:`mtl_jax.data.TaskData`."""
        comp_cols = data.columns_for(self.covariates)
        mix_cols = data.columns_for(self.mixing_covariates)
        return MixtureDesign(
            y=data.y,
            x_comp=data.X[:, comp_cols],
            x_mix=data.X[:, mix_cols],
            task=data.task,
            num_tasks=data.num_tasks,
        )

    # -------------------------------------------------------------- predictors
    def linear_predictors(self, params: MixtureParams, design: MixtureDesign):
        """Mixing logits ``[n, g]`` (last column 0) and component means ``[n, g, p]``."""
        return _linear_predictors(params, design, params.mixing_effects, params.component_effects)

    def log_joint(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""``log pi_h(x_ij) + log f_h(y_ij)`` given the current random effects."""
        logits, means = self.linear_predictors(params, design)
        return _log_joint(logits, means, params.component_cov, design.y)

    def responsibilities(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""E-step (eq. 9): ``tau_hij = pi_h f_h / sum_l pi_l f_l``."""
        return jax.nn.softmax(self.log_joint(params, design), axis=-1)

    def random_effects_log_prior(self, params: MixtureParams) -> Float[Array, ""]:
        """``L2``: log density of the predicted random effects under their variances."""
        total = jnp.zeros((), params.component_coef.dtype)
        if self.has_mixing_effects:
            total += _normal_logpdf(params.mixing_effects, params.mixing_var).sum()
        if self.component_random_effects:
            total += _normal_logpdf(params.component_effects, params.component_var).sum()
        return total

    def objective(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
        """``L = L1 + L2`` (eq. 7), the function the EM algorithm maximises."""
        l1 = jax.nn.logsumexp(self.log_joint(params, design), axis=-1).sum()
        return l1 + self.random_effects_log_prior(params)

    def numpyro_model(self, design: MixtureDesign, priors: MixturePriors | None = None) -> None:
        r"""The model as a NumPyro program: priors, non-centred random effects, labels summed out.

        The parameterisation is that of :class:`MixtureParams`; with ``s_c``, ``s_sd`` and
        ``eta`` from ``priors`` (default :class:`MixturePriors`):

        .. math::

            v_{hc},\ W_{hck} \sim \mathcal N(0, s_c^2), \qquad
            \sqrt{\lambda_h},\ \sqrt{\phi_{hk}},\ \sigma_{hk} \sim \operatorname{HalfCauchy}(s_{sd}),

            \Sigma_h = \operatorname{diag}(\sigma_h)\, L_h L_h^T \operatorname{diag}(\sigma_h),
            \qquad L_h \sim \operatorname{LKJCholesky}(p, \eta) \quad (p > 1;\ \Sigma_h = \sigma_h^2
            \text{ for } p = 1),

            A_{hi} = \sqrt{\lambda_h}\,\varepsilon^a_{ih}, \qquad
            B_{hik} = \sqrt{\phi_{hk}}\,\varepsilon^b_{ihk}, \qquad
            \varepsilon \sim \mathcal N(0, 1) \ \text{(non-centred)},

            y_{ij} \sim \sum_h \pi_h(x^m_{ij}, A_i)\,
            \mathcal N_p\big(W_h^T x^c_{ij} + B_{hi}, \Sigma_h\big).

        The priors are on standard deviations (``var = sd**2``). The labels are summed out
        by ``MixtureSameFamily`` (a logsumexp) over the logits and means that
        :meth:`log_joint` uses, so the likelihood term is ``L1`` of :meth:`objective`.

        Sampled sites: ``mixing_coef [g-1, q_m]`` (``g > 1``), ``component_coef
        [g, q_c, p]``, ``component_scale [g, p]`` (``sigma``), ``component_corr_chol
        [g, p, p]`` (``L``, ``p > 1``), ``mixing_effects_sd [g-1]`` and
        ``component_effects_sd [g, p]`` (the random-effect sds), and under
        ``plate("tasks", K)`` the standard normals ``mixing_effects_z [K, g-1]`` and
        ``component_effects_z [K, g, p]``; ``y [n, p]`` is observed under
        ``plate("obs", n)``. Every other :class:`MixtureParams` field is a deterministic
        site of its own name and shape; the fields of a switched-off random-effect part
        (and ``mixing_coef`` when ``g = 1``) are zeros, so every field is always present.

        Args:
            design: the data.
            priors: prior scales; ``None`` for the defaults of :class:`MixturePriors`.
        """
        priors = MixturePriors() if priors is None else priors
        g, K = self.num_components, design.num_tasks
        p, q_comp, q_mix = design.y.shape[1], design.x_comp.shape[1], design.x_mix.shape[1]
        dtype = design.y.dtype
        coef_prior = dist.Normal(0.0, priors.coef_scale)
        sd_prior = dist.HalfCauchy(priors.sd_scale)

        if g > 1:
            v = numpyro.sample("mixing_coef", coef_prior.expand((g - 1, q_mix)).to_event(2))
        else:
            v = numpyro.deterministic("mixing_coef", jnp.zeros((0, q_mix), dtype))
        w = numpyro.sample("component_coef", coef_prior.expand((g, q_comp, p)).to_event(3))
        scale = numpyro.sample("component_scale", sd_prior.expand((g, p)).to_event(2))
        if p > 1:
            corr_chol = numpyro.sample(
                "component_corr_chol", dist.LKJCholesky(p, priors.lkj_concentration).expand((g,)).to_event(1)
            )
            chol = scale[:, :, None] * corr_chol
        else:
            chol = scale[:, :, None]
        cov = numpyro.deterministic("component_cov", chol @ jnp.swapaxes(chol, 1, 2))

        def random_effects(name, present, shape):
            """``(var, effects [K, *shape])``: non-centred draws, or zeros when switched off."""
            if present:
                sd = numpyro.sample(f"{name}_effects_sd", sd_prior.expand(shape).to_event(len(shape)))
                with numpyro.plate("tasks", K):
                    unit = dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape))
                    z = numpyro.sample(f"{name}_effects_z", unit)
                var, effects = sd**2, sd * z
            else:
                var, effects = jnp.zeros(shape, dtype), jnp.zeros((K,) + shape, dtype)
            var = numpyro.deterministic(f"{name}_var", var)
            return var, numpyro.deterministic(f"{name}_effects", effects)

        mixing_var, a = random_effects("mixing", self.has_mixing_effects, (g - 1,))
        component_var, b = random_effects("component", self.component_random_effects, (g, p))

        params = MixtureParams(v, w, cov, mixing_var, component_var, a, b)
        logits, means = _linear_predictors(params, design, a, b)
        likelihood = dist.MixtureSameFamily(
            dist.Categorical(logits=logits), dist.MultivariateNormal(means, scale_tril=chol)
        )
        with numpyro.plate("obs", design.y.shape[0]):
            numpyro.sample("y", likelihood, obs=design.y)

    # ------------------------------------------------------------------- EM
    def em_step(
        self, params: MixtureParams, design: MixtureDesign, update_variance_components: bool = True
    ) -> tuple[MixtureParams, Float[Array, ""]]:
        """One EM iteration; returns the new parameters and ``L`` at the old ones.

        E-step (eq. 9), then the BLUP M-steps: a penalised Newton step with step
        halving for ``(v, a)`` and penalised weighted least squares for each
        ``(W_h, b_h)``; then the residual covariances and (unless held fixed) the
        approximate REML variance components.
        """
        log_joint = self.log_joint(params, design)
        objective = jax.nn.logsumexp(log_joint, axis=-1).sum() + self.random_effects_log_prior(params)
        tau = jax.nn.softmax(log_joint, axis=-1)
        if self.num_components > 1:
            params = self._mixing_m_step(params, design, tau, update_variance_components)
        params = self._component_m_step(params, design, tau, update_variance_components)
        return params, objective

    def _mixing_m_step(self, params, design, tau, update_variance_components):
        """Penalised Newton (IRLS) step for ``(v, a)`` with step halving, then ``lambda``."""
        g1 = self.num_components - 1
        K = design.num_tasks
        with_effects = self.has_mixing_effects

        def q_mix(v, a):
            logits = _mixing_logits(v, design.x_mix, a[design.task])
            value = (tau * jax.nn.log_softmax(logits, axis=-1)).sum()
            if with_effects:
                value += _normal_logpdf(a, params.mixing_var).sum()
            return value

        v, a, lam = params.mixing_coef, params.mixing_effects, params.mixing_var
        pi = jax.nn.softmax(_mixing_logits(v, design.x_mix, a[design.task]), axis=-1)[:, :g1]
        resid = tau[:, :g1] - pi  # d Q / d eta
        weight = _diag_embed(pi) - pi[:, :, None] * pi[:, None, :]  # -d2 Q / d eta2, [n, g1, g1]
        qm = design.x_mix.shape[1]
        m = g1 * qm
        grad_v = (resid.T @ design.x_mix).reshape(m)
        info_vv = jnp.einsum("nhk,na,nc->hakc", weight, design.x_mix, design.x_mix).reshape(m, m)
        if with_effects:
            info_aa = _segment_sum(weight, design.task, K) + _diag_embed(1.0 / lam)
            info_va = _segment_sum(
                jnp.einsum("nhk,na->nhak", weight, design.x_mix), design.task, K
            ).reshape(K, m, g1)
            grad_a = _segment_sum(resid, design.task, K) - a / lam
            blocks = _schur_solve(info_vv, info_va, info_aa, grad_v, grad_a)
            step_v, step_a = blocks.fixed, blocks.random
        else:
            step_v = _psd_solve(info_vv, grad_v)
            step_a = jnp.zeros_like(a)
        step_v = step_v.reshape(g1, qm)

        base = q_mix(v, a)

        def halve(state):
            t, _ = state
            t = t / 2
            return t, q_mix(v + t * step_v, a + t * step_a)

        def needs_halving(state):
            t, value = state
            return (~(value >= base)) & (t > 2.0**-30)

        one = jnp.ones((), base.dtype)
        t, value = jax.lax.while_loop(needs_halving, halve, (one, q_mix(v + step_v, a + step_a)))
        t = jnp.where(value >= base, t, 0.0)
        v, a = v + t * step_v, a + t * step_a
        if with_effects and update_variance_components:
            lam = (jnp.sum(a**2, axis=0) + jnp.einsum("ihh->h", blocks.random_cov)) / K
        return params._replace(mixing_coef=v, mixing_effects=a, mixing_var=lam)

    def _component_m_step(self, params, design, tau, update_variance_components):
        """Penalised weighted least squares for each component, then ``Sigma`` and ``phi``."""
        update = jax.vmap(
            _component_update,
            in_axes=(1, None, None, None, 0, 0, None, None, None, None, None),
        )
        coef, effects, cov, var = update(
            tau,
            design.y,
            design.x_comp,
            design.task,
            params.component_cov,
            params.component_var,
            design.num_tasks,
            self.component_random_effects,
            self.residual_update == "reml",
            update_variance_components,
            self.variance_floor,
        )
        return params._replace(
            component_coef=coef,
            component_effects=jnp.swapaxes(effects, 0, 1),
            component_cov=cov,
            component_var=var,
        )

    # ---------------------------------------------------------------- init
    def init(self, key: Array, design: MixtureDesign, init_var: float = 1.0) -> MixtureParams:
        """Random start: soft assignment by distance to ``g`` random OLS residuals, then M-step.

        The least-squares fit of the component design gives residuals ``r``; ``g``
        observations are drawn at random and each observation is softly assigned to
        them by ``exp(-|r_j - r_c|^2 / 2 s^2)`` with ``s`` the residual sd over ``g``.
        One M-step from these responsibilities gives the starting parameters.
        """
        g, K = self.num_components, design.num_tasks
        y, x = design.y, design.x_comp
        n, p = y.shape
        dtype = y.dtype
        ols = jnp.linalg.lstsq(x, y)[0]
        resid = y - x @ ols
        scale = resid.std(axis=0) + 1e-12
        centres = resid[jax.random.choice(key, n, (g,), replace=False)]
        dist2 = (((resid[:, None, :] - centres[None]) / scale) ** 2).sum(-1)
        tau = jax.nn.softmax(-dist2 * g**2 / 2.0, axis=-1)
        params = MixtureParams(
            mixing_coef=jnp.zeros((g - 1, design.x_mix.shape[1]), dtype),
            component_coef=jnp.broadcast_to(ols, (g,) + ols.shape),
            component_cov=jnp.broadcast_to(jnp.cov(resid.T).reshape(p, p), (g, p, p)),
            mixing_var=jnp.full((g - 1,), init_var if self.has_mixing_effects else 0.0, dtype),
            component_var=jnp.full((g, p), init_var if self.component_random_effects else 0.0, dtype),
            mixing_effects=jnp.zeros((K, g - 1), dtype),
            component_effects=jnp.zeros((K, g, p), dtype),
        )
        if g > 1:
            params = self._mixing_m_step(params, design, tau, update_variance_components=False)
        return self._component_m_step(params, design, tau, update_variance_components=False)

    # --------------------------------------------------------------- names
    def labelled_parameters(
        self, params: MixtureParams, component_columns, mixing_columns, response_names, leading: int = 0
    ) -> dict[str, np.ndarray]:
        """Population-level parameters by readable name, keeping ``leading`` batch axes.

        Names: ``v[h, col]`` (mixing), ``w[h, col]`` or ``w[h, col, response]``,
        ``sigma2[h]`` or ``Sigma[h, k, l]``, ``lambda[h]``, ``phi[h]`` or ``phi[h, response]``;
        components are numbered from 1.
        """
        p = len(response_names)
        lead = (slice(None),) * leading
        out: dict[str, np.ndarray] = {}
        arrays = {field: np.asarray(value) for field, value in params._asdict().items()}
        for h in range(self.num_components - 1):
            for c, col in enumerate(mixing_columns):
                out[f"v[{h + 1}, {col}]"] = arrays["mixing_coef"][lead + (h, c)]
        for h in range(self.num_components):
            for c, col in enumerate(component_columns):
                for k, resp in enumerate(response_names):
                    suffix = f", {resp}" if p > 1 else ""
                    out[f"w[{h + 1}, {col}{suffix}]"] = arrays["component_coef"][lead + (h, c, k)]
        for h in range(self.num_components):
            if p == 1:
                out[f"sigma2[{h + 1}]"] = arrays["component_cov"][lead + (h, 0, 0)]
            else:
                for k in range(p):
                    for m in range(k, p):
                        name = f"Sigma[{h + 1}, {response_names[k]}, {response_names[m]}]"
                        out[name] = arrays["component_cov"][lead + (h, k, m)]
        if self.has_mixing_effects:
            for h in range(self.num_components - 1):
                out[f"lambda[{h + 1}]"] = arrays["mixing_var"][lead + (h,)]
        if self.component_random_effects:
            for h in range(self.num_components):
                for k, resp in enumerate(response_names):
                    suffix = f", {resp}" if p > 1 else ""
                    out[f"phi[{h + 1}{suffix}]"] = arrays["component_var"][lead + (h, k)]
        return out

    # ------------------------------------------------------------ marginal
    @functools.partial(jax.jit, static_argnums=(0,), static_argnames=("newton_steps",))
    def marginal_log_likelihood(
        self, params: MixtureParams, design: MixtureDesign, newton_steps: int = 8
    ) -> Float[Array, ""]:
        r"""Log-likelihood with the random effects integrated out (per-task Laplace).

        For each task, :math:`\log\int \prod_j \sum_h \pi_h f_h\, N(u; 0, \Psi)\,du
        \approx f_i(\hat u) + \tfrac r2 \log 2\pi - \tfrac12\log\det(-\nabla^2 f_i(\hat u))`
        with :math:`f_i(u)` the task's log-likelihood plus log prior and :math:`\hat u`
        its mode, refined from the BLUPs by guarded Newton steps. Exact when the
        integrand is Gaussian (the linear mixed model).
        """
        if not (self.has_mixing_effects or self.component_random_effects):
            return jax.nn.logsumexp(self.log_joint(params, design), axis=-1).sum()
        return _laplace_log_marginal(self, params, design, newton_steps)

    def num_parameters(self, p: int, q_comp: int, q_mix: int) -> int:
        """Free parameters counted by BIC: fixed effects, covariances, variance components."""
        g = self.num_components
        count = (g - 1) * q_mix + g * q_comp * p + g * p * (p + 1) // 2
        if self.has_mixing_effects:
            count += g - 1
        if self.component_random_effects:
            count += g * p
        return count

    def bic(self, loglik: Float[Array, ""], design: MixtureDesign) -> Float[Array, ""]:
        """``-2 loglik + k log n`` for the marginal log-likelihood ``loglik``."""
        n, p = design.y.shape
        k = self.num_parameters(p, design.x_comp.shape[1], design.x_mix.shape[1])
        return -2.0 * loglik + k * jnp.log(n)

    # ---------------------------------------------------------- prediction
    def predict(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n p"]:
        r"""Predictive mean :math:`\sum_h \pi_h(x, a_i)(W_h^T x + b_{hi})`."""
        logits, means = self.linear_predictors(params, design)
        return jnp.einsum("ng,ngp->np", jax.nn.softmax(logits, axis=-1), means)

    def align_effects(self, params: MixtureParams, rows: Int[Array, " K_new"], seen: Array) -> MixtureParams:
        """Random effects for another task list: row ``rows[k]`` where ``seen[k]``, else zero.

        A task unseen in training gets the population-level answer (its random effects at
        their prior mean, zero).
        """
        a = jnp.where(seen[:, None], params.mixing_effects[rows], 0.0)
        b = jnp.where(seen[:, None, None], params.component_effects[rows], 0.0)
        return params._replace(mixing_effects=a, component_effects=b)

    # ----------------------------------------------------------- simulation
    def sample_effects(self, key: Array, params: MixtureParams, num_tasks: int) -> MixtureParams:
        """Draw ``a_i ~ N(0, Lambda)`` and ``b_i ~ N(0, Phi)`` for ``num_tasks`` tasks."""
        g = self.num_components
        p = params.component_coef.shape[-1]
        dtype = params.component_coef.dtype
        key_a, key_b = jax.random.split(key)
        a = jax.random.normal(key_a, (num_tasks, g - 1), dtype) * jnp.sqrt(params.mixing_var)
        b = jax.random.normal(key_b, (num_tasks, g, p), dtype) * jnp.sqrt(params.component_var)
        return params._replace(mixing_effects=a, component_effects=b)

    def simulate(self, key: Array, params: MixtureParams, design: MixtureDesign) -> tuple[Array, Array]:
        """Draw labels ``z [n]`` and responses ``y [n, p]`` at the design's covariates.

        The random effects are taken from ``params`` (see :meth:`sample_effects`).
        """
        key_z, key_y = jax.random.split(key)
        logits, means = self.linear_predictors(params, design)
        z = jax.random.categorical(key_z, logits, axis=-1)
        chol = jnp.linalg.cholesky(params.component_cov)
        noise = jax.random.normal(key_y, means.shape[:1] + means.shape[2:], means.dtype)
        y = jnp.take_along_axis(means, z[:, None, None], axis=1)[:, 0] + jnp.einsum(
            "npk,nk->np", chol[z], noise
        )
        return z, y

    # -------------------------------------------------------------- labels
    def relabel(self, params: MixtureParams, order) -> MixtureParams:
        """Permute components: new component ``h`` is old component ``order[h]``.

        The mixing logits are re-expressed against the new reference (last) component,
        so the mixture itself is unchanged.
        """
        order = jnp.asarray(order)
        g = self.num_components
        dtype = params.component_coef.dtype
        full_v = jnp.concatenate([params.mixing_coef, jnp.zeros((1,) + params.mixing_coef.shape[1:], dtype)])
        full_a = jnp.concatenate([params.mixing_effects, jnp.zeros(params.mixing_effects.shape[:1] + (1,), dtype)], 1)
        full_v = full_v[order] - full_v[order[g - 1]]
        full_a = full_a[:, order] - full_a[:, order[g - 1], None]
        # A'_h = A_order[h] - A_order[g-1]: independent effects, so the variances add.
        full_lam = jnp.concatenate([params.mixing_var, jnp.zeros((1,), dtype)])
        return MixtureParams(
            mixing_coef=full_v[: g - 1],
            component_coef=params.component_coef[order],
            component_cov=params.component_cov[order],
            mixing_var=full_lam[order[: g - 1]] + full_lam[order[g - 1]],
            component_var=params.component_var[order],
            mixing_effects=full_a[:, : g - 1],
            component_effects=params.component_effects[:, order],
        )


# ---------------------------------------------------------------------- helpers
class _SchurBlocks(NamedTuple):
    fixed: Array  # solution for the fixed effects, [m]
    random: Array  # solution for the per-task random effects, [K, r]
    fixed_cov: Array  # H_ff = P^{-1}, [m, m]
    cross_cov: Array  # H_fr_i, [K, m, r]
    random_cov: Array  # H_rr_i (diagonal task blocks of H), [K, r, r]


def _schur_solve(info_ff, info_fr, info_rr, grad_f, grad_r) -> _SchurBlocks:
    r"""Solve the bordered block-diagonal system and return the blocks of its inverse.

    The system is ``[[F, C_1 .. C_K], [C_i^T, D_i]] (x_f, x_r) = (g_f, g_r)`` with
    ``F [m, m]``, ``C_i [m, r]`` and ``D_i [r, r]``. With
    :math:`P = F - \sum_i C_i D_i^{-1} C_i^T` (Schur complement):
    :math:`x_f = P^{-1}(g_f - \sum_i C_i D_i^{-1} g_{r,i})`,
    :math:`x_{r,i} = D_i^{-1}(g_{r,i} - C_i^T x_f)`, and the inverse has
    :math:`H_{ff} = P^{-1}`, :math:`H_{fr_i} = -P^{-1} C_i D_i^{-1}`,
    :math:`H_{r_i r_i} = D_i^{-1} + D_i^{-1} C_i^T P^{-1} C_i D_i^{-1}`.
    Cost :math:`O(K (m^2 r + r^3) + m^3)`.
    """
    d_inv = jnp.linalg.inv(info_rr)  # [K, r, r], r is small
    c_dinv = jnp.einsum("imr,irs->ims", info_fr, d_inv)
    schur = info_ff - jnp.einsum("ims,ins->mn", c_dinv, info_fr)
    p_inv = _psd_inverse(schur)
    fixed = p_inv @ (grad_f - jnp.einsum("ims,is->m", c_dinv, grad_r))
    random = jnp.einsum("irs,is->ir", d_inv, grad_r - jnp.einsum("imr,m->ir", info_fr, fixed))
    cross_cov = -jnp.einsum("mn,inr->imr", p_inv, c_dinv)
    random_cov = d_inv + jnp.einsum("imr,mn,ins->irs", c_dinv, p_inv, c_dinv)
    return _SchurBlocks(fixed, random, p_inv, cross_cov, random_cov)


def _component_update(tau, y, x, task, cov, var, num_tasks, with_effects, reml, update_var, floor):
    r"""M-step of one Gaussian component (weights ``tau [n]``).

    Henderson's mixed-model equations for :math:`\beta=\operatorname{vec}(W_h)` (index
    ``(a, k)``, covariate ``a``, response ``k``) and the task intercepts :math:`b_i`, with
    :math:`S=\Sigma_h^{-1}`: :math:`F = G \otimes S`, :math:`G=\sum_j\tau_j x_jx_j^T`;
    :math:`C_i = s_i \otimes S`, :math:`s_i = \sum_{j\in i}\tau_j x_j`;
    :math:`D_i = n_i S + \operatorname{diag}(\phi_h)^{-1}`. The residual covariance is
    :math:`(\sum_j \tau_j r_j r_j^T + M)/\sum_j\tau_j`, where for REML
    :math:`M=\sum_j\tau_j\tilde X_j H \tilde X_j^T` is the posterior covariance of the
    fitted means; :math:`\phi_{hk} = K^{-1}\sum_i (b_{ik}^2 + H_{b_ib_i,kk})`.
    """
    q, p = x.shape[1], y.shape[1]
    chol = cho_factor(cov, lower=True)
    prec = cho_solve(chol, jnp.eye(p, dtype=y.dtype))
    gram = jnp.einsum("n,na,nc->ac", tau, x, x)
    info_ff = jnp.kron(gram, prec)
    grad_f = (jnp.einsum("n,na,nk->ak", tau, x, y) @ prec).reshape(q * p)
    total = tau.sum()
    if with_effects:
        n_i = _segment_sum(tau, task, num_tasks)
        s_i = _segment_sum(tau[:, None] * x, task, num_tasks)
        t_i = _segment_sum(tau[:, None] * y, task, num_tasks)
        info_rr = n_i[:, None, None] * prec + _diag_embed(1.0 / var)
        info_fr = jnp.einsum("ia,kl->iakl", s_i, prec).reshape(num_tasks, q * p, p)
        blocks = _schur_solve(info_ff, info_fr, info_rr, grad_f, t_i @ prec)
        beta, effects, fixed_cov = blocks.fixed, blocks.random, blocks.fixed_cov
    else:
        fixed_cov = _psd_inverse(info_ff)
        beta = fixed_cov @ grad_f
        effects = jnp.zeros((num_tasks, p), y.dtype)
    coef = beta.reshape(q, p)
    resid = y - x @ coef - effects[task]
    scatter = jnp.einsum("n,nk,nl->kl", tau, resid, resid)
    if reml:
        scatter += jnp.einsum("ac,akcl->kl", gram, fixed_cov.reshape(q, p, q, p))
        if with_effects:
            cross = jnp.einsum("ia,iakl->kl", s_i, blocks.cross_cov.reshape(num_tasks, q, p, p))
            scatter += cross + cross.T + jnp.einsum("i,ikl->kl", n_i, blocks.random_cov)
    new_cov = scatter / total + floor * jnp.eye(p, dtype=y.dtype)
    if with_effects and update_var:
        var = (jnp.sum(effects**2, axis=0) + jnp.einsum("ikk->k", blocks.random_cov)) / num_tasks
    return coef, effects, new_cov, var


def _laplace_log_marginal(model: MixtureGLMM, params: MixtureParams, design: MixtureDesign, newton_steps):
    """Per-task Laplace approximation; see :meth:`MixtureGLMM.marginal_log_likelihood`."""
    g = model.num_components
    K = design.num_tasks
    p = design.y.shape[1]
    use_a, use_b = model.has_mixing_effects, model.component_random_effects
    base_logits, base_means = _linear_predictors(
        params, design, jnp.zeros_like(params.mixing_effects), jnp.zeros_like(params.component_effects)
    )

    def unpack(u):  # u: [r] -> (a [g-1], b [g, p])
        a = u[: g - 1] if use_a else jnp.zeros((g - 1,), u.dtype)
        b = u[(g - 1) if use_a else 0 :].reshape(g, p) if use_b else jnp.zeros((g, p), u.dtype)
        return a, b

    prior_var = jnp.concatenate(
        ([params.mixing_var] if use_a else []) + ([params.component_var.reshape(-1)] if use_b else [])
    )

    def obs_loglik(u, logits, means, y):
        a, b = unpack(u)
        full = logits + jnp.concatenate([a, jnp.zeros((1,), a.dtype)])
        log_joint = jax.nn.log_softmax(full) + _mvn_logpdf(y, means + b, params.component_cov)
        return jax.nn.logsumexp(log_joint)

    obs_grad = jax.vmap(jax.grad(obs_loglik))
    obs_hess = jax.vmap(jax.hessian(obs_loglik))
    obs_value = jax.vmap(obs_loglik)

    def task_terms(u):  # u: [K, r]
        args = (u[design.task], base_logits, base_means, design.y)
        value = _segment_sum(obs_value(*args), design.task, K) + _normal_logpdf(u, prior_var).sum(-1)
        grad = _segment_sum(obs_grad(*args), design.task, K) - u / prior_var
        hess = _segment_sum(obs_hess(*args), design.task, K) - _diag_embed(
            jnp.broadcast_to(1.0 / prior_var, u.shape)
        )
        return value, grad, hess

    parts = ([params.mixing_effects] if use_a else []) + (
        [params.component_effects.reshape(K, -1)] if use_b else []
    )
    u = jnp.concatenate(parts, axis=1)

    def newton(_, u):
        value, grad, hess = task_terms(u)
        proposal = u - jnp.linalg.solve(hess, grad[..., None])[..., 0]
        new_value = task_terms(proposal)[0]
        return jnp.where((new_value >= value)[:, None], proposal, u)

    u = jax.lax.fori_loop(0, newton_steps, newton, u)
    value, _, hess = task_terms(u)
    r = u.shape[1]
    _, logdet = jnp.linalg.slogdet(-hess)
    return jnp.sum(value + 0.5 * r * _LOG_2PI - 0.5 * logdet)


def _mixing_logits(v, x_mix, a_obs):
    logits = x_mix @ v.T + a_obs
    return jnp.concatenate([logits, jnp.zeros(logits.shape[:1] + (1,), logits.dtype)], axis=1)


def _linear_predictors(params: MixtureParams, design: MixtureDesign, a, b):
    logits = _mixing_logits(params.mixing_coef, design.x_mix, a[design.task])
    means = jnp.einsum("nq,gqp->ngp", design.x_comp, params.component_coef) + b[design.task]
    return logits, means


def _log_joint(logits, means, cov, y):
    return jax.nn.log_softmax(logits, axis=-1) + _mvn_logpdf(y[:, None, :], means, cov)


def _mvn_logpdf(y, mean, cov):
    """``log N_p(y; mean_h, Sigma_h)`` for ``mean [..., g, p]``, ``cov [g, p, p]``.

    Each ``Sigma_h`` is factorised once and the residuals whitened with the inverse
    factor; a distribution object would broadcast ``Sigma`` to every observation and
    factorise it ``n * g`` times.
    """
    chol = jnp.linalg.cholesky(cov)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype),
                                                                        cov.shape), lower=True)
    white = jnp.einsum("gkl,...gl->...gk", inv_chol, y - mean)
    half_logdet = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return -0.5 * (cov.shape[-1] * _LOG_2PI + jnp.sum(white**2, axis=-1)) - half_logdet


def _normal_logpdf(x, var):
    """Sum-free elementwise ``log N(x; 0, var)``; zero where ``var`` is zero (effects off)."""
    safe = jnp.where(var > 0, var, 1.0)
    return jnp.where(var > 0, -0.5 * (_LOG_2PI + jnp.log(safe) + x**2 / safe), 0.0)


def _segment_sum(values, task, num_tasks):
    return jax.ops.segment_sum(values, task, num_segments=num_tasks)


def _diag_embed(x):
    return x[..., :, None] * jnp.eye(x.shape[-1], dtype=x.dtype)


def _psd_inverse(matrix):
    jitter = 1e-10 * jnp.trace(matrix) / matrix.shape[0]
    factor = cho_factor(matrix + jitter * jnp.eye(matrix.shape[0], dtype=matrix.dtype), lower=True)
    return cho_solve(factor, jnp.eye(matrix.shape[0], dtype=matrix.dtype))


def _psd_solve(matrix, rhs):
    return _psd_inverse(matrix) @ rhs


@dataclasses.dataclass(frozen=True)
class MixturePriors:
    """Prior scales of :meth:`MixtureGLMM.numpyro_model`.

    Attributes:
        coef_scale: sd of the ``Normal(0, coef_scale)`` prior on every fixed-effect
            coefficient (``v`` and ``W``).
        sd_scale: scale of the ``HalfCauchy(sd_scale)`` prior on every standard
            deviation: the random-effect sds ``sqrt(lambda_h)``, ``sqrt(phi_hk)`` and the
            residual sds ``sqrt(Sigma_hkk)``.
        lkj_concentration: ``eta`` of the ``LKJCholesky`` prior on the Cholesky factor of
            each residual correlation matrix (``p > 1``; ``eta > 1`` favours weak correlation).
    """

    coef_scale: float = 5.0
    sd_scale: float = 1.0
    lkj_concentration: float = 2.0
