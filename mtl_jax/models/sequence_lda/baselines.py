r"""The two baselines of Sequential LDA: one generator for all tasks, one generator per task.

Both fit a generator of :mod:`.generators` (categorical, Markov, HMM, Gaussian HMM) by
MAP EM on weighted rows, the M-step of Sequential LDA with fixed weights: from
:math:`P` (``S`` rows, row :math:`n` with multiplicity :math:`c_n`, weight
:math:`w_n \ge 0`)

.. math:: P' = \arg\max_Q \; \sum_n w_n \, E_{P}[\log Q(x_n, h_n) \mid x_n] + \log p(Q)

(:func:`weighted_em_step`; :math:`h_n` the hidden states, none for categorical and
Markov generators, :math:`\log p` the generator's Dirichlet ``log_prior``). For the
categorical and Markov generators the step is closed form, the weighted counts plus
pseudo-counts normalised, so EM is at its optimum after one step; for the HMMs it is one
Baum-Welch step, which never lowers :math:`\sum_n w_n \log P(x_n) + \log p(P)`.

* :class:`SequencePooled` (``"sequence-pooled"``): one generator :math:`P` for every
  task, weights :math:`w_n = c_n`; every row, of a training task or not, is scored
  :math:`\log P(x_n)`.
* :class:`SequencePerTask` (``"sequence-per-task"``): a generator :math:`P_t` per
  training task, weights :math:`w^{(t)}_n = c_n [t_n = t]`, fitted independently: the
  one-generator step is written once and ``jax.vmap``-ed over the ``T`` tasks (each
  task's step reads every row, with weight 0 outside its task, so a step costs
  ``O(T S L)``). A task unseen in training has no generator of its own; its rows get the
  population-level answer of this model, the pooled generator fitted alongside on all
  rows (the :class:`SequencePooled` fit, the answer when nothing is known about the
  task), rather than, e.g., an average of the training tasks' generators.

Parameters of one generator carry no topic axis (e.g. Markov ``log_init [V]``,
``log_trans [V, W]``); stacks of them carry one leading axis (``[T, ...]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from mtl_jax.data.sequences import SequenceData
from mtl_jax.models.protocol import register
from mtl_jax.models.sequence_lda.base import SequenceModel, readable_fields


def weighted_log_likelihood(weights: Float[Array, " S"], log_lik: Float[Array, " S"]) -> Float[Array, ""]:
    r""":math:`\sum_n w_n \log P(x_n)` over the rows with :math:`w_n > 0` (others add 0, even at ``-inf``)."""
    return jnp.sum(jnp.where(weights > 0, weights * log_lik, 0.0))


def weighted_em_step(
    generator,
    params,
    observations: Array,
    lengths: Int[Array, " S"],
    weights: Float[Array, " S"],
) -> tuple[Any, Float[Array, ""]]:
    r"""One MAP EM step of one generator on rows weighted by ``weights``.

    The generator's weighted M-step (``m_step`` with one topic, weights ``[S, 1]``).

    Args:
        generator: a generator of :mod:`.generators`.
        params: its parameters for one generator (no topic axis).
        observations: ``tokens`` or ``values`` ``[S, L]``.
        lengths: ``[S]``; padding rows (length 0) must have weight 0.
        weights: :math:`w_n \ge 0` ``[S]``.

    Returns:
        ``(new params, objective)``, the objective
        :math:`\sum_n w_n \log P(x_n) + \log p(P)` at the old ``params`` (the step
        never lowers it).
    """
    stacked = jax.tree_util.tree_map(lambda leaf: leaf[None], params)
    log_lik = generator.log_probs(params, observations, lengths)
    objective = weighted_log_likelihood(weights, log_lik) + generator.log_prior(stacked)
    new = generator.m_step(stacked, observations, lengths, weights[:, None])
    return jax.tree_util.tree_map(lambda leaf: leaf[0], new), objective


@dataclasses.dataclass(frozen=True)
class GeneratorBaseline(SequenceModel):
    """What both baselines share: settings, EM only, scoring through each row's generator.

    A subclass gives ``row_generators(params, task) -> [S, ...]``, the generator that
    answers each row (stacked), from which :meth:`log_predictive`, :meth:`predict`,
    :meth:`score` and :meth:`next_symbol_log_probs` follow.

    Attributes:
        generator: a name of :data:`.generators.GENERATORS` (``categorical``, ``markov``,
            ``hmm``, ``gaussian-hmm``); the number of symbols is the data's alphabet size.
        num_states: hidden states of ``hmm`` / ``gaussian-hmm`` (required there).
        halting: whether Markov/HMM generators model the end of a sequence.
        pseudo_count: the generators' Dirichlet (MAP) pseudo-count.
        task_column: the CSV column of task labels (``None``: the model reads no frames).
        sequence_column: the CSV column of sequences (strings split by ``tokens``).
        tokens: ``"chars"`` (one symbol per character) or ``"whitespace"``.
    """

    generator: str = "markov"
    num_states: int | None = None
    halting: bool = True
    pseudo_count: float = 0.01
    task_column: str | None = None
    sequence_column: str | None = None
    tokens: str = "chars"

    methods: ClassVar[frozenset] = frozenset({"em"})

    def __post_init__(self):
        self.check_generator()

    # -------------------------------------------------------------- scores
    def log_predictive(self, params, design: SequenceData) -> Float[Array, " S"]:
        r""":math:`\log P_{(n)}(x_n)` per row under its generator (``row_generators``); padding rows 0.

        The natural log of the whole sequence's probability (density for real values),
        the halting factor included when ``halting``.
        """
        rows = self.row_generators(params, design.task)
        return jax.vmap(self.generator_for(design).log_prob)(rows, self.observed(design), design.lengths)

    def predict(self, params, design: SequenceData) -> Float[Array, " S"]:
        """The per-sequence log-probability (as :meth:`log_predictive`)."""
        return self.log_predictive(params, design)

    def score(self, params, design: SequenceData) -> Float[Array, ""]:
        r"""The training log-likelihood :math:`\sum_n c_n \log P_{(n)}(x_n)` (without the generators' log prior)."""
        return weighted_log_likelihood(design.counts, self.log_predictive(params, design))

    def next_symbol_log_probs(self, params, design: SequenceData) -> Float[Array, "S L+1 V+1"]:
        r"""Entry ``[s, j]``: the next-outcome log-distribution (``V`` symbols, HALT) after :math:`x_{s,1:j}`.

        Row ``s``'s generator's ``next_symbol_log_probs`` table. This is Sequential LDA's
        prefix-filtered mixture (:func:`.prediction.next_outcome_log_probs`) with one
        topic, whose filtered weight is identically 1. Rows ``j > lengths[s]`` are padding.

        Raises:
            ValueError: for real-valued data (no symbols to predict).
        """
        self.require_tokens(design)
        rows = self.row_generators(params, design.task)
        return jax.vmap(self.generator_for(design).next_symbol_log_probs)(rows, design.tokens, design.lengths)

    # ------------------------------------------------------------------ CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model <name>``: the generator's."""
        cls.add_generator_arguments(parser.add_argument_group(f"{cls.name} options"))

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> "GeneratorBaseline":
        """The model of a parsed ``mtl-jax fit`` command line."""
        return cls(**cls.generator_options(args))


@register
@dataclasses.dataclass(frozen=True)
class SequencePooled(GeneratorBaseline):
    """One generator fitted to every training sequence, whatever its task.

    Parameters: one generator's parameter NamedTuple without a topic axis (e.g.
    :class:`.generators.MarkovParams` with ``log_init [V]``, ``log_trans [V, W]``).
    Every row, of any task, is scored under it. Settings: :class:`GeneratorBaseline`.
    """

    name: ClassVar[str] = "sequence-pooled"

    def num_parameters(self, design: SequenceData) -> int:
        """The generator's free parameters."""
        return self.generator_for(design).num_parameters

    def init(self, key: PRNGKeyArray, design: SequenceData):
        """A random generator (the generator's flat-Dirichlet start), without a topic axis."""
        return jax.tree_util.tree_map(lambda leaf: leaf[0], self.init_generators(key, design, 1))

    def em_step(self, params, design: SequenceData):
        r"""One MAP EM step with weights :math:`w_n = c_n` (:func:`weighted_em_step`)."""
        return weighted_em_step(self.generator_for(design), params, self.observed(design), design.lengths,
                                design.counts)

    def population(self, params):
        """The whole generator."""
        return params

    def row_generators(self, params, task: Int[Array, " S"]):
        """The generator broadcast to every row ``[S, ...]``."""
        return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, task.shape + leaf.shape), params)

    def params_like(self, labels: dict):
        """Zeros of one generator for the labels' alphabet."""
        return jax.tree_util.tree_map(lambda leaf: leaf[0], self.zero_generators(labels, 1))

    def named_parameters(self, params, labels: dict, leading: int = 0) -> dict[str, Any]:
        """Every generator entry, e.g. ``trans[a->b]``, ``init[a]`` (``log_`` fields exponentiated)."""
        stacked = jax.tree_util.tree_map(lambda leaf: jnp.expand_dims(jnp.asarray(leaf), leading), params)
        return self.generator_parameters(stacked, labels, [""], leading)

    def report(self, params, labels: dict) -> dict[str, Any]:
        """``generator``: its fields as probabilities (nested lists)."""
        return {"generator": {field: value.tolist() for field, value in readable_fields(params).items()}}


class PerTaskParams(NamedTuple):
    """Attributes:
    tasks: one generator per training task, leaves with a leading task axis ``[T, ...]``.
    pooled: the generator fitted to every row (no task axis), answering unseen tasks.
    """

    tasks: Any
    pooled: Any


@register
@dataclasses.dataclass(frozen=True)
class SequencePerTask(GeneratorBaseline):
    """One generator per training task, fitted independently (``vmap`` over tasks).

    Rows of training task ``t`` are scored under :math:`P_t`; rows of tasks unseen in
    training under the pooled generator fitted alongside to every row (see the module
    docstring). EM restarts (``n_init``) restart every task together and keep the
    restart with the largest total log-likelihood; for the closed-form M-steps
    (categorical, Markov) every restart reaches the same estimate. Settings:
    :class:`GeneratorBaseline`.
    """

    name: ClassVar[str] = "sequence-per-task"

    def pooled_model(self) -> SequencePooled:
        """The pooled baseline with the same settings (it fits and answers unseen tasks)."""
        return SequencePooled(**dataclasses.asdict(self))

    def num_parameters(self, design: SequenceData) -> int:
        """``T`` generators' free parameters (the pooled generator does not enter the training likelihood)."""
        return design.num_tasks * self.generator_for(design).num_parameters

    def init(self, key: PRNGKeyArray, design: SequenceData) -> PerTaskParams:
        """Independent random generators (one draw of ``T + 1``) for the ``T`` training tasks and the pooled one."""
        generators = self.init_generators(key, design, design.num_tasks + 1)
        return PerTaskParams(jax.tree_util.tree_map(lambda leaf: leaf[:-1], generators),
                             jax.tree_util.tree_map(lambda leaf: leaf[-1], generators))

    def em_step(self, params: PerTaskParams, design: SequenceData):
        r"""One MAP EM step of every task's generator (weights :math:`c_n [t_n = t]`) and of the pooled one.

        The objective is the sum of the ``T + 1`` generators' objectives
        (:func:`weighted_em_step`), each of which the step never lowers.
        """
        num_tasks = jax.tree_util.tree_leaves(params.tasks)[0].shape[0]
        weights = design.counts * (design.task == jnp.arange(num_tasks)[:, None])  # [T, S]
        one_task = functools.partial(weighted_em_step, self.generator_for(design))
        tasks, objectives = jax.vmap(one_task, in_axes=(0, None, None, 0))(
            params.tasks, self.observed(design), design.lengths, weights)
        pooled, objective = self.pooled_model().em_step(params.pooled, design)
        return PerTaskParams(tasks, pooled), jnp.sum(objectives) + objective

    def population(self, params: PerTaskParams) -> PerTaskParams:
        """Every generator: the task generators are free parameters (nothing is integrated out)."""
        return params

    def row_generators(self, params: PerTaskParams, task: Int[Array, " S"]):
        """Each row's generator ``[S, ...]``: its task's for ``task < T``, the pooled one for unseen tasks."""
        num_tasks = jax.tree_util.tree_leaves(params.tasks)[0].shape[0]
        seen = task < num_tasks
        index = jnp.where(seen, task, 0)

        def pick(per_task, pooled):
            return jnp.where(seen.reshape(seen.shape + (1,) * pooled.ndim), per_task[index], pooled)

        return jax.tree_util.tree_map(pick, params.tasks, params.pooled)

    def params_like(self, labels: dict) -> PerTaskParams:
        """Zeros of ``T`` generators (the labels' task names) and of the pooled one."""
        return PerTaskParams(self.zero_generators(labels, len(labels["task_names"])),
                             self.pooled_model().params_like(labels))

    def named_parameters(self, params: PerTaskParams, labels: dict, leading: int = 0) -> dict[str, Any]:
        """Every entry of every generator: ``task A trans[a->b]`` per training task, then ``pooled trans[a->b]``."""
        tasks = self.generator_parameters(params.tasks, labels, [f"task {name} " for name in labels["task_names"]],
                                          leading)
        pooled = self.pooled_model().named_parameters(params.pooled, labels, leading)
        return {**tasks, **{f"pooled {name}": value for name, value in pooled.items()}}

    def report(self, params: PerTaskParams, labels: dict) -> dict[str, Any]:
        """``generators``: each training task's fields as probabilities (nested lists); ``pooled``: the pooled one's."""
        fields = readable_fields(params.tasks)
        return {
            "generators": {name: {field: value[t].tolist() for field, value in fields.items()}
                           for t, name in enumerate(labels["task_names"])},
            "pooled": self.pooled_model().report(params.pooled, labels)["generator"],
        }
