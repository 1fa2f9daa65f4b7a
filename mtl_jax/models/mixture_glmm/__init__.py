"""The multitask mixture GLMM: model (:mod:`.model`), EM (:mod:`.em`), densities
(:mod:`.likelihood`), standard errors (:mod:`.variance`), pytrees (:mod:`.params`)."""

from mtl_jax.models.mixture_glmm.model import MixtureGLMM
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams, MixturePriors

__all__ = ["MixtureDesign", "MixtureGLMM", "MixtureParams", "MixturePriors"]
