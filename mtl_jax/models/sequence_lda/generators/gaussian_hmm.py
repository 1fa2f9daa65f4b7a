r"""Hidden Markov model topic with Gaussian emissions, for real-valued sequences.

The state process (initial distribution, moves and per-state END, see :mod:`.hmm`) is
that of the categorical HMM; state ``s`` emits :math:`x_l \sim N(\mu_s, \sigma^2_s)`.

The M-step is one Baum-Welch step. State occupancies :math:`\gamma_{sl}(n)` are the
gradients of :math:`\sum_n w_n \log P(x_n)` with respect to an additive offset of the
log emission densities (Fisher's identity), the state-process counts the gradients with
respect to the log-probabilities; means and variances are the MAP under the prior
:math:`\log p(\mu, \sigma^2) = -\tfrac a2 \log \sigma^2 - a\,\frac{(\mu - m_0)^2 + v_0}{2\sigma^2}`
(``a = pseudo_count``, ``m_0 = prior_mean``, ``v_0 = prior_variance``), which keeps every
variance above ``a v_0 / (N_s + a)``:

.. math:: \mu_s = \frac{\sum \gamma x + a m_0}{N_s + a}, \qquad
          \sigma^2_s = \frac{\sum \gamma (x - \mu_s)^2 + a (\mu_s - m_0)^2 + a v_0}{N_s + a}.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray
from numpyro.distributions import Normal

from mtl_jax.models.sequence_lda.generators.common import log_dirichlet, log_normalize
from mtl_jax.models.sequence_lda.generators.states import forward


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
class GaussianHMM:
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

    @property
    def width(self) -> int:
        """``W``, outcomes per transition row: ``S + 1`` with halting, else ``S``."""
        return self.num_states + int(self.halting)

    @property
    def num_parameters(self) -> int:
        """Free parameters of one topic: ``(S - 1) + S (W - 1) + 2 S``."""
        S = self.num_states
        return S - 1 + S * (self.width - 1) + 2 * S

    def init(self, key: PRNGKeyArray, num_topics: int) -> GaussianHMMParams:
        """Flat-Dirichlet state process; means drawn from the prior, variances ``v_0``."""
        keys = jax.random.split(key, 3)
        K, S = num_topics, self.num_states
        scale = jnp.sqrt(self.prior_variance)
        return GaussianHMMParams(
            log_dirichlet(keys[0], (K, S)),
            log_dirichlet(keys[1], (K, S, self.width)),
            self.prior_mean + scale * jax.random.normal(keys[2], (K, S)),
            jnp.full((K, S), jnp.log(self.prior_variance)),
        )

    def _log_obs(
        self, params: GaussianHMMParams, values: Float[Array, " L"]
    ) -> Float[Array, "L S"]:
        """Log emission densities of every position under every state."""
        return Normal(params.mean, jnp.exp(0.5 * params.log_var)).log_prob(values[:, None])

    def log_prob(
        self, params: GaussianHMMParams, values: Float[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, ""]:
        """Log-density of one sequence (its first ``length`` values) under one topic."""
        log_obs = self._log_obs(params, values)
        return forward(params.log_init, params.log_trans, log_obs, length, self.halting)[0]

    def log_prior(self, params: GaussianHMMParams) -> Float[Array, ""]:
        r"""Log of the prior the M-step's MAP maximises, up to a constant.

        :math:`a (\sum \log \pi + \sum \log A) + \sum_{k,s} \bigl(-\tfrac a2 \log \sigma^2_{ks}
        - a \frac{(\mu_{ks} - m_0)^2 + v_0}{2 \sigma^2_{ks}}\bigr)` (module docstring); 0 when ``a = 0``.
        """
        a = self.pseudo_count
        if not a:
            return jnp.zeros(())
        process = jnp.sum(params.log_init) + jnp.sum(params.log_trans)
        spread = (params.mean - self.prior_mean) ** 2 + self.prior_variance
        emission = -0.5 * params.log_var - spread / (2.0 * jnp.exp(params.log_var))
        return a * (process + jnp.sum(emission))

    def expected_counts(
        self,
        params: GaussianHMMParams,
        values: Float[Array, "N L"],
        lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ) -> tuple[Float[Array, "K S"], Float[Array, "K S W"], Float[Array, "K N L S"]]:
        r"""Weighted expected initial states, moves/ENDs and occupancies.

        Returns:
            Per topic: expected initial states ``[K, S]``, moves and ENDs ``[K, S, W]``,
            and occupancies :math:`w_{nk} \gamma_{nls}` ``[K, N, L, S]``.
        """
        log_obs = jax.vmap(jax.vmap(self._log_obs, (None, 0)), (0, None))(params, values)

        def objective(log_init, log_trans, log_obs_one, weights_one):
            log_probs = jax.vmap(forward, (None, None, 0, 0, None))(
                log_init, log_trans, log_obs_one, lengths, self.halting
            )[0]
            return jnp.sum(weights_one * log_probs)

        offsets = jnp.zeros_like(log_obs)
        grad = jax.vmap(
            lambda a, b, obs, off, w: jax.grad(
                lambda a, b, off: objective(a, b, obs + off, w), argnums=(0, 1, 2)
            )(a, b, off)
        )
        return grad(params.log_init, params.log_trans, log_obs, offsets, weights.T)

    def m_step(
        self,
        params: GaussianHMMParams,
        values: Float[Array, "N L"],
        lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ) -> GaussianHMMParams:
        """One Baum-Welch step (MAP means and variances, see the module docstring)."""
        init, trans, occupancy = self.expected_counts(params, values, lengths, weights)
        a, m0 = self.pseudo_count, self.prior_mean
        total = jnp.sum(occupancy, axis=(1, 2)) + a
        mean = (jnp.einsum("knls,nl->ks", occupancy, values) + a * m0) / total
        deviation = values[None, :, :, None] - mean[:, None, None]
        spread = jnp.einsum("knls,knls->ks", occupancy, deviation**2)
        var = (spread + a * (mean - m0) ** 2 + a * self.prior_variance) / total
        return GaussianHMMParams(
            log_normalize(init, a), log_normalize(trans, a), mean, jnp.log(var)
        )
