r"""Dirichlet-process hierarchical Bayesian logistic regression (``"hblr"``; Xue et al. 2007).

:mod:`.model` is the protocol class :class:`HBLR`; :mod:`.vb` its closed-form variational
Bayes (``method="vb"``); :mod:`.program` its NumPyro program (``"svi"``, ``"nuts"``).
"""

from mtl_jax.models.hblr.model import HBLR, default_clusters
from mtl_jax.models.hblr.vb import HBLRParams, Prior

__all__ = ["HBLR", "HBLRParams", "Prior", "default_clusters"]
