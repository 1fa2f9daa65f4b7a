r"""The hidden-state process shared by the HMM topics, whatever their emissions.

With ``S`` hidden states, initial distribution :math:`\pi` and transitions :math:`A`:
the first state is :math:`z_1 \sim \pi`, each state emits :math:`x_l \sim p(\cdot \mid z_l)`
(the emission model: categorical in :mod:`.hmm`, Gaussian in :mod:`.gaussian_hmm`), and
then either ends the sequence (probability :math:`A_{z_l, \mathrm{END}}`) or moves to
:math:`z_{l+1}` (probability :math:`A_{z_l, z_{l+1}}`), each row of :math:`A` normalised
jointly over the ``S`` moves and END (``W = S + 1`` outcomes per row). So

.. math:: P(x_{1:L}) = \sum_{z} \pi_{z_1} p(x_1 \mid z_1)
          \prod_{l=2}^{L} A_{z_{l-1} z_l} p(x_l \mid z_l) \; A_{z_L, \mathrm{END}},

a distribution over finite non-empty sequences. With ``halting=False`` rows of :math:`A`
have ``W = S`` outcomes and there is no END factor (the prefix probability).

The forward pass (:func:`forward`) is a ``lax.scan`` whose carry is the normalised
filtered log-distribution :math:`\log p(z_l \mid x_{1:l})`; each step emits its
log-normaliser :math:`\log p(x_l \mid x_{1:l-1})` (which includes the probability of not
ending), and their sum is the log-likelihood: stable in float32 for long sequences.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int


def forward(
    log_init: Float[Array, " S"], log_trans: Float[Array, "S W"], log_obs: Float[Array, "L S"],
    length: Int[Array, ""], halting: bool,
) -> tuple[Float[Array, ""], Float[Array, "L S"]]:
    r"""The forward algorithm in normalised log space for one sequence.

    Args:
        log_init: :math:`\log \pi`.
        log_trans: :math:`\log A` (last column END when ``halting``).
        log_obs: :math:`\log p(x_l \mid z_l = s)` at each position (any emission model).
        length: Number of valid positions; later steps are identity updates.
        halting: Whether to include the END factor of the last state.

    Returns:
        ``(log P(x_{1:length}), log_filtered)``: the log-likelihood (0 when
        ``length == 0``) and :math:`\log p(z_l \mid x_{1:l})` per position (rows at
        ``l >= length`` repeat the last valid row).
    """
    num_states = log_init.shape[-1]
    log_move = log_trans[:, :num_states]

    def step(log_filtered, inputs):
        position, log_ob = inputs
        log_predicted = jnp.where(
            position == 0, log_init, logsumexp(log_filtered[:, None] + log_move, axis=0)
        )
        log_joint = log_predicted + log_ob
        log_norm = logsumexp(log_joint)
        valid = position < length
        log_filtered = jnp.where(valid, log_joint - log_norm, log_filtered)
        return log_filtered, (jnp.where(valid, log_norm, 0.0), log_filtered)

    positions = jnp.arange(log_obs.shape[0])
    last, (log_norms, log_filtered) = lax.scan(step, log_init, (positions, log_obs))
    log_prob = jnp.sum(log_norms)
    if halting:
        log_end = logsumexp(last + log_trans[:, num_states])
        log_prob = log_prob + jnp.where(length > 0, log_end, 0.0)
    return log_prob, log_filtered


def next_outcome_log_probs(
    log_init: Float[Array, " S"], log_trans: Float[Array, "S W"], log_filtered: Float[Array, "L S"],
    halting: bool,
) -> tuple[Float[Array, "L+1 S"], Float[Array, " L+1"]]:
    r"""Predicted next-state log-masses and the END log-probability after each prefix.

    Row 0 (empty prefix) is :math:`\log \pi` with END impossible; row ``j >= 1`` is
    :math:`\log \sum_s p(z_j = s \mid x_{1:j}) A_{s,\cdot}` (total mass ``1 - P(END)``).
    Without halting END is ``-inf``.
    """
    num_states = log_init.shape[-1]
    moves = logsumexp(log_filtered[:, :, None] + log_trans[None, :, :num_states], axis=1)
    if halting:
        end = logsumexp(log_filtered + log_trans[:, num_states], axis=1)
    else:
        end = jnp.full(log_filtered.shape[0], -jnp.inf, log_filtered.dtype)
    return (
        jnp.concatenate([log_init[None], moves], axis=0),
        jnp.concatenate([jnp.full(1, -jnp.inf, end.dtype), end]),
    )
