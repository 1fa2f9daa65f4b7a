r"""**Single-task nets** (``"stl-net"``, :class:`STLNet`): one small net per task, no
parameter shared. The nets are stacked (every leaf has a leading task axis ``[K, ...]``)
and applied by gathering each row's task weights and a batched ``einsum`` (memory
``n x q x H`` for the first layer), trained by the generic optax loop of
:mod:`mtl_jax.infer.optimize` on :math:`\sum_k \frac{1}{m_k}\sum_{i\in k} w_i\,
\ell_k(y_i, \eta_i) + \lambda\sum\lVert W\rVert^2`. A task unseen in training gets the
**average of the task predictions** (the equal mixture of the :math:`K` task nets:
mean :math:`\frac1K\sum_k \mu_k(x)`, density :math:`\frac1K\sum_k p_k(y \mid x)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.linalg import segment_sum
from mtl_jax.models.mtl_net import network
from mtl_jax.models.mtl_net.model import MTLNet
from mtl_jax.models.person_model import add_net_arguments, check_net_settings, net_widths
from mtl_jax.models.protocol import register
from mtl_jax.models.baselines.common import (
    binary_rows,
    jitted,
    masked_y,
    person_labels,
    PersonBaseline,
    population_branch,
    RowArrays,
    row_arrays,
    STLNetParams,
)

# --------------------------------------------------------------------------- STL net
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def init_stl_params(key: PRNGKeyArray, num_inputs: int, hidden: tuple[int, ...], num_tasks: int,
                    dtype=jnp.float32) -> STLNetParams:
    """``num_tasks`` independent nets, stacked: each layer is ``eqx.nn.Linear`` built per task
    with its own key (Glorot-uniform, equinox's default) under ``eqx.filter_vmap``."""
    widths = (num_inputs, *hidden)
    keys = jax.random.split(key, len(widths))

    def stacked(layer_key, fan_in, fan_out):
        make = eqx.filter_vmap(lambda k: eqx.nn.Linear(fan_in, fan_out, key=k, dtype=dtype))
        return make(jax.random.split(layer_key, num_tasks))

    layers = tuple(stacked(k, a, b) for k, a, b in zip(keys[:-1], widths[:-1], widths[1:]))
    return STLNetParams(layers=layers, head=stacked(keys[-1], widths[-1], 1),
                        log_noise_sd=jnp.zeros((num_tasks,), dtype))


def stl_rows_forward(params: STLNetParams, X, index, activation: str = "relu", dropout: float = 0.0,
                     key: PRNGKeyArray | None = None) -> Float[Array, " n"]:
    r""":math:`\eta_i` of each row under the net of task ``index[i]``: its weights gathered per
    row (``[n, out, in]``) and applied by a batched ``einsum``; dropout on the hidden layers when ``key`` is given."""
    act = network.ACTIVATIONS[activation]
    keys = jax.random.split(key, max(len(params.layers), 1)) if key is not None else [None] * len(params.layers)
    h = X
    for layer, layer_key in zip(params.layers, keys):
        h = act(jnp.einsum("noi,ni->no", layer.weight[index], h) + layer.bias[index])
        if layer_key is not None and dropout > 0.0:
            h = eqx.nn.Dropout(dropout)(h, key=layer_key)
    return jnp.einsum("ni,ni->n", params.head.weight[index, 0], h) + params.head.bias[index, 0]


def stl_all_forward(params: STLNetParams, X, activation: str = "relu") -> Float[Array, "K n"]:
    r""":math:`\eta` of every row under every task's net ``[K, n]`` (``jax.vmap`` over the stacked nets)."""
    act = network.ACTIVATIONS[activation]

    def one(layers, head):
        h = X
        for layer in layers:
            h = act(h @ layer.weight.T + layer.bias)
        return h @ head.weight[0] + head.bias[0]

    return jax.vmap(one)(params.layers, params.head)


@register
@dataclasses.dataclass(frozen=True)
class STLNet(PersonBaseline):
    """One small net per task, nothing shared (module docstring), trained by ``method="map"``.

    Attributes:
        hidden: widths of each net's hidden layers; ``None`` sizes them like ``"mtl-net"``
            (:func:`~mtl_jax.models.person_model.default_hidden`); ``()``: per-task linear models.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        dropout: dropout rate on the hidden layers during training.
        l2: :math:`\\lambda` on every weight matrix (biases unpenalised).

    The nets share no parameter, and Adam's updates are per parameter, so each task's
    training is that of its net alone -- except for early stopping, which (the generic
    loop of :mod:`mtl_jax.infer.optimize`) keeps the step with the best *total*
    validation loss. With ``validation_fraction=0`` and no validation rows, each net is
    exactly what training it alone would give. The task weightings that act on shared
    parameters (``gradnorm``, ``pcgrad``) have nothing to act on.
    """

    hidden: tuple[int, ...] | None = None
    activation: str = "relu"
    dropout: float = 0.0
    l2: float = 1e-3

    name: ClassVar[str] = "stl-net"
    methods: ClassVar[frozenset] = frozenset({"map"})

    def __post_init__(self):
        check_net_settings(self.hidden, self.activation, self.dropout)
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, not {self.l2}")

    def widths(self, num_inputs: int) -> tuple[int, ...]:
        """The hidden layers' widths for ``num_inputs`` features."""
        return net_widths(self.hidden, num_inputs)

    def labels(self, data: PersonData) -> dict[str, Any]:
        """As the others, plus the hidden widths."""
        return {**person_labels(data), "hidden": list(self.widths(data.X.shape[1]))}

    # ------------------------------------------------------------ parameters
    def init(self, key: PRNGKeyArray, design: PersonData) -> STLNetParams:
        """Glorot-uniform layers, each task's from its own key (:func:`init_stl_params`)."""
        return init_stl_params(key, design.X.shape[1], self.widths(design.X.shape[1]), design.num_tasks,
                               np.dtype(design.X.dtype))

    def params_like(self, labels: dict) -> STLNetParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        return init_stl_params(jax.random.key(0), len(labels["columns"]), tuple(labels["hidden"]),
                               len(labels["task_names"]), np.dtype(np.float32))

    def num_parameters(self, design: PersonData) -> int:
        """Every weight and bias of every net, plus a noise sd per Gaussian task."""
        q, widths = design.X.shape[1], self.widths(design.X.shape[1])
        sizes = (q, *widths, 1)
        per_task = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
        gaussian = int(np.sum(~np.asarray(design.task_binary)[: design.num_tasks]))
        return design.num_tasks * per_task + gaussian

    def population(self, params: STLNetParams):
        """Every parameter: an unseen task's answer averages all the task nets."""
        return params

    def shared_mask(self, params: STLNetParams):
        """``False`` everywhere: nothing is shared."""
        return jax.tree_util.tree_map(lambda _: False, params)

    def split_rows(self, design: PersonData, key: PRNGKeyArray, fraction: float):
        """``(train, validation)`` row weights, as ``"mtl-net"`` (:meth:`MTLNet.split_rows`)."""
        return MTLNet.split_rows(self, design, key, fraction)

    # ------------------------------------------------------------ likelihood
    def _own(self, params: STLNetParams, design: PersonData, key=None):
        """``(eta, log_sd)`` of each row under its own task's net (unseen rows: task 0's, to be replaced)."""
        K = params.num_tasks
        index = jnp.where(design.task < K, design.task, 0)
        eta = stl_rows_forward(params, design.X, index, self.activation, self.dropout, key)
        return eta, params.log_noise_sd[index]

    def task_losses(self, params: STLNetParams, design: PersonData, row_weight, key=None) -> Float[Array, " K"]:
        """Per-task mean negative log-likelihood of the rows weighted by ``row_weight`` (times the label mask)."""
        return jitted(self, "_task_losses", params, (row_arrays(design), row_weight, key))

    def _task_losses(self, params: STLNetParams, arguments) -> Float[Array, " K"]:
        design, row_weight, key = arguments
        weight = row_weight * design.weight
        eta, log_sd = self._own(params, design, key)
        loglik = network.row_log_likelihood(eta, log_sd, masked_y(design), binary_rows(design))
        K = params.num_tasks
        total = segment_sum(jnp.where(weight > 0, -weight * loglik, 0.0), design.task, K)
        count = segment_sum(weight, design.task, K)
        return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)

    def penalty(self, params: STLNetParams, design=None, row_weight=None) -> Float[Array, ""]:
        """:math:`\\lambda` times the sum of squares of every weight matrix (all tasks); the rows are not needed."""
        weights = [layer.weight for layer in params.layers] + [params.head.weight]
        return self.l2 * sum(jnp.sum(w ** 2) for w in weights)

    def _row_answers(self, params: STLNetParams, design: RowArrays):
        K = params.num_tasks
        seen = design.task < K
        binary, y = binary_rows(design), masked_y(design)
        eta, log_sd = self._own(params, design)
        own_mean = network.mean_response(eta, binary)
        own_loglik = network.row_log_likelihood(eta, log_sd, y, binary)

        def population():
            eta_all = stl_all_forward(params, design.X, self.activation)  # [K, n]
            mean = network.mean_response(eta_all, binary[None])
            loglik = network.row_log_likelihood(eta_all, params.log_noise_sd[:, None], y[None], binary[None])
            return jnp.mean(mean, axis=0), jax.nn.logsumexp(loglik, axis=0) - jnp.log(jnp.asarray(K, eta.dtype))

        pop_mean, pop_loglik = population_branch(jnp.any(~seen), population, (own_mean, own_loglik))
        return jnp.where(seen, own_mean, pop_mean), jnp.where(seen, own_loglik, pop_loglik)

    # --------------------------------------------------------------- reports
    def named_parameters(self, params: STLNetParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Over tasks: ``mean_head_bias``, the rms of each layer's weights (``weight_rms[<l>]``,
        the head last) and each Gaussian task's ``noise_sd[<task>]``."""
        del leading
        named = {"mean_head_bias": np.asarray(params.head.bias)[..., 0].mean(axis=-1)}
        weights = [layer.weight for layer in params.layers] + [params.head.weight]
        for index, weight in enumerate(weights):
            named[f"weight_rms[{index}]"] = np.sqrt(np.mean(np.asarray(weight) ** 2, axis=(-3, -2, -1)))
        log_sd = np.asarray(params.log_noise_sd)
        for k, (task, binary) in enumerate(zip(labels["task_names"], labels["task_binary"])):
            if not binary:
                named[f"noise_sd[{task}]"] = np.exp(log_sd[..., k])
        return named

    def report(self, params: STLNetParams, labels: dict) -> dict[str, Any]:
        """The hidden widths and per task its head (``bias``, ``weight``)."""
        bias, weight = np.asarray(params.head.bias)[:, 0], np.asarray(params.head.weight)[:, 0]
        return {"hidden": labels["hidden"], "task_nets": {
            task: {"head_bias": float(bias[k]), "head_weight": weight[k].tolist()}
            for k, task in enumerate(labels["task_names"])}}

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model stl-net``."""
        group = parser.add_argument_group(f"{cls.name} options")
        add_net_arguments(group, "hidden widths of each task's net", "per-task linear models")
        group.add_argument("--l2", type=float, default=1e-3, help="L2 on every weight matrix (default 1e-3)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(hidden=None if args.hidden is None else tuple(args.hidden), activation=args.activation,
                   dropout=args.dropout, l2=args.l2)
