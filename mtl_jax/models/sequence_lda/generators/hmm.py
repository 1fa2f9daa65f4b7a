r"""Hidden Markov model topic with categorical emissions and per-state halting.

With ``S`` hidden states, initial distribution :math:`\pi`, transitions :math:`A` and
emissions :math:`B`: the first state is :math:`z_1 \sim \pi`, each state emits
:math:`x_l \sim B_{z_l}`, and then either ends the sequence (probability
:math:`A_{z_l, \mathrm{END}}`) or moves to :math:`z_{l+1}` (probability
:math:`A_{z_l, z_{l+1}}`), each row of :math:`A` normalised jointly over the ``S`` moves
and END. So

.. math:: P(x_{1:L}) = \sum_{z} \pi_{z_1} B_{z_1 x_1}
          \prod_{l=2}^{L} A_{z_{l-1} z_l} B_{z_l x_l} \; A_{z_L, \mathrm{END}},

a distribution over finite non-empty strings. With ``halting=False`` rows of :math:`A`
have ``S`` outcomes and there is no END factor (the prefix probability).

The forward pass is :func:`.states.forward`, shared with the Gaussian HMM.

The M-step is one Baum-Welch step whose expected counts are gradients (Fisher's
identity): for any probability :math:`p` entering the likelihood multiplicatively,
:math:`\partial \log P(x) / \partial \log p = \mathbb{E}[\#\text{uses of } p \mid x]`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.common import log_dirichlet, log_normalize
from mtl_jax.models.sequence_lda.generators.states import forward, next_outcome_log_probs


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
class HMM:
    """A categorical-emission HMM per topic.

    Attributes:
        num_symbols: ``V``.
        num_states: ``S``.
        halting: Whether each state may END the sequence (see the module docstring).
        pseudo_count: Dirichlet pseudo-count added to every expected count in the M-step.
    """

    num_symbols: int
    num_states: int
    halting: bool = True
    pseudo_count: float = 0.01
    observations: ClassVar[str] = "tokens"

    @property
    def width(self) -> int:
        """``W``, outcomes per transition row: ``S + 1`` with halting, else ``S``."""
        return self.num_states + int(self.halting)

    @property
    def num_parameters(self) -> int:
        """Free parameters of one topic: ``(S - 1) + S (W - 1) + S (V - 1)``."""
        S = self.num_states
        return S - 1 + S * (self.width - 1) + S * (self.num_symbols - 1)

    def init(self, key: PRNGKeyArray, num_topics: int) -> HMMParams:
        """Flat-Dirichlet random initial, transition and emission rows."""
        keys = jax.random.split(key, 3)
        K, S = num_topics, self.num_states
        return HMMParams(
            log_dirichlet(keys[0], (K, S)),
            log_dirichlet(keys[1], (K, S, self.width)),
            log_dirichlet(keys[2], (K, S, self.num_symbols)),
        )

    def log_prob(
        self, params: HMMParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, ""]:
        """Log-probability of one sequence (its first ``length`` tokens) under one topic."""
        log_obs = params.log_emit[:, tokens].T
        return forward(params.log_init, params.log_trans, log_obs, length, self.halting)[0]

    def log_prior(self, params: HMMParams) -> Float[Array, ""]:
        r"""Log of the ``Dirichlet(1 + a)`` row priors the M-step's MAP maximises, up to a constant.

        :math:`a` times the sum of every log-probability (``a = pseudo_count``; 0 when ``a = 0``).
        """
        if not self.pseudo_count:
            return jnp.zeros(())
        return self.pseudo_count * sum(jnp.sum(leaf) for leaf in params)

    def expected_counts(
        self,
        params: HMMParams,
        tokens: Int[Array, "S L"],
        lengths: Int[Array, " S"],
        weights: Float[Array, "S K"],
    ) -> HMMParams:
        r"""Weighted expected counts of every parameter, per topic (a ``[K, ...]`` pytree).

        :math:`\partial_{\log \theta_k} \sum_s w_{sk} \log P_k(x_s)` (Fisher's identity):
        the expected initial states, moves and ENDs, and emissions, weighted by ``w``.
        """

        def objective(params_one, weights_one):
            log_probs = jax.vmap(self.log_prob, (None, 0, 0))(params_one, tokens, lengths)
            return jnp.sum(weights_one * log_probs)

        return jax.vmap(jax.grad(objective))(params, weights.T)

    def m_step(
        self,
        params: HMMParams,
        tokens: Int[Array, "S L"],
        lengths: Int[Array, " S"],
        weights: Float[Array, "S K"],
    ) -> HMMParams:
        """One Baum-Welch step: expected counts plus pseudo-counts, normalised per row."""
        counts = self.expected_counts(params, tokens, lengths, weights)
        return HMMParams(*(log_normalize(c, self.pseudo_count) for c in counts))

    def next_symbol_log_probs(
        self, params: HMMParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, "L+1 V+1"]:
        r"""Row ``j``: log-distribution of the next outcome (``V`` symbols, END) after ``x_{1:j}``.

        The filtered state distribution pushed through the transitions and emissions:
        :math:`P(x_{j+1} = v) = \sum_{s'} \sum_s p(z_j = s \mid x_{1:j}) A_{ss'} B_{s'v}`,
        :math:`P(\mathrm{END}) = \sum_s p(z_j = s \mid x_{1:j}) A_{s,\mathrm{END}}`. Rows
        ``j > length`` repeat row ``length``.
        """
        log_obs = params.log_emit[:, tokens].T
        _, log_filtered = forward(params.log_init, params.log_trans, log_obs, length, self.halting)
        log_states, log_end = next_outcome_log_probs(
            params.log_init, params.log_trans, log_filtered, self.halting
        )
        log_symbols = logsumexp(log_states[:, :, None] + params.log_emit[None], axis=1)
        return jnp.concatenate([log_symbols, log_end[:, None]], axis=1)
