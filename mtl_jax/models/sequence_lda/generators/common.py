r"""Helpers shared by the generators: Dirichlet starts, normalisation, weighted counts, NumPyro priors."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

if TYPE_CHECKING:  # NumPyro is imported where a program runs
    import numpyro.distributions as dist


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


def to_sites(params) -> dict[str, Array]:
    """A generator's fields as NumPyro site values: named without ``log_``, ``log_`` fields exponentiated.

    ``log_trans -> trans`` (probabilities), ``log_var -> var`` (variances), ``mean`` as is
    (any leading axes kept).
    """
    return {field.removeprefix("log_"): jnp.exp(value) if field.startswith("log_") else jnp.asarray(value)
            for field, value in params._asdict().items()}


def from_sites(params_type: type, samples: dict[str, Array]):
    """The inverse of :func:`to_sites`: ``params_type`` from the site values in ``samples``."""
    return params_type(**{
        field: jnp.log(samples[field.removeprefix("log_")]) if field.startswith("log_")
        else jnp.asarray(samples[field])
        for field in params_type._fields
    })


class Generator:
    r"""What every generator shares: batch scoring and the topics as NumPyro sample sites.

    :meth:`log_probs` scores a batch under one topic by ``vmap`` of the generator's
    ``log_prob`` (a generator with a faster batched pass overrides it).

    The generator (a frozen dataclass with a ``pseudo_count`` field ``a``) names its
    parameter NamedTuple in ``params_type``. Each field is one site, named and valued as in
    :func:`to_sites`. By default every field is a set of probability rows with the
    ``Dirichlet(1 + a)`` prior whose MAP the M-step finds; a generator with other fields
    overrides :meth:`field_prior` for them.
    """

    pseudo_count: float
    params_type: ClassVar[type]

    def log_probs(self, params, x: Array, lengths: Array) -> Array:
        """Log-probabilities ``[N]`` of sequences ``x [N, L]`` (first ``lengths [N]`` entries) under one topic."""
        return jax.vmap(self.log_prob, in_axes=(None, 0, 0))(params, x, lengths)

    def field_prior(self, field: str, shape: tuple[int, ...], dtype) -> dist.Distribution:
        """The prior of one field's site value of shape ``shape`` (``[K, ..., n]``): ``Dirichlet(1 + a)`` rows."""
        import numpyro.distributions as dist

        return dist.Dirichlet(jnp.full(shape, 1.0 + self.pseudo_count, dtype)).to_event(len(shape) - 1)

    def sample_topics(self, num_topics: int, dtype):
        """Sample every field's site (NumPyro statements); returns the topics ``params_type``."""
        import numpyro

        shapes = jax.eval_shape(lambda key: self.init(key, num_topics), jax.random.key(0))
        samples = {}
        for field in self.params_type._fields:
            site = field.removeprefix("log_")
            samples[site] = numpyro.sample(site, self.field_prior(field, getattr(shapes, field).shape, dtype))
        return from_sites(self.params_type, samples)
