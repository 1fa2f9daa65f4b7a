"""The mixture GLMM's pytrees: its design (data arrays), parameters and NumPyro priors.

Shapes: ``n`` observations, ``K`` tasks, ``g`` components, ``p`` responses, ``q_c``
component covariates, ``q_m`` mixing covariates.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
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
        mixing_cov: ``Lambda``, the covariance of the mixing random effects
            ``[g-1, g-1]`` (zeros when mixing effects are off). A full matrix, so that
            re-expressing the logits against another reference component is exact.
        component_var: ``phi``, ``[g, p]`` (zeros when component effects are off).
        mixing_effects: BLUPs ``a``, ``[K, g-1]``.
        component_effects: BLUPs ``b``, ``[K, g, p]``.
    """

    mixing_coef: Float[Array, "gm1 qm"]
    component_coef: Float[Array, "g qc p"]
    component_cov: Float[Array, "g p p"]
    mixing_cov: Float[Array, "gm1 gm1"]
    component_var: Float[Array, "g p"]
    mixing_effects: Float[Array, "K gm1"]
    component_effects: Float[Array, "K g p"]


POPULATION_FIELDS = ("mixing_coef", "component_coef", "component_cov", "mixing_cov", "component_var")
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
