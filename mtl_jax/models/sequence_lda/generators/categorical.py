r"""Bag-of-symbols topic: every position is an independent draw from one categorical.

:math:`\log P_k(x) = \sum_{l < L} \log \beta_{k, x_l}`; plain LDA is the case where each
sequence is a single token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.common import (
    Generator,
    log_dirichlet,
    log_normalize,
    weighted_counts,
)


class CategoricalParams(NamedTuple):
    """Attributes: log_beta: symbol log-probabilities ``[K, V]`` (``[V]`` for one topic)."""

    log_beta: Float[Array, "*K V"]


@dataclasses.dataclass(frozen=True)
class Categorical(Generator):
    """A categorical distribution over ``num_symbols`` symbols per topic.

    Attributes:
        num_symbols: ``V``.
        pseudo_count: Dirichlet pseudo-count added to every expected count in the M-step.
    """

    num_symbols: int
    pseudo_count: float = 0.01
    observations: ClassVar[str] = "tokens"
    params_type: ClassVar[type] = CategoricalParams

    @property
    def num_parameters(self) -> int:
        """Free parameters of one topic: ``V - 1``."""
        return self.num_symbols - 1

    def init(self, key: PRNGKeyArray, num_topics: int) -> CategoricalParams:
        """Flat-Dirichlet random topics, ``log_beta [K, V]``."""
        return CategoricalParams(log_dirichlet(key, (num_topics, self.num_symbols)))

    def log_prob(
        self, params: CategoricalParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, ""]:
        """Log-probability of one sequence (its first ``length`` tokens) under one topic."""
        mask = jnp.arange(tokens.shape[0]) < length
        return jnp.sum(jnp.where(mask, params.log_beta[tokens], 0.0))

    def log_prior(self, params: CategoricalParams) -> Float[Array, ""]:
        r"""Log of the ``Dirichlet(1 + a)`` prior the M-step's MAP maximises, up to a constant.

        :math:`a \sum_{k,v} \log \beta_{kv}` (``a = pseudo_count``; 0 when ``a = 0``).
        """
        return self.pseudo_count * jnp.sum(params.log_beta) if self.pseudo_count else jnp.zeros(())

    def m_step(
        self,
        params: CategoricalParams,
        tokens: Int[Array, "S L"],
        lengths: Int[Array, " S"],
        weights: Float[Array, "S K"],
    ) -> CategoricalParams:
        r""":math:`\beta_{kv} \propto a + \sum_s w_{sk} \#\{l < L_s: x_{sl} = v\}` (closed form).

        ``params`` is unused (the update does not depend on the current point).
        """
        mask = jnp.arange(tokens.shape[1]) < lengths[:, None]
        counts = weighted_counts(tokens, mask, weights, self.num_symbols)
        return CategoricalParams(log_normalize(counts, self.pseudo_count))

    def next_symbol_log_probs(
        self, params: CategoricalParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, "L+1 V+1"]:
        """``log_beta`` at every prefix; the halt column is ``-inf`` (lengths are given)."""
        row = jnp.append(params.log_beta, -jnp.inf)
        return jnp.broadcast_to(row, (tokens.shape[0] + 1, self.num_symbols + 1))
