r"""Response families of the mixture GLMM's components, each with its canonical link.

A component's linear predictor is :math:`\eta = W_h^T x + B_{hi}^T z + o` (``o`` the
offset). Given :math:`\eta`:

========== ================================= ============================== ===================
family     density of ``y``                  mean :math:`\mu(\eta)`         weight :math:`V`
========== ================================= ============================== ===================
gaussian   :math:`\mathcal N_p(\eta, \Sigma_h)` :math:`\eta`                 :math:`\Sigma_h^{-1}`
bernoulli  :math:`\mathrm{Bern}(\mu)`         :math:`\sigma(\eta)`           :math:`\mu(1-\mu)`
binomial   :math:`\mathrm{Bin}(m, \mu)`       :math:`\sigma(\eta)` per trial :math:`m\mu(1-\mu)`
poisson    :math:`\mathrm{Pois}(\mu)`         :math:`e^\eta`                 :math:`\mu`
========== ================================= ============================== ===================

For a canonical link the score and the negative second derivative of
:math:`\log f(y\mid\eta)` in :math:`\eta` are :math:`y - m\mu` and :math:`m V(\mu)` (``m``
the trials; 1 except for the binomial): the working quantities of IRLS (Fisher scoring
equals Newton). The Gaussian family is handled in closed form by the EM (Henderson's
equations); its entries here serve the Laplace approximation and the NumPyro program.
Densities come from :mod:`numpyro.distributions`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FAMILIES = ("gaussian", "bernoulli", "binomial", "poisson")
"""The family names a :class:`~mtl_jax.models.mixture_glmm.MixtureGLMM` accepts."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One response family with its canonical link (see the module table).

    Attributes:
        name: one of :data:`FAMILIES`.
    """

    name: str

    def __post_init__(self):
        if self.name not in FAMILIES:
            raise ValueError(f"unknown family {self.name!r}; choose one of {list(FAMILIES)}")

    @property
    def is_gaussian(self) -> bool:
        """Whether the family has a residual covariance (the Gaussian one)."""
        return self.name == "gaussian"

    def distribution(self, eta, trials, chol=None):
        """The NumPyro distribution of ``y`` given ``eta`` (scalar responses, any batch shape).

        Args:
            eta: linear predictor; for the Gaussian family ``[..., p]`` means.
            trials: binomial trials broadcastable against ``eta`` (ignored by the others).
            chol: Cholesky factor of the residual covariance (Gaussian only).
        """
        import numpyro.distributions as dist

        if self.name == "gaussian":
            return dist.MultivariateNormal(eta, scale_tril=chol)
        if self.name == "poisson":
            return dist.Poisson(jnp.exp(eta))
        return dist.BinomialLogits(eta, total_count=trials if self.name == "binomial" else 1)

    def log_density(self, y, eta, trials):
        r""":math:`\log f(y\mid\eta)` elementwise for the non-Gaussian families (the Poisson in log space)."""
        if self.name == "poisson":
            return y * eta - jnp.exp(eta) - jax.lax.lgamma(y + 1.0)
        # NumPyro's binomial log-density comes back in the default float (float64 under x64).
        return self.distribution(eta, trials).log_prob(y).astype(jnp.result_type(eta))

    def mean(self, eta, trials=1.0):
        r"""The mean per trial :math:`\mu(\eta)`: the identity, the logistic or the exponential."""
        if self.name == "gaussian":
            return eta
        if self.name == "poisson":
            return jnp.exp(eta)
        return jax.nn.sigmoid(eta)

    def working(self, y, eta, trials):
        r"""Score :math:`y - m\mu` and weight :math:`mV(\mu)` of the canonical link, elementwise."""
        mu = self.mean(eta)
        if self.name == "poisson":
            return y - mu, mu
        count = trials if self.name == "binomial" else 1.0
        return y - count * mu, count * mu * (1.0 - mu)

    def link(self, mu):
        r"""The canonical link :math:`g(\mu)` (for starting values and prior centres)."""
        if self.name == "gaussian":
            return mu
        if self.name == "poisson":
            return jnp.log(mu)
        return jnp.log(mu) - jnp.log1p(-mu)
