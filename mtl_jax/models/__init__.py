"""Model families, each registered by name in :data:`mtl_jax.models.protocol.MODELS`."""

from mtl_jax.models import baselines  # noqa: F401  (registers "logistic", "pooled-logistic", "lssvm", "stl-net")
from mtl_jax.models import hblr  # noqa: F401  (registers "hblr")
from mtl_jax.models import mixture_glmm  # noqa: F401  (registers "mixture-glmm")
from mtl_jax.models import mtl_net  # noqa: F401  (registers "mtl-net", "pooled-net")
from mtl_jax.models import mtmkl  # noqa: F401  (registers "mtmkl")
from mtl_jax.models import sequence_lda  # noqa: F401  (registers "sequence-lda", "sequence-pooled", "sequence-per-task")
from mtl_jax.models.protocol import MODELS, model_class, register

__all__ = ["MODELS", "model_class", "register"]
