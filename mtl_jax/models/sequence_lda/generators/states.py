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

The forward pass (:func:`log_likelihoods`) is a ``lax.scan`` over positions whose carry
is the normalised filtered distribution :math:`p(z_l \mid x_{1:l})` of a whole batch of
sequences (Rabiner's scaled forward variables); each step's normaliser
:math:`p(x_l \mid x_{1:l-1})` (which includes the probability of not ending) adds its log
to the log-likelihood: stable in float32 for long sequences.

The M-step is one Baum-Welch step whose expected counts are gradients (Fisher's
identity): for any probability :math:`p` entering the likelihood multiplicatively,
:math:`\partial \log P(x) / \partial \log p = \mathbb{E}[\#\text{uses of } p \mid x]`;
in particular the gradient with respect to the log emission density of state ``s`` at
position ``l`` is the occupancy :math:`\gamma_{ls} = p(z_l = s \mid x)`
(:meth:`HiddenStates.weighted_gradients`). The new :math:`\pi` and rows of :math:`A` are
the MAP under ``Dirichlet(1 + a)`` priors (``a = pseudo_count``), and the emission model
updates from the gradients with respect to its parameters.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

from mtl_jax.models.sequence_lda.generators.common import Generator, log_dirichlet, log_normalize


def _forward(model, log_init, log_trans, table, xs, lengths):
    r"""The scaled forward pass over a batch (see :func:`log_likelihoods`), time-major.

    Args:
        model: the :class:`HiddenStates` generator (its ``_scaled_obs`` and ``halting``).
        table: ``model._obs_table(emissions)``.
        xs: observations ``[L, N]``.

    Returns:
        ``(log_probs [N], filtered [L, S, N], inverse_norms [L, N], end_mass [N])``:
        the log-likelihoods, the filtered distributions, the inverse normalisers
        (1 at padding) and :math:`f_{\mathrm{length}}^T e` (1 without halting).
    """
    num_states = log_init.shape[-1]
    init = jnp.exp(log_init)[:, None]
    move_t = jnp.exp(log_trans[:, :num_states]).T
    tiny = jnp.finfo(init.dtype).tiny

    def step(filtered, inputs):
        position, x = inputs
        # p(z_l | x_{1:l-1}) = sum_s p(z_{l-1} = s | x_{1:l-1}) A_{s z_l}, then Bayes' rule;
        # the normaliser (clipped at the smallest normal number for an impossible
        # observation) is p(x_l | x_{1:l-1}) up to the scale of the emission densities.
        obs, log_scale = model._scaled_obs(table, x)
        joint = jnp.where(position == 0, init, move_t @ filtered) * obs
        inverse = 1.0 / jnp.maximum(jnp.sum(joint, axis=0), tiny)
        valid = position < lengths
        filtered = jnp.where(valid, joint * inverse, filtered)
        log_norm = jnp.where(valid, log_scale - jnp.log(inverse), 0.0)
        return filtered, (filtered, jnp.where(valid, inverse, 1.0), log_norm)

    start = jnp.broadcast_to(init, (num_states, xs.shape[1]))
    last, (filtered, inverse, log_norms) = lax.scan(step, start, (jnp.arange(xs.shape[0]), xs))
    log_probs = jnp.sum(log_norms, axis=0)
    end_mass = jnp.ones_like(log_probs)
    if model.halting:
        end_mass = jnp.maximum(jnp.exp(log_trans[:, num_states]) @ last, tiny)
        log_probs = log_probs + jnp.where(lengths > 0, jnp.log(end_mass), 0.0)
    return log_probs, filtered, inverse, end_mass


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def log_likelihoods(
    model, log_init: Float[Array, " S"], log_trans: Float[Array, "S W"], emissions: tuple,
    x: Shaped[Array, "N L"], lengths: Int[Array, " N"],
) -> Float[Array, " N"]:
    r""":math:`\log P(x_{n,1:\mathrm{length}_n})` of a batch under one topic, with the backward algorithm as its gradient.

    The forward algorithm (Rabiner's scaled forward variables), one ``lax.scan`` over
    positions whose carry is the filtered distributions :math:`f_l = p(z_l \mid x_{1:l})`
    of the whole batch, states by sequences ``[S, N]`` (time-major: a step is a few vector
    operations over ``N``); each step's normaliser :math:`c_l = p(x_l \mid x_{1:l-1})`
    (which includes the probability of not ending) contributes :math:`\log c_l`. The
    emission densities come scaled, :math:`o_l = p(x_l \mid z_l) / m_l` with
    :math:`\log m_l` added back (``model._scaled_obs``): a table lookup for categorical
    emissions, so the scan needs no ``exp``. Stable in float32 for long sequences.
    Padding (``l >= length``) leaves the carry unchanged; ``length == 0`` scores 0.

    The gradient is what reverse-mode differentiation of the forward scan would give
    (Fisher's identity, module docstring), computed by the scaled backward recursion
    :math:`\hat\beta_{L} = e / (f_L^T e)` (:math:`e` the END column, ones without
    halting), :math:`\hat\beta_l = A\,(o_{l+1} \odot \hat\beta_{l+1}) / c_{l+1}`:

    * the occupancies :math:`\gamma_{ls} = f_{ls}\hat\beta_{ls}`, pulled back through the
      emission log-densities (``model._log_obs``): for categorical emissions the expected
      emission counts;
    * :math:`\partial / \partial \log \pi_s = \gamma_{1s}`;
    * :math:`\partial / \partial \log A_{ss'} = \sum_l f_{ls} A_{ss'} o_{l+1,s'}\hat\beta_{l+1,s'} / c_{l+1}`
      and :math:`\partial / \partial \log A_{s,\mathrm{END}} = f_{Ls} e_s / (f_L^T e)`.

    The backward scan accumulates the expected moves in its carry. First derivatives
    only (no forward-mode or second derivatives).

    Args:
        model: the :class:`HiddenStates` generator; static.
        log_init: :math:`\log \pi`.
        log_trans: :math:`\log A` (last column END when ``model.halting``).
        emissions: the emission fields of one topic's parameters.
        x: observations, padded.
        lengths: valid positions per sequence.
    """
    return _forward(model, log_init, log_trans, model._obs_table(emissions), x.T, lengths)[0]


def _log_likelihoods_fwd(model, log_init, log_trans, emissions, x, lengths):
    xs = x.T
    table = model._obs_table(emissions)
    log_probs, filtered, inverse, end_mass = _forward(model, log_init, log_trans, table, xs, lengths)
    return log_probs, (log_trans, emissions, table, xs, lengths, filtered, inverse, end_mass)


def _log_likelihoods_bwd(model, residuals, cotangent):
    log_trans, emissions, table, xs, lengths, filtered, inverse, end_mass = residuals
    num_states = filtered.shape[1]
    move = jnp.exp(log_trans[:, :num_states])
    end = jnp.exp(log_trans[:, num_states]) if model.halting else jnp.ones(num_states, move.dtype)
    last_valid = jnp.maximum(lengths - 1, 0)
    beta_last = end[:, None] * (cotangent / end_mass)

    def step(carry, inputs):
        # message = o_{l+1} * beta_{l+1} / c_{l+1} from the position after this one (zero
        # past the end, where beta is 0); moves accumulates sum_{l' >= l} f_{l'} message_{l'}^T
        message, moves = carry
        position, x, inverse_here, filtered_here = inputs
        beta = jnp.where(position == last_valid, beta_last, move @ message)
        beta = jnp.where(position < lengths, beta, 0.0)
        moves = moves + filtered_here @ message.T
        message = model._scaled_obs(table, x)[0] * inverse_here * beta
        return (message, moves), filtered_here * beta

    positions = jnp.arange(xs.shape[0])
    start = (jnp.zeros_like(filtered[0]), jnp.zeros_like(move))
    (_, moves), occupancy = lax.scan(step, start, (positions, xs, inverse, filtered), reverse=True)
    grad_trans = move * moves
    if model.halting:
        f_last = jnp.take_along_axis(filtered, last_valid[None, None, :], axis=0)[0]
        grad_end = f_last @ jnp.where(lengths > 0, cotangent / end_mass, 0.0) * end
        grad_trans = jnp.concatenate([grad_trans, grad_end[:, None]], axis=1)
    def log_obs(emissions):
        return jax.vmap(model._log_obs, (None, 0))(emissions, xs)

    (grad_emissions,) = jax.vjp(log_obs, emissions)[1](occupancy)
    # occupancies are zero at padding (beta = 0 there), so position 0 of an empty sequence too
    return jnp.sum(occupancy[0], axis=1), grad_trans, grad_emissions, None, None


log_likelihoods.defvjp(_log_likelihoods_fwd, _log_likelihoods_bwd)


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


class HiddenStates(Generator):
    r"""The state process of an HMM topic; a subclass (a frozen dataclass) adds its emissions.

    The subclass declares the fields ``num_states`` (``S``), ``halting`` and
    ``pseudo_count`` (``a``), a parameter NamedTuple ``params_type`` whose first two fields
    are ``log_init [K, S]`` and ``log_trans [K, S, W]`` and whose others, the
    *emissions*, parametrise the emission model:

    ``_emission_inputs(params_one_topic) -> tuple`` (optional)
        The arrays the emission log-densities are computed from (default: the emission
        fields), chosen so that the gradients with respect to them are the statistics
        the emission M-step needs.
    ``_log_obs(emission_inputs, x [N]) -> [S, N]``
        :math:`\log p(x_n \mid z = s)` at one position of a batch.
    ``_obs_table(emission_inputs)``, ``_scaled_obs(table, x [N]) -> ([S, N], [N])``
        (optional) The densities scaled by a per-observation factor and that factor's
        log; the default exponentiates ``_log_obs`` shifted by its largest state.
    ``_init_emissions(key, num_topics) -> tuple``
        Random emission parameters.
    ``_emission_parameters`` (property)
        Free emission parameters of one topic.
    ``_emission_log_prior(params) -> scalar``
        Log of the emission prior divided by ``a``, up to a constant.
    ``_emission_m_step(params, gradients) -> tuple``
        The emissions' MAP from the gradients of the weighted log-likelihood with respect
        to the emission inputs (topic axis ``[K, ...]`` throughout).

    This class supplies the generator interface (``init``, ``log_prob``, ``log_probs``,
    ``log_prior``, ``m_step``, ``num_parameters``) around them.
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

    def _emission_inputs(self, params) -> tuple:
        """The emission fields of one topic's parameters."""
        return tuple(params[2:])

    def _obs_table(self, emissions: tuple):
        """What :meth:`_scaled_obs` reads, computed once per pass (default: the emissions)."""
        return emissions

    def _scaled_obs(self, table, x: Shaped[Array, " N"]) -> tuple[Float[Array, "S N"], Float[Array, " N"]]:
        """Densities divided by their largest state, and that state's log-density."""
        log_obs = self._log_obs(table, x)
        shift = jnp.max(log_obs, axis=0)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        return jnp.exp(log_obs - shift), shift

    def log_probs(self, params, x: Shaped[Array, "N L"], lengths: Int[Array, " N"]) -> Float[Array, " N"]:
        """Log-probabilities (densities) of a batch of sequences under one topic (:func:`log_likelihoods`)."""
        return log_likelihoods(self, params[0], params[1], self._emission_inputs(params), x, lengths)

    def log_prob(self, params, x: Shaped[Array, " L"], length: Int[Array, ""]) -> Float[Array, ""]:
        """Log-probability (density) of one sequence (its first ``length`` entries), one topic."""
        return self.log_probs(params, x[None], jnp.reshape(length, (1,)))[0]

    def filtered_log_probs(self, params, x: Shaped[Array, " L"], length: Int[Array, ""]) -> Float[Array, "L S"]:
        r""":math:`\log p(z_l \mid x_{1:l})` of one sequence, one topic (rows ``l >= length`` repeat the last valid one)."""
        table = self._obs_table(self._emission_inputs(params))
        filtered = _forward(self, params[0], params[1], table, x[:, None], jnp.reshape(length, (1,)))[1]
        return jnp.log(filtered[:, :, 0])

    def log_prior(self, params) -> Float[Array, ""]:
        r"""Log of the prior the M-step's MAP maximises, up to a constant.

        :math:`a (\sum \log \pi + \sum \log A + e)`, ``e`` the emission part
        (``_emission_log_prior``); 0 when ``a = 0``.
        """
        if not self.pseudo_count:
            return jnp.zeros(())
        states = jnp.sum(params.log_init) + jnp.sum(params.log_trans)
        return self.pseudo_count * (states + self._emission_log_prior(params))

    def weighted_gradients(
        self, params, x: Shaped[Array, "N L"], lengths: Int[Array, " N"], weights: Float[Array, "N K"],
    ) -> tuple:
        r"""The gradients of :math:`\sum_n w_{nk} \log P_k(x_n)`, per topic.

        With respect to :math:`\log \pi_k`, :math:`\log A_k` and the emission inputs
        (``_emission_inputs``). By Fisher's identity (module docstring) the first two are
        the weighted expected initial states :math:`\sum_n w_{nk} p(z_1 = s \mid x_n)`
        ``[K, S]`` and moves and ENDs :math:`\sum_n w_{nk} \mathbb{E}[\#(s \to s') \mid x_n]`
        ``[K, S, W]``; the others are the occupancies pulled back through the emission
        log-densities (for categorical emissions the expected emission counts ``[K, S, V]``).

        Returns:
            ``(init, trans, *emission_gradients)``.
        """
        def objective(log_init, log_trans, emissions, weights_one):
            log_probs = log_likelihoods(self, log_init, log_trans, emissions, x, lengths)
            return jnp.sum(weights_one * log_probs)

        emissions = jax.vmap(self._emission_inputs)(params)
        init, trans, emission_gradients = jax.vmap(jax.grad(objective, argnums=(0, 1, 2)))(
            params.log_init, params.log_trans, emissions, weights.T
        )
        return init, trans, *emission_gradients

    def m_step(
        self, params, x: Shaped[Array, "N L"], lengths: Int[Array, " N"],
        weights: Float[Array, "N K"],
    ):
        r"""One Baum-Welch step.

        :math:`\pi_k \propto a + \mathbb{E}[\text{initial states}]`,
        :math:`A_{k,s\cdot} \propto a + \mathbb{E}[\text{moves and END from } s]`, and the
        emissions' MAP (``_emission_m_step``) from their gradients.
        """
        init, trans, *emission_gradients = self.weighted_gradients(params, x, lengths, weights)
        a = self.pseudo_count
        return self.params_type(
            log_normalize(init, a), log_normalize(trans, a), *self._emission_m_step(params, tuple(emission_gradients))
        )
