r"""The multitask net as a NumPyro program (``method="svi"`` / ``"nuts"``).

With ``f`` the fan-in of a layer, ``s`` = ``prior_scale``, ``H`` the last hidden width:

.. math::

    W^{(l)} \sim \mathcal N(0, s^2/f_l),\quad b^{(l)} \sim \mathcal N(0, s^2),\quad
    u \sim \mathcal N(0, s^2/H),\quad c \sim \mathcal N(0, s^2),

    \tau \sim \operatorname{HalfNormal}(s),\quad
    (\delta_k, \epsilon_k) \sim \mathcal N\big(0, \tau^2\operatorname{diag}(1/H, \dots, 1/H, 1)\big),

    s_0 \sim \mathcal N(0, 1),\quad s_k \sim \mathcal N(s_0, 1),\quad
    \log p(y) = \sum_j w_j \log p(y_j \mid \eta_j, s_{k_j})

(the labels enter as one ``factor``; a masked label has :math:`w_j = 0` and contributes
nothing). The head deviations are sampled non-centred (``head_z``, standard normals
scaled by :math:`\tau`) or centred (``head_centred``). ``pooled`` nets have no
:math:`\tau` and no deviations. Each :class:`~.network.NetParams` leaf is also a
deterministic site (``trunk{l}_weight``, ``trunk{l}_bias``, ``head_weight``, ...), which
:func:`from_sites` reads back.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from mtl_jax.models.mtl_net.network import NetParams

HEAD_FIELDS = ("head_weight", "head_bias", "population_weight", "population_bias", "log_noise_sd",
               "population_log_noise_sd", "head_log_scale")


def param_sites(num_layers: int) -> tuple[str, ...]:
    """Deterministic sites of a net with ``num_layers`` shared layers."""
    trunk = tuple(f"trunk{l}_{part}" for l in range(num_layers) for part in ("weight", "bias"))
    return trunk + HEAD_FIELDS


def _normal(name, scale, shape, dtype):
    import numpyro
    import numpyro.distributions as dist

    return numpyro.sample(name, dist.Normal(jnp.zeros(shape, dtype), scale).to_event(len(shape)))


def numpyro_model(model, design, centred: bool = False) -> None:
    """The program of the module docstring."""
    import numpyro
    import numpyro.distributions as dist

    s, dtype = model.prior_scale, design.X.dtype
    widths = (design.X.shape[1], *model.widths(design.X.shape[1]))
    K, H = design.num_tasks, widths[-1]
    layers = []
    for l, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        weight = _normal(f"trunk{l}_w", s / jnp.sqrt(fan_in), (fan_out, fan_in), dtype)
        bias = _normal(f"trunk{l}_b", s, (fan_out,), dtype)
        layers.append((numpyro.deterministic(f"trunk{l}_weight", weight),
                       numpyro.deterministic(f"trunk{l}_bias", bias)))
    u = _normal("population_u", s / jnp.sqrt(H), (H,), dtype)
    c = _normal("population_c", s, (), dtype)
    if model.pooled:
        deviations, tau = jnp.zeros((K, H + 1), dtype), jnp.ones((), dtype)
    else:
        tau = numpyro.sample("head_scale", dist.HalfNormal(jnp.asarray(s, dtype)))
        unit = jnp.concatenate([jnp.full((H,), 1.0 / jnp.sqrt(H), dtype), jnp.ones((1,), dtype)])
        with numpyro.plate("tasks", K):
            if centred:
                deviations = numpyro.sample("head_centred", dist.Normal(0.0, tau * unit).to_event(1))
            else:
                deviations = tau * unit * numpyro.sample("head_z", dist.Normal(jnp.zeros((H + 1,), dtype), 1.0)
                                                          .to_event(1))
    s0 = numpyro.sample("noise_log_sd_mean", dist.Normal(jnp.zeros((), dtype), 1.0))
    with numpyro.plate("tasks", K):
        s_k = numpyro.sample("noise_log_sd", dist.Normal(s0, 1.0))
    values = {"head_weight": deviations[:, :H], "head_bias": deviations[:, H], "population_weight": u,
              "population_bias": c, "log_noise_sd": s_k, "population_log_noise_sd": s0,
              "head_log_scale": jnp.log(tau)}
    for field in HEAD_FIELDS:
        numpyro.deterministic(field, values[field])
    params = build(layers, values)
    numpyro.factor("labels", jnp.sum(design.weight * model.row_log_likelihood(params, design)))


def shared_neg_log_prior(model, params: NetParams) -> Array:
    r"""Minus the log prior density (less constants) of the shared weights and the noise sds at ``params``:
    :math:`\sum_l (f_l\lVert W^{(l)}\rVert^2 + \lVert b^{(l)}\rVert^2)/(2s^2) + (H\lVert u\rVert^2 + c^2)/(2s^2)
    + s_0^2/2 + \sum_k (s_k - s_0)^2/2`."""
    s2 = model.prior_scale ** 2
    total = sum(layer.weight.shape[1] * jnp.sum(layer.weight ** 2) + jnp.sum(layer.bias ** 2) for layer in params.trunk)
    total += params.population_weight.shape[0] * jnp.sum(params.population_weight ** 2) + params.population_bias ** 2
    noise = params.population_log_noise_sd ** 2 + jnp.sum((params.log_noise_sd - params.population_log_noise_sd) ** 2)
    return total / (2.0 * s2) + noise / 2.0


def build(layers, values) -> NetParams:
    """:class:`NetParams` from ``(weight, bias)`` per layer and the head fields (any leading axes)."""
    trunk = []
    for weight, bias in layers:
        template = eqx.nn.Linear(1, 1, key=jax.random.key(0))
        trunk.append(eqx.tree_at(lambda layer: (layer.weight, layer.bias), template, (weight, bias)))
    return NetParams(trunk=tuple(trunk), **{field: values[field] for field in HEAD_FIELDS})


def from_sites(samples: dict[str, Array], num_layers: int) -> NetParams:
    """Parameters from the deterministic sites (any leading axes)."""
    layers = [(samples[f"trunk{l}_weight"], samples[f"trunk{l}_bias"]) for l in range(num_layers)]
    return build(layers, samples)


def site_values(model, params: NetParams) -> dict[str, Array]:
    """The sampled sites at ``params`` (both forms of the head deviations)."""
    values = {}
    for l, layer in enumerate(params.trunk):
        values[f"trunk{l}_w"], values[f"trunk{l}_b"] = layer.weight, layer.bias
    values["population_u"], values["population_c"] = params.population_weight, params.population_bias
    values["noise_log_sd_mean"], values["noise_log_sd"] = params.population_log_noise_sd, params.log_noise_sd
    if not model.pooled:
        H = params.population_weight.shape[-1]
        deviations = jnp.concatenate([params.head_weight, params.head_bias[:, None]], axis=1)
        unit = jnp.concatenate([jnp.full((H,), 1.0 / jnp.sqrt(H)), jnp.ones((1,))]).astype(deviations.dtype)
        tau = jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(deviations / unit))), 1e-2)
        values["head_scale"] = tau
        values["head_centred"] = deviations
        values["head_z"] = deviations / (tau * unit)
    return values
