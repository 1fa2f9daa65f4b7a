r"""Hidden Markov model topic with categorical emissions and per-state halting.

The state process (initial distribution :math:`\pi`, moves and per-state END :math:`A`,
forward pass, Baum-Welch counts) is :class:`.states.HiddenStates`; state ``s`` emits
symbol :math:`x_l = v` with probability :math:`B_{sv}`. So

.. math:: P(x_{1:L}) = \sum_{z} \pi_{z_1} B_{z_1 x_1}
          \prod_{l=2}^{L} A_{z_{l-1} z_l} B_{z_l x_l} \; A_{z_L, \mathrm{END}},

a distribution over finite non-empty strings (no END factor with ``halting=False``).

The M-step is one Baum-Welch step: with occupancies :math:`\gamma_{nls}` weighted by
:math:`w_{nk}` (gradients, Fisher's identity),
:math:`B_{k,sv} \propto a + \sum_{n,l} w_{nk} \gamma_{nls} [x_{nl} = v]`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.common import log_dirichlet, log_normalize
from mtl_jax.models.sequence_lda.generators.states import HiddenStates, next_outcome_log_probs


class HMMParams(NamedTuple):
    """Attributes:
    log_init: initial state log-probabilities ``[K, S]``.
    log_trans: move (and END, last column) log-probabilities ``[K, S, W]``, ``W = S + 1``
        with halting, else ``S``.
    log_emit: emission log-probabilities ``[K, S, V]``.
    """

    log_init: Float[Array, "*K S"]
    log_trans: Float[Array, "*K S W"]
    log_emit: Float[Array, "*K S V"]


@dataclasses.dataclass(frozen=True)
class HMM(HiddenStates):
    """A categorical-emission HMM per topic.

    Attributes:
        num_symbols: ``V``.
        num_states: ``S``.
        halting: Whether each state may END the sequence (see :mod:`.states`).
        pseudo_count: Dirichlet pseudo-count added to every expected count in the M-step.
    """

    num_symbols: int
    num_states: int
    halting: bool = True
    pseudo_count: float = 0.01
    observations: ClassVar[str] = "tokens"
    params_type: ClassVar[type] = HMMParams

    @property
    def _emission_parameters(self) -> int:
        """``S (V - 1)``."""
        return self.num_states * (self.num_symbols - 1)

    def _init_emissions(self, key: PRNGKeyArray, num_topics: int) -> tuple[Float[Array, "K S V"]]:
        """Flat-Dirichlet random emission rows."""
        return (log_dirichlet(key, (num_topics, self.num_states, self.num_symbols)),)

    def _log_obs(self, emissions: tuple[Float[Array, "S V"]], tokens: Int[Array, " N"]) -> Float[Array, "S N"]:
        r""":math:`\log B_{s x_n}`."""
        return jnp.take(emissions[0], tokens, axis=1)

    def _obs_table(self, emissions: tuple[Float[Array, "S V"]]) -> tuple[Float[Array, "S V"], Float[Array, " V"]]:
        r"""Each symbol's column of :math:`B` over its largest entry, and that entry's log."""
        (log_emit,) = emissions
        top = jnp.max(log_emit, axis=0)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        return jnp.exp(log_emit - top), top

    def _scaled_obs(self, table, tokens: Int[Array, " N"]) -> tuple[Float[Array, "S N"], Float[Array, " N"]]:
        """A lookup in the scaled table (no ``exp`` per position)."""
        scaled, top = table
        return jnp.take(scaled, tokens, axis=1), top[tokens]

    def _emission_log_prior(self, params: HMMParams) -> Float[Array, ""]:
        r""":math:`\sum \log B` (the ``Dirichlet(1 + a)`` rows' log-density over ``a``)."""
        return jnp.sum(params.log_emit)

    def _emission_m_step(self, params: HMMParams, gradients: tuple[Float[Array, "K S V"]]) -> tuple[Float[Array, "K S V"]]:
        """The gradient with respect to :math:`\\log B` is the expected emission counts: plus pseudo-counts, normalised per row."""
        return (log_normalize(gradients[0], self.pseudo_count),)

    def next_symbol_log_probs(
        self, params: HMMParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, "L+1 V+1"]:
        r"""Row ``j``: log-distribution of the next outcome (``V`` symbols, END) after ``x_{1:j}``.

        The filtered state distribution pushed through the transitions and emissions:
        :math:`P(x_{j+1} = v) = \sum_{s'} \sum_s p(z_j = s \mid x_{1:j}) A_{ss'} B_{s'v}`,
        :math:`P(\mathrm{END}) = \sum_s p(z_j = s \mid x_{1:j}) A_{s,\mathrm{END}}`. Rows
        ``j > length`` repeat row ``length``.
        """
        log_filtered = self.filtered_log_probs(params, tokens, length)
        log_states, log_end = next_outcome_log_probs(
            params.log_init, params.log_trans, log_filtered, self.halting
        )
        log_symbols = logsumexp(log_states[:, :, None] + params.log_emit[None], axis=1)
        return jnp.concatenate([log_symbols, log_end[:, None]], axis=1)
