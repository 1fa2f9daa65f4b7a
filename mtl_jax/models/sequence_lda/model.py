r"""Sequential LDA on the model protocol: tasks are mixtures of shared sequence generators.

Task :math:`t` draws topic proportions :math:`\theta_t \sim \mathrm{Dir}(\alpha)`; each of
its sequences draws a topic :math:`z \sim \mathrm{Cat}(\theta_t)` and then the sequence
from that topic's generator :math:`P_z` (:mod:`.generators`). Fitted by variational EM
(:mod:`.vem`); the parameters keep the per-task variational Dirichlet parameters
:math:`\gamma_t`, so known tasks are predicted with :math:`E_q[\theta_t]` and unseen tasks
with the prior mean :math:`\alpha / \sum_k \alpha_k`. With discrete generators the model
is also a NumPyro program (:meth:`SequenceLDA.numpyro_model`) for the generic SVI and NUTS
backends.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, PRNGKeyArray
from scipy.optimize import linear_sum_assignment

from mtl_jax.data.sequences import SequenceData
from mtl_jax.data.tabular import DataError
from mtl_jax.models.protocol import register
from mtl_jax.models.sequence_lda import prediction, vem
from mtl_jax.models.sequence_lda.generators import (
    GENERATORS,
    HMM,
    Categorical,
    CategoricalParams,
    GaussianHMM,
    HMMParams,
    Markov,
    MarkovParams,
)

ALPHA_MODES = ("symmetric", "asymmetric")
STATE_GENERATORS = ("hmm", "gaussian-hmm")
SIMPLEX_TOPICS = {"categorical": CategoricalParams, "markov": MarkovParams, "hmm": HMMParams}
"""Parameter types of the discrete generators, whose fields are all log-probability rows
(simplexes along the last axis); these generators have the ``svi`` and ``nuts`` backends."""


class SequenceLDAParams(NamedTuple):
    """Attributes:
    topics: the generator's parameters with a leading topic axis ``[K, ...]``.
    log_alpha: log Dirichlet concentration of the topic proportions ``[K]``.
    gamma: per-task variational Dirichlet parameters ``[T, K]`` (training tasks).
    """

    topics: Any
    log_alpha: Float[Array, " K"]
    gamma: Float[Array, "T K"]


@register
@dataclasses.dataclass(frozen=True)
class SequenceLDA:
    """Sequential LDA with ``num_topics`` generator topics.

    Attributes:
        num_topics: ``K >= 1``.
        generator: a name of :data:`GENERATORS` (``categorical``, ``markov``, ``hmm``,
            ``gaussian-hmm``); the number of symbols is the data's alphabet size.
        num_states: hidden states of the ``hmm`` / ``gaussian-hmm`` topics (required there).
        halting: whether Markov/HMM topics model the end of a sequence.
        pseudo_count: the topics' Dirichlet (MAP) pseudo-count.
        alpha: ``"symmetric"`` (one concentration) or ``"asymmetric"`` (one per topic).
        inner_iterations: E-step rounds of the ``phi`` / ``gamma`` updates per EM step.
        task_column: the CSV column of task labels (``None``: the model reads no frames).
        sequence_column: the CSV column of sequences (strings split by ``tokens``).
        tokens: ``"chars"`` (one symbol per character) or ``"whitespace"``.
    """

    num_topics: int
    generator: str = "markov"
    num_states: int | None = None
    halting: bool = True
    pseudo_count: float = 0.01
    alpha: str = "symmetric"
    inner_iterations: int = 20
    task_column: str | None = None
    sequence_column: str | None = None
    tokens: str = "chars"

    name: ClassVar[str] = "sequence-lda"

    def __post_init__(self):
        if self.num_topics < 1:
            raise ValueError(f"num_topics must be at least 1, got {self.num_topics}")
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; choose one of {sorted(GENERATORS)}")
        if self.generator in STATE_GENERATORS and (self.num_states is None or self.num_states < 1):
            raise ValueError(f"generator {self.generator!r} needs num_states >= 1, got {self.num_states}")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {self.alpha!r}")
        if self.inner_iterations < 1:
            raise ValueError(f"inner_iterations must be at least 1, got {self.inner_iterations}")
        if self.pseudo_count < 0:
            raise ValueError(f"pseudo_count must be >= 0, got {self.pseudo_count}")

    @property
    def methods(self) -> frozenset:
        """``em`` for every generator; ``svi`` and ``nuts`` too for the discrete ones (:data:`SIMPLEX_TOPICS`)."""
        return frozenset({"em", "svi", "nuts"} if self.generator in SIMPLEX_TOPICS else {"em"})

    # ------------------------------------------------------------ generator
    def make_generator(self, alphabet):
        """The topics' generator for ``alphabet`` (``None`` for real-valued data)."""
        a, halting = self.pseudo_count, self.halting
        observations = GENERATORS[self.generator].observations
        if (alphabet is None) != (observations == "values"):
            kind = "real-valued" if alphabet is None else "discrete (tokens)"
            raise ValueError(f"generator {self.generator!r} reads {observations}, but the data are {kind}")
        if self.generator == "gaussian-hmm":
            return GaussianHMM(self.num_states, halting, a)
        V = len(alphabet)
        if self.generator == "categorical":
            return Categorical(V, a)
        if self.generator == "markov":
            return Markov(V, halting, a)
        return HMM(V, self.num_states, halting, a)

    def generator_for(self, design: SequenceData):
        """The generator for a design (its static alphabet)."""
        return self.make_generator(design.alphabet)

    def _log_lik(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, "S K"]:
        generator = self.generator_for(design)
        return vem.topic_log_likelihoods(generator, params.topics, getattr(design, generator.observations),
                                         design.lengths)

    # --------------------------------------------------------------- data
    def design(self, data) -> SequenceData:
        """A :class:`SequenceData` (checked against the generator) without its ``source_row``.

        Dropping ``source_row`` (one entry per input row, not bucketed) keeps compiled
        code dependent on the bucketed shapes only.

        Raises:
            ValueError: for other data, or data of the wrong kind for the generator.
        """
        if not isinstance(data, SequenceData):
            raise ValueError(f"sequence-lda needs a SequenceData, got {type(data).__name__}")
        self.make_generator(data.alphabet)
        return dataclasses.replace(data, source_row=None)

    def labels(self, data) -> dict[str, Any]:
        """``task_names`` and ``alphabet`` (``None`` for real-valued data)."""
        return {"task_names": list(data.task_names),
                "alphabet": None if data.alphabet is None else list(data.alphabet)}

    def num_observations(self, design: SequenceData) -> int:
        """The number of sequences (multiplicities included)."""
        return int(round(float(jnp.sum(design.counts))))

    def num_parameters(self, design: SequenceData) -> int:
        """``K`` topics' free parameters plus ``alpha`` (1 symmetric, ``K`` asymmetric)."""
        per_topic = self.generator_for(design).num_parameters
        return self.num_topics * per_topic + (1 if self.alpha == "symmetric" else self.num_topics)

    # --------------------------------------------------------- parameters
    def init(self, key: PRNGKeyArray, design: SequenceData) -> SequenceLDAParams:
        r"""Random topics, :math:`\alpha = 1`, :math:`\gamma_{tk} = 1 + n_t / K` (``n_t`` sequences of task ``t``)."""
        K, T = self.num_topics, design.num_tasks
        topics = self.generator_for(design).init(key, K)
        dtype = design.counts.dtype
        sizes = jax.ops.segment_sum(design.counts, design.task, num_segments=T)
        gamma = 1.0 + jnp.broadcast_to(sizes[:, None] / K, (T, K))
        return SequenceLDAParams(topics, jnp.zeros(K, dtype), gamma.astype(dtype))

    def em_step(self, params: SequenceLDAParams, design: SequenceData):
        """One variational EM step (:func:`mtl_jax.models.sequence_lda.vem.em_step`)."""
        return vem.em_step(self, params, design)

    def population(self, params: SequenceLDAParams):
        """Topics and ``log_alpha`` (not the per-task ``gamma``)."""
        return (params.topics, params.log_alpha)

    def params_like(self, labels: dict) -> SequenceLDAParams:
        """Zeros of the fitted structure (topics from the labels' alphabet, ``gamma [T, K]``)."""
        alphabet = labels.get("alphabet")
        topics = self.make_generator(alphabet).init(jax.random.key(0), self.num_topics)
        K, T = self.num_topics, len(labels["task_names"])
        return SequenceLDAParams(jax.tree_util.tree_map(jnp.zeros_like, topics), jnp.zeros(K), jnp.zeros((T, K)))

    # -------------------------------------------------------------- scores
    def score(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, ""]:
        r"""The ELBO at ``params``' topics and :math:`\alpha`, after an E-step from the stored :math:`\gamma`.

        ``inner_iterations`` rounds of the coordinate updates start from ``params.gamma``,
        so the score is at least the ELBO at the stored ``gamma`` with its optimal ``phi``
        and at most the log marginal likelihood. It excludes the topics' log prior (which
        the EM objective adds). Training tasks only (task ids ``< T``).
        """
        log_lik = self._log_lik(params, design)
        log_phi, gamma = vem.e_step(log_lik, design.task, design.counts, params.log_alpha, params.gamma,
                                    self.inner_iterations)
        return vem.elbo_terms(log_lik, design.task, design.counts, params.log_alpha, gamma, log_phi).total

    def topic_log_weights(self, params: SequenceLDAParams, task) -> Float[Array, "S K"]:
        r"""Log mixture weights per row: :math:`\log(\gamma_t / \sum\gamma_t)`, prior mean for ``t >= T``."""
        num_tasks = params.gamma.shape[0]
        known = jnp.log(params.gamma) - jnp.log(jnp.sum(params.gamma, axis=-1, keepdims=True))
        prior = params.log_alpha - logsumexp(params.log_alpha)
        seen = task < num_tasks
        return jnp.where(seen[:, None], known[jnp.where(seen, task, 0)], prior)

    def log_predictive(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, " S"]:
        r""":math:`\log \sum_k \bar\theta_{t k} P_k(x_n)` per row, :math:`\bar\theta_t = E_q[\theta_t]`.

        Known tasks: :math:`\gamma_t / \sum_k \gamma_{tk}`; unseen tasks (id ``>= T``):
        the prior mean :math:`\alpha / \sum_k \alpha_k`. Padding rows score 0.
        """
        mixture = logsumexp(self._log_lik(params, design) + self.topic_log_weights(params, design.task), axis=-1)
        return jnp.where(design.lengths > 0, mixture, 0.0)

    def predict(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, " S"]:
        """The per-sequence log-probability under its task's mixture (as :meth:`log_predictive`)."""
        return self.log_predictive(params, design)

    def next_symbol_log_probs(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, "S L+1 V+1"]:
        r"""Entry ``[s, j]``: the next-outcome log-distribution (``V`` symbols, HALT) after :math:`x_{s,1:j}`.

        The task's mixture with the topic weights filtered on the prefix,
        :math:`w_k \propto \bar\theta_{tk} P_k(x_{1:j})` with :math:`\bar\theta_t` as in
        :meth:`log_predictive` (:func:`.prediction.next_outcome_log_probs`). Rows
        ``j > lengths[s]`` are padding.

        Raises:
            ValueError: for real-valued data (no symbols to predict).
        """
        if design.alphabet is None:
            raise ValueError(f"generator {self.generator!r} models real values; next-symbol prediction needs tokens")
        return prediction.next_outcome_log_probs(self.generator_for(design), params.topics,
                                                 self.topic_log_weights(params, design.task),
                                                 design.tokens, design.lengths)

    def score_columns(self, params: SequenceLDAParams, design: SequenceData) -> dict[str, Array]:
        """Per row: ``next_correct`` / ``next_total``, next outcomes the predictive argmax gets right.

        Over the prefixes ``j = 0 .. length`` (``length + 1`` outcomes, the last one HALT)
        for Markov/HMM topics with halting, ``j = 0 .. length - 1`` for topics without a
        HALT outcome (categorical, ``halting=False``); see
        :func:`.prediction.next_outcome_hits`. Real-valued data: no columns.
        """
        if design.alphabet is None:
            return {}
        halting = self.halting and self.generator != "categorical"
        correct, total = prediction.next_outcome_hits(self.next_symbol_log_probs(params, design),
                                                      design.tokens, design.lengths, halting)
        return {"next_correct": correct, "next_total": total}

    # ------------------------------------------------------------ reading
    def _axis_labels(self, labels: dict) -> dict[str, tuple[list[str], ...]]:
        """Index labels of each axis of one topic's fields (symbols, states, HALT/END)."""
        symbols = [str(s) for s in labels.get("alphabet") or []]
        states = [f"s{i + 1}" for i in range(self.num_states or 0)]
        end = ["HALT"] if self.halting else []
        if self.generator == "categorical":
            return {"log_beta": (symbols,)}
        if self.generator == "markov":
            return {"log_init": (symbols,), "log_trans": (symbols, symbols + end)}
        moves = {"log_init": (states,), "log_trans": (states, states + (["END"] if self.halting else []))}
        if self.generator == "hmm":
            return {**moves, "log_emit": (states, symbols)}
        return {**moves, "mean": (states,), "log_var": (states,)}

    def named_parameters(self, params: SequenceLDAParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """``alpha[topic k]`` and every topic parameter, e.g. ``topic1 trans[a->b]``.

        ``log_`` fields are reported exponentiated under their name without ``log_``
        (probabilities, variances); two-axis fields are named ``[row->column]``.
        """
        lead = (slice(None),) * leading
        alpha = np.exp(np.asarray(params.log_alpha))
        out = {f"alpha[topic{k + 1}]": alpha[lead + (k,)] for k in range(self.num_topics)}
        for field, axes in self._axis_labels(labels).items():
            values = np.asarray(getattr(params.topics, field))
            shown = field.removeprefix("log_")
            values = np.exp(values) if field.startswith("log_") else values
            for k in range(self.num_topics):
                for index in np.ndindex(*(len(axis) for axis in axes)):
                    name = "->".join(axis[i] for axis, i in zip(axes, index))
                    out[f"topic{k + 1} {shown}[{name}]"] = values[lead + (k, *index)]
        return out

    def report(self, params: SequenceLDAParams, labels: dict) -> dict[str, Any]:
        """``alpha``, the topics (probabilities as nested lists) and per-task topic proportions."""
        gamma = np.asarray(params.gamma)
        proportions = gamma / gamma.sum(axis=-1, keepdims=True)
        topics = {field.removeprefix("log_"): (np.exp(np.asarray(value)) if field.startswith("log_")
                                               else np.asarray(value)).tolist()
                  for field, value in params.topics._asdict().items()}
        return {
            "alpha": np.exp(np.asarray(params.log_alpha)).tolist(),
            "topics": topics,
            "topic_proportions": {name: row.tolist() for name, row in zip(labels["task_names"], proportions)},
        }

    def align(self, params: SequenceLDAParams, reference: SequenceLDAParams) -> SequenceLDAParams:
        """Topics permuted to best match ``reference`` (Hungarian matching, squared distance).

        Topics are compared by their parameters (``log_`` fields exponentiated); ``alpha``
        and the columns of ``gamma`` follow the permutation. Host (numpy) function.
        """

        def features(topics):
            return np.concatenate([
                (np.exp(np.asarray(v)) if f.startswith("log_") else np.asarray(v)).reshape(self.num_topics, -1)
                for f, v in topics._asdict().items()], axis=1)

        mine, theirs = features(params.topics), features(reference.topics)
        cost = ((theirs[:, None, :] - mine[None, :, :]) ** 2).sum(-1)
        _, order = linear_sum_assignment(cost)
        return SequenceLDAParams(
            jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[order], params.topics),
            np.asarray(params.log_alpha)[order],
            np.asarray(params.gamma)[:, order],
        )

    # ------------------------------------------------------------- NumPyro
    def _topic_sites(self) -> dict[str, str]:
        """Sampled site of each topic field: ``log_trans -> "trans"`` (probabilities).

        Raises:
            ValueError: for the Gaussian HMM (SVI/NUTS are for the discrete generators only).
        """
        if self.generator not in SIMPLEX_TOPICS:
            raise ValueError(f"SVI/NUTS are for the discrete generators {sorted(SIMPLEX_TOPICS)} only, "
                             f"not {self.generator!r}; fit it with method='em'")
        return {field: field.removeprefix("log_") for field in SIMPLEX_TOPICS[self.generator]._fields}

    def numpyro_model(self, design: SequenceData) -> None:
        r"""The model as a NumPyro program, each sequence's topic summed out.

        With ``a = pseudo_count``, ``T`` tasks, ``K`` topics and row ``n`` of task
        :math:`t_n`, multiplicity :math:`c_n`:

        .. math::

            \text{every probability row } p \text{ of every topic} \sim \mathrm{Dir}(1 + a),\quad
            \log\alpha_k \sim \mathcal N(0, 1),\quad
            \theta_t \sim \mathrm{Dir}(\alpha),

            \log p(x \mid \theta, P) = \sum_n c_n \log \sum_k \theta_{t_n k} P_k(x_n).

        The row priors are those whose MAP the EM's M-step finds (the generators'
        ``log_prior``). Symmetric ``alpha``: one shared :math:`\log\alpha \sim \mathcal N(0, 1)`
        (a scalar site). Padding rows (length 0) contribute 0.

        Sites: one simplex-valued site per topic field named without ``log_``
        (``init [K, V]``, ``trans [K, V, W]``, ``beta [K, V]``, ``emit [K, S, V]``),
        ``log_alpha`` (``[]`` symmetric, ``[K]`` asymmetric), ``theta [T, K]`` under
        ``plate("tasks", T)``, the factor ``sequences``, and the deterministic
        ``gamma [T, K]`` :math:`= \theta_t (\sum_k \alpha_k + n_t)` (``n_t`` the task's
        sequences; see :meth:`from_sites`).

        Raises:
            ValueError: for the Gaussian HMM.
        """
        sites = self._topic_sites()
        generator = self.generator_for(design)
        K, T, dtype = self.num_topics, design.num_tasks, design.counts.dtype
        shapes = jax.eval_shape(lambda key: generator.init(key, K), jax.random.key(0))
        rows = 1.0 + self.pseudo_count
        topics = SIMPLEX_TOPICS[self.generator](**{
            field: jnp.log(numpyro.sample(site, dist.Dirichlet(jnp.full(getattr(shapes, field).shape, rows, dtype))
                                          .to_event(getattr(shapes, field).ndim - 1)))
            for field, site in sites.items()})
        alpha_shape = () if self.alpha == "symmetric" else (K,)
        log_alpha = numpyro.sample("log_alpha", dist.Normal(jnp.zeros(alpha_shape, dtype), 1.0).to_event(len(alpha_shape)))
        alpha = jnp.exp(jnp.broadcast_to(log_alpha, (K,)))
        with numpyro.plate("tasks", T):
            theta = numpyro.sample("theta", dist.Dirichlet(alpha))
        log_lik = vem.topic_log_likelihoods(generator, topics, design.tokens, design.lengths)
        mixture = logsumexp(jnp.log(theta)[design.task] + log_lik, axis=-1)
        numpyro.factor("sequences", jnp.sum(jnp.where(design.lengths > 0, design.counts * mixture, 0.0)))
        sizes = jax.ops.segment_sum(design.counts, design.task, num_segments=T)
        numpyro.deterministic("gamma", theta * (jnp.sum(alpha) + sizes)[:, None])

    def site_values(self, params: SequenceLDAParams) -> dict[str, Array]:
        r"""The sampled sites of :meth:`numpyro_model` at ``params``: probabilities,
        ``log_alpha`` (its first entry when symmetric) and :math:`\theta_t = \gamma_t / \sum_k \gamma_{tk}`."""
        values = {site: jnp.exp(getattr(params.topics, field)) for field, site in self._topic_sites().items()}
        values["log_alpha"] = params.log_alpha[0] if self.alpha == "symmetric" else params.log_alpha
        values["theta"] = params.gamma / jnp.sum(params.gamma, axis=-1, keepdims=True)
        return values

    def param_sites(self) -> tuple[str, ...]:
        """The program's sites that :meth:`from_sites` reads: the topic sites, ``log_alpha``, ``gamma``."""
        return (*self._topic_sites().values(), "log_alpha", "gamma")

    def from_sites(self, samples: dict[str, Array]) -> SequenceLDAParams:
        r"""Parameters from samples of :meth:`param_sites` (any leading axes).

        ``gamma`` of a draw is :math:`\theta_t (\sum_k \alpha_k + n_t)`: not a variational
        parameter but scaled so that :math:`\gamma_t / \sum_k \gamma_{tk}` is the draw's
        :math:`\theta_t` (what known tasks are predicted with) while keeping the size of the
        EM's :math:`\gamma` (prior plus counts, the start of :meth:`score`'s E-step).
        """
        topics = SIMPLEX_TOPICS[self.generator](**{
            field: jnp.log(samples[site]) for field, site in self._topic_sites().items()})
        log_alpha = jnp.asarray(samples["log_alpha"])
        if self.alpha == "symmetric":
            log_alpha = jnp.broadcast_to(log_alpha[..., None], log_alpha.shape + (self.num_topics,))
        return SequenceLDAParams(topics, log_alpha, jnp.asarray(samples["gamma"]))

    def simulate(self, key: PRNGKeyArray, params: SequenceLDAParams, design: SequenceData):
        r"""Draws the latent variables of the design's tasks and rows.

        :math:`\theta_t \sim \mathrm{Dir}(\alpha)` for every task of the design and
        :math:`z_n \sim \mathrm{Cat}(\theta_{t_n})` for every row.

        Returns:
            ``(theta [T_design, K], z [S])``.
        """
        k_theta, k_z = jax.random.split(key)
        theta = jax.random.dirichlet(k_theta, jnp.exp(params.log_alpha), (design.num_tasks,))
        z = jax.random.categorical(k_z, jnp.log(theta)[design.task])
        return theta, z

    # ------------------------------------------------------------------ CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model sequence-lda``."""
        group = parser.add_argument_group("sequence-lda options")
        group.add_argument("--topics", type=int, metavar="K", default=None, help="number of topics (required)")
        group.add_argument("--generator", choices=sorted(GENERATORS), default="markov",
                           help="topic generator (default: markov)")
        group.add_argument("--states", type=int, metavar="S", default=None, help="HMM states (hmm, gaussian-hmm)")
        group.add_argument("--no-halting", dest="halting", action="store_false",
                           help="score sequences by their prefix probability (no end-of-sequence outcome)")
        group.add_argument("--alpha", choices=ALPHA_MODES, default="symmetric",
                           help="Dirichlet concentration of the topic proportions (default: symmetric)")
        group.add_argument("--inner-iterations", type=int, metavar="N", default=20,
                           help="E-step rounds per EM step (default: 20)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> "SequenceLDA":
        """The model of a parsed ``mtl-jax fit`` command line."""
        if args.topics is None:
            raise ValueError("--topics is required for --model sequence-lda")
        return cls(num_topics=args.topics, generator=args.generator, num_states=args.states,
                   halting=args.halting, alpha=args.alpha, inner_iterations=args.inner_iterations,
                   task_column=args.task, sequence_column=args.sequence, tokens=args.tokens)

    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options of ``mtl-jax fit --model sequence-lda``: one sequence (a string) per CSV row."""
        group = parser.add_argument_group("data options (sequence-lda)")
        group.add_argument("--task", required=True, help="column holding the task labels")
        group.add_argument("--sequence", required=True, metavar="COL", help="column holding the sequences")
        group.add_argument("--alphabet", type=Path, metavar="FILE", default=None,
                           help="symbols in id order, one per line (default: the sorted symbols of the data)")
        group.add_argument("--tokens", choices=("chars", "whitespace"), default="chars",
                           help="how a sequence splits into symbols (default: chars)")

    def data_from_frame(self, frame, args: argparse.Namespace | None = None, *, labels: dict | None = None,
                        schema=None, require_response: bool = False) -> SequenceData:
        """Encodes a frame of sequences: training data from ``args``, new data from a fit's ``labels``.

        Training (``args`` given): the alphabet of ``--alphabet`` or the data's sorted
        symbols. New data (``labels`` given): the fit's alphabet and task ids; tasks unseen
        in training get ids ``>= K`` (the prior mean answers them). The result's
        ``source_row`` maps each frame row to its stored (deduplicated) row. An encoded
        :class:`SequenceData` passes through unchanged. ``schema`` and
        ``require_response`` are unused (a sequence is its own response).

        Raises:
            DataError: for a missing column or value, a sequence column read as numbers,
                an empty sequence or a symbol outside the alphabet (naming the row).
            ValueError: for a model without ``task_column`` / ``sequence_column``.
        """
        if isinstance(frame, SequenceData):
            return frame
        if self.task_column is None or self.sequence_column is None:
            raise ValueError("this sequence-lda model has no task_column/sequence_column to read a frame with")
        column = frame.get(self.sequence_column)
        if column is not None and not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
            raise DataError(f"column {self.sequence_column!r} holds numbers ({column.dtype}), not sequence strings")
        options = dict(task=self.task_column, sequence=self.sequence_column, tokens=self.tokens)
        if labels is None:
            return SequenceData.from_frame(frame, alphabet=args.alphabet, **options)
        return SequenceData.from_frame(frame, alphabet=labels["alphabet"], task_names=labels["task_names"],
                                       allow_empty_tasks=True, **options)
