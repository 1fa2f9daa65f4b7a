r"""The multitask mixture of Gaussian GLMs with task random effects: :class:`MixtureGLMM`.

For task :math:`i` and observation :math:`j` with mixing covariates
:math:`x^m_{ij}\in\mathbb R^{q_m}` and component covariates :math:`x^c_{ij}\in\mathbb R^{q_c}`:

.. math::

    \pi_h(x^m_{ij}, a_i) = \operatorname{softmax}_h\big(v_1^T x^m_{ij} + a_{1i}, \dots,
        v_{g-1}^T x^m_{ij} + a_{(g-1)i},\; 0\big),

    y_{ij} \mid z_{ij}=h \sim \mathcal N_p\big(W_h^T x^c_{ij} + b_{hi},\; \Sigma_h\big),

    a_i \sim \mathcal N_{g-1}(0, \Lambda), \qquad b_{hi} \sim \mathcal N_p\big(0, \operatorname{diag}(\phi_h)\big).

With :math:`p=1` and a diagonal :math:`\Lambda` this is equations (3), (5) and (10) of the
mixture-GLMM paper. :math:`\Lambda` is a full covariance so that relabelling the components
(which re-expresses the logits against another reference) is an exact symmetry. Either
random-effect part can be switched off: without both it is the mixture of regressions with
concomitant covariates (the paper's "independence" model); with ``num_components=1`` and
component effects it is the linear mixed model.

This module is the model (protocol of :mod:`mtl_jax.models.protocol`): design, densities,
NumPyro program, prediction, labels, simulation. Its EM algorithm is in
:mod:`~mtl_jax.models.mixture_glmm.em`, the densities in
:mod:`~mtl_jax.models.mixture_glmm.likelihood`, the standard errors in
:mod:`~mtl_jax.models.mixture_glmm.variance`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from jaxtyping import Array, Float

from mtl_jax.data import TaskData
from mtl_jax.linalg import cholesky, psd_cholesky, solve_triangular
from mtl_jax.models.mixture_glmm import em, likelihood, variance
from mtl_jax.models.mixture_glmm.params import POPULATION_FIELDS, MixtureDesign, MixtureParams, MixturePriors
from mtl_jax.models.protocol import register

#: Smallest random-effect sd used when mapping a point to the NumPyro sites: a variance
#: estimated at its floor would otherwise sit far out in the unconstrained space.
MIN_SD = 1e-3


@register
@dataclasses.dataclass(frozen=True)
class MixtureGLMM:
    """Static description of a multitask mixture of Gaussian GLMs.

    Attributes:
        num_components: ``g``.
        covariates: source columns of the component means (``None``: all columns).
        mixing_covariates: source columns of the mixing proportions (``None``: all).
        mixing_random_effects: task random intercepts ``a_i`` in the mixing logits.
        component_random_effects: task random intercepts ``b_hi`` in the component means.
        residual_update: ``"reml"`` adds the posterior covariance of the fitted means to the
            residual covariance update (exact REML for the linear mixed model); ``"ml"`` is
            the plain weighted residual covariance.
        variance_floor: every variance lives at or above this fraction of its scale (1 for
            the logit-scale ``Lambda``, the response variance for ``phi`` and ``Sigma``), so
            that a collapsing component or a vanishing variance component cannot make the
            likelihood infinite. A variance within 10 times its floor is reported as at the
            boundary.
        priors: prior scales of the NumPyro program (SVI, NUTS).
    """

    name: ClassVar[str] = "mixture-glmm"
    methods: ClassVar[frozenset] = frozenset({"em", "svi", "nuts"})

    num_components: int
    covariates: tuple[str, ...] | None = None
    mixing_covariates: tuple[str, ...] | None = None
    mixing_random_effects: bool = True
    component_random_effects: bool = True
    residual_update: Literal["reml", "ml"] = "reml"
    variance_floor: float = 1e-6
    priors: MixturePriors = MixturePriors()

    def __post_init__(self):
        if not isinstance(self.num_components, (int, np.integer)) or self.num_components < 1:
            raise ValueError(f"num_components must be an integer >= 1, got {self.num_components!r}")
        if self.residual_update not in ("reml", "ml"):
            raise ValueError(f"residual_update must be 'reml' or 'ml', got {self.residual_update!r}")
        for name in ("covariates", "mixing_covariates"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.priors, dict):
            object.__setattr__(self, "priors", MixturePriors(**self.priors))

    @property
    def has_mixing_effects(self) -> bool:
        """Whether mixing random effects are present (they need ``g >= 2``)."""
        return self.mixing_random_effects and self.num_components > 1

    @property
    def has_random_effects(self) -> bool:
        """Whether any task random effect is present."""
        return self.has_mixing_effects or self.component_random_effects

    # ----------------------------------------------------------------- data
    def design(self, data) -> MixtureDesign:
        """This model's arrays from a :class:`mtl_jax.data.TaskData` (a design passes through)."""
        if isinstance(data, MixtureDesign):
            return data
        return MixtureDesign(
            y=data.y,
            x_comp=data.X[:, data.columns_for(self.covariates)],
            x_mix=data.X[:, data.columns_for(self.mixing_covariates)],
            task=data.task,
            num_tasks=data.num_tasks,
        )

    def labels(self, data) -> dict[str, Any]:
        """Task, column and response names (default names for a raw design)."""
        if isinstance(data, MixtureDesign):
            return {
                "task_names": [str(i) for i in range(data.num_tasks)],
                "component_columns": [f"x{i}" for i in range(data.x_comp.shape[1])],
                "mixing_columns": [f"x{i}" for i in range(data.x_mix.shape[1])],
                "response_names": [f"y{i}" for i in range(data.y.shape[1])],
            }
        return {
            "task_names": list(data.task_names),
            "component_columns": [data.columns[i] for i in data.columns_for(self.covariates)],
            "mixing_columns": [data.columns[i] for i in data.columns_for(self.mixing_covariates)],
            "response_names": list(data.response_names),
        }

    # ------------------------------------------------------------ densities
    def linear_predictors(self, params: MixtureParams, design: MixtureDesign):
        """Mixing logits ``[n, g]`` (last column 0) and component means ``[n, g, p]``."""
        return likelihood.linear_predictors(params, design, params.mixing_effects, params.component_effects)

    def log_joint(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""``log pi_h(x_ij) + log f_h(y_ij)`` given the current random effects."""
        logits, means = self.linear_predictors(params, design)
        return likelihood.log_joint(logits, means, params.component_cov, design.y)

    def responsibilities(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""E-step (eq. 9): ``tau_hij = pi_h f_h / sum_l pi_l f_l``."""
        return jax.nn.softmax(self.log_joint(params, design), axis=-1)

    def objective(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
        """``L = L1 + L2`` (eq. 7), the function the EM steps increase."""
        return em.complete_objective(self, params, design)

    @functools.partial(jax.jit, static_argnums=0)
    def laplace(self, params: MixtureParams, design: MixtureDesign):
        """``(value, ok)`` of :func:`~mtl_jax.models.mixture_glmm.likelihood.laplace_log_marginal`."""
        if not self.has_random_effects:
            value = jax.nn.logsumexp(self.log_joint(params, design), axis=-1).sum()
            return value, jnp.isfinite(value)
        return likelihood.laplace_log_marginal(
            params, design, use_mixing=self.has_mixing_effects, use_component=self.component_random_effects
        )

    def score(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
        """Marginal log-likelihood (per-task Laplace; exact without random effects and for the LMM).

        NaN where the Laplace approximation is invalid (mode not reached, or a task's
        negative Hessian not positive definite): such a point ranks no restart and sets no BIC.
        """
        value, ok = self.laplace(params, design)
        return jnp.where(ok, value, jnp.nan)

    def num_observations(self, design: MixtureDesign) -> int:
        """Rows ``n`` (BIC's sample size)."""
        return design.y.shape[0]

    def num_parameters(self, design: MixtureDesign) -> int:
        """Free parameters counted by BIC: fixed effects, covariances, variance components."""
        g = self.num_components
        p, q_comp, q_mix = design.y.shape[1], design.x_comp.shape[1], design.x_mix.shape[1]
        count = (g - 1) * q_mix + g * q_comp * p + g * p * (p + 1) // 2
        if self.has_mixing_effects:
            count += g * (g - 1) // 2
        if self.component_random_effects:
            count += g * p
        return count

    # ------------------------------------------------------------------- EM
    def init(self, key: Array, design: MixtureDesign) -> MixtureParams:
        """Random start (see :func:`mtl_jax.models.mixture_glmm.em.init`)."""
        return em.init(self, key, design)

    def em_step(self, params: MixtureParams, design: MixtureDesign, update_variance_components: bool = True):
        """One EM iteration: new parameters and the stopping quantity ``h_A`` at the old ones."""
        return em.em_step(self, params, design, update_variance_components)

    def population(self, params: MixtureParams) -> dict[str, Array]:
        """The population-level fields (no task axis)."""
        return {field: getattr(params, field) for field in POPULATION_FIELDS}

    # ------------------------------------------------------------ prediction
    def predict(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n p"]:
        r"""Predictive mean :math:`\sum_h E[\pi_h](W_h^T x + b_{hi})`.

        For a task seen in training the task's predicted effects are plugged in; for an
        unseen task (id ``>= K``) the effects are integrated out: ``b`` has mean zero and
        the mixing proportions are averaged over ``a ~ N(0, Lambda)`` by Gauss-Hermite.
        """
        logits, means = self.linear_predictors(params, design)
        pi = jax.nn.softmax(logits, axis=-1)
        if design.num_tasks > params.mixing_effects.shape[0]:
            population = likelihood.population_proportions(params, design, self.has_mixing_effects)
            pi = jnp.where(likelihood.seen_rows(params, design)[:, None], pi, population)
        return jnp.einsum("ng,ngp->np", pi, means)

    def log_predictive(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, " n"]:
        r"""Natural-log predictive density of each row's response.

        Seen tasks: :math:`\log\sum_h \pi_h(x, \hat a_i) N(y; W_h^Tx + \hat b_{hi}, \Sigma_h)`;
        unseen tasks: the effects integrated out
        (:func:`~mtl_jax.models.mixture_glmm.likelihood.population_log_predictive`).
        """
        plug_in = jax.nn.logsumexp(self.log_joint(params, design), axis=-1)
        if design.num_tasks > params.mixing_effects.shape[0]:
            population = likelihood.population_log_predictive(
                params, design, self.has_mixing_effects, self.component_random_effects)
            return jnp.where(likelihood.seen_rows(params, design), plug_in, population)
        return plug_in

    # ------------------------------------------------------------ simulation
    def sample_effects(self, key: Array, params: MixtureParams, num_tasks: int) -> MixtureParams:
        """Draw ``a_i ~ N(0, Lambda)`` and ``b_i ~ N(0, diag phi)`` for ``num_tasks`` tasks."""
        g = self.num_components
        p = params.component_coef.shape[-1]
        dtype = params.component_coef.dtype
        key_a, key_b = jax.random.split(key)
        z = jax.random.normal(key_a, (num_tasks, g - 1), dtype)
        a = z @ psd_cholesky(params.mixing_cov).T if g > 1 else z
        b = jax.random.normal(key_b, (num_tasks, g, p), dtype) * jnp.sqrt(params.component_var)
        return params._replace(mixing_effects=a, component_effects=b)

    def simulate(self, key: Array, params: MixtureParams, design: MixtureDesign) -> tuple[Array, Array]:
        """Draw labels ``z [n]`` and responses ``y [n, p]`` at the design's covariates.

        The random effects are taken from ``params`` (see :meth:`sample_effects`).
        """
        key_z, key_y = jax.random.split(key)
        logits, means = self.linear_predictors(params, design)
        z = jax.random.categorical(key_z, logits, axis=-1)
        chol = cholesky(params.component_cov)
        noise = jax.random.normal(key_y, means.shape[:1] + means.shape[2:], means.dtype)
        y = jnp.take_along_axis(means, z[:, None, None], axis=1)[:, 0] + jnp.einsum("npk,nk->np", chol[z], noise)
        return z, y

    # ---------------------------------------------------------------- labels
    def relabel(self, params: MixtureParams, order) -> MixtureParams:
        r"""Permute components: new component ``h`` is old component ``order[h]``.

        The logits are re-expressed against the new reference (last) component by the
        linear map :math:`T` with :math:`\ell'_h = \ell_{\text{order}[h]} -
        \ell_{\text{order}[g-1]}`, so :math:`v' = Tv`, :math:`a'_i = Ta_i` and
        :math:`\Lambda' = T\Lambda T^T`: the model itself is unchanged.
        """
        order = jnp.asarray(order)
        g = self.num_components
        dtype = params.component_coef.dtype
        embed = jnp.concatenate([jnp.eye(g - 1, dtype=dtype), jnp.zeros((1, g - 1), dtype)])  # [g, g-1]
        transform = embed[order[: g - 1]] - embed[order[g - 1]][None]  # [g-1, g-1]
        return MixtureParams(
            mixing_coef=transform @ params.mixing_coef,
            component_coef=params.component_coef[order],
            component_cov=params.component_cov[order],
            mixing_cov=transform @ params.mixing_cov @ transform.T,
            component_var=params.component_var[order],
            mixing_effects=params.mixing_effects @ transform.T,
            component_effects=params.component_effects[:, order],
        )

    def align(self, params: MixtureParams, reference: MixtureParams) -> MixtureParams:
        """``params`` relabelled to best match ``reference`` (Hungarian matching on ``W``)."""
        from mtl_jax.metrics import match_components

        order = match_components(np.asarray(params.component_coef), np.asarray(reference.component_coef))
        return self.relabel(params, order)

    def named_parameters(self, params: MixtureParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Population-level parameters by readable name, keeping ``leading`` batch axes.

        Names: ``v[h, col]``, ``w[h, col]`` or ``w[h, col, response]``, ``sigma2[h]`` or
        ``Sigma[h, k, l]``, ``lambda[h]`` (and ``lambda[h, k]`` off the diagonal for
        ``g > 2``), ``phi[h]`` or ``phi[h, response]``; components are numbered from 1.
        """
        response_names = labels["response_names"]
        p = len(response_names)
        lead = (slice(None),) * leading
        out: dict[str, np.ndarray] = {}
        arrays = {field: np.asarray(getattr(params, field)) for field in POPULATION_FIELDS}
        g = self.num_components
        for h in range(g - 1):
            for c, col in enumerate(labels["mixing_columns"]):
                out[f"v[{h + 1}, {col}]"] = arrays["mixing_coef"][lead + (h, c)]
        for h in range(g):
            for c, col in enumerate(labels["component_columns"]):
                for k, resp in enumerate(response_names):
                    suffix = f", {resp}" if p > 1 else ""
                    out[f"w[{h + 1}, {col}{suffix}]"] = arrays["component_coef"][lead + (h, c, k)]
        for h in range(g):
            if p == 1:
                out[f"sigma2[{h + 1}]"] = arrays["component_cov"][lead + (h, 0, 0)]
            else:
                for k in range(p):
                    for m in range(k, p):
                        name = f"Sigma[{h + 1}, {response_names[k]}, {response_names[m]}]"
                        out[name] = arrays["component_cov"][lead + (h, k, m)]
        if self.has_mixing_effects:
            for h in range(g - 1):
                for k in range(h, g - 1):
                    name = f"lambda[{h + 1}]" if k == h else f"lambda[{h + 1}, {k + 1}]"
                    out[name] = arrays["mixing_cov"][lead + (h, k)]
        if self.component_random_effects:
            for h in range(g):
                for k, resp in enumerate(response_names):
                    suffix = f", {resp}" if p > 1 else ""
                    out[f"phi[{h + 1}{suffix}]"] = arrays["component_var"][lead + (h, k)]
        return out

    def params_like(self, labels: dict) -> MixtureParams:
        """Zeros with the structure and shapes of a fit with these labels."""
        g, K = self.num_components, len(labels["task_names"])
        p, qc, qm = len(labels["response_names"]), len(labels["component_columns"]), len(labels["mixing_columns"])
        return MixtureParams(
            np.zeros((g - 1, qm)), np.zeros((g, qc, p)), np.zeros((g, p, p)), np.zeros((g - 1, g - 1)),
            np.zeros((g, p)), np.zeros((K, g - 1)), np.zeros((K, g, p)),
        )

    def random_effects(self, params: MixtureParams, labels: dict) -> dict[str, pd.DataFrame]:
        """Predicted random effects per task: ``mixing`` and ``component`` DataFrames."""
        g = self.num_components
        response_names = labels["response_names"]
        index = pd.Index(labels["task_names"], name="task")
        a, b = np.asarray(params.mixing_effects), np.asarray(params.component_effects)
        mixing = pd.DataFrame(a, index=index, columns=[f"A{h + 1}" for h in range(g - 1)])
        columns = [f"B{h + 1}" + (f"[{r}]" if len(response_names) > 1 else "") for h in range(g) for r in response_names]
        component = pd.DataFrame(b.reshape(len(index), -1), index=index, columns=columns)
        return {"mixing": mixing, "component": component}

    def report(self, params: MixtureParams, labels: dict) -> dict[str, Any]:
        """The readable entries of a saved fit (documented JSON keys)."""
        p = len(labels["response_names"])
        coef = np.asarray(params.component_coef)
        effects = self.random_effects(params, labels)
        return {
            "mixing_coef": np.asarray(params.mixing_coef).tolist(),
            "component_coef": (coef[..., 0] if p == 1 else coef).tolist(),
            "component_cov": np.asarray(params.component_cov).tolist(),
            "variance_components": {
                "mixing": np.diagonal(np.asarray(params.mixing_cov)).tolist(),
                "mixing_cov": np.asarray(params.mixing_cov).tolist(),
                "component": np.asarray(params.component_var).tolist(),
            },
            "random_effects": {
                part: {str(task): row.tolist() for task, row in frame.iterrows()} for part, frame in effects.items()
            },
        }

    # ------------------------------------------------------------ diagnostics
    def standard_errors(self, params: MixtureParams, design: MixtureDesign, labels: dict) -> dict[str, float]:
        """Asymptotic standard errors (see :mod:`mtl_jax.models.mixture_glmm.variance`)."""
        return variance.standard_errors(self, params, design, labels)

    def check(self, params: MixtureParams, design: MixtureDesign, labels: dict) -> list[str]:
        """Problems of a fitted point: non-finite values, empty components, variances at the floor."""
        problems = []
        bad = [field for field in POPULATION_FIELDS if not np.all(np.isfinite(np.asarray(getattr(params, field))))]
        if bad:
            return [f"non-finite parameter(s) {bad}: the fit failed numerically"]
        tau = np.asarray(self.responsibilities(params, design))
        size = tau.sum(0)
        q = design.x_comp.shape[1]
        for h in np.flatnonzero(size < q + 1):
            problems.append(
                f"component {h + 1} is (nearly) empty: {size[h]:.3g} effective rows for {q} coefficients; "
                "use fewer components")
        scale = np.var(np.asarray(design.y), axis=0)
        floor = 10 * self.variance_floor
        if self.component_random_effects:
            phi = np.asarray(params.component_var)
            for h, k in zip(*np.nonzero(phi <= floor * scale)):
                suffix = f", {labels['response_names'][k]}" if phi.shape[1] > 1 else ""
                problems.append(f"phi[{h + 1}{suffix}] is at its boundary (zero variance: a singular fit)")
        if self.has_mixing_effects:
            lam = np.diagonal(np.asarray(params.mixing_cov))
            for h in np.flatnonzero(lam <= floor):
                problems.append(f"lambda[{h + 1}] is at its boundary (zero variance: a singular fit)")
        if self.has_random_effects and design.num_tasks < 5:
            problems.append(f"only {design.num_tasks} tasks: the variance components are poorly determined")
        return problems

    # -------------------------------------------------------------- NumPyro
    def numpyro_model(self, design: MixtureDesign) -> None:
        r"""The model as a NumPyro program: priors, non-centred random effects, labels summed out.

        With ``s_c``, ``s_sd``, ``eta`` from :attr:`priors` and ``m_k``, ``s_k`` the mean
        and sd of response ``k`` (the priors are in units of the data, see
        :class:`MixturePriors`):

        .. math::

            W_{hck} \sim \mathcal N(m_k[c=0], (s_c s_k)^2),\quad v_{hc} \sim \mathcal N(0, s_c^2),

            \sigma_{hk},\ \sqrt{\phi_{hk}} \sim \operatorname{HalfCauchy}(s_{sd} s_k),\quad
            \sqrt{\Lambda_{hh}} \sim \operatorname{HalfCauchy}(s_{sd}),

            \Sigma_h = \operatorname{diag}(\sigma_h) L_h L_h^T \operatorname{diag}(\sigma_h),
            \ L_h \sim \operatorname{LKJCholesky}(p, \eta);\quad \Lambda \text{ likewise } (g > 2),

            a_i = \operatorname{diag}(\sqrt{\Lambda_{hh}}) L_\Lambda \varepsilon^a_i,\quad
            b_{hik} = \sqrt{\phi_{hk}}\,\varepsilon^b_{ihk},\quad \varepsilon \sim \mathcal N(0, 1),

            y_{ij} \sim \sum_h \pi_h(x^m_{ij}, a_i)\,\mathcal N_p(W_h^T x^c_{ij} + b_{hi}, \Sigma_h).

        The labels are summed out by ``MixtureSameFamily``. The intercept prior is centred on
        the response mean only when the first component column is the intercept (all ones).

        Sampled sites: ``mixing_coef`` (``g > 1``), ``component_coef``, ``component_scale``,
        ``component_corr_chol`` (``p > 1``), ``mixing_effects_sd``, ``mixing_corr_chol``
        (``g > 2``), ``component_effects_sd``, and under ``plate("tasks", K)``
        ``mixing_effects_z`` and ``component_effects_z``. Every :class:`MixtureParams` field
        is a deterministic site of its own name (zeros for switched-off parts).
        """
        priors = self.priors
        g, K = self.num_components, design.num_tasks
        p, q_comp, q_mix = design.y.shape[1], design.x_comp.shape[1], design.x_mix.shape[1]
        dtype = design.y.dtype
        y_mean, y_sd = design.y.mean(0), design.y.std(0) + jnp.finfo(dtype).tiny
        has_intercept = jnp.all(design.x_comp[:, 0] == 1.0)
        coef_loc = jnp.zeros((g, q_comp, p), dtype).at[:, 0, :].set(jnp.where(has_intercept, y_mean, 0.0))
        coef_scale = priors.coef_scale * jnp.broadcast_to(y_sd, (g, q_comp, p))

        if g > 1:
            v = numpyro.sample("mixing_coef", dist.Normal(0.0, priors.coef_scale).expand((g - 1, q_mix)).to_event(2))
        else:
            v = numpyro.deterministic("mixing_coef", jnp.zeros((0, q_mix), dtype))
        w = numpyro.sample("component_coef", dist.Normal(coef_loc, coef_scale).to_event(3))
        scale = numpyro.sample("component_scale", dist.HalfCauchy(priors.sd_scale * jnp.broadcast_to(y_sd, (g, p)))
                               .to_event(2))
        if p > 1:
            corr = numpyro.sample("component_corr_chol",
                                  dist.LKJCholesky(p, priors.lkj_concentration).expand((g,)).to_event(1))
            chol = scale[:, :, None] * corr
        else:
            chol = scale[:, :, None]
        cov = numpyro.deterministic("component_cov", chol @ jnp.swapaxes(chol, 1, 2))

        g1 = g - 1
        if self.has_mixing_effects:
            sd = numpyro.sample("mixing_effects_sd", dist.HalfCauchy(priors.sd_scale).expand((g1,)).to_event(1))
            if g1 > 1:
                corr = numpyro.sample("mixing_corr_chol", dist.LKJCholesky(g1, priors.lkj_concentration))
                lam_chol = sd[:, None] * corr
            else:
                lam_chol = sd[:, None]
            with numpyro.plate("tasks", K):
                z = numpyro.sample("mixing_effects_z", dist.Normal(0.0, 1.0).expand((g1,)).to_event(1))
            mixing_cov, a = lam_chol @ lam_chol.T, z @ lam_chol.T
        else:
            mixing_cov, a = jnp.zeros((g1, g1), dtype), jnp.zeros((K, g1), dtype)
        mixing_cov = numpyro.deterministic("mixing_cov", mixing_cov)
        a = numpyro.deterministic("mixing_effects", a)

        if self.component_random_effects:
            sd = numpyro.sample("component_effects_sd",
                                dist.HalfCauchy(priors.sd_scale * jnp.broadcast_to(y_sd, (g, p))).to_event(2))
            with numpyro.plate("tasks", K):
                z = numpyro.sample("component_effects_z", dist.Normal(0.0, 1.0).expand((g, p)).to_event(2))
            component_var, b = sd**2, sd * z
        else:
            component_var, b = jnp.zeros((g, p), dtype), jnp.zeros((K, g, p), dtype)
        component_var = numpyro.deterministic("component_var", component_var)
        b = numpyro.deterministic("component_effects", b)

        params = MixtureParams(v, w, cov, mixing_cov, component_var, a, b)
        logits, means = likelihood.linear_predictors(params, design, a, b)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.MultivariateNormal(means, scale_tril=chol))
        with numpyro.plate("obs", design.y.shape[0]):
            numpyro.sample("y", mixture, obs=design.y)

    def site_values(self, params: MixtureParams) -> dict[str, Array]:
        r"""The sampled sites of :meth:`numpyro_model` at the point ``params``.

        Standard deviations are floored at :data:`MIN_SD` (times the response sd for the
        component effects is not needed: the floor only keeps the start finite); the
        non-centred effects are solved from ``effects = L z`` so the effects are reproduced.
        """
        cov = params.component_cov
        scale = jnp.sqrt(jnp.diagonal(cov, axis1=1, axis2=2))
        values = {"component_coef": params.component_coef, "component_scale": scale}
        if self.num_components > 1:
            values["mixing_coef"] = params.mixing_coef
        if cov.shape[-1] > 1:
            values["component_corr_chol"] = cholesky(cov / (scale[:, :, None] * scale[:, None, :]))
        if self.has_mixing_effects:
            lam = params.mixing_cov
            sd = jnp.maximum(jnp.sqrt(jnp.diagonal(lam)), MIN_SD)
            corr_chol = cholesky(lam / (sd[:, None] * sd[None, :]) + 1e-6 * jnp.eye(lam.shape[0]))
            corr_chol = corr_chol / jnp.linalg.norm(corr_chol, axis=1, keepdims=True)
            values["mixing_effects_sd"] = sd
            if lam.shape[0] > 1:
                values["mixing_corr_chol"] = corr_chol
            lam_chol = sd[:, None] * corr_chol
            values["mixing_effects_z"] = solve_triangular(lam_chol, params.mixing_effects.T).T
        if self.component_random_effects:
            sd = jnp.maximum(jnp.sqrt(params.component_var), MIN_SD)
            values["component_effects_sd"] = sd
            values["component_effects_z"] = params.component_effects / sd
        return values

    def param_sites(self) -> tuple[str, ...]:
        """The program's sites that :meth:`from_sites` reads (the deterministic fields)."""
        return MixtureParams._fields

    def from_sites(self, samples: dict[str, Array]) -> MixtureParams:
        """Parameters from samples of the program's deterministic sites (any leading axes)."""
        return MixtureParams(**{field: samples[field] for field in MixtureParams._fields})

    # ------------------------------------------------------------------ CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model mixture-glmm``."""
        group = parser.add_argument_group("mixture-glmm options")
        group.add_argument("--components", type=int, metavar="G", default=None,
                           help="number of mixture components (required)")
        group.add_argument("--no-mixing-random-effects", dest="mixing_random_effects", action="store_false",
                           help="drop the task effects in the mixing logits")
        group.add_argument("--no-component-random-effects", dest="component_random_effects",
                           action="store_false", help="drop the task effects in the component means")
        group.add_argument("--residual-update", choices=("reml", "ml"), default="reml",
                           help="residual covariance update (default: reml)")

    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options of ``mtl-jax fit --model mixture-glmm``: task, responses, covariates."""
        data = parser.add_argument_group("data options (mixture-glmm)")
        data.add_argument("--task", required=True, help="column holding the task labels")
        data.add_argument("--response", required=True, nargs="+", metavar="COL", help="response column(s)")
        data.add_argument("--covariates", required=True, nargs="+", metavar="COL", help="covariate columns")
        data.add_argument("--mixing-covariates", nargs="+", metavar="COL",
                          help="covariates of the mixing proportions (default: --covariates)")
        data.add_argument("--categorical", nargs="+", default=[], metavar="COL",
                          help="covariates to dummy-code (non-numeric columns always are)")
        data.add_argument("--no-standardize", dest="standardize", action="store_false",
                          help="use continuous covariates unscaled")

    def data_from_frame(self, frame, args=None, *, labels: dict | None = None, schema=None,
                        require_response: bool = False):
        """Encodes a frame: training data from ``args``, new data with a fit's ``schema``.

        Training (``args`` given): a :class:`TaskData` of the ``--covariates`` and
        ``--mixing-covariates`` columns. New data (``labels`` of a fit): encoded with the
        stored ``schema`` (levels, means, sds); training tasks keep their ids and unseen
        tasks are numbered after them. A ``TaskData`` is re-indexed the same way (it must
        carry the fit's schema); a raw design passes through.

        Raises:
            ValueError: for a ``TaskData`` of another schema, or a frame when the fit has
                no schema (it was fitted to a raw design).
            DataError: for invalid data (missing columns or values, unseen levels ...).
        """
        if labels is None:
            sources = list(dict.fromkeys([*args.covariates, *(self.mixing_covariates or ())]))
            return TaskData.from_dataframe(frame, task=args.task, response=args.response, covariates=sources,
                                           categorical=args.categorical, standardize=args.standardize)
        train = list(labels["task_names"])
        if isinstance(frame, pd.DataFrame):
            if schema is None:
                raise ValueError("this fit has no data schema (it was fitted to a raw design); pass a design")
            extended = train + [name for name in schema.task_labels(frame) if name not in set(train)]
            return schema.transform(frame, require_response=require_response, task_names=extended)
        if isinstance(frame, TaskData):
            if schema is not None and frame.schema != schema:
                raise ValueError(
                    "this TaskData was encoded with another schema than the fit's (different columns, levels, "
                    "means or sds); pass the raw DataFrame, or encode it with fit.schema.transform(frame)")
            extended = train + [name for name in frame.task_names if name not in set(train)]
            ids = np.asarray([extended.index(name) for name in frame.task_names], dtype=np.int32)
            return dataclasses.replace(frame, task=jnp.asarray(ids[np.asarray(frame.task)]),
                                       task_names=tuple(extended))
        return frame

    @classmethod
    def from_arguments(cls, args) -> "MixtureGLMM":
        """The model of a parsed ``mtl-jax fit`` command line."""
        if args.components is None:
            raise ValueError("--components is required for --model mixture-glmm")
        return cls(
            num_components=args.components,
            covariates=tuple(args.covariates),
            mixing_covariates=tuple(args.mixing_covariates or args.covariates),
            mixing_random_effects=args.mixing_random_effects,
            component_random_effects=args.component_random_effects,
            residual_update=args.residual_update,
        )
