r"""First-order Markov chain topic with halting.

With ``halting=True`` each transition row has ``V + 1`` outcomes (the ``V`` symbols and
HALT, normalised jointly), so for a string :math:`x_1 \dots x_L`, :math:`L \ge 1`,

.. math:: P(x) = \pi_{x_1} \prod_{l=1}^{L-1} A_{x_l, x_{l+1}} \; A_{x_L, \mathrm{HALT}},

which sums to 1 over all finite non-empty strings (when every halt probability is
positive). With ``halting=False`` rows have ``V`` outcomes and a sequence is scored by its
prefix probability (no halt factor).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.models.sequence_lda.generators.common import (
    Generator,
    log_dirichlet,
    log_normalize,
    weighted_counts,
)


class MarkovParams(NamedTuple):
    """Attributes:
    log_init: initial symbol log-probabilities ``[K, V]``.
    log_trans: transition log-probabilities ``[K, V, W]``, ``W = V + 1`` (last column
        HALT) with halting, else ``V``.
    """

    log_init: Float[Array, "*K V"]
    log_trans: Float[Array, "*K V W"]


@dataclasses.dataclass(frozen=True)
class Markov(Generator):
    """A first-order Markov chain over ``num_symbols`` symbols per topic.

    Attributes:
        num_symbols: ``V``.
        halting: Whether HALT is an outcome of each transition row (a distribution over
            finite strings) or sequences are scored by their prefix probability.
        pseudo_count: Dirichlet pseudo-count added to every expected count in the M-step.
    """

    num_symbols: int
    halting: bool = True
    pseudo_count: float = 0.01
    observations: ClassVar[str] = "tokens"
    params_type: ClassVar[type] = MarkovParams

    @property
    def width(self) -> int:
        """``W``, outcomes per transition row: ``V + 1`` with halting, else ``V``."""
        return self.num_symbols + int(self.halting)

    @property
    def num_parameters(self) -> int:
        """Free parameters of one topic: ``(V - 1) + V (W - 1)``."""
        return self.num_symbols - 1 + self.num_symbols * (self.width - 1)

    def init(self, key: PRNGKeyArray, num_topics: int) -> MarkovParams:
        """Flat-Dirichlet random initial and transition rows."""
        k_init, k_trans = jax.random.split(key)
        V = self.num_symbols
        return MarkovParams(
            log_dirichlet(k_init, (num_topics, V)),
            log_dirichlet(k_trans, (num_topics, V, self.width)),
        )

    def _outcomes(
        self, tokens: Int[Array, "... L"], lengths: Int[Array, "..."]
    ) -> tuple[Int[Array, "... L"], Int[Array, "... L"]]:
        """Flat ids ``row * W + outcome`` of each transition (and the halt) with their mask.

        Position ``l < L - 1`` holds the transition ``x_l -> x_{l+1}`` (valid when
        ``l + 1 < length``); the last position holds ``x_{length-1} -> HALT`` (column
        ``W - 1``; valid when halting and ``length > 0``).
        """
        lengths = jnp.asarray(lengths)
        L, W = tokens.shape[-1], self.width
        moves = tokens[..., :-1] * W + tokens[..., 1:]
        last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[..., None], axis=-1)
        index = jnp.concatenate([moves, last * W + W - 1], axis=-1)
        position = jnp.arange(L)
        mask = jnp.where(
            position < L - 1,
            position + 1 < lengths[..., None],
            self.halting & (lengths[..., None] > 0),
        )
        return index, mask

    def log_prob(
        self, params: MarkovParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, ""]:
        """Log-probability of one sequence (its first ``length`` tokens) under one topic."""
        index, mask = self._outcomes(tokens, length)
        steps = jnp.sum(jnp.where(mask, params.log_trans.reshape(-1)[index], 0.0))
        return jnp.where(length > 0, params.log_init[tokens[0]], 0.0) + steps

    def log_prior(self, params: MarkovParams) -> Float[Array, ""]:
        r"""Log of the ``Dirichlet(1 + a)`` row priors the M-step's MAP maximises, up to a constant.

        :math:`a (\sum \log \pi + \sum \log A)` (``a = pseudo_count``; 0 when ``a = 0``).
        """
        if not self.pseudo_count:
            return jnp.zeros(())
        return self.pseudo_count * (jnp.sum(params.log_init) + jnp.sum(params.log_trans))

    def m_step(
        self,
        params: MarkovParams,
        tokens: Int[Array, "S L"],
        lengths: Int[Array, " S"],
        weights: Float[Array, "S K"],
    ) -> MarkovParams:
        r"""Closed form from weighted counts (``params`` unused).

        :math:`\pi_{kv} \propto a + \sum_s w_{sk} [x_{s1} = v]`,
        :math:`A_{k,uv} \propto a + \sum_s w_{sk} \#\{l: x_{sl} = u, x_{s,l+1} = v\}`
        (``v = HALT`` counting the last symbol).
        """
        V, W = self.num_symbols, self.width
        init = weighted_counts(tokens[:, :1], lengths[:, None] > 0, weights, V)
        index, mask = self._outcomes(tokens, lengths)
        trans = weighted_counts(index, mask, weights, V * W).reshape(-1, V, W)
        return MarkovParams(
            log_normalize(init, self.pseudo_count), log_normalize(trans, self.pseudo_count)
        )

    def next_symbol_log_probs(
        self, params: MarkovParams, tokens: Int[Array, " L"], length: Int[Array, ""]
    ) -> Float[Array, "L+1 V+1"]:
        """Row ``j``: the next-outcome log-distribution after the prefix ``x_1..x_j``.

        Row 0 is the initial distribution (HALT impossible: sequences are non-empty);
        row ``j >= 1`` is the transition row of ``x_j``. Without halting the HALT column
        is ``-inf``. Rows ``j > length`` follow the padding and are to be masked.
        """
        rows = params.log_trans[tokens]
        if not self.halting:
            rows = jnp.pad(rows, ((0, 0), (0, 1)), constant_values=-jnp.inf)
        first = jnp.append(params.log_init, -jnp.inf)
        return jnp.concatenate([first[None], rows], axis=0)
