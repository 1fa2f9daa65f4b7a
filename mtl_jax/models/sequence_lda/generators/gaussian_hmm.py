r"""Hidden Markov model topic with Gaussian emissions, for real-valued sequences.

The state process (initial distribution, moves and per-state END, forward pass and
Baum-Welch counts) is :class:`.states.HiddenStates`, that of the categorical HMM; state
``s`` emits :math:`x_l \sim N(\mu_s, \sigma^2_s)`.

The M-step is one Baum-Welch step. State occupancies :math:`\gamma_{sl}(n)` are the
gradients of :math:`\sum_n w_n \log P(x_n)` with respect to the log emission densities
(Fisher's identity, :meth:`.states.HiddenStates.state_counts`); means and variances are
the MAP under the prior
:math:`\log p(\mu, \sigma^2) = -\tfrac a2 \log \sigma^2 - a\,\frac{(\mu - m_0)^2 + v_0}{2\sigma^2}`
(``a = pseudo_count``, ``m_0 = prior_mean``, ``v_0 = prior_variance``), which keeps every
variance above ``a v_0 / (N_s + a)``:

.. math:: \mu_s = \frac{\sum \gamma x + a m_0}{N_s + a}, \qquad
          \sigma^2_s = \frac{\sum \gamma (x - \mu_s)^2 + a (\mu_s - m_0)^2 + a v_0}{N_s + a}.

That prior is improper (it only regularises the MAP). The NumPyro program (SVI, NUTS)
needs a proper one and uses independent weak priors of the same scale,
:math:`\mu_s \sim N(m_0, v_0 / a)` and :math:`\sigma^2_s \sim \mathrm{InvGamma}(1 + a, a v_0)`
(:meth:`GaussianHMM.field_prior`), with ``Dirichlet(1 + a)`` rows for the state process.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.states import HiddenStates


class GaussianHMMParams(NamedTuple):
    """Attributes:
    log_init: initial state log-probabilities ``[K, S]``.
    log_trans: move (and END, last column) log-probabilities ``[K, S, W]``.
    mean: emission means ``[K, S]``.
    log_var: emission log-variances ``[K, S]``.
    """

    log_init: Float[Array, "*K S"]
    log_trans: Float[Array, "*K S W"]
    mean: Float[Array, "*K S"]
    log_var: Float[Array, "*K S"]


@dataclasses.dataclass(frozen=True)
class GaussianHMM(HiddenStates):
    """A Gaussian-emission HMM per topic (reads ``values``, not ``tokens``).

    Attributes:
        num_states: ``S``.
        halting: Whether each state may END the sequence.
        pseudo_count: Dirichlet pseudo-count of the state process and weight ``a`` of the
            emission prior.
        prior_mean: ``m_0``.
        prior_variance: ``v_0``.
    """

    num_states: int
    halting: bool = True
    pseudo_count: float = 0.01
    prior_mean: float = 0.0
    prior_variance: float = 1.0
    observations: ClassVar[str] = "values"
    params_type: ClassVar[type] = GaussianHMMParams

    # The emission statistics are the occupancies themselves.
    expected_counts = HiddenStates.state_counts

    @property
    def _emission_parameters(self) -> int:
        """``2 S``: a mean and a variance per state."""
        return 2 * self.num_states

    def _init_emissions(
        self, key: PRNGKeyArray, num_topics: int
    ) -> tuple[Float[Array, "K S"], Float[Array, "K S"]]:
        """Means drawn from the prior, variances ``v_0``."""
        shape = (num_topics, self.num_states)
        scale = jnp.sqrt(self.prior_variance)
        return (
            self.prior_mean + scale * jax.random.normal(key, shape),
            jnp.full(shape, jnp.log(self.prior_variance)),
        )

    def _log_obs(
        self, params: GaussianHMMParams, values: Float[Array, " L"]
    ) -> Float[Array, "L S"]:
        """Log emission densities of every position under every state."""
        return dist.Normal(params.mean, jnp.exp(0.5 * params.log_var)).log_prob(values[:, None])

    def field_prior(self, field: str, shape: tuple[int, ...], dtype) -> dist.Distribution:
        r"""NumPyro priors: :math:`\mu \sim N(m_0, v_0 / a)`, :math:`\sigma^2 \sim \mathrm{InvGamma}(1 + a, a v_0)`, Dirichlet rows.

        Raises:
            ValueError: when ``pseudo_count`` is 0 (both would be improper).
        """
        if field not in ("mean", "log_var"):
            return super().field_prior(field, shape, dtype)
        a, v0 = self.pseudo_count, self.prior_variance
        if a <= 0:
            raise ValueError("SVI/NUTS with gaussian-hmm topics need pseudo_count > 0 (the scale of the emission priors)")
        if field == "mean":
            return dist.Normal(jnp.full(shape, self.prior_mean, dtype), jnp.sqrt(v0 / a)).to_event(len(shape))
        return dist.InverseGamma(jnp.full(shape, 1.0 + a, dtype), a * v0).to_event(len(shape))

    def _emission_log_prior(self, params: GaussianHMMParams) -> Float[Array, ""]:
        r"""The log of the emission prior (module docstring) over ``a``, up to a constant.

        :math:`\sum_{k,s} \bigl(-\tfrac 12 \log \sigma^2_{ks}
        - \frac{(\mu_{ks} - m_0)^2 + v_0}{2 \sigma^2_{ks}}\bigr)`.
        """
        spread = (params.mean - self.prior_mean) ** 2 + self.prior_variance
        return jnp.sum(-0.5 * params.log_var - spread / (2.0 * jnp.exp(params.log_var)))

    def _emission_m_step(
        self, values: Float[Array, "N L"], occupancy: Float[Array, "K N L S"]
    ) -> tuple[Float[Array, "K S"], Float[Array, "K S"]]:
        """MAP means and log-variances from the weighted occupancies (module docstring)."""
        a, m0 = self.pseudo_count, self.prior_mean
        total = jnp.sum(occupancy, axis=(1, 2)) + a
        mean = (jnp.einsum("knls,nl->ks", occupancy, values) + a * m0) / total
        deviation = values[None, :, :, None] - mean[:, None, None]
        spread = jnp.einsum("knls,knls->ks", occupancy, deviation**2)
        var = (spread + a * (mean - m0) ** 2 + a * self.prior_variance) / total
        return mean, jnp.log(var)
