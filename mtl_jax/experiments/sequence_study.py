r"""The Sequential LDA paper's synthetic study: how much sharing generators across tasks helps.

Data are drawn from the Sequential LDA generative model itself. Per repeat and per value
of the concentration :math:`\alpha`:

* ``K`` true topics, each a hidden Markov model with ``S`` states over ``V`` symbols with
  halting (the package's :class:`~mtl_jax.models.sequence_lda.generators.HMM`): initial
  distribution :math:`\pi_k \sim \mathrm{Dir}(\mathbf 1_S)`, emissions
  :math:`B_{ks} \sim \mathrm{Dir}(\mathbf 1_V)`, and from each state :math:`s` the END
  probability :math:`h_{ks} \sim U[h_{lo}, h_{hi}]` (``halt_probability``) and the moves
  :math:`A_{ks,1:S} = (1 - h_{ks})\,\mathrm{Dir}(\mathbf 1_S)`;
* ``T_max = max(num_tasks)`` tasks with :math:`\theta_t \sim \mathrm{Dir}(\alpha \mathbf 1_K)`;
  task ``t`` has :math:`n_t \sim U\{n_{lo}, \dots, n_{hi}\}` training sequences
  (``train_sequences``) and ``test_sequences`` test sequences, each drawn by
  :math:`z \sim \mathrm{Cat}(\theta_t)`, :math:`x \sim \mathrm{HMM}_z` (:func:`sample_hmm`).

For every ``T`` of ``num_tasks`` the training data are the sequences of tasks
``0 .. T-1`` (the task sets are nested, so a larger ``T`` only adds tasks), and four
predictors are compared on the test sequences of those same ``T`` tasks:

* ``sequence-lda``: :class:`~mtl_jax.models.SequenceLDA` with ``K`` HMM topics
  (``S`` states, halting, symmetric :math:`\alpha`), fitted by variational EM; a test
  sequence of task ``t`` is scored under the mixture with :math:`E_q[\theta_t]`;
* ``per-task``: :class:`~mtl_jax.models.SequencePerTask`, one ``S``-state HMM per task.
  Each task's HMM is fitted by MAP EM on that task's sequences alone, as a
  :class:`~mtl_jax.models.SequencePooled` fit of the one task (the per-task model's EM
  restricted to one task, which ``tests/test_sequence_baselines.py`` checks is the same
  computation); this keeps each fit at ``n_hi`` rows instead of reading every row with
  weight 0 outside the task, and picks the best restart per task rather than for all
  tasks together. Nested task sets mean one fit per task serves every ``T``; the fitted
  HMMs are then scored as ``SequencePerTask`` parameters;
* ``pooled``: :class:`~mtl_jax.models.SequencePooled`, one ``S``-state HMM for all ``T``
  tasks' sequences;
* ``oracle``: the true generative model. It knows the true topics (all HMM parameters)
  and each task's true :math:`\theta_t` (not just :math:`\alpha`), and scores a test
  sequence :math:`x` of task ``t`` by :math:`\log \sum_k \theta_{tk} P_k(x)`; it is
  evaluated through ``SequenceLDA`` with the true topics and :math:`\gamma_t = \theta_t`
  (:meth:`SequenceLDA.topic_log_weights` normalises :math:`\gamma_t`). It is the best
  predictor in expectation, the ceiling of the other three.

Metrics, per repeat, over all test sequences of the ``T`` training tasks:

* ``loglik``: the mean held-out log-likelihood per sequence, the natural log of the
  whole sequence's probability, halting included (the models' ``log_predictive``);
* ``accuracy``: next-symbol accuracy in %, the fraction of next outcomes (each symbol
  and the final HALT; :math:`\sum_n (L_n + 1)` of them) that the argmax of the model's
  prefix-filtered predictive distribution gets right (``score_columns``:
  :math:`100 \sum_n \mathrm{next\_correct}_n / \sum_n \mathrm{next\_total}_n`).

Reported as mean and standard error over repeats for each :math:`(\alpha, T)`.

Every fitted model of one ``T`` is fitted to all repeats and all :math:`\alpha` values in
one call (:func:`mtl_jax.experiments.table2.fit_replicates`, EM vmapped over the batch
with vmapped restarts). The designs are built directly as
:class:`~mtl_jax.data.SequenceData` with shapes fixed across the batch: ``n_hi * T``
training rows (padding rows have length and count 0) and the maximum length of all
simulated training (or test) sequences (not rounded up to a power of two as
:class:`~mtl_jax.data.SequenceData` buckets do: the forward passes scan every position). Simulation is numpy (seeded by
``(seed, alpha index, repeat)``); the study runs in float32 by default (the HMM forward
pass is normalised at every step, so float32 is accurate here).

The number of topics ``K`` (config ``topics``) is that of both the simulated truth and
the fitted Sequential LDA. The paper text at hand names no value of ``K`` nor the HMM
parameter distributions; the defaults here (``K = 3``, flat Dirichlet rows, END
probability in ``[0.2, 0.3]``) are this study's choice.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, Int

from mtl_jax.data.sequences import SequenceData
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.common import plus_minus, resolve_dtype, stack_trees, summarize
from mtl_jax.experiments.table2 import run_replicates
from mtl_jax.infer.sharding import resolve_devices
from mtl_jax.models.sequence_lda import (
    PerTaskParams,
    SequenceLDA,
    SequenceLDAParams,
    SequencePerTask,
    SequencePooled,
)
from mtl_jax.models.sequence_lda.generators import HMMParams

#: The predictors compared, in report order (the oracle last).
MODELS = ("sequence-lda", "per-task", "pooled", "oracle")

#: The metrics of every predictor (module docstring).
METRICS = ("loglik", "accuracy")

DEFAULT_CONFIG = {
    "experiment": "sequence_study",
    "topics": 3,
    "states": 2,
    "symbols": 8,
    "halt_probability": [0.2, 0.3],
    "alphas": [0.01, 0.1, 1.0],
    "num_tasks": [1, 2, 5, 10, 20, 30],
    "train_sequences": [5, 35],
    "test_sequences": 200,
    "repeats": 10,
    "pseudo_count": 1.0,
    "n_init": 2,
    "max_iter": 150,
    "tol": 1e-6,
    "seed": 0,
    "dtype": "float32",
    "devices": None,
}
"""Settings of the study; :func:`run_sequence_study` fills missing keys from here."""


class SimulatedTasks(NamedTuple):
    """One draw of the study's data (numpy; probabilities in float64).

    Attributes:
        topics: the true topics, :class:`HMMParams` of log-probabilities
            (``log_init [K, S]``, ``log_trans [K, S, S + 1]``, ``log_emit [K, S, V]``).
        theta: true topic proportions ``[T_max, K]``.
        train: per task, its training sequences (int arrays of symbol ids).
        test: per task, its test sequences.
    """

    topics: HMMParams
    theta: np.ndarray
    train: list[list[np.ndarray]]
    test: list[list[np.ndarray]]


# ------------------------------------------------------------------- simulation
def draw_topics(rng: np.random.Generator, num_topics: int, num_states: int, num_symbols: int,
                halt_probability: tuple[float, float]) -> HMMParams:
    r"""Random HMM topics with halting (see the module docstring), as log-probabilities.

    Returns:
        :class:`HMMParams` with ``log_init [K, S]``, ``log_trans [K, S, S + 1]`` (last
        column END, each row summing to 1 with it) and ``log_emit [K, S, V]``.
    """
    K, S, V = num_topics, num_states, num_symbols
    init = rng.dirichlet(np.ones(S), size=K)
    halt = rng.uniform(*halt_probability, size=(K, S, 1))
    moves = (1.0 - halt) * rng.dirichlet(np.ones(S), size=(K, S))
    emit = rng.dirichlet(np.ones(V), size=(K, S))
    return HMMParams(np.log(init), np.log(np.concatenate([moves, halt], axis=-1)), np.log(emit))


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of ``probs [N, n]`` (rows sum to 1) by inverting the CDF."""
    below = np.cumsum(probs, axis=-1)[:, :-1] < rng.random(len(probs))[:, None]
    return below.sum(axis=-1)


def sample_hmm(rng: np.random.Generator, topics: HMMParams, z: np.ndarray) -> list[np.ndarray]:
    r"""Draws one sequence from HMM topic ``z[n]`` for every ``n`` (vectorised over sequences).

    The generative process of :class:`~mtl_jax.models.sequence_lda.generators.HMM` with
    halting: :math:`s_1 \sim \pi`, then repeatedly emit :math:`x_l \sim B_{s_l}` and
    draw the next outcome from the row :math:`A_{s_l}` over the ``S`` states and END,
    stopping at END. Every sequence has at least one symbol.

    Args:
        rng: the random generator.
        topics: log-probabilities as from :func:`draw_topics`.
        z: topic of each sequence ``[N]``.

    Returns:
        ``N`` int32 arrays of symbol ids.
    """
    init, trans, emit = (np.exp(leaf) for leaf in topics)
    S = init.shape[-1]
    state = _categorical(rng, init[z])
    alive = np.ones(len(z), bool)
    symbols = []
    while alive.any():
        symbols.append(np.where(alive, _categorical(rng, emit[z, state]), -1))
        outcome = _categorical(rng, trans[z, state])
        alive &= outcome < S
        state = np.where(alive, outcome, 0)
    table = np.stack(symbols, axis=1)
    return [row[row >= 0].astype(np.int32) for row in table]


def simulate_tasks(rng: np.random.Generator, config: dict[str, Any], alpha: float) -> SimulatedTasks:
    r"""True topics, ``T_max`` tasks' :math:`\theta_t \sim \mathrm{Dir}(\alpha)` and their sequences.

    Args:
        rng: the random generator.
        config: a complete study config (``topics``, ``states``, ``symbols``,
            ``halt_probability``, ``num_tasks``, ``train_sequences``, ``test_sequences``).
        alpha: the symmetric Dirichlet concentration.
    """
    K = int(config["topics"])
    topics = draw_topics(rng, K, int(config["states"]), int(config["symbols"]), tuple(config["halt_probability"]))
    num_tasks = max(config["num_tasks"])
    theta = rng.dirichlet(np.full(K, float(alpha)), size=num_tasks)
    low, high = config["train_sequences"]
    sizes = rng.integers(low, high + 1, size=num_tasks)
    n_test = int(config["test_sequences"])

    def draw(counts):
        task = np.repeat(np.arange(num_tasks), counts)
        sequences = sample_hmm(rng, topics, _categorical(rng, theta[task]))
        return [[s for s, t in zip(sequences, task) if t == k] for k in range(num_tasks)]

    return SimulatedTasks(topics, theta, draw(sizes), draw(np.full(num_tasks, n_test)))


# ---------------------------------------------------------------------- designs
def alphabet(num_symbols: int) -> tuple[str, ...]:
    """The symbols of the study: ``"0" .. str(V - 1)``."""
    return tuple(str(i) for i in range(num_symbols))


def sequence_design(tasks: list[list[np.ndarray]], rows: int, length: int, symbols: tuple[str, ...],
                    dtype) -> SequenceData:
    """A :class:`SequenceData` of the given tasks' sequences with fixed shape ``[rows, length]``.

    Rows are in task order, one per sequence (no deduplication, counts 1), then padding
    rows (length 0, count 0, task 0). Task ``t`` is named ``"task<t>"``.

    Raises:
        ValueError: when the sequences need more rows or positions than given.
    """
    sequences = [s for task in tasks for s in task]
    if len(sequences) > rows or max(len(s) for s in sequences) > length:
        raise ValueError(f"{len(sequences)} sequences (longest {max(len(s) for s in sequences)}) "
                         f"do not fit a [{rows}, {length}] design")
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.zeros(rows, np.int32)
    task = np.zeros(rows, np.int32)
    for row, (t, s) in enumerate((t, s) for t, task_sequences in enumerate(tasks) for s in task_sequences):
        tokens[row, :len(s)] = s
        lengths[row] = len(s)
        task[row] = t
    counts = (lengths > 0).astype(dtype)
    return SequenceData(tokens=jnp.asarray(tokens), values=None, lengths=jnp.asarray(lengths),
                        task=jnp.asarray(task), counts=jnp.asarray(counts),
                        task_names=tuple(f"task{t}" for t in range(len(tasks))), alphabet=symbols)


# ---------------------------------------------------------------------- scoring
def score_rows(model, params, design: SequenceData) -> tuple[Float[Array, " N"], Int[Array, " N"], Int[Array, " N"]]:
    """Per test row: ``log_predictive``, ``next_correct`` and ``next_total`` of ``model`` at ``params``."""
    columns = model.score_columns(params, design)
    return model.log_predictive(params, design), columns["next_correct"], columns["next_total"]


@functools.partial(jax.jit, static_argnames="model")
def score_batch(model, params, designs: SequenceData):
    """:func:`score_rows` vmapped over a leading batch axis of ``params`` and ``designs``."""
    return jax.vmap(functools.partial(score_rows, model))(params, designs)


def batch_metrics(model, params, designs: SequenceData) -> dict[str, np.ndarray]:
    """Per batch entry: mean log-likelihood per test sequence and next-symbol accuracy in %.

    ``params`` and ``designs`` carry a leading batch axis (:func:`score_batch`). Every
    test row is a real sequence (the test designs have no padding rows).
    """
    loglik, correct, total = score_batch(model, params, designs)
    return {"loglik": np.asarray(loglik, float).mean(axis=1),
            "accuracy": 100.0 * np.asarray(correct).sum(axis=1) / np.asarray(total).sum(axis=1)}


def oracle_params(sims: list[SimulatedTasks], alphas: np.ndarray, num_tasks: int, dtype) -> SequenceLDAParams:
    r"""The oracle as stacked :class:`SequenceLDAParams`: true topics, :math:`\gamma_t = \theta_t` of the first ``T`` tasks.

    ``alphas [B]`` is each batch entry's true :math:`\alpha` (``log_alpha`` does not enter
    the scores of training tasks).
    """
    K = sims[0].theta.shape[1]
    return SequenceLDAParams(
        topics=HMMParams(*(jnp.asarray(np.stack(leaf), dtype) for leaf in zip(*(sim.topics for sim in sims)))),
        log_alpha=jnp.asarray(np.log(np.repeat(alphas[:, None], K, axis=1)), dtype),
        gamma=jnp.asarray(np.stack([sim.theta[:num_tasks] for sim in sims]), dtype),
    )


# ------------------------------------------------------------------------ study
def study_models(config: dict[str, Any]) -> dict[str, Any]:
    """The fitted models (and the oracle's ``SequenceLDA``) of the study, by :data:`MODELS` name."""
    hmm = dict(generator="hmm", num_states=int(config["states"]), halting=True,
               pseudo_count=float(config["pseudo_count"]))
    lda = SequenceLDA(num_topics=int(config["topics"]), **hmm)
    return {"sequence-lda": lda, "per-task": SequencePerTask(**hmm), "pooled": SequencePooled(**hmm),
            "oracle": lda}


def run_sequence_study(config: dict[str, Any], *, progress: bool = True,
                       checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Runs the synthetic study (module docstring).

    Args:
        config: settings; missing keys take their values from :data:`DEFAULT_CONFIG`.
            ``topics``, ``states``, ``symbols``: ``K``, ``S``, ``V`` of the truth and the
            fits; ``halt_probability``: the range ``[h_lo, h_hi]`` of the true END
            probabilities; ``alphas``: the :math:`\\alpha` values; ``num_tasks``: the grid
            of ``T``; ``train_sequences``: ``[n_lo, n_hi]``; ``test_sequences``: per task;
            ``repeats``: independent draws per :math:`\\alpha`; ``pseudo_count``: the
            fitted generators' Dirichlet (MAP) pseudo-count; ``n_init``, ``max_iter``,
            ``tol``: EM restarts and stopping rule; ``seed``; ``dtype``: ``"float32"``,
            ``"float64"`` or ``None`` (JAX's default). ``"float32"`` needs a process
            without ``jax_enable_x64``: the models draw their EM starts in JAX's default
            float, and variational EM cannot mix the two. ``devices``: how many devices
            each batch of fits is split over (``None``: every device).
        progress: print a line per ``T`` and the result table.
        checkpoint: journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none). The units are the per-task HMM fits (shared by every ``T``; a
            resumed run that still has ``T`` values to do fits them again) and each ``T``
            (its Sequential LDA and pooled fits and the scores of all four predictors).

    Returns:
        A JSON-serialisable dict: the complete ``config``; ``data`` (mean training
        sequences per task and mean sequence length, the designs' padded lengths, the
        float dtype); ``results[str(alpha)][str(T)][model]`` with ``loglik`` and
        ``accuracy`` (``mean``, ``se``, ``per_repeat``), for fitted models also
        ``loglik_gap`` and ``accuracy_gap`` (oracle minus model, paired within repeats),
        ``converged_fraction`` (per-task: the fraction of repeats whose ``T`` task fits
        all converged) and ``mean_iterations``; ``timings``, one entry per batch of fits
        (``model``, ``T``, number of ``fits``, ``compile_seconds``, ``run_seconds``); and
        the printed ``table``.

    Raises:
        ValueError: on an unknown config key.
    """
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown sequence_study setting(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    dtype = resolve_dtype(config["dtype"])
    resolve_devices(config["devices"])  # a bad count fails before any work
    alphas = [float(a) for a in config["alphas"]]
    grid = sorted(int(t) for t in config["num_tasks"])
    repeats, max_tasks = int(config["repeats"]), max(grid)
    n_high = int(config["train_sequences"][1])
    symbols = alphabet(int(config["symbols"]))
    models = study_models(config)
    em = dict(n_init=int(config["n_init"]), max_iter=int(config["max_iter"]), tol=float(config["tol"]))

    # One simulated data set per (alpha, repeat): the batch axis of every fit, alpha-major.
    sims = [simulate_tasks(np.random.default_rng([int(config["seed"]), a, r]), config, alpha)
            for a, alpha in enumerate(alphas) for r in range(repeats)]
    batch_alpha = np.repeat(np.asarray(alphas), repeats)
    train_length = max(len(s) for sim in sims for task in sim.train for s in task)
    test_length = max(len(s) for sim in sims for task in sim.test for s in task)
    root = jax.random.key(int(config["seed"]))

    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(1 + len(grid), "sequence study (per-task fits, then T)")

    def fit(name, designs, T, timings):
        """EM fits of model ``name`` to a batch of designs (keys from ``T``; ``T = 0``: the per-task fits);
        appends the batch's timing entry to ``timings``.

        The per-task HMMs are fitted as one-task pooled fits (module docstring).
        """
        keys = jax.random.split(jax.random.fold_in(root, T), designs.lengths.shape[0])
        model = models["pooled" if name == "per-task" else name]
        run = run_replicates(model, designs, keys, devices=config["devices"], **em)
        timings.append({"model": name, "T": T or "all", "fits": int(designs.lengths.shape[0]), **run.timing})
        if progress:
            checkpoint.write(f"{name} (T = {T or 'each task'}): {designs.lengths.shape[0]} fits, compile "
                             f"{run.compile_seconds:.0f} s, fit {run.run_seconds:.0f} s")
        return run.output

    per_task = {}

    def per_task_fits() -> dict:
        """Per-task HMMs: one pooled fit per (batch entry, task) on that task's sequences alone.

        Run once per process, when a unit needs them: the ``"per-task"`` unit records their
        timing; a resumed run with ``T`` values left fits them again (their timing is kept
        from the first run).
        """
        if not per_task:
            designs = stack_trees([sequence_design([task], n_high, train_length, symbols, dtype)
                                   for sim in sims for task in sim.train])
            timing = []
            fits = fit("per-task", designs, 0, timing)

            def by_task(leaf):
                return np.asarray(leaf).reshape(len(sims), max_tasks, *leaf.shape[1:])

            per_task.update(generators=jax.tree_util.tree_map(by_task, fits.params), converged=by_task(fits.converged),
                            iterations=by_task(fits.n_iter), timing=timing[0])
        return per_task

    def scores_of(T: int) -> dict:
        """The unit of one ``T``: per model the per-batch-entry metrics, and the timings of its fits."""
        train = stack_trees([sequence_design(sim.train[:T], n_high * T, train_length, symbols, dtype)
                             for sim in sims])
        test = stack_trees([sequence_design(sim.test[:T], int(config["test_sequences"]) * T, test_length,
                                            symbols, dtype) for sim in sims])
        timings = []
        lda, pooled = fit("sequence-lda", train, T, timings), fit("pooled", train, T, timings)
        fitted_per_task = per_task_fits()
        fitted = {
            "sequence-lda": (lda.params, lda.converged, lda.n_iter),
            "per-task": (PerTaskParams(jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf[:, :T]),
                                                              fitted_per_task["generators"]), pooled.params),
                         fitted_per_task["converged"][:, :T].all(axis=1),
                         fitted_per_task["iterations"][:, :T].mean(axis=1)),
            "pooled": (pooled.params, pooled.converged, pooled.n_iter),
            "oracle": (oracle_params(sims, batch_alpha, T, dtype), None, None),
        }
        by_model = {}
        for name, (params, converged, n_iter) in fitted.items():
            by_model[name] = batch_metrics(models[name], params, test)
            if converged is not None:
                by_model[name]["converged"] = np.asarray(converged)
                by_model[name]["n_iter"] = np.asarray(n_iter, float)
        return {"scores": by_model, "timings": timings}

    timings = [checkpoint.unit("per-task", lambda: per_task_fits()["timing"])]
    scores = {}  # (T, model) -> {"loglik": [B], "accuracy": [B], ...}
    for T in grid:
        unit = checkpoint.unit(f"T={T}", lambda: scores_of(T))
        timings.extend(unit["timings"])
        for name, metrics in unit["scores"].items():
            scores[T, name] = {key: np.asarray(values) for key, values in metrics.items()}
        if progress:
            checkpoint.write(f"T = {T:>3}: " + ", ".join(
                f"{name} loglik {scores[T, name]['loglik'].mean():.3f} acc {scores[T, name]['accuracy'].mean():.1f}%"
                for name in MODELS))

    for T in grid:
        for name in MODELS[:-1]:
            for metric in METRICS:
                scores[T, name][f"{metric}_gap"] = scores[T, "oracle"][metric] - scores[T, name][metric]
    results = {
        str(alpha): {
            str(T): {name: _summary(scores[T, name], slice(a * repeats, (a + 1) * repeats)) for name in MODELS}
            for T in grid
        }
        for a, alpha in enumerate(alphas)
    }
    output = {
        "experiment": "sequence_study",
        "config": config,
        "data": {
            "mean_train_sequences": float(np.mean([len(task) for sim in sims for task in sim.train])),
            "mean_length": float(np.mean([len(s) for sim in sims for task in sim.train + sim.test for s in task])),
            "train_length": train_length,
            "test_length": test_length,
            "dtype": str(dtype),
        },
        "results": results,
        "timings": timings,
    }
    output["table"] = format_table(output)
    if progress:
        print(output["table"], flush=True)
    return output


def _summary(scores: dict[str, np.ndarray], rows: slice) -> dict[str, Any]:
    """Mean, standard error and per-repeat values of each metric of one ``(alpha, T, model)`` cell."""
    out = {metric: {**summarize(scores[metric][rows]), "per_repeat": scores[metric][rows].tolist()}
           for metric in (*METRICS, *(f"{m}_gap" for m in METRICS)) if metric in scores}
    if "converged" in scores:
        out["converged_fraction"] = float(scores["converged"][rows].mean())
        out["mean_iterations"] = float(scores["n_iter"][rows].mean())
    return out


def format_table(output: dict[str, Any]) -> str:
    """The study as text: two tables with one row per ``(alpha, T)``.

    The first gives each predictor's held-out log-likelihood per sequence and next-symbol
    accuracy, the second each fitted model's gap to the oracle (oracle minus model, paired
    within repeats, so its standard error leaves out the repeat-to-repeat variation of
    the truth). Entries are mean +- standard error over repeats.
    """

    def table(columns):
        rows = []
        for alpha, by_tasks in output["results"].items():
            for T, by_model in by_tasks.items():
                row = {"alpha": alpha, "T": T}
                for label, metric, digits, names in columns:
                    row.update({f"{label} {name}": plus_minus(by_model[name][metric], sign="+-", digits=digits)
                                for name in names})
                rows.append(row)
        return pd.DataFrame(rows).to_string(index=False)

    fitted = MODELS[:-1]
    config = output["config"]
    header = (f"Sequential LDA synthetic study: K = {config['topics']} HMM topics ({config['states']} states, "
              f"{config['symbols']} symbols, halting), {config['repeats']} repeats, "
              f"{config['train_sequences'][0]}-{config['train_sequences'][1]} training and "
              f"{config['test_sequences']} test sequences per task; LL = mean held-out log-likelihood per "
              f"sequence, acc% = next-symbol accuracy (HALT included)")
    gaps = "gap to the oracle (oracle - model; LL in nats per sequence, acc in points)"
    return "\n".join([header, table([("LL", "loglik", 2, MODELS), ("acc%", "accuracy", 1, MODELS)]), gaps,
                      table([("LL gap", "loglik_gap", 3, fitted), ("acc gap", "accuracy_gap", 1, fitted)])])


def plot_results(output: dict[str, Any], path: str | Path) -> Path:
    """Draws the metrics against the number of tasks, one column per alpha, error bars +- 1 s.e.

    Rows: held-out log-likelihood per sequence, next-symbol accuracy, and the fitted
    models' log-likelihood gap to the oracle (paired within repeats, so its error bars
    leave out the repeat-to-repeat variation of the truth).

    matplotlib is imported here (with the non-interactive Agg backend), not with the module.

    Returns:
        ``path``, a PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    alphas = list(output["results"])
    metrics = {"loglik": "held-out log-likelihood per sequence", "accuracy": "next-symbol accuracy (%)",
               "loglik_gap": "oracle minus model log-likelihood"}
    figure, axes = plt.subplots(len(metrics), len(alphas), figsize=(4.2 * len(alphas), 10), squeeze=False)
    for column, alpha in enumerate(alphas):
        by_tasks = output["results"][alpha]
        tasks = [int(T) for T in by_tasks]
        for row, (metric, label) in enumerate(metrics.items()):
            ax = axes[row, column]
            for name in (MODELS if metric in METRICS else MODELS[:-1]):
                values = [by_tasks[str(T)][name][metric] for T in tasks]
                ax.errorbar(tasks, [v["mean"] for v in values], yerr=[v["se"] or 0.0 for v in values],
                            marker="o", capsize=3, label=name, linestyle="--" if name == "oracle" else "-")
            ax.set_xscale("log")
            ax.set_xticks(tasks, [str(T) for T in tasks])
            ax.set_xlabel("number of tasks")
            ax.set_ylabel(label)
            ax.set_title(f"alpha = {alpha}")
    axes[0, 0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
