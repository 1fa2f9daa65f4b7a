r"""The hard-shared multitask network: a shared trunk and one stacked linear head per task.

For a row ``x`` of task ``k`` the trunk gives features :math:`h(x) \in \mathbb R^H` (dense
layers with an activation, optional dropout) and the head gives the linear predictor

.. math::

    \eta = h(x)^T (u + \delta_k) + (c + \epsilon_k),

with a *population head* :math:`(u, c)` and per-task deviations :math:`(\delta_k,
\epsilon_k)` stored stacked ``[K, H]``, ``[K]``. Rows of a task unseen in training
(``task >= K``) use the population head alone. A binary task reads :math:`\eta` as a
logit; a Gaussian task as the mean, with noise sd :math:`e^{s_k}` (unseen: :math:`e^{s}`).
Heads are gathered per row and applied with one batched ``einsum``: no loop over tasks.
Without shared layers (``hidden=()``) the "trunk" is the identity and each head is a
linear model on the features.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


class NetParams(eqx.Module):
    """Parameters of :mod:`network`.

    Attributes:
        trunk: the shared dense layers (``eqx.nn.Linear``), input to last hidden width ``H``.
        head_weight: per-task deviations :math:`\\delta_k` ``[K, H]``.
        head_bias: per-task deviations :math:`\\epsilon_k` ``[K]``.
        population_weight: :math:`u` ``[H]``.
        population_bias: :math:`c` ``[]``.
        log_noise_sd: :math:`s_k` ``[K]`` (used by Gaussian tasks only).
        population_log_noise_sd: :math:`s` ``[]`` (unseen Gaussian tasks).
        head_log_scale: :math:`\\log\\tau` ``[]``, the scale of the head deviations' prior
            (learned by empirical Bayes in MAP training when ``l2_task`` is not fixed;
            see :mod:`.empirical_bayes`).
    """

    trunk: tuple[eqx.nn.Linear, ...]
    head_weight: Float[Array, "K H"]
    head_bias: Float[Array, " K"]
    population_weight: Float[Array, " H"]
    population_bias: Float[Array, ""]
    log_noise_sd: Float[Array, " K"]
    population_log_noise_sd: Float[Array, ""]
    head_log_scale: Float[Array, ""]

    @property
    def num_tasks(self) -> int:
        """``K``, the training tasks."""
        return self.head_bias.shape[0]


def init_params(key: PRNGKeyArray, num_inputs: int, hidden: tuple[int, ...], num_tasks: int,
                dtype=jnp.float32) -> NetParams:
    """Glorot-uniform trunk (equinox's default), zero task deviations, small random population head."""
    widths = (num_inputs, *hidden)
    keys = jax.random.split(key, len(hidden) + 1)
    trunk = tuple(eqx.nn.Linear(a, b, key=k, dtype=dtype) for a, b, k in zip(widths[:-1], widths[1:], keys))
    width = widths[-1]
    return NetParams(
        trunk=trunk,
        head_weight=jnp.zeros((num_tasks, width), dtype),
        head_bias=jnp.zeros((num_tasks,), dtype),
        population_weight=jax.random.normal(keys[-1], (width,), dtype) / jnp.sqrt(jnp.asarray(width, dtype)),
        population_bias=jnp.zeros((), dtype),
        log_noise_sd=jnp.zeros((num_tasks,), dtype),
        population_log_noise_sd=jnp.zeros((), dtype),
        head_log_scale=jnp.zeros((), dtype),
    )


def features(params: NetParams, X: Float[Array, "n q"], activation: str = "relu", dropout: float = 0.0,
             key: PRNGKeyArray | None = None) -> Float[Array, "n H"]:
    """The trunk's output :math:`h(x)` per row; dropout (rate ``dropout``) on each hidden layer when ``key`` is given."""
    act = ACTIVATIONS[activation]
    h = X
    keys = jax.random.split(key, max(len(params.trunk), 1)) if key is not None else [None] * len(params.trunk)
    for layer, layer_key in zip(params.trunk, keys):
        h = act(h @ layer.weight.T + layer.bias)
        if layer_key is not None and dropout > 0.0:
            h = eqx.nn.Dropout(dropout)(h, key=layer_key)
    return h


def row_deviations(params: NetParams, task: Int[Array, " n"]):
    """Each row's task deviation ``(delta [n, H], epsilon [n])`` and noise ``log_sd [n]``, gathered from
    tables with an extra row ``K`` (zero deviation, population noise) that unseen tasks point to."""
    index = jnp.minimum(task, params.num_tasks)
    delta = jnp.pad(params.head_weight, ((0, 1), (0, 0)))[index]
    epsilon = jnp.pad(params.head_bias, (0, 1))[index]
    log_sd = jnp.append(params.log_noise_sd, params.population_log_noise_sd)[index]
    return delta, epsilon, log_sd


def linear_predictor(params: NetParams, X: Float[Array, "n q"], task: Int[Array, " n"], activation: str = "relu",
                     dropout: float = 0.0, key: PRNGKeyArray | None = None):
    r"""``(eta [n], log_sd [n])``: :math:`\eta_j = h(x_j)^T (u + \delta_{k_j}) + c + \epsilon_{k_j}`, the
    population part one matrix-vector product and the deviations one batched einsum."""
    h = features(params, X, activation, dropout, key)
    delta, epsilon, log_sd = row_deviations(params, task)
    return h @ params.population_weight + jnp.einsum("nh,nh->n", h, delta) + params.population_bias + epsilon, log_sd


def row_log_likelihood(eta: Float[Array, " n"], log_sd: Float[Array, " n"], y: Float[Array, " n"],
                       binary: Array) -> Float[Array, " n"]:
    r"""Per-row :math:`\log p(y \mid \eta)`: Bernoulli-logit where ``binary``, else Gaussian with sd :math:`e^{s}`.

    Bernoulli: :math:`y\,\eta - \operatorname{softplus}(\eta)` (stable for any :math:`\eta`);
    Gaussian: :math:`-\tfrac12\log 2\pi - s - \tfrac12 (y-\eta)^2 e^{-2s}`.
    """
    bernoulli = y * eta - jax.nn.softplus(eta)
    gaussian = -0.5 * jnp.log(2.0 * jnp.pi) - log_sd - 0.5 * jnp.square((y - eta) * jnp.exp(-log_sd))
    return jnp.where(binary, bernoulli, gaussian)


def mean_response(eta: Float[Array, " n"], binary: Array) -> Float[Array, " n"]:
    """Probability of the positive label (binary) or the mean (Gaussian)."""
    return jnp.where(binary, jax.nn.sigmoid(eta), eta)
