r"""The hard-shared multitask net on the model protocol (``"mtl-net"``, and ``"pooled-net"``).

The network is :mod:`.network`: a shared trunk, a population head and per-task head
deviations. Its training objective (``method="map"``, :mod:`mtl_jax.infer.optimize`) is

.. math::

    \sum_k \frac{1}{m_k}\sum_{j \in k} w_j\,\ell(y_j, \eta_j)
    + \lambda_s \lVert \theta_{\text{shared}}\rVert^2
    + \lambda_t \sum_k \lVert(\delta_k, \epsilon_k)\rVert^2

(:math:`\ell` the negative log-likelihood of the task's family, :math:`w_j` 0 for a
missing label, :math:`m_k = \sum_{j\in k} w_j`), combined over tasks as the chosen task
weighting says. Penalising the deviations pulls every head towards the population head,
which is what a person unseen in training gets. Those are the fixed-weight penalties
(``l2_shared``, ``l2_task``). By default (both ``None``) the penalties are the NumPyro
program's priors instead, so that MAP training finds that model's posterior mode: the
shared weights' Gaussian priors over :math:`\bar m` (the mean rows per task), and the
head deviations' hierarchical prior :math:`\sum_k \lVert\zeta_k\rVert^2 / (2\tau^2 m_k)`
whose scale :math:`\tau` is learned by empirical Bayes between training chunks
(:mod:`.empirical_bayes`). How strongly weights are held back and how far heads may
stray from the population head are then set by the data's size, not by fixed weights. The same net is a NumPyro program
(:mod:`.program`) for ``method="svi"`` and ``"nuts"``: Gaussian priors on the shared
weights and a hierarchical prior on the head deviations whose scale is learned.

``pooled=True`` (``"pooled-net"``) has no task deviations: one net for all tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.linalg import segment_sum
from mtl_jax.models.mtl_net import empirical_bayes, network, program
from mtl_jax.models.mtl_net.network import NetParams
from mtl_jax.models.person_model import PersonModel, add_net_arguments, check_net_settings, net_widths
from mtl_jax.models.protocol import register


def mean_rows_per_task(count: Float[Array, " K"]) -> Float[Array, ""]:
    """:math:`\bar m`, the mean weighted training rows of the tasks that have any (at least 1)."""
    return jnp.maximum(jnp.sum(count) / jnp.maximum(jnp.sum(count > 0), 1), 1.0)


@register
@dataclasses.dataclass(frozen=True)
class MTLNet(PersonModel):
    """A hard-shared multitask net.

    Attributes:
        hidden: widths of the shared layers; ``None`` sizes them to the data
            (:func:`~mtl_jax.models.person_model.default_hidden`); ``()`` has no shared layer (linear heads).
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        dropout: dropout rate on the hidden layers during MAP training.
        l2_shared: :math:`\\lambda_s` on the trunk and the population head; ``None`` (the
            default) puts the NumPyro program's Gaussian priors (scale ``prior_scale``) on
            all shared weights instead, weighed as one task's worth of rows.
        l2_task: :math:`\\lambda_t` on the per-task head deviations; ``None`` (the default)
            puts the NumPyro program's Gaussian prior on them instead, its scale
            :math:`\\tau` learned by empirical Bayes during training (:mod:`.empirical_bayes`).
        prior_scale: sd of the Gaussian priors of the NumPyro program (weights of a
            layer with fan-in ``f``: ``prior_scale / sqrt(f)``).
        pooled: no per-task heads (``"pooled-net"``).
    """

    hidden: tuple[int, ...] | None = None
    activation: str = "relu"
    dropout: float = 0.0
    l2_shared: float | None = None
    l2_task: float | None = None
    prior_scale: float = 1.0
    pooled: bool = False

    name: ClassVar[str] = "mtl-net"
    methods: ClassVar[frozenset] = frozenset({"map", "svi", "nuts"})

    def __post_init__(self):
        check_net_settings(self.hidden, self.activation, self.dropout)
        if any(value is not None and value < 0 for value in (self.l2_shared, self.l2_task)) or self.prior_scale <= 0:
            raise ValueError("l2_shared and l2_task must be >= 0 and prior_scale > 0")

    # ------------------------------------------------------------------ data
    def widths(self, num_inputs: int) -> tuple[int, ...]:
        """The shared layers' widths for ``num_inputs`` features."""
        return net_widths(self.hidden, num_inputs)

    def labels(self, data: PersonData) -> dict[str, Any]:
        """Task names, feature columns, label (response) names, hidden widths, which tasks are binary."""
        return {"task_names": list(data.task_names), "columns": list(data.columns),
                "response_names": list(data.schema.labels), "hidden": list(self.widths(data.X.shape[1])),
                "task_binary": [bool(b) for b in np.asarray(data.task_binary)]}

    def num_observations(self, design: PersonData) -> int:
        """Observed labels."""
        return int(np.sum(np.asarray(design.weight)))

    # ------------------------------------------------------------ parameters
    def init(self, key: PRNGKeyArray, design: PersonData) -> NetParams:
        """Glorot trunk, zero head deviations (:func:`.network.init_params`)."""
        return network.init_params(key, design.X.shape[1], self.widths(design.X.shape[1]), design.num_tasks,
                                   design.X.dtype)

    def params_like(self, labels: dict) -> NetParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        return network.init_params(jax.random.key(0), len(labels["columns"]), tuple(labels["hidden"]),
                                   len(labels["task_names"]))

    def num_parameters(self, design: PersonData) -> int:
        """Every weight, bias and noise scale of the net (the heads' deviations included)."""
        params = self.init(jax.random.key(0), design)
        return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))

    def population(self, params: NetParams):
        """What every task shares: trunk, population head and noise scale."""
        return (params.trunk, params.population_weight, params.population_bias, params.population_log_noise_sd)

    def shared_mask(self, params: NetParams):
        """``True`` on the shared leaves (trunk, population head), ``False`` on the per-task ones."""
        mask = jax.tree_util.tree_map(lambda _: True, params)
        return eqx.tree_at(lambda p: (p.head_weight, p.head_bias, p.log_noise_sd), mask, (False, False, False))

    # ------------------------------------------------------------ likelihood
    def _heads(self, params: NetParams) -> NetParams:
        if not self.pooled:
            return params
        return eqx.tree_at(lambda p: (p.head_weight, p.head_bias), params,
                           (jnp.zeros_like(params.head_weight), jnp.zeros_like(params.head_bias)))

    def row_log_likelihood(self, params: NetParams, design: PersonData,
                           key: PRNGKeyArray | None = None) -> Float[Array, " n"]:
        """:math:`\\log p(y_j)` per observation (masked rows included; weight them yourself)."""
        params = self._heads(params)
        eta, log_sd = network.linear_predictor(params, design.X, design.task, self.activation, self.dropout, key)
        return network.row_log_likelihood(eta, log_sd, design.y, self._binary_rows(params, design))

    def _binary_rows(self, params: NetParams, design: PersonData):
        known = jnp.where(design.task < design.task_binary.shape[0], design.task, 0)
        return design.task_binary[known]

    def task_losses(self, params: NetParams, design: PersonData, row_weight, key=None) -> Float[Array, " K"]:
        """Per-task mean negative log-likelihood of the rows weighted by ``row_weight`` (times the label mask)."""
        weight = row_weight * design.weight
        K = params.num_tasks
        total = segment_sum(-weight * self.row_log_likelihood(params, design, key), design.task, K)
        count = segment_sum(weight, design.task, K)
        return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)

    def _training_rows(self, params: NetParams, design: PersonData, row_weight) -> Float[Array, " K"]:
        """:math:`m_k`, each task's weighted rows with an observed label."""
        return segment_sum(row_weight * design.weight, design.task, params.num_tasks)

    def penalty(self, params: NetParams, design: PersonData, row_weight) -> Float[Array, ""]:
        """The regulariser :math:`\\lambda R` of the MAP objective (module docstring).

        Fixed weights: :math:`\\lambda_s(\\lVert\\text{trunk}\\rVert^2 + \\lVert u\\rVert^2)` and
        :math:`\\lambda_t\\sum_k\\lVert(\\delta_k,\\epsilon_k)\\rVert^2`. With ``l2_shared=None`` the
        NumPyro program's negative log-priors of the shared weights and noise sds over
        :math:`\\bar m` (the mean weighted rows per task); with ``l2_task=None`` the head
        prior's :math:`\\sum_k \\lVert\\zeta_k\\rVert^2 / (2\\tau^2 m_k)` (:math:`m_k` the task's
        weighted rows, :math:`\\tau` held fixed here; :mod:`.empirical_bayes`). With both
        ``None`` and equal :math:`m_k = m`, objective times :math:`m` is the program's negative
        log joint density (less :math:`\\tau`'s prior and constants): MAP is its posterior mode.
        """
        count = self._training_rows(params, design, row_weight)
        if self.l2_shared is None:
            shared = program.shared_neg_log_prior(self, params) / mean_rows_per_task(count)
        else:
            shared = self.l2_shared * (sum(jnp.sum(layer.weight ** 2) for layer in params.trunk)
                                       + jnp.sum(params.population_weight ** 2))
        if self.pooled:
            return shared
        if self.l2_task is not None:
            return shared + self.l2_task * (jnp.sum(params.head_weight ** 2) + jnp.sum(params.head_bias ** 2))
        scale = jax.lax.stop_gradient(jnp.exp(params.head_log_scale))
        squares = jnp.sum(empirical_bayes.standardised_deviations(params) ** 2, axis=1)
        return shared + jnp.sum(squares / jnp.maximum(count, 1.0)) / (2.0 * scale ** 2)

    def empirical_bayes(self, params: NetParams, design: PersonData, row_weight) -> NetParams:
        """With ``l2_task=None``: the head deviations, the population head and their prior scale
        refitted by :func:`.empirical_bayes.refresh` on the rows weighted by ``row_weight``; else ``params``."""
        if self.l2_task is not None or self.pooled:
            return params
        H = params.population_weight.shape[0]
        if self.l2_shared is None:  # H |u|^2 / (2 s^2 m) + c^2 / (2 s^2 m) = |v|^2 / (2 s^2 m)
            count = self._training_rows(params, design, row_weight)
            precision = jnp.full((H + 1,), 1.0 / (self.prior_scale ** 2 * mean_rows_per_task(count)))
        else:  # l2 |u|^2 = (l2 / H) |v_u|^2, the bias unpenalised
            precision = jnp.append(jnp.full((H,), 2.0 * self.l2_shared / H), 0.0)
        return empirical_bayes.refresh(params, design.X, design.y, design.task, self._binary_rows(params, design),
                                       row_weight * design.weight, self.activation,
                                       precision.astype(params.population_weight.dtype))

    def split_rows(self, design: PersonData, key: PRNGKeyArray, fraction: float):
        """``(train, validation)`` row weights: the data's own split, or ``fraction`` of each
        task's training rows drawn at random for validation when the data have no validation rows."""
        train = (design.split == 0).astype(design.X.dtype)
        validation = (design.split == 1).astype(design.X.dtype)
        if bool(jnp.any(validation * design.weight > 0)) or fraction <= 0:
            return train, validation
        held = (jax.random.uniform(key, design.y.shape) < fraction).astype(design.X.dtype) * train
        return train - held, held

    def score(self, params: NetParams, design: PersonData) -> Float[Array, ""]:
        """Log-likelihood of the observed labels (training and validation rows; test rows excluded)."""
        weight = design.weight * (design.split < 2)
        return jnp.sum(weight * self.row_log_likelihood(params, design))

    def predict(self, params: NetParams, design: PersonData) -> Float[Array, "samples L"]:
        """Per input row and label: the probability of the positive level (binary) or the mean."""
        params = self._heads(params)
        eta, _ = network.linear_predictor(params, design.X, design.task, self.activation)
        mean = network.mean_response(eta, self._binary_rows(params, design))
        return mean.reshape(-1, design.num_labels)

    def log_predictive(self, params: NetParams, design: PersonData) -> Float[Array, " samples"]:
        """Per input row: the log-likelihood of its observed labels (0 when none is observed)."""
        values = design.weight * self.row_log_likelihood(params, design)
        return values.reshape(-1, design.num_labels).sum(axis=1)

    # --------------------------------------------------------------- reports
    def named_parameters(self, params: NetParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Population head (``population_bias``, ``population_weight[h]``), the head-deviation
        scale (rms of the deviations) and each Gaussian task's noise sd."""
        lead = (slice(None),) * leading
        weight = np.asarray(params.population_weight)
        named = {"population_bias": np.asarray(params.population_bias)}
        named.update({f"population_weight[{h}]": weight[lead + (h,)] for h in range(weight.shape[-1])})
        deviations = np.asarray(params.head_weight)
        named["head_deviation_rms"] = np.sqrt(np.mean(deviations ** 2, axis=(-2, -1)))
        log_sd = np.asarray(params.log_noise_sd)
        for k, (name, binary) in enumerate(zip(labels["task_names"], labels["task_binary"])):
            if not binary:
                named[f"noise_sd[{name}]"] = np.exp(log_sd[lead + (k,)])
        return named

    def report(self, params: NetParams, labels: dict) -> dict[str, Any]:
        """Per task: its head (population plus deviation) as ``bias`` and ``weight``."""
        weight = np.asarray(params.population_weight) + np.asarray(params.head_weight)
        bias = np.asarray(params.population_bias) + np.asarray(params.head_bias)
        return {"hidden": labels["hidden"], "task_heads": {
            name: {"bias": float(bias[k]), "weight": weight[k].tolist()} for k, name in enumerate(labels["task_names"])}}

    # --------------------------------------------------------------- NumPyro
    def numpyro_model(self, design: PersonData, centred: bool = False) -> None:
        """The net as a NumPyro program (:mod:`.program`)."""
        program.numpyro_model(self, design, centred)

    def site_values(self, params: NetParams) -> dict[str, Array]:
        """The program's sampled sites at ``params``."""
        return program.site_values(self, params)

    def param_sites(self) -> tuple[str, ...]:
        """The deterministic sites :meth:`from_sites` reads."""
        return program.param_sites(len(self.widths(1)))

    def from_sites(self, samples: dict[str, Array]) -> NetParams:
        """Parameters from samples of :meth:`param_sites` (any leading axes)."""
        return program.from_sites(samples, len(self.widths(1)))

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model mtl-net``."""
        group = parser.add_argument_group(f"{cls.name} options")
        add_net_arguments(group, "shared layer widths", "linear heads")
        group.add_argument("--l2-shared", type=float, default=None,
                           help="L2 on the shared weights (default: none; the Bayesian net's Gaussian priors)")
        group.add_argument("--l2-task", type=float, default=None,
                           help="L2 on the task heads' deviations from the population head (default: none; a "
                                "Gaussian prior whose scale is learned by empirical Bayes)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(hidden=None if args.hidden is None else tuple(args.hidden), activation=args.activation,
                   dropout=args.dropout, l2_shared=args.l2_shared, l2_task=args.l2_task)



@register
@dataclasses.dataclass(frozen=True)
class PooledNet(MTLNet):
    """One net for all tasks (no task heads): the pooled baseline."""

    pooled: bool = True
    name: ClassVar[str] = "pooled-net"

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options (``--l2-task`` is ignored)."""
        return cls(hidden=None if args.hidden is None else tuple(args.hidden), activation=args.activation,
                   dropout=args.dropout, l2_shared=args.l2_shared)


__all__ = ["MTLNet", "PooledNet"]
