r"""Helpers shared by the generators: Dirichlet starts, normalisation, weighted counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


def log_dirichlet(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, "..."]:
    """Log of independent flat ``Dirichlet(1, ..., 1)`` draws along the last axis of ``shape``."""
    return jnp.log(jax.random.dirichlet(key, jnp.ones(shape[-1]), shape[:-1]))


def log_normalize(counts: Float[Array, "... n"], pseudo_count: float) -> Float[Array, "... n"]:
    r"""The MAP simplex of expected counts under a ``Dirichlet(1 + pseudo_count)`` prior.

    :math:`\log p_i = \log(c_i + a) - \log \sum_j (c_j + a)`, ``a = pseudo_count``. Counts
    are clipped at 0 first (gradient-based counts may carry roundoff of order ``-eps``).
    """
    total = jnp.maximum(counts, 0.0) + pseudo_count
    return jnp.log(total) - jnp.log(jnp.sum(total, axis=-1, keepdims=True))


def weighted_counts(
    index: Int[Array, "S L"],
    mask: Bool[Array, "S L"],
    weights: Float[Array, "S K"],
    num_outcomes: int,
) -> Float[Array, "K n"]:
    r"""Weighted outcome counts per topic: :math:`c_{ki} = \sum_{s,l} w_{sk} [m_{sl}] [x_{sl} = i]`.

    Args:
        index: Outcome id at each position, in ``[0, num_outcomes)``.
        mask: Which positions count.
        weights: Weight of each sequence for each topic.
        num_outcomes: ``n``, the number of outcomes.

    Returns:
        Counts ``[K, n]`` (one ``segment_sum`` over all positions; memory ``O(S L K)``).
    """
    data = jnp.where(mask[..., None], weights[:, None, :], 0.0).reshape(-1, weights.shape[-1])
    return jax.ops.segment_sum(data, index.reshape(-1), num_segments=num_outcomes).T
