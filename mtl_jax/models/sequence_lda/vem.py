r"""Variational EM of Sequential LDA (Blei, Ng & Jordan 2003 with sequence-generator topics).

Notation: ``S`` sequence rows (row ``n`` of task :math:`t_n` with multiplicity
:math:`c_n`), ``K`` topics, ``T`` training tasks. Topic :math:`k` is a generator with
:math:`P_k(x)`; task :math:`t` draws :math:`\theta_t \sim \mathrm{Dir}(\alpha)` and each
of its sequences a topic :math:`z_n \sim \theta_t` and then :math:`x_n \sim P_{z_n}`.
The variational family is :math:`q(\theta_t) = \mathrm{Dir}(\gamma_t)`,
:math:`q(z_n) = \mathrm{Cat}(\phi_n)`, with
:math:`\Psi_{tk} = \psi(\gamma_{tk}) - \psi(\sum_j \gamma_{tj}) = E_q[\log \theta_{tk}]`.

E-step (coordinate ascent, the paper's eqs. 10-11), all tasks at once:

.. math:: \log \phi_{nk} = \log P_k(x_n) + \Psi_{t_n k} - \log \sum_j (\cdot), \qquad
          \gamma_{tk} = \alpha_k + \sum_{n: t_n = t} c_n \phi_{nk}.

ELBO (eqs. 2-5; exact, every term in closed form):

.. math:: \mathcal L = \sum_t \Bigl[\log\Gamma(\textstyle\sum\alpha) - \sum_k \log\Gamma(\alpha_k)
          + \sum_k (\alpha_k - 1)\Psi_{tk}\Bigr]
          + \sum_n c_n \sum_k \phi_{nk}\bigl[\Psi_{t_n k} + \log P_k(x_n) - \log \phi_{nk}\bigr]
          - \sum_t \Bigl[\log\Gamma(\textstyle\sum_k\gamma_{tk}) - \sum_k \log\Gamma(\gamma_{tk})
          + \sum_k (\gamma_{tk} - 1)\Psi_{tk}\Bigr].

M-step: the topics maximise :math:`\sum_n \sum_k c_n \phi_{nk} \log P_k(x_n)` plus their
Dirichlet (MAP) log prior through the generator's ``m_step`` (eq. 12 with generators);
:math:`\alpha` maximises the first line by Newton's method (eq. 13, appendix A.4.2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln, polygamma
from jaxtyping import Array, Float, Int

#: Newton iterations of the alpha update per EM step, and step halvings tried per iteration.
NEWTON_ITERATIONS = 20
NEWTON_HALVINGS = 30


class ElboTerms(NamedTuple):
    r"""The ELBO's terms (each summed over tasks or rows).

    Attributes:
        prior: :math:`\sum_t E_q[\log p(\theta_t \mid \alpha)]`.
        assignments: :math:`\sum_n c_n E_q[\log p(z_n \mid \theta_{t_n})]`.
        sequences: :math:`\sum_n c_n \sum_k \phi_{nk} \log P_k(x_n)`.
        entropy: :math:`-E_q[\log q(\theta)] - \sum_n c_n \sum_k \phi_{nk} \log \phi_{nk}`.
    """

    prior: Float[Array, ""]
    assignments: Float[Array, ""]
    sequences: Float[Array, ""]
    entropy: Float[Array, ""]

    @property
    def total(self) -> Float[Array, ""]:
        """The ELBO, the sum of the terms."""
        return self.prior + self.assignments + self.sequences + self.entropy


def expected_log_theta(gamma: Float[Array, "T K"]) -> Float[Array, "T K"]:
    r""":math:`\Psi_{tk} = E_q[\log\theta_{tk}] = \psi(\gamma_{tk}) - \psi(\sum_j \gamma_{tj})`."""
    return digamma(gamma) - digamma(jnp.sum(gamma, axis=-1, keepdims=True))


def log_dirichlet_normalizer(concentration: Float[Array, "... K"]) -> Float[Array, "..."]:
    r""":math:`\log\Gamma(\sum_k a_k) - \sum_k \log\Gamma(a_k)`, the log of :math:`1/B(a)`."""
    return gammaln(jnp.sum(concentration, axis=-1)) - jnp.sum(gammaln(concentration), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def topic_log_likelihoods(generator, topics, observations: Array, lengths: Int[Array, " S"]) -> Float[Array, "S K"]:
    r""":math:`\log P_k(x_n)` of every row under every topic (the generator's batched ``log_probs``, ``vmap`` over topics).

    Jitted (``generator`` static) so that a NumPyro program run eagerly, as SVI's and
    NUTS's initialisation do, compiles it once instead of each of its vmapped primitives.
    """
    return jax.vmap(generator.log_probs, in_axes=(0, None, None), out_axes=1)(topics, observations, lengths)


def e_step(
    log_lik: Float[Array, "S K"],
    task: Int[Array, " S"],
    counts: Float[Array, " S"],
    log_alpha: Float[Array, " K"],
    gamma: Float[Array, "T K"],
    iterations: int,
) -> tuple[Float[Array, "S K"], Float[Array, "T K"]]:
    r"""``iterations`` rounds of :math:`\phi \leftarrow \phi(\gamma)`, :math:`\gamma \leftarrow \gamma(\phi)` from ``gamma``.

    Returns:
        ``(log_phi [S, K], gamma [T, K])`` with ``gamma`` optimal given ``phi`` (the last
        update), so the ELBO at them is at least the ELBO at the input ``gamma`` with
        its optimal ``phi``.
    """
    alpha = jnp.exp(log_alpha)

    # Psi is carried through the loop so that it is computed once per task: fused into the
    # gather ``psi[task]``, XLA would evaluate the digammas once per row (5x slower on a CPU).
    def update(_, carry):
        _, gamma, psi = carry
        log_phi = jax.nn.log_softmax(log_lik + psi[task], axis=-1)
        gamma = alpha + jax.ops.segment_sum(counts[:, None] * jnp.exp(log_phi), task, num_segments=gamma.shape[0])
        return log_phi, gamma, expected_log_theta(gamma)

    log_phi, gamma, _ = jax.lax.fori_loop(
        0, iterations, update, (jnp.zeros_like(log_lik), gamma, expected_log_theta(gamma))
    )
    return log_phi, gamma


def elbo_terms(
    log_lik: Float[Array, "S K"],
    task: Int[Array, " S"],
    counts: Float[Array, " S"],
    log_alpha: Float[Array, " K"],
    gamma: Float[Array, "T K"],
    log_phi: Float[Array, "S K"],
) -> ElboTerms:
    """The ELBO's terms at ``(alpha, gamma, phi)`` (module docstring); padding rows (count 0) add 0."""
    alpha = jnp.exp(log_alpha)
    psi = expected_log_theta(gamma)
    phi = jnp.exp(log_phi)
    used = counts > 0

    def rows(values):
        per_row = jnp.sum(jnp.where(phi > 0, phi * values, 0.0), axis=-1)
        return jnp.sum(jnp.where(used, counts * per_row, 0.0))

    prior = jnp.sum(log_dirichlet_normalizer(alpha) + jnp.sum((alpha - 1.0) * psi, axis=-1))
    q_theta = jnp.sum(log_dirichlet_normalizer(gamma) + jnp.sum((gamma - 1.0) * psi, axis=-1))
    return ElboTerms(
        prior=prior,
        assignments=rows(psi[task]),
        sequences=rows(log_lik),
        entropy=-q_theta - rows(log_phi),
    )


def dirichlet_objective(alpha: Float[Array, " K"], log_theta_sum: Float[Array, " K"], num_tasks) -> Float[Array, ""]:
    r""":math:`f(\alpha) = T[\log\Gamma(\sum\alpha) - \sum\log\Gamma(\alpha_k)] + \sum_k (\alpha_k - 1) s_k`.

    With :math:`s_k = \sum_t E_q[\log\theta_{tk}]`: the :math:`\alpha` part of the ELBO
    (concave in :math:`\alpha`); ``-inf`` outside the positive orthant.
    """
    value = num_tasks * log_dirichlet_normalizer(alpha) + jnp.sum((alpha - 1.0) * log_theta_sum)
    return jnp.where(jnp.all(alpha > 0), value, -jnp.inf)


def update_alpha(
    log_alpha: Float[Array, " K"],
    log_theta_sum: Float[Array, " K"],
    num_tasks,
    symmetric: bool,
    iterations: int = NEWTON_ITERATIONS,
) -> Float[Array, " K"]:
    r"""Maximise :func:`dirichlet_objective` over :math:`\alpha` by safeguarded Newton; returns :math:`\log\alpha`.

    Asymmetric: gradient :math:`g_k = T[\psi(\sum\alpha) - \psi(\alpha_k)] + s_k`, Hessian
    :math:`H = \mathrm{diag}(h) + z\,\mathbf 1\mathbf 1^\top` with
    :math:`h_k = -T\psi'(\alpha_k)`, :math:`z = T\psi'(\sum\alpha)`, so the Newton step is
    linear-time (appendix A.2): :math:`(H^{-1}g)_k = (g_k - b)/h_k`,
    :math:`b = \sum_j (g_j/h_j) / (1/z + \sum_j 1/h_j)`. Symmetric (:math:`\alpha_k = a`):
    scalar Newton on :math:`T[\log\Gamma(Ka) - K\log\Gamma(a)] + (a - 1)\sum_k s_k`.

    Each iteration takes the largest step :math:`2^{-j}`, ``j < NEWTON_HALVINGS``, that
    keeps :math:`\alpha` positive and does not decrease :math:`f` (else stays), so the
    update never lowers the ELBO; the parameter is stored as :math:`\log\alpha`.
    """
    K = log_alpha.shape[-1]
    steps = 0.5 ** jnp.arange(NEWTON_HALVINGS, dtype=log_alpha.dtype)

    def direction(alpha):
        total = jnp.sum(alpha)
        if symmetric:
            a = alpha[0]
            g = num_tasks * K * (digamma(K * a) - digamma(a)) + jnp.sum(log_theta_sum)
            h = num_tasks * K * (K * polygamma(1, K * a) - polygamma(1, a))
            return jnp.full((K,), -g / h)
        g = num_tasks * (digamma(total) - digamma(alpha)) + log_theta_sum
        h = -num_tasks * polygamma(1, alpha)
        z = num_tasks * polygamma(1, total)
        b = jnp.sum(g / h) / (1.0 / z + jnp.sum(1.0 / h))
        return -(g - b) / h

    def newton(_, alpha):
        current = dirichlet_objective(alpha, log_theta_sum, num_tasks)
        candidates = alpha + steps[:, None] * direction(alpha)
        values = jax.vmap(dirichlet_objective, (0, None, None))(candidates, log_theta_sum, num_tasks)
        ok = jnp.isfinite(values) & (values >= current)
        best = jnp.argmax(ok)
        return jnp.where(ok[best], candidates[best], alpha)

    return jnp.log(jax.lax.fori_loop(0, iterations, newton, jnp.exp(log_alpha)))


def em_step(model, params, design):
    r"""One variational EM step of ``model`` (a :class:`SequenceLDA`) from ``params``.

    E-step from the stored :math:`\gamma` (``model.inner_iterations`` rounds), then the
    topics' weighted M-step (weights :math:`c_n \phi_{nk}`) and the Newton update of
    :math:`\alpha`; the new :math:`\gamma` is the E-step's.

    Returns:
        ``(new params, objective)``: the objective is the ELBO at the old topics and
        :math:`\alpha` with the E-step's :math:`(\phi, \gamma)`, plus the topics' log
        prior (the M-step is MAP). It never decreases from one step to the next: the
        E-step starts with the optimal :math:`\phi` for the stored :math:`\gamma` and
        only ascends, and each M-step block maximises (or, for the HMMs, increases) its
        part of the objective.
    """
    generator = model.generator_for(design)
    observations = getattr(design, generator.observations)
    log_lik = topic_log_likelihoods(generator, params.topics, observations, design.lengths)
    log_phi, gamma = e_step(log_lik, design.task, design.counts, params.log_alpha, params.gamma,
                            model.inner_iterations)
    objective = elbo_terms(log_lik, design.task, design.counts, params.log_alpha, gamma, log_phi).total
    objective = objective + generator.log_prior(params.topics)
    weights = design.counts[:, None] * jnp.exp(log_phi)
    topics = generator.m_step(params.topics, observations, design.lengths, weights)
    log_theta_sum = jnp.sum(expected_log_theta(gamma), axis=0)
    log_alpha = update_alpha(params.log_alpha, log_theta_sum, gamma.shape[0], model.alpha == "symmetric")
    return params._replace(topics=topics, log_alpha=log_alpha, gamma=gamma), objective
