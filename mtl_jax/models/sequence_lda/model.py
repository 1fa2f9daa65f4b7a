r"""Sequential LDA on the model protocol: tasks are mixtures of shared sequence generators.

Task :math:`t` draws topic proportions :math:`\theta_t \sim \mathrm{Dir}(\alpha)`; each of
its sequences draws a topic :math:`z \sim \mathrm{Cat}(\theta_t)` and then the sequence
from that topic's generator :math:`P_z` (:mod:`.generators`). Fitted by variational EM
(:mod:`.vem`); the parameters keep the per-task variational Dirichlet parameters
:math:`\gamma_t`, so known tasks are predicted with :math:`E_q[\theta_t]` and unseen tasks
with the prior mean :math:`\alpha / \sum_k \alpha_k`. The model is also a NumPyro
program (:meth:`SequenceLDA.numpyro_model`) for the generic SVI and NUTS backends.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.sequences import SequenceData
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.models.protocol import register
from mtl_jax.models.sequence_lda import prediction, vem
from mtl_jax.models.sequence_lda.base import SequenceModel, readable_fields
from mtl_jax.models.sequence_lda.generators import GENERATORS
from mtl_jax.models.sequence_lda.generators.common import from_sites, to_sites

ALPHA_MODES = ("symmetric", "asymmetric")


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
class SequenceLDA(SequenceModel):
    """Sequential LDA with ``num_topics`` generator topics.

    Data, labels, generator building, parameter names, ``score_columns`` and the data
    options of the command line come from :class:`.base.SequenceModel`.

    Attributes:
        num_topics: ``K >= 1``.
        generator: a name of :data:`.generators.GENERATORS` (``categorical``, ``markov``, ``hmm``,
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
        self.check_generator()
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {self.alpha!r}")
        if self.inner_iterations < 1:
            raise ValueError(f"inner_iterations must be at least 1, got {self.inner_iterations}")

    methods: ClassVar[frozenset] = frozenset({"em", "svi", "nuts"})

    def _log_lik(self, params: SequenceLDAParams, design: SequenceData) -> Float[Array, "S K"]:
        return vem.topic_log_likelihoods(self.generator_for(design), params.topics, self.observed(design),
                                         design.lengths)

    def num_parameters(self, design: SequenceData) -> int:
        """``K`` topics' free parameters plus ``alpha`` (1 symmetric, ``K`` asymmetric)."""
        per_topic = self.generator_for(design).num_parameters
        return self.num_topics * per_topic + (1 if self.alpha == "symmetric" else self.num_topics)

    # --------------------------------------------------------- parameters
    def init(self, key: PRNGKeyArray, design: SequenceData) -> SequenceLDAParams:
        r"""Random topics, :math:`\alpha = 1`, :math:`\gamma_{tk} = 1 + n_t / K` (``n_t`` sequences of task ``t``)."""
        K, T = self.num_topics, design.num_tasks
        topics = self.init_generators(key, design, K)
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

    def valid(self, params: SequenceLDAParams):
        r"""Whether ``params`` can start an EM step (EM's acceleration rejects others): every
        :math:`\gamma_{tk} > 0`. (Topics extrapolated in log space need not be normalised:
        the step's M-step normalises them, and only its output is ever kept.)"""
        return jnp.all(params.gamma > 0)

    def params_like(self, labels: dict) -> SequenceLDAParams:
        """Zeros of the fitted structure (topics from the labels' alphabet, ``gamma [T, K]``)."""
        K, T = self.num_topics, len(labels["task_names"])
        return SequenceLDAParams(self.zero_generators(labels, K), jnp.zeros(K), jnp.zeros((T, K)))

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

    @cached_program(static_argnames="self")
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
        self.require_tokens(design)
        return prediction.next_outcome_log_probs(self.generator_for(design), params.topics,
                                                 self.topic_log_weights(params, design.task),
                                                 design.tokens, design.lengths)

    # ------------------------------------------------------------ reading
    def named_parameters(self, params: SequenceLDAParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """``alpha[topic k]`` and every topic parameter, e.g. ``topic1 trans[a->b]``.

        ``log_`` fields are reported exponentiated under their name without ``log_``
        (probabilities, variances); two-axis fields are named ``[row->column]``.
        """
        lead = (slice(None),) * leading
        alpha = np.exp(np.asarray(params.log_alpha))
        topics = [f"topic{k + 1}" for k in range(self.num_topics)]
        return {**{f"alpha[{topic}]": alpha[lead + (k,)] for k, topic in enumerate(topics)},
                **self.generator_parameters(params.topics, labels, [f"{topic} " for topic in topics], leading)}

    def report(self, params: SequenceLDAParams, labels: dict) -> dict[str, Any]:
        """``alpha``, the topics (probabilities as nested lists) and per-task topic proportions."""
        gamma = np.asarray(params.gamma)
        proportions = gamma / gamma.sum(axis=-1, keepdims=True)
        return {
            "alpha": np.exp(np.asarray(params.log_alpha)).tolist(),
            "topics": {field: value.tolist() for field, value in readable_fields(params.topics).items()},
            "topic_proportions": {name: row.tolist() for name, row in zip(labels["task_names"], proportions)},
        }

    def align(self, params: SequenceLDAParams, reference: SequenceLDAParams) -> SequenceLDAParams:
        """Topics permuted to best match ``reference`` (Hungarian matching, squared distance).

        Topics are compared by their parameters (``log_`` fields exponentiated); ``alpha``
        and the columns of ``gamma`` follow the permutation. Host (numpy) function.
        """
        from scipy.optimize import linear_sum_assignment


        def features(topics):
            return np.concatenate([value.reshape(self.num_topics, -1) for value in readable_fields(topics).values()],
                                  axis=1)

        mine, theirs = features(params.topics), features(reference.topics)
        cost = ((theirs[:, None, :] - mine[None, :, :]) ** 2).sum(-1)
        _, order = linear_sum_assignment(cost)
        return SequenceLDAParams(
            jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[order], params.topics),
            np.asarray(params.log_alpha)[order],
            np.asarray(params.gamma)[:, order],
        )

    # ------------------------------------------------------------- NumPyro
    def _topic_sites(self) -> tuple[str, ...]:
        """The topic fields' sites, named without ``log_`` (``log_trans -> "trans"``, ``log_var -> "var"``)."""
        return tuple(field.removeprefix("log_") for field in GENERATORS[self.generator].params_type._fields)

    def numpyro_model(self, design: SequenceData, centred: bool = False) -> None:
        r"""The model as a NumPyro program, each sequence's topic summed out (``centred`` is
        ignored: the task proportions are Dirichlet, with no location-scale form).

        With ``T`` tasks, ``K`` topics and row ``n`` of task :math:`t_n`, multiplicity
        :math:`c_n`:

        .. math::

            \text{topics} \sim \text{the generator's priors},\quad
            \log\alpha_k \sim \mathcal N(0, 1),\quad
            \theta_t \sim \mathrm{Dir}(\alpha),

            \log p(x \mid \theta, P) = \sum_n c_n \log \sum_k \theta_{t_n k} P_k(x_n).

        The topic priors are the generator's ``field_prior``: every probability row
        ``Dirichlet(1 + a)`` (``a = pseudo_count``), the prior whose MAP the EM's M-step
        finds; the Gaussian HMM's means and variances have the proper priors of
        :mod:`.generators.gaussian_hmm`. Symmetric ``alpha``: one shared
        :math:`\log\alpha \sim \mathcal N(0, 1)` (a scalar site). Padding rows (length 0)
        contribute 0.

        Sites: one site per topic field named without ``log_`` and valued on the natural
        scale (``init [K, V]``, ``trans [K, V, W]``, ``beta [K, V]``, ``emit [K, S, V]``,
        ``mean [K, S]``, ``var [K, S]``), ``log_alpha`` (``[]`` symmetric, ``[K]``
        asymmetric), ``theta [T, K]`` under ``plate("tasks", T)``, the factor ``sequences``,
        and the deterministic ``gamma [T, K]`` :math:`= \theta_t (\sum_k \alpha_k + n_t)`
        (``n_t`` the task's sequences; see :meth:`from_sites`).
        """
        import numpyro
        import numpyro.distributions as dist

        generator = self.generator_for(design)
        K, T, dtype = self.num_topics, design.num_tasks, design.counts.dtype
        topics = generator.sample_topics(K, dtype)
        alpha_shape = () if self.alpha == "symmetric" else (K,)
        log_alpha = numpyro.sample("log_alpha", dist.Normal(jnp.zeros(alpha_shape, dtype), 1.0).to_event(len(alpha_shape)))
        alpha = jnp.exp(jnp.broadcast_to(log_alpha, (K,)))
        with numpyro.plate("tasks", T):
            theta = numpyro.sample("theta", dist.Dirichlet(alpha))
        log_lik = vem.topic_log_likelihoods(generator, topics, self.observed(design), design.lengths)
        mixture = logsumexp(jnp.log(theta)[design.task] + log_lik, axis=-1)
        numpyro.factor("sequences", jnp.sum(jnp.where(design.lengths > 0, design.counts * mixture, 0.0)))
        sizes = jax.ops.segment_sum(design.counts, design.task, num_segments=T)
        numpyro.deterministic("gamma", theta * (jnp.sum(alpha) + sizes)[:, None])

    def site_values(self, params: SequenceLDAParams) -> dict[str, Array]:
        r"""The sampled sites of :meth:`numpyro_model` at ``params``: the topics on the natural
        scale, ``log_alpha`` (its first entry when symmetric) and :math:`\theta_t = \gamma_t / \sum_k \gamma_{tk}`."""
        values = to_sites(params.topics)
        values["log_alpha"] = params.log_alpha[0] if self.alpha == "symmetric" else params.log_alpha
        values["theta"] = params.gamma / jnp.sum(params.gamma, axis=-1, keepdims=True)
        return values

    def param_sites(self) -> tuple[str, ...]:
        """The program's sites that :meth:`from_sites` reads: the topic sites, ``log_alpha``, ``gamma``."""
        return (*self._topic_sites(), "log_alpha", "gamma")

    def from_sites(self, samples: dict[str, Array]) -> SequenceLDAParams:
        r"""Parameters from samples of :meth:`param_sites` (any leading axes).

        ``gamma`` of a draw is :math:`\theta_t (\sum_k \alpha_k + n_t)`: not a variational
        parameter but scaled so that :math:`\gamma_t / \sum_k \gamma_{tk}` is the draw's
        :math:`\theta_t` (what known tasks are predicted with) while keeping the size of the
        EM's :math:`\gamma` (prior plus counts, the start of :meth:`score`'s E-step).
        """
        topics = from_sites(GENERATORS[self.generator].params_type, samples)
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
        cls.add_generator_arguments(group)
        group.add_argument("--alpha", choices=ALPHA_MODES, default="symmetric",
                           help="Dirichlet concentration of the topic proportions (default: symmetric)")
        group.add_argument("--inner-iterations", type=int, metavar="N", default=20,
                           help="E-step rounds per EM step (default: 20)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> "SequenceLDA":
        """The model of a parsed ``mtl-jax fit`` command line."""
        if args.topics is None:
            raise ValueError("--topics is required for --model sequence-lda")
        return cls(num_topics=args.topics, alpha=args.alpha, inner_iterations=args.inner_iterations,
                   **cls.generator_options(args))
