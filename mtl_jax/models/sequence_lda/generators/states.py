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
filtered distribution :math:`p(z_l \mid x_{1:l})` (Rabiner's scaled forward variables);
each step emits its normaliser :math:`p(x_l \mid x_{1:l-1})` (which includes the
probability of not ending), and the sum of their logs is the log-likelihood: stable in
float32 for long sequences.

The M-step is one Baum-Welch step whose expected counts are gradients (Fisher's
identity): for any probability :math:`p` entering the likelihood multiplicatively,
:math:`\partial \log P(x) / \partial \log p = \mathbb{E}[\#\text{uses of } p \mid x]`;
in particular the gradient with respect to the log emission density of state ``s`` at
position ``l`` is the occupancy :math:`\gamma_{ls} = p(z_l = s \mid x)`
(:meth:`HiddenStates.state_counts`). The new :math:`\pi` and rows of :math:`A` are the
MAP under ``Dirichlet(1 + a)`` priors (``a = pseudo_count``), and the emission model
updates from the occupancies.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

from mtl_jax.models.sequence_lda.generators.common import TopicPriors, log_dirichlet, log_normalize


def _scaled_forward(log_init, log_trans, log_obs, length, halting: bool):
    """The scaled forward pass (see :func:`forward`) and what the backward pass reuses.

    Returns:
        ``(log_prob, filtered [L, S], norms [L], obs [L, S], end [S])``: the scaled
        emission densities ``obs`` and the END probabilities ``end`` (ones without halting).
    """
    num_states = log_init.shape[-1]
    move = jnp.exp(log_trans[:, :num_states])
    tiny = jnp.finfo(log_obs.dtype).tiny
    # Emission densities in probability space, scaled per position by their largest state
    # (added back to the log-normaliser): the scan below then needs no exp or log.
    shift = jnp.max(log_obs, axis=-1, keepdims=True)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    obs = jnp.exp(log_obs - shift)

    def step(filtered, inputs):
        position, ob = inputs
        # p(z_l | x_{1:l-1}) = sum_s p(z_{l-1} = s | x_{1:l-1}) A_{s z_l}, then Bayes' rule;
        # the normaliser (clipped at the smallest normal number for an impossible symbol)
        # is p(x_l | x_{1:l-1}) up to the shift.
        predicted = jnp.where(position == 0, jnp.exp(log_init), filtered @ move)
        joint = predicted * ob
        norm = jnp.maximum(jnp.sum(joint), tiny)
        valid = position < length
        filtered = jnp.where(valid, joint / norm, filtered)
        return filtered, (jnp.where(valid, norm, 1.0), filtered)

    positions = jnp.arange(log_obs.shape[0])
    last, (norms, filtered) = lax.scan(step, jnp.exp(log_init), (positions, obs))
    log_prob = jnp.sum(jnp.log(norms) + jnp.where(positions < length, shift[:, 0], 0.0))
    end = jnp.exp(log_trans[:, num_states]) if halting else jnp.ones_like(log_init)
    if halting:
        log_end = jnp.log(jnp.maximum(last @ end, tiny))
        log_prob = log_prob + jnp.where(length > 0, log_end, 0.0)
    return log_prob, filtered, norms, obs, end


def forward(
    log_init: Float[Array, " S"], log_trans: Float[Array, "S W"], log_obs: Float[Array, "L S"],
    length: Int[Array, ""], halting: bool,
) -> tuple[Float[Array, ""], Float[Array, "L S"]]:
    r"""The forward algorithm with a normalised carry, for one sequence.

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
    log_prob, filtered = _scaled_forward(log_init, log_trans, log_obs, length, halting)[:2]
    return log_prob, jnp.log(filtered)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def log_likelihood(
    log_init: Float[Array, " S"], log_trans: Float[Array, "S W"], log_obs: Float[Array, "L S"],
    length: Int[Array, ""], halting: bool,
) -> Float[Array, ""]:
    r""":math:`\log P(x_{1:\mathrm{length}})` (as :func:`forward`), with the backward algorithm as its gradient.

    The gradient is what reverse-mode differentiation of the forward scan gives (Fisher's
    identity, module docstring), computed by the scaled backward recursion
    :math:`\hat\beta_{L} = e / (f_L^T e)` (:math:`e` the END column, ones without halting),
    :math:`\hat\beta_l = A\,(o_{l+1} \odot \hat\beta_{l+1}) / c_{l+1}` with :math:`f_l` the
    filtered distributions, :math:`o_l` the (scaled) emission densities and :math:`c_l` the
    normalisers of the forward pass:

    * :math:`\partial / \partial \log p(x_l \mid z_l = s) = \gamma_{ls} = f_{ls}\hat\beta_{ls}`;
    * :math:`\partial / \partial \log \pi_s = \gamma_{1s}`;
    * :math:`\partial / \partial \log A_{ss'} = \sum_l f_{ls} A_{ss'} o_{l+1,s'}\hat\beta_{l+1,s'} / c_{l+1}`
      and :math:`\partial / \partial \log A_{s,\mathrm{END}} = f_{Ls} e_s / (f_L^T e)`.

    One backward scan of vector operations replaces the transposed forward scan (2x faster
    for the E-step); it accumulates the expected moves in its carry and emits the weighted
    occupancies directly, the only ``[L, S]`` array it writes (the E-step is bound by
    memory traffic on a CPU). First derivatives only (no forward-mode or second
    derivatives).
    """
    return _scaled_forward(log_init, log_trans, log_obs, length, halting)[0]


def _log_likelihood_fwd(log_init, log_trans, log_obs, length, halting):
    log_prob, filtered, norms, obs, end = _scaled_forward(log_init, log_trans, log_obs, length, halting)
    return log_prob, (log_trans, filtered, norms, obs, end, length)


def _log_likelihood_bwd(halting, residuals, cotangent):
    log_trans, filtered, norms, obs, end, length = residuals
    num_states = filtered.shape[-1]
    move = jnp.exp(log_trans[:, :num_states])
    tiny = jnp.finfo(filtered.dtype).tiny
    last_valid = jnp.maximum(length - 1, 0)
    f_last = jax.lax.dynamic_index_in_dim(filtered, last_valid, keepdims=False)
    end_mass = jnp.maximum(f_last @ end, tiny)
    beta_last = end / end_mass

    def step(carry, inputs):
        # message = o_{l+1} * beta_{l+1} / c_{l+1}, from the position after this one (zero
        # past the end); moves accumulates sum_{l' >= l} f_{l'} (x) message_{l'+1}
        message, moves = carry
        position, ob, norm, filtered_here = inputs
        beta = jnp.where(position == last_valid, beta_last, move @ message)
        beta = jnp.where(position < length, beta, 0.0)
        moves = moves + filtered_here[:, None] * message[None, :]
        message = jnp.where(position < length, ob * beta / norm, message)
        return (message, moves), cotangent * filtered_here * beta

    positions = jnp.arange(filtered.shape[0])
    start = (jnp.zeros_like(end), jnp.zeros_like(move))
    (_, moves), weighted_occupancy = lax.scan(step, start, (positions, obs, norms, filtered), reverse=True)
    grad_trans = move * moves
    if halting:
        grad_end = jnp.where(length > 0, f_last * end / end_mass, 0.0)
        grad_trans = jnp.concatenate([grad_trans, grad_end[:, None]], axis=1)
    # occupancies are zero at padding (beta = 0 there), so position 0 of an empty sequence too
    return weighted_occupancy[0], cotangent * grad_trans, weighted_occupancy, None


log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)


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


class HiddenStates(TopicPriors):
    r"""The state process of an HMM topic; a subclass (a frozen dataclass) adds its emissions.

    The subclass declares the fields ``num_states`` (``S``), ``halting`` and
    ``pseudo_count`` (``a``), a parameter NamedTuple ``params_type`` whose first two fields
    are ``log_init [K, S]`` and ``log_trans [K, S, W]`` and whose others are the
    emission parameters, and the emission model:

    ``_log_obs(params_one_topic, x [L]) -> [L, S]``
        :math:`\log p(x_l \mid z_l = s)`.
    ``_init_emissions(key, num_topics) -> tuple``
        Random emission parameters.
    ``_emission_parameters`` (property)
        Free emission parameters of one topic.
    ``_emission_log_prior(params) -> scalar``
        Log of the emission prior divided by ``a``, up to a constant.
    ``_emission_m_step(x [N, L], occupancy [K, N, L, S]) -> tuple``
        The emission parameters' MAP from the weighted occupancies.

    This class supplies the generator interface (``init``, ``log_prob``, ``log_prior``,
    ``m_step``, ``num_parameters``) around them.
    """

    num_states: int
    halting: bool
    pseudo_count: float
    params_type: ClassVar[Any]

    @property
    def width(self) -> int:
        """``W``, outcomes per transition row: ``S + 1`` with halting, else ``S``."""
        return self.num_states + int(self.halting)

    @property
    def num_parameters(self) -> int:
        """Free parameters of one topic: ``(S - 1) + S (W - 1)`` plus the emissions'."""
        S = self.num_states
        return S - 1 + S * (self.width - 1) + self._emission_parameters

    def init(self, key: PRNGKeyArray, num_topics: int):
        """Flat-Dirichlet random initial and transition rows; emissions by ``_init_emissions``."""
        keys = jax.random.split(key, 3)
        K, S = num_topics, self.num_states
        return self.params_type(
            log_dirichlet(keys[0], (K, S)),
            log_dirichlet(keys[1], (K, S, self.width)),
            *self._init_emissions(keys[2], K),
        )

    def log_prob(self, params, x: Shaped[Array, " L"], length: Int[Array, ""]) -> Float[Array, ""]:
        """Log-probability (density) of one sequence (its first ``length`` entries), one topic."""
        log_obs = self._log_obs(params, x)
        return log_likelihood(params.log_init, params.log_trans, log_obs, length, self.halting)

    def log_prior(self, params) -> Float[Array, ""]:
        r"""Log of the prior the M-step's MAP maximises, up to a constant.

        :math:`a (\sum \log \pi + \sum \log A + e)`, ``e`` the emission part
        (``_emission_log_prior``); 0 when ``a = 0``.
        """
        if not self.pseudo_count:
            return jnp.zeros(())
        states = jnp.sum(params.log_init) + jnp.sum(params.log_trans)
        return self.pseudo_count * (states + self._emission_log_prior(params))

    def state_counts(
        self, params, x: Shaped[Array, "N L"], lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ) -> tuple[Float[Array, "K S"], Float[Array, "K S W"], Float[Array, "K N L S"]]:
        r"""Weighted expected initial states, moves/ENDs and state occupancies, per topic.

        The gradients of :math:`\sum_n w_{nk} \log P_k(x_n)` (:func:`forward`) with respect
        to :math:`\log \pi_k`, :math:`\log A_k` and the log emission densities (Fisher's
        identity, module docstring).

        Returns:
            Per topic: :math:`\sum_n w_{nk} p(z_1 = s \mid x_n)` ``[K, S]``, the expected
            moves and ENDs :math:`\sum_n w_{nk} \mathbb{E}[\#(s \to s') \mid x_n]`
            ``[K, S, W]``, and the occupancies :math:`w_{nk} \gamma_{nls}` ``[K, N, L, S]``
            (0 at padding).
        """
        log_obs = jax.vmap(jax.vmap(self._log_obs, (None, 0)), (0, None))(params, x)

        def objective(log_init, log_trans, log_obs_one, weights_one):
            log_probs = jax.vmap(log_likelihood, (None, None, 0, 0, None))(
                log_init, log_trans, log_obs_one, lengths, self.halting
            )
            return jnp.sum(weights_one * log_probs)

        grad = jax.vmap(jax.grad(objective, argnums=(0, 1, 2)))
        return grad(params.log_init, params.log_trans, log_obs, weights.T)

    def m_step(
        self, params, x: Shaped[Array, "N L"], lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ):
        r"""One Baum-Welch step.

        :math:`\pi_k \propto a + \mathbb{E}[\text{initial states}]`,
        :math:`A_{k,s\cdot} \propto a + \mathbb{E}[\text{moves and END from } s]`, and the
        emissions' MAP from the occupancies (``_emission_m_step``).
        """
        init, trans, occupancy = self.state_counts(params, x, lengths, weights)
        a = self.pseudo_count
        return self.params_type(
            log_normalize(init, a), log_normalize(trans, a), *self._emission_m_step(x, occupancy)
        )
