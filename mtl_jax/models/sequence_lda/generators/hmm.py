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

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.common import log_dirichlet, log_normalize
from mtl_jax.models.sequence_lda.generators.states import (
    HiddenStates,
    forward,
    next_outcome_log_probs,
)


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

    def _log_obs(self, params: HMMParams, tokens: Int[Array, " L"]) -> Float[Array, "L S"]:
        r""":math:`\log B_{s x_l}`."""
        return params.log_emit[:, tokens].T

    def _emission_log_prior(self, params: HMMParams) -> Float[Array, ""]:
        r""":math:`\sum \log B` (the ``Dirichlet(1 + a)`` rows' log-density over ``a``)."""
        return jnp.sum(params.log_emit)

    def _emission_counts(
        self, tokens: Int[Array, "N L"], occupancy: Float[Array, "K N L S"]
    ) -> Float[Array, "K S V"]:
        r""":math:`\sum_{n,l} o_{knls} [x_{nl} = v]` (one ``segment_sum`` over all positions)."""
        K, S = occupancy.shape[0], occupancy.shape[-1]
        data = jnp.moveaxis(occupancy, 0, 2).reshape(-1, K * S)
        counts = jax.ops.segment_sum(data, tokens.reshape(-1), num_segments=self.num_symbols)
        return counts.T.reshape(K, S, self.num_symbols)

    def _emission_m_step(
        self, tokens: Int[Array, "N L"], occupancy: Float[Array, "K N L S"]
    ) -> tuple[Float[Array, "K S V"]]:
        """Expected emissions plus pseudo-counts, normalised per row."""
        return (log_normalize(self._emission_counts(tokens, occupancy), self.pseudo_count),)

    def expected_counts(
        self,
        params: HMMParams,
        tokens: Int[Array, "N L"],
        lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ) -> HMMParams:
        r"""Weighted expected counts of every parameter, per topic (a ``[K, ...]`` pytree).

        :math:`\partial_{\log \theta_k} \sum_n w_{nk} \log P_k(x_n)` (Fisher's identity):
        the expected initial states, moves and ENDs, and emissions, weighted by ``w``.
        """
        init, trans, occupancy = self.state_counts(params, tokens, lengths, weights)
        return HMMParams(init, trans, self._emission_counts(tokens, occupancy))

    def next_symbol_log_probs(
        self, params: HMMParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, "L+1 V+1"]:
        r"""Row ``j``: log-distribution of the next outcome (``V`` symbols, END) after ``x_{1:j}``.

        The filtered state distribution pushed through the transitions and emissions:
        :math:`P(x_{j+1} = v) = \sum_{s'} \sum_s p(z_j = s \mid x_{1:j}) A_{ss'} B_{s'v}`,
        :math:`P(\mathrm{END}) = \sum_s p(z_j = s \mid x_{1:j}) A_{s,\mathrm{END}}`. Rows
        ``j > length`` repeat row ``length``.
        """
        log_obs = self._log_obs(params, tokens)
        _, log_filtered = forward(params.log_init, params.log_trans, log_obs, length, self.halting)
        log_states, log_end = next_outcome_log_probs(
            params.log_init, params.log_trans, log_filtered, self.halting
        )
        log_symbols = logsumexp(log_states[:, :, None] + params.log_emit[None], axis=1)
        return jnp.concatenate([log_symbols, log_end[:, None]], axis=1)
