r"""The multitask mixture of GLMs with task random effects: :class:`MixtureGLMM`.

For task :math:`i` and observation :math:`j` with mixing covariates
:math:`x^m_{ij}\in\mathbb R^{q_m}`, component covariates :math:`x^c_{ij}\in\mathbb R^{q_c}`
and random-effect covariates :math:`z_{ij}\in\mathbb R^{r}` (a subset of the component
columns, by default the intercept):

.. math::

    \pi_h(x^m_{ij}, a_i) = \operatorname{softmax}_h\big(v_1^T x^m_{ij} + a_{1i}, \dots,
        v_{g-1}^T x^m_{ij} + a_{(g-1)i},\; 0\big),

    \eta_{hij} = W_h^T x^c_{ij} + B_{hi}^T z_{ij} + o_{ij}, \qquad
    y_{ij} \mid z_{ij}=h \sim f(\,\cdot\mid\eta_{hij}),

    a_i \sim \mathcal N_{g-1}(0, \Lambda), \qquad \operatorname{vec}B_{hi} \sim \mathcal N_{rp}(0, \Phi_h),

with ``f`` one of the families of :mod:`~mtl_jax.models.mixture_glmm.families` (Gaussian
:math:`\mathcal N_p(\eta, \Sigma_h)`; Bernoulli, binomial, Poisson with canonical links and
``p = 1``) and ``o`` an optional offset. :math:`\Phi_h` is a full covariance, its diagonal,
or :math:`\phi_h I` (``random_effects_covariance``). With ``p = 1``, random intercepts and
a diagonal :math:`\Lambda` this is equations (3), (5) and (10) of the mixture-GLMM paper.

**Membership.** Per observation (``membership="observation"``, eq. 3), each row has its
own label. Per task (``"task"``, the latent-class mixed model of lcmm and flexmix's
``y ~ x | task``), all rows of a task share one label, the mixing covariates must be
constant within a task, there are no mixing random effects, and the posterior class
probabilities of the training tasks are part of the fit (``class_logits``).

Either random-effect part can be switched off: without both it is the mixture of
regressions with concomitant covariates (the paper's "independence" model); with
``num_components=1`` and component effects it is the GLMM.

This module is the model (protocol of :mod:`mtl_jax.models.protocol`). Its EM algorithm
is in :mod:`~mtl_jax.models.mixture_glmm.em`, the densities in
:mod:`~mtl_jax.models.mixture_glmm.likelihood`, the design in
:mod:`~mtl_jax.models.mixture_glmm.design`, the NumPyro program in
:mod:`~mtl_jax.models.mixture_glmm.program`, the names in
:mod:`~mtl_jax.models.mixture_glmm.naming`, the standard errors in
:mod:`~mtl_jax.models.mixture_glmm.variance`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from mtl_jax.data import TaskData
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.linalg import cholesky, is_positive_definite, psd_cholesky
from mtl_jax.models.mixture_glmm import design as design_module
from mtl_jax.models.mixture_glmm import em, likelihood, naming, program, variance
from mtl_jax.models.mixture_glmm.families import FAMILIES, Family
from mtl_jax.models.mixture_glmm.params import POPULATION_FIELDS, MixtureDesign, MixtureParams, MixturePriors
from mtl_jax.models.protocol import register


@register
@dataclasses.dataclass(frozen=True)
class MixtureGLMM:
    """Static description of a multitask mixture of GLMs with task random effects.

    Attributes:
        num_components: ``g``.
        covariates: source columns of the component means (``None``: all columns).
        mixing_covariates: source columns of the mixing proportions (``None``: all, or the
            intercept alone with membership per task, where they must be task-level).
        family: ``"gaussian"``, ``"bernoulli"``, ``"binomial"`` (trials from the data) or
            ``"poisson"``, each with its canonical link.
        random_slopes: source columns of the data with component random effects (slopes),
            besides the random intercept.
        random_intercept: whether the component effects include a random intercept.
        random_effects_covariance: structure of each ``Phi_h``: ``"full"``, ``"diagonal"``
            or ``"identity"`` (``phi_h I``, one variance per component).
        membership: ``"observation"`` (a label per row, the paper's eq. 3) or ``"task"``
            (a label per task).
        mixing_random_effects: task random intercepts ``a_i`` in the mixing logits;
            ``None``: on for membership per observation, off per task (where they are
            not allowed).
        component_random_effects: task random effects ``B_hi`` in the components.
        quadrature_points: points of the adaptive Gauss-Hermite rule for each task's
            marginal (1: the Laplace approximation, lme4's ``nAGQ``); more than 1 needs a
            single scalar effect per task and component, with membership per task or
            ``g = 1``.
        residual_update: ``"reml"`` adds the posterior covariance of the fitted means to the
            residual covariance update and the fixed effects' uncertainty to the effects'
            covariance update (exact REML for the linear mixed model, the paper's
            approximate REML otherwise); ``"ml"`` leaves the fixed effects' uncertainty out
            (per task or for ``g = 1``: EM for the marginal likelihood, the criterion of
            lme4's ``REML=FALSE``, lcmm and flexmix; per observation with ``g > 1``: the
            plain weighted residual covariance, which maximises ``L`` given the effects).
            ``None``: ``"ml"`` for membership per task, ``"reml"`` otherwise.
        variance_floor: every variance lives at or above this fraction of its scale (1 for
            the logit-scale ``Lambda``, the response variance for ``Phi`` and ``Sigma`` of
            a Gaussian family, 1 on the link scale otherwise), so that a collapsing
            component or a vanishing variance component cannot make the likelihood
            infinite. A variance within 10 times its floor is reported as at the boundary.
        priors: prior scales of the NumPyro program (SVI, NUTS).
    """

    name: ClassVar[str] = "mixture-glmm"
    methods: ClassVar[frozenset] = frozenset({"em", "svi", "nuts"})
    #: XLA options of the model's compiled programs (:mod:`mtl_jax.infer.program_cache`): on
    #: the CPU, no YNNPACK library fusions. Their reductions over a short minor axis (the
    #: ``[n, g]`` softmax of the E-step) and the transposes they add before products over the
    #: rows made an EM step 1.1-2x slower and its compilation ~25% longer (README, "Speed").
    compiler_options: ClassVar[dict[str, str]] = {"xla_cpu_experimental_ynn_fusion_type": ""}

    num_components: int
    covariates: tuple[str, ...] | None = None
    mixing_covariates: tuple[str, ...] | None = None
    family: Literal["gaussian", "bernoulli", "binomial", "poisson"] = "gaussian"
    random_slopes: tuple[str, ...] = ()
    random_intercept: bool = True
    random_effects_covariance: Literal["full", "diagonal", "identity"] = "full"
    membership: Literal["observation", "task"] = "observation"
    mixing_random_effects: bool | None = None
    component_random_effects: bool = True
    quadrature_points: int = 1
    residual_update: Literal["reml", "ml"] | None = None
    variance_floor: float = 1e-6
    priors: MixturePriors = MixturePriors()

    def __post_init__(self):
        if not isinstance(self.num_components, (int, np.integer)) or self.num_components < 1:
            raise ValueError(f"num_components must be an integer >= 1, got {self.num_components!r}")
        choices = {"family": FAMILIES, "random_effects_covariance": ("full", "diagonal", "identity"),
                   "membership": ("observation", "task"), "residual_update": ("reml", "ml", None)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("covariates", "mixing_covariates", "random_slopes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.membership == "task" and self.mixing_covariates is None:
            object.__setattr__(self, "mixing_covariates", ())
        if self.residual_update is None:
            object.__setattr__(self, "residual_update", "ml" if self.membership == "task" else "reml")
        if self.mixing_random_effects is None:
            object.__setattr__(self, "mixing_random_effects", self.membership == "observation")
        if self.membership == "task" and self.mixing_random_effects and self.num_components > 1:
            raise ValueError("membership per task has one label per task, so the mixing logits take no task "
                             "random effects: set mixing_random_effects=False (or leave it None)")
        if not isinstance(self.quadrature_points, (int, np.integer)) or self.quadrature_points < 1:
            raise ValueError(f"quadrature_points must be an integer >= 1, got {self.quadrature_points!r}")
        if self.quadrature_points > 1:
            scalar = (self.component_random_effects and self.random_intercept + len(self.random_slopes) == 1
                      and (self.membership == "task" or self.num_components == 1))
            if not scalar:
                raise ValueError("quadrature_points > 1 (adaptive Gauss-Hermite) needs one scalar component effect "
                                 "per task (a random intercept or a single slope) with membership per task or "
                                 "num_components=1; use the Laplace approximation (quadrature_points=1) otherwise")
        if isinstance(self.priors, dict):
            object.__setattr__(self, "priors", MixturePriors(**self.priors))

    @property
    def response_family(self) -> Family:
        """The :class:`~mtl_jax.models.mixture_glmm.families.Family` of the components."""
        return Family(self.family)

    @property
    def has_mixing_effects(self) -> bool:
        """Whether mixing random effects are present (they need ``g >= 2`` and membership per observation)."""
        return bool(self.mixing_random_effects) and self.num_components > 1 and self.membership == "observation"

    @property
    def has_random_effects(self) -> bool:
        """Whether any task random effect is present."""
        return self.has_mixing_effects or self.component_random_effects

    @property
    def random_intercept_only(self) -> bool:
        """Whether the component effects are random intercepts alone (the fast path of the M-step)."""
        return self.random_intercept and not self.random_slopes

    @property
    def per_task_marginal(self) -> bool:
        """Whether the marginal factorises over tasks and components (membership per task, or ``g = 1``)."""
        return self.membership == "task" or self.num_components == 1

    # ----------------------------------------------------------------- data
    def design(self, data) -> MixtureDesign:
        """This model's arrays from a :class:`mtl_jax.data.TaskData` (a design passes through, checked).

        Raises:
            DataError: for responses the family cannot take, or mixing covariates that vary
                within a task under membership per task (naming column, row and task).
        """
        if isinstance(data, MixtureDesign):
            design_module.check_design(self, data, {})
            return data
        return design_module.build_design(self, data)

    def labels(self, data) -> dict[str, Any]:
        """Task, column and response names (default names for a raw design)."""
        if isinstance(data, MixtureDesign):
            return {
                "task_names": [str(i) for i in range(data.num_tasks)],
                "component_columns": [f"x{i}" for i in range(data.x_comp.shape[1])],
                "mixing_columns": [f"x{i}" for i in range(data.x_mix.shape[1])],
                "response_names": [f"y{i}" for i in range(data.y.shape[1])],
                "random_effect_columns": ["intercept"] if data.z_comp.shape[1] == 1 else [
                    f"z{i}" for i in range(data.z_comp.shape[1])],
            }
        random_columns = design_module.random_effect_columns(self, data) if self.component_random_effects else [0]
        return {
            "task_names": list(data.task_names),
            "component_columns": [data.columns[i] for i in data.columns_for(self.covariates)],
            "mixing_columns": [data.columns[i] for i in data.columns_for(self.mixing_covariates)],
            "response_names": list(data.response_names),
            "random_effect_columns": [data.columns[i] for i in random_columns],
        }

    # ------------------------------------------------------------ densities
    def linear_predictors(self, params: MixtureParams, design: MixtureDesign):
        """Mixing logits ``[n, g]`` (last column 0) and component linear predictors ``[n, g, p]``."""
        return likelihood.linear_predictors(params, design, params.mixing_effects, params.component_effects)

    def log_joint(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""``log pi_h(x_ij) + log f_h(y_ij)`` given the current random effects."""
        logits, eta = self.linear_predictors(params, design)
        return likelihood.log_joint(self.response_family, logits, eta, params.component_cov, design)

    @cached_program(static_argnames="self")
    def responsibilities(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        r"""Each row's posterior label probabilities: eq. (9) per observation, the task's per task."""
        if self.membership == "task":
            return jnp.exp(self.class_log_probabilities(params, design))[design.task]
        return jax.nn.softmax(self.log_joint(params, design), axis=-1)

    @cached_program(static_argnames="self")
    def class_log_probabilities(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "K g"]:
        r"""Membership per task: :math:`\log P(z_i = h \mid y_i)` of every task (E-step, :func:`em.task_responsibilities`)."""
        return em.task_responsibilities(self, params, design)[0]

    def objective(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
        """``L = L1 + L2`` (eq. 7), the function the EM steps increase (membership per observation)."""
        return em.complete_objective(self, params, design)

    @cached_program(static_argnames="self")
    def laplace(self, params: MixtureParams, design: MixtureDesign):
        """``(value, ok)``: the marginal log-likelihood and whether its approximation is valid.

        Per task (membership per task, or ``g = 1``):
        :math:`\\sum_i\\log\\sum_h\\pi_h m_{ih}` with
        :func:`~mtl_jax.models.mixture_glmm.likelihood.class_log_marginals`; otherwise
        :func:`~mtl_jax.models.mixture_glmm.likelihood.laplace_log_marginal`. Exact without
        random effects and for Gaussian components with membership per task or ``g = 1``.
        """
        family = self.response_family
        if self.per_task_marginal:
            log_m, ok = likelihood.class_log_marginals(params, design, family,
                                                       use_component=self.component_random_effects,
                                                       quadrature_points=self.quadrature_points)
            value = jax.nn.logsumexp(likelihood.task_log_proportions(params, design) + log_m, axis=-1).sum()
            K = params.component_effects.shape[0]
            if design.num_tasks > K:
                unseen = likelihood.population_log_predictive(params, design, family, False,
                                                              self.component_random_effects)
                value = value + jnp.sum(jnp.where(design.task >= K, unseen, 0.0))
            return value, ok & jnp.isfinite(value)
        if not self.has_random_effects:
            value = jax.nn.logsumexp(self.log_joint(params, design), axis=-1).sum()
            return value, jnp.isfinite(value)
        return likelihood.laplace_log_marginal(params, design, family, use_mixing=self.has_mixing_effects,
                                               use_component=self.component_random_effects)

    def score(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, ""]:
        """Marginal log-likelihood (see :meth:`laplace`).

        NaN where the Laplace approximation is invalid (mode not reached, or a task's
        negative Hessian not positive definite): such a point ranks no restart and sets no BIC.
        """
        value, ok = self.laplace(params, design)
        return jnp.where(ok, value, jnp.nan)

    def num_observations(self, design: MixtureDesign) -> int:
        """Rows ``n`` (BIC's sample size)."""
        return design.y.shape[0]

    def num_parameters(self, design: MixtureDesign) -> int:
        """Free parameters counted by BIC: fixed effects, dispersions, covariances of the effects."""
        g = self.num_components
        p, q_comp, q_mix = design.y.shape[1], design.x_comp.shape[1], design.x_mix.shape[1]
        count = (g - 1) * q_mix + g * q_comp * p
        if self.response_family.is_gaussian:
            count += g * p * (p + 1) // 2
        if self.has_mixing_effects:
            count += g * (g - 1) // 2
        if self.component_random_effects:
            d = design.z_comp.shape[1] * p
            per_component = {"full": d * (d + 1) // 2, "diagonal": d, "identity": 1}
            count += g * per_component[self.random_effects_covariance]
        return count

    # ------------------------------------------------------------------- EM
    def init(self, key: Array, design: MixtureDesign) -> MixtureParams:
        """Random start (see :func:`mtl_jax.models.mixture_glmm.em.init`)."""
        return em.init(self, key, design)

    def em_step(self, params: MixtureParams, design: MixtureDesign, update_variance_components: bool = True):
        """One EM iteration: new parameters and the stopping quantity at the old ones."""
        return em.em_step(self, params, design, update_variance_components)

    def population(self, params: MixtureParams) -> dict[str, Array]:
        """The population-level fields (no task axis)."""
        return {field: getattr(params, field) for field in POPULATION_FIELDS}

    def valid(self, params: MixtureParams):
        r"""Whether ``params`` is a point of the model (EM's acceleration rejects others): the
        residual covariances :math:`\Sigma_h` and the effects' covariances :math:`\Lambda`,
        :math:`\Phi_h` (those the model has) positive definite."""
        ok = jnp.all(is_positive_definite(params.component_cov))
        if self.has_mixing_effects:
            ok &= is_positive_definite(params.mixing_cov)
        if self.component_random_effects:
            ok &= jnp.all(is_positive_definite(params.component_effects_cov))
        return ok

    # ------------------------------------------------------------ prediction
    def _label_probabilities(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n g"]:
        """Each row's label probabilities given its task's predicted effects (no response needed).

        Per observation: :math:`\\pi_h(x^m, \\hat a_i)`; per task: the task's posterior class
        probabilities from training. Rows of unseen tasks: the population proportions
        (mixing effects integrated out).
        """
        if self.membership == "task":
            pi = jnp.exp(likelihood.row_effects(params.class_logits, design.task))
        else:
            logits, _ = self.linear_predictors(params, design)
            pi = jax.nn.softmax(logits, axis=-1)
        if design.num_tasks > params.mixing_effects.shape[0]:
            population = likelihood.population_proportions(params, design, self.has_mixing_effects)
            pi = jnp.where(likelihood.seen_rows(params, design)[:, None], pi, population)
        return pi

    @cached_program(static_argnames="self")
    def predict(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, "n p"]:
        r"""Mean response :math:`\sum_h P(z=h)\,\mu(\eta_h)` (for binomial rows, per trial).

        Seen tasks: the predicted effects plugged in, with the label probabilities of
        :meth:`_label_probabilities`; unseen tasks (id ``>= K``): all effects integrated out
        (:func:`~mtl_jax.models.mixture_glmm.likelihood.population_means`).
        """
        family = self.response_family
        _, eta = self.linear_predictors(params, design)
        plug_in = jnp.einsum("ng,ngp->np", self._label_probabilities(params, design), family.mean(eta))
        if design.num_tasks > params.mixing_effects.shape[0]:
            population = likelihood.population_means(params, design, family, self.has_mixing_effects,
                                                     self.component_random_effects)
            return jnp.where(likelihood.seen_rows(params, design)[:, None], plug_in, population)
        return plug_in

    @cached_program(static_argnames="self")
    def log_predictive(self, params: MixtureParams, design: MixtureDesign) -> Float[Array, " n"]:
        r"""Natural-log predictive density of each row's response.

        Seen tasks: :math:`\log\sum_h P(z=h)\, f_h(y\mid\hat\eta_h)` with the label
        probabilities of :meth:`_label_probabilities`; unseen tasks: the effects integrated
        out (:func:`~mtl_jax.models.mixture_glmm.likelihood.population_log_predictive`).
        """
        _, eta = self.linear_predictors(params, design)
        dens = likelihood.component_log_density(self.response_family, design.y, eta, params.component_cov,
                                                design.trials)
        plug_in = jax.nn.logsumexp(jnp.log(self._label_probabilities(params, design)) + dens, axis=-1)
        if design.num_tasks > params.mixing_effects.shape[0]:
            population = likelihood.population_log_predictive(
                params, design, self.response_family, self.has_mixing_effects, self.component_random_effects)
            return jnp.where(likelihood.seen_rows(params, design), plug_in, population)
        return plug_in

    # ------------------------------------------------------------ simulation
    def sample_effects(self, key: Array, params: MixtureParams, num_tasks: int) -> MixtureParams:
        """Draw ``a_i ~ N(0, Lambda)`` and ``vec B_hi ~ N(0, Phi_h)`` for ``num_tasks`` tasks."""
        g = self.num_components
        r_c, p = params.component_effects.shape[2:]
        dtype = params.component_coef.dtype
        key_a, key_b = jax.random.split(key)
        z = jax.random.normal(key_a, (num_tasks, g - 1), dtype)
        a = z @ psd_cholesky(params.mixing_cov).T if g > 1 else z
        noise = jax.random.normal(key_b, (num_tasks, g, r_c * p), dtype)
        b = jnp.einsum("hde,ihe->ihd", psd_cholesky(params.component_effects_cov), noise)
        return params._replace(mixing_effects=a, component_effects=b.reshape(num_tasks, g, r_c, p),
                               class_logits=jnp.zeros((num_tasks, g), dtype))

    def simulate(self, key: Array, params: MixtureParams, design: MixtureDesign) -> tuple[Array, Array]:
        """Draw labels ``z [n]`` and responses ``y [n, p]`` at the design's covariates.

        The random effects are taken from ``params`` (see :meth:`sample_effects`); with
        membership per task one label is drawn per task from its mixing proportions.
        """
        key_z, key_y = jax.random.split(key)
        logits, eta = self.linear_predictors(params, design)
        if self.membership == "task":
            log_pi = likelihood.task_log_proportions(params, design)
            z = jax.random.categorical(key_z, log_pi, axis=-1)[design.task]
        else:
            z = jax.random.categorical(key_z, logits, axis=-1)
        chosen = jnp.take_along_axis(eta, z[:, None, None], axis=1)[:, 0]  # [n, p]
        family = self.response_family
        if family.is_gaussian:
            chol = cholesky(params.component_cov)
            noise = jax.random.normal(key_y, chosen.shape, chosen.dtype)
            return z, chosen + jnp.einsum("npk,nk->np", chol[z], noise)
        # NumPyro's binomial sampler indexes a table by the trial count, so it needs integers.
        draws = family.distribution(chosen[:, 0], design.trials.astype(int)).sample(key_y)
        return z, draws[:, None].astype(chosen.dtype)

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
            component_effects_cov=params.component_effects_cov[order],
            mixing_effects=params.mixing_effects @ transform.T,
            component_effects=params.component_effects[:, order],
            class_logits=params.class_logits[:, order],
        )

    def align(self, params: MixtureParams, reference: MixtureParams) -> MixtureParams:
        """``params`` relabelled to best match ``reference`` (Hungarian matching on ``W``)."""
        from mtl_jax.metrics import match_components

        order = match_components(np.asarray(params.component_coef), np.asarray(reference.component_coef))
        return self.relabel(params, order)

    # ----------------------------------------------------------- names, JSON
    def named_parameters(self, params: MixtureParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Population-level parameters by name (:func:`~mtl_jax.models.mixture_glmm.naming.named_parameters`)."""
        return naming.named_parameters(self, params, labels, leading)

    def params_like(self, labels: dict) -> MixtureParams:
        """Zeros with the structure and shapes of a fit with these labels."""
        return naming.params_like(self, labels)

    def random_effects(self, params: MixtureParams, labels: dict) -> dict[str, pd.DataFrame]:
        """Predicted random effects per task: ``mixing`` and ``component`` DataFrames."""
        return naming.random_effects(self, params, labels)

    def report(self, params: MixtureParams, labels: dict) -> dict[str, Any]:
        """The readable entries of a saved fit (:func:`~mtl_jax.models.mixture_glmm.naming.report`)."""
        return naming.report(self, params, labels)

    def task_tables(self, params: MixtureParams, design: MixtureDesign, labels: dict) -> dict[str, pd.DataFrame]:
        """Per-task tables of a fit: conditional sds of the predicted effects and class probabilities.

        ``mixing_sd`` / ``component_sd``: square roots of the diagonal of the inverse
        penalised information of each task's effects at the fit (lme4's ``condVar``);
        ``class_probabilities`` (membership per task): columns ``"1" .. "g"``.
        """
        index = pd.Index(labels["task_names"], name="task")
        mixing_columns, component_columns = naming.effect_columns(self, labels)
        tables = {}
        mixing_sd, component_sd = variance.effect_sds(self, params, design)
        if self.has_mixing_effects:
            tables["mixing_sd"] = pd.DataFrame(np.asarray(mixing_sd), index=index, columns=mixing_columns)
        if self.component_random_effects:
            tables["component_sd"] = pd.DataFrame(np.asarray(component_sd).reshape(len(index), -1), index=index,
                                                  columns=component_columns)
        if self.membership == "task":
            probabilities = np.exp(np.asarray(self.class_log_probabilities(params, design)))
            tables["class_probabilities"] = pd.DataFrame(
                probabilities, index=index, columns=[str(h + 1) for h in range(self.num_components)])
        return tables

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
        size, scale = map(np.asarray, self._check_statistics(params, design))
        q = design.x_comp.shape[1]
        for h in np.flatnonzero(size < q + 1):
            problems.append(
                f"component {h + 1} is (nearly) empty: {size[h]:.3g} effective rows for {q} coefficients; "
                "use fewer components")
        floor = 10 * self.variance_floor
        if self.component_random_effects:
            phi = np.diagonal(np.asarray(params.component_effects_cov), axis1=1, axis2=2)
            names = naming.effect_labels(labels)
            for h, e in zip(*np.nonzero(phi <= floor * scale)):
                suffix = f", {names[e]}" if phi.shape[1] > 1 and self.random_effects_covariance != "identity" else ""
                problems.append(f"phi[{h + 1}{suffix}] is at its boundary (zero variance: a singular fit)")
        if self.has_mixing_effects:
            lam = np.diagonal(np.asarray(params.mixing_cov))
            for h in np.flatnonzero(lam <= floor):
                problems.append(f"lambda[{h + 1}] is at its boundary (zero variance: a singular fit)")
        if self.has_random_effects and design.num_tasks < 5:
            problems.append(f"only {design.num_tasks} tasks: the variance components are poorly determined")
        return problems

    @cached_program(static_argnames="self")
    def _check_statistics(self, params: MixtureParams, design: MixtureDesign):
        """``(effective rows per component [g], scale of each component effect [d])`` for :meth:`check`."""
        return self.responsibilities(params, design).sum(0), em.effects_scale(self, design)

    # -------------------------------------------------------------- NumPyro
    def numpyro_model(self, design: MixtureDesign, centred: bool = False) -> None:
        """The model as a NumPyro program (:mod:`~mtl_jax.models.mixture_glmm.program`), task effects (non-)centred."""
        program.numpyro_model(self, design, centred)

    def site_values(self, params: MixtureParams) -> dict[str, Array]:
        """The sampled sites of :meth:`numpyro_model` at the point ``params``."""
        return program.site_values(self, params)

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
        group.add_argument("--components", type=int, nargs="+", metavar="G", default=None,
                           help="number of mixture components (required); several values fit each and "
                                "choose by BIC")
        group.add_argument("--no-mixing-random-effects", dest="mixing_random_effects", action="store_false",
                           help="drop the task effects in the mixing logits")
        group.add_argument("--no-component-random-effects", dest="component_random_effects",
                           action="store_false", help="drop the task effects in the component means")
        group.add_argument("--residual-update", choices=("reml", "ml"), default=None,
                           help="variance updates: reml or ml (default: ml with --membership task, else reml)")
        group.add_argument("--family", choices=FAMILIES, default="gaussian",
                           help="response family of the components, canonical link (default: gaussian)")
        group.add_argument("--component-random-effects", dest="random_slopes", nargs="+", default=[],
                           metavar="COL", help="columns with task random effects (slopes) in the components; "
                                               "the random intercept is included unless --no-random-intercept")
        group.add_argument("--no-random-intercept", dest="random_intercept", action="store_false",
                           help="no random intercept in the component effects")
        group.add_argument("--random-effects-covariance", choices=("full", "diagonal", "identity"),
                           default="full", help="structure of each component's random-effect covariance "
                                                "(default: full)")
        group.add_argument("--membership", choices=("observation", "task"), default="observation",
                           help="a component label per row (the paper's model) or per task (latent-class mixed "
                                "model); default: observation")
        group.add_argument("--quadrature-points", type=int, default=1, metavar="K",
                           help="adaptive Gauss-Hermite points for a scalar effect (default 1: Laplace)")

    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options of ``mtl-jax fit --model mixture-glmm``: task, responses, covariates."""
        data = parser.add_argument_group("data options (mixture-glmm)")
        data.add_argument("--task", help="column holding the task labels (required without --formula)")
        data.add_argument("--response", nargs="+", metavar="COL", help="response column(s) (required without "
                                                                        "--formula)")
        data.add_argument("--covariates", nargs="+", metavar="COL", help="covariate columns (required without "
                                                                          "--formula)")
        data.add_argument("--formula", help='lme4-style formula of the components, e.g. "y ~ x1 + I(x1**2) + '
                                            '(1 + x1 | task)" (replaces --task --response --covariates and the '
                                            'random-effect options; || for a diagonal covariance)')
        data.add_argument("--mixing-formula", help='one-sided formula of the mixing logits, e.g. "~ x2" '
                                                   '(default: the fixed part of --formula)')
        data.add_argument("--mixing-covariates", nargs="+", metavar="COL",
                          help="covariates of the mixing proportions (default: --covariates; the intercept "
                               "alone with --membership task)")
        data.add_argument("--categorical", nargs="+", default=[], metavar="COL",
                          help="covariates to dummy-code (non-numeric columns always are)")
        data.add_argument("--no-standardize", dest="standardize", action="store_false",
                          help="use continuous covariates unscaled")
        data.add_argument("--trials", metavar="COL", help="binomial trials column (--family binomial)")
        data.add_argument("--offset", metavar="COL",
                          help="offset column added to the linear predictor (e.g. a log exposure for poisson)")
        data.add_argument("--positive", metavar="LABEL",
                          help="the level coded 1 of a two-level text response (bernoulli)")

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
        if labels is None and args.formula:
            from mtl_jax.data.formula import from_formula

            data, _ = from_formula(frame, args.formula, args.mixing_formula, task=args.task, trials=args.trials,
                                   offset=args.offset, positive=args.positive)
            return data
        if labels is None:
            sources = list(dict.fromkeys([*args.covariates, *(self.mixing_covariates or ()), *self.random_slopes]))
            missing = [flag for flag, value in (("--task", args.task), ("--response", args.response),
                                                ("--covariates", args.covariates)) if not value]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or give --formula)")
            if self.family == "binomial" and args.trials is None:
                raise ValueError("--family binomial needs --trials COL (the column of trials per row)")
            return TaskData.from_dataframe(frame, task=args.task, response=args.response, covariates=sources,
                                           categorical=args.categorical, standardize=args.standardize,
                                           trials=args.trials, offset=args.offset, positive=args.positive)
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
        task_level = args.membership == "task"
        terms = _formula_terms(args) if args.formula else {
            "covariates": tuple(args.covariates),
            "mixing_covariates": tuple(args.mixing_covariates or ([] if task_level else args.covariates)),
            "random_slopes": tuple(args.random_slopes),
            "random_intercept": args.random_intercept,
            "random_effects_covariance": args.random_effects_covariance,
            "component_random_effects": args.component_random_effects,
        }
        return cls(
            num_components=args.components[0],
            family=args.family,
            membership=args.membership,
            mixing_random_effects=args.mixing_random_effects and not task_level,
            **terms,
            quadrature_points=args.quadrature_points,
            residual_update=args.residual_update,
        )


def _formula_terms(args) -> dict[str, Any]:
    """The model's column settings from ``--formula`` / ``--mixing-formula`` (terms named as
    :func:`mtl_jax.data.formula.from_formula` names the data's sources).

    Raises:
        ValueError: when ``--formula`` is combined with the column options it replaces.
    """
    from mtl_jax.data.formula import parse_mixed_formula

    clashes = [flag for flag, value in (("--response", args.response), ("--covariates", args.covariates),
                                        ("--mixing-covariates", args.mixing_covariates),
                                        ("--component-random-effects", args.random_slopes)) if value]
    if clashes:
        raise ValueError(f"--formula replaces {', '.join(clashes)}: give the terms in the formula")
    parsed = parse_mixed_formula(args.formula)
    if args.mixing_formula:
        mixing = parse_mixed_formula(f"{parsed.response[0]} {args.mixing_formula.strip()}").fixed_terms
    else:
        mixing = () if args.membership == "task" else parsed.fixed_terms
    return {
        "covariates": parsed.fixed_terms,
        "mixing_covariates": tuple(mixing),
        "random_slopes": parsed.random_slopes,
        "random_intercept": parsed.random_intercept,
        "random_effects_covariance": parsed.random_effects_covariance,
        "component_random_effects": parsed.group is not None and args.component_random_effects,
    }
