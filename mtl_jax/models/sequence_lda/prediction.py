r"""Next-symbol prediction of Sequential LDA: the task's mixture filtered on each prefix.

For a row of task :math:`t` with symbols :math:`x_1 \dots x_L` and every prefix length
:math:`j = 0 \dots L`, the posterior over topics given the prefix is

.. math:: w_k(x_{1:j}) \propto \bar\theta_{tk} \, P_k(x_{1:j} \text{ as a prefix}),
          \qquad P_k(x_{1:j}) = \prod_{i=0}^{j-1} P_k(x_{i+1} \mid x_{1:i}),

(:math:`\bar\theta_t = E_q[\theta_t]`, the prior mean for unseen tasks), and the
predictive distribution of the next outcome (``V`` symbols, then HALT) is the mixture

.. math:: P(o \mid x_{1:j}) = \sum_k w_k(x_{1:j}) \, P_k(o \mid x_{1:j}).

Both factors come from the generators' ``next_symbol_log_probs`` tables (the prefix
probability is the cumulative sum of the observed symbols' entries), so any discrete
generator (categorical, Markov, HMM) is covered without generator-specific code. All in
log space, ``vmap`` over rows and topics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int


@functools.partial(jax.jit, static_argnums=0)
def next_outcome_log_probs(
    generator,
    topics,
    log_weights: Float[Array, "S K"],
    tokens: Int[Array, "S L"],
    lengths: Int[Array, " S"],
) -> Float[Array, "S L+1 V+1"]:
    r"""Entry ``[s, j]``: :math:`\log P(\cdot \mid x_{s,1:j})`, the filtered mixture's next outcome.

    Args:
        generator: a discrete generator (has ``next_symbol_log_probs``); static.
        topics: its parameters with a leading topic axis ``[K, ...]``.
        log_weights: :math:`\log \bar\theta_{t_s k}` per row (normalised over ``k``).
        tokens: symbol ids; positions ``>= lengths[s]`` are padding.
        lengths: sequence lengths.

    Returns:
        ``[S, L + 1, V + 1]`` log-probabilities (each row ``j <= lengths[s]`` sums to 1 in
        probability; rows ``j > lengths[s]`` are padding, and so are rows of length 0).
        A prefix impossible under every topic gives NaN (pseudo-counts > 0 prevent it).
    """

    def one_row(log_weight, row_tokens, length):
        tables = jax.vmap(generator.next_symbol_log_probs, in_axes=(0, None, None))(
            topics, row_tokens, length
        )  # [K, L + 1, V + 1]
        observed = jnp.take_along_axis(tables[:, :-1, :], row_tokens[None, :, None], axis=-1)[..., 0]
        observed = jnp.where(jnp.arange(row_tokens.shape[0]) < length, observed, 0.0)  # [K, L]
        log_prefix = jnp.concatenate([jnp.zeros_like(observed[:, :1]), jnp.cumsum(observed, axis=1)], axis=1)
        log_joint = log_weight[:, None] + log_prefix  # [K, L + 1]
        log_posterior = log_joint - logsumexp(log_joint, axis=0)
        return logsumexp(log_posterior[..., None] + tables, axis=0)

    return jax.vmap(one_row)(log_weights, tokens, lengths)


def next_outcome_hits(
    log_probs: Float[Array, "S L+1 V+1"],
    tokens: Int[Array, "S L"],
    lengths: Int[Array, " S"],
    halting: bool,
) -> tuple[Int[Array, " S"], Int[Array, " S"]]:
    r"""Per row: how many next outcomes the argmax of ``log_probs`` gets right, out of how many.

    The true outcome after prefix ``j`` is :math:`x_{j+1}` for ``j < length`` and HALT
    (id ``V``) at ``j = length``. The prefixes counted are ``j = 0 .. length`` with
    ``halting`` (``length + 1`` of them) and ``j = 0 .. length - 1`` without (a model
    without HALT cannot predict the end). Padding rows (length 0) count nothing. Ties go
    to the lowest outcome id.

    Returns:
        ``(correct [S], total [S])`` int32.
    """
    V = log_probs.shape[-1] - 1
    position = jnp.arange(tokens.shape[-1] + 1)
    lengths = lengths[:, None]
    target = jnp.where(position < lengths, jnp.pad(tokens, ((0, 0), (0, 1))), V)
    counted = (position < lengths + int(halting)) & (lengths > 0)
    hits = counted & (jnp.argmax(log_probs, axis=-1) == target)
    return jnp.sum(hits, axis=-1, dtype=jnp.int32), jnp.sum(counted, axis=-1, dtype=jnp.int32)
