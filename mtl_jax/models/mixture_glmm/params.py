"""The mixture GLMM's pytrees: its design (data arrays), parameters and NumPyro priors.

Shapes: ``n`` observations, ``K`` tasks, ``g`` components, ``p`` responses, ``q_c``
component covariates, ``q_m`` mixing covariates, ``r`` component random-effect columns,
``d = r p`` component random effects per task and component.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class MixtureDesign(eqx.Module):
    """The arrays one mixture-GLMM fit reads, in flat per-observation storage.

    Attributes:
        y: responses ``[n, p]``.
        x_comp: component-mean design ``[n, q_c]`` (first column the intercept).
        x_mix: mixing-proportion design ``[n, q_m]`` (first column the intercept).
        task: task id of each observation ``[n]``, integers in ``[0, num_tasks)``.
        num_tasks: ``K`` (static). Ids at or above the number of tasks of a fitted
            parameter point are tasks unseen in training.
        z_comp: design of the component random effects ``[n, r]`` (default: a random
            intercept, a column of ones).
        trials: binomial trials ``[n]`` (default ones).
        offset: offset of the component linear predictors ``[n]`` (default zeros).
    """

    y: Float[Array, "n p"]
    x_comp: Float[Array, "n qc"]
    x_mix: Float[Array, "n qm"]
    task: Int[Array, " n"]
    num_tasks: int = eqx.field(static=True)
    z_comp: Float[Array, "n r"] | None = None
    trials: Float[Array, " n"] | None = None
    offset: Float[Array, " n"] | None = None

    def __post_init__(self):
        n = self.y.shape[0]
        dtype = self.y.dtype
        if self.z_comp is None:
            self.z_comp = jnp.ones((n, 1), dtype)
        if self.trials is None:
            self.trials = jnp.ones((n,), dtype)
        if self.offset is None:
            self.offset = jnp.zeros((n,), dtype)


class MixtureParams(NamedTuple):
    """Fixed effects, dispersion, variance components and predicted random effects.

    Attributes:
        mixing_coef: ``v``, ``[g-1, q_m]`` (component ``g`` is the reference).
        component_coef: ``W``, ``[g, q_c, p]``.
        component_cov: ``Sigma``, ``[g, p, p]``.
        mixing_cov: ``Lambda``, the covariance of the mixing random effects
            ``[g-1, g-1]`` (zeros when mixing effects are off). A full matrix, so that
            re-expressing the logits against another reference component is exact.
        component_effects_cov: ``Phi_h``, the covariance of ``vec(B_hi)`` (index
            ``a p + k`` for random-effect column ``a`` and response ``k``), ``[g, d, d]``
            (zeros when component effects are off).
        mixing_effects: BLUPs ``a``, ``[K, g-1]``.
        component_effects: BLUPs ``B``, ``[K, g, r, p]``.
        class_logits: membership per task: each training task's log posterior class
            probabilities ``[K, g]`` (zeros for membership per observation).

    ``component_cov`` is the Gaussian family's residual covariance; the other families
    have no dispersion and keep it at the identity (not a parameter).
    """

    mixing_coef: Float[Array, "gm1 qm"]
    component_coef: Float[Array, "g qc p"]
    component_cov: Float[Array, "g p p"]
    mixing_cov: Float[Array, "gm1 gm1"]
    component_effects_cov: Float[Array, "g d d"]
    mixing_effects: Float[Array, "K gm1"]
    component_effects: Float[Array, "K g r p"]
    class_logits: Float[Array, "K g"]


POPULATION_FIELDS = ("mixing_coef", "component_coef", "component_cov", "mixing_cov", "component_effects_cov")
"""The fields without a task axis."""


@dataclasses.dataclass(frozen=True)
class MixturePriors:
    """Prior scales of :meth:`MixtureGLMM.numpyro_model`, in units of the data.

    The program standardises nothing; instead every scale that lives on the response
    scale is multiplied by the response's spread, so the priors are equally weak for
    exam scores in points and for reaction times in seconds. With ``m_k`` and ``s_k``
    the mean and sd of response ``k`` over the training rows:

    * component coefficients ``W_{h,c,k} ~ Normal(m_k [c = intercept], coef_scale * s_k)``
      (the intercept prior is centred on the response mean, the slopes on zero);
    * residual and component-effect sds ``~ HalfCauchy(sd_scale * s_k)``;
    * mixing coefficients ``v ~ Normal(0, coef_scale)`` and mixing-effect sds
      ``~ HalfCauchy(sd_scale)`` (logits have no units);
    * correlations ``LKJCholesky(lkj_concentration)``.

    Attributes:
        coef_scale: prior sd of a coefficient, in response sds (or logit units).
        sd_scale: HalfCauchy scale of a standard deviation, in response sds.
        lkj_concentration: ``eta`` of the LKJ priors (``eta > 1`` favours weak correlation).
    """

    coef_scale: float = 5.0
    sd_scale: float = 1.0
    lkj_concentration: float = 2.0
