r"""Hidden Markov model topic with Gaussian emissions, for real-valued sequences.

The state process (initial distribution, moves and per-state END, forward pass and
Baum-Welch counts) is :class:`.states.HiddenStates`, that of the categorical HMM; state
``s`` emits :math:`x_l \sim N(\mu_s, \sigma^2_s)`.

The M-step is one Baum-Welch step. The occupancy-weighted moments of the data about the
current means are gradients of :math:`\sum_n w_n \log P(x_n)` (Fisher's identity,
:meth:`GaussianHMM._emission_inputs`); means and variances are the MAP under the prior
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
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.states import HiddenStates

if TYPE_CHECKING:  # NumPyro is imported where a program runs
    import numpyro.distributions as dist


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

    def _emission_inputs(self, params: GaussianHMMParams) -> tuple[Float[Array, " S"], ...]:
        r"""``(mean, rho, nu, eta)`` with :math:`\rho = -1/(2\sigma^2)`, :math:`\nu = -\tfrac12 \log(2\pi\sigma^2)`, :math:`\eta = 0`.

        The log-density :math:`\rho (x - \mu)^2 + \nu + \eta (x - \mu)` (:meth:`_log_obs`)
        is the normal one, and its gradients with respect to :math:`\rho, \nu, \eta` are
        the occupancy-weighted moments about the current mean,
        :math:`\sum \gamma (x - \mu)^2`, :math:`\sum \gamma` and :math:`\sum \gamma (x - \mu)`:
        the M-step's statistics, centred (accurate in float32 for data far from zero).
        """
        return (
            params.mean,
            -0.5 * jnp.exp(-params.log_var),
            -0.5 * (jnp.log(2.0 * jnp.pi) + params.log_var),
            jnp.zeros_like(params.mean),
        )

    def _log_obs(self, emissions: tuple[Float[Array, " S"], ...], values: Float[Array, " N"]) -> Float[Array, "S N"]:
        """Log emission densities of one position of every sequence under every state."""
        mean, rho, nu, eta = (field[:, None] for field in emissions)
        deviation = values - mean
        return rho * deviation**2 + nu + eta * deviation

    def field_prior(self, field: str, shape: tuple[int, ...], dtype) -> dist.Distribution:
        r"""NumPyro priors: :math:`\mu \sim N(m_0, v_0 / a)`, :math:`\sigma^2 \sim \mathrm{InvGamma}(1 + a, a v_0)`, Dirichlet rows.

        Raises:
            ValueError: when ``pseudo_count`` is 0 (both would be improper).
        """
        import numpyro.distributions as dist

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
        self, params: GaussianHMMParams, gradients: tuple[Float[Array, "K S"], ...]
    ) -> tuple[Float[Array, "K S"], Float[Array, "K S"]]:
        r"""MAP means and log-variances (module docstring) from the centred moments.

        The gradients with respect to :math:`(\rho, \nu, \eta)` (:meth:`_emission_inputs`)
        are :math:`\sum \gamma (x - \mu)^2`, :math:`N_s = \sum \gamma` and
        :math:`\sum \gamma (x - \mu)` about the current mean :math:`\mu`.
        """
        a, m0 = self.pseudo_count, self.prior_mean
        _, second, occupancy, first = gradients
        total = occupancy + a
        step = (first + a * (m0 - params.mean)) / total
        new_mean = params.mean + step
        spread = second - 2.0 * step * first + occupancy * step**2  # sum gamma (x - new_mean)^2
        new_var = (spread + a * (new_mean - m0) ** 2 + a * self.prior_variance) / total
        return new_mean, jnp.log(new_var)
