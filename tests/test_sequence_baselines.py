"""The baselines of Sequential LDA (one pooled generator; one generator per task) against numpy references."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from support import run_main
from test_sequence_cli import markov_log_prob
from test_sequence_prediction import reference_hits, reference_next

from mtl_jax import Fit, SequenceData, SequenceLDA, SequenceLDAParams, SequencePerTask, SequencePooled, fit
from mtl_jax.models.sequence_lda import PerTaskParams
from mtl_jax.models.sequence_lda.generators import HMMParams

ALPHABET = ("a", "b", "c")
# Three tasks with duplicates; task B never starts with "a" or "c" nor moves on from "a", so
# pseudo-counts show. 7 distinct rows: the data and each task's subset share one padded shape
# (8 rows of 8), so the fits below share compiled code.
SEQUENCES = {"A": ["abca", "ab", "ab", "cab"], "B": ["ba", "bbc", "ba"], "C": ["ccb", "c", "c"]}
PSEUDO = 0.01  # the generators' default pseudo-count
NEW = {"A": ["abc", "ab"], "new": ["cba", "ab"]}  # a training task and a task unseen in training
COLUMNS = dict(task_column="task", sequence_column="seq")  # the models the CLI builds (compiled code shared)


def markov_estimate(sequences: list[str], pseudo: float = PSEUDO) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form MAP Markov chain: first-symbol and transition (+ HALT) counts plus ``pseudo``, normalised."""
    V = len(ALPHABET)
    init, trans = np.full(V, pseudo), np.full((V, V + 1), pseudo)
    for sequence in sequences:
        ids = [ALPHABET.index(symbol) for symbol in sequence]
        init[ids[0]] += 1
        for previous, current in zip(ids[:-1], ids[1:]):
            trans[previous, current] += 1
        trans[ids[-1], V] += 1
    return init / init.sum(), trans / trans.sum(axis=1, keepdims=True)


def probabilities(generator) -> tuple[np.ndarray, np.ndarray]:
    """``(init, trans)`` of a fitted Markov generator."""
    return np.exp(np.asarray(generator.log_init)), np.exp(np.asarray(generator.log_trans))


def new_data(train: SequenceData) -> SequenceData:
    """:data:`NEW` encoded against the training tasks (``new`` gets id 3)."""
    return SequenceData.from_lists(NEW, alphabet=ALPHABET, task_names=train.task_names, allow_empty_tasks=True)


def task_alone(name: str) -> SequenceData:
    """The sequences of task ``name`` only (the other tasks listed, empty: the same static task names)."""
    return SequenceData.from_lists({name: SEQUENCES[name]}, alphabet=ALPHABET, task_names=tuple(SEQUENCES),
                                   allow_empty_tasks=True)


def frame(sequences: dict[str, list[str]]) -> pd.DataFrame:
    """One row per sequence: columns ``task``, ``seq``."""
    return pd.DataFrame([(task, s) for task, task_sequences in sequences.items() for s in task_sequences],
                        columns=["task", "seq"])


@pytest.fixture(scope="module")
def data() -> SequenceData:
    return SequenceData.from_lists(SEQUENCES, alphabet=ALPHABET)


@pytest.fixture(scope="module")
def fits(data) -> dict[str, Fit]:
    """Both baselines (Markov chains with halting) fitted by EM to :data:`SEQUENCES`."""
    return {cls.name: fit(cls("markov", **COLUMNS), data, "em", n_init=1) for cls in (SequencePooled, SequencePerTask)}


def test_pooled_markov_is_the_normalised_counts(fits):
    result = fits["sequence-pooled"]
    everything = [sequence for task in SEQUENCES.values() for sequence in task]
    init, trans = markov_estimate(everything)
    fitted_init, fitted_trans = probabilities(result.params)
    np.testing.assert_allclose(fitted_init, init, rtol=1e-12)
    np.testing.assert_allclose(fitted_trans, trans, rtol=1e-12)
    assert result.converged and result.n_iter == 3  # closed form: the estimate after one step, then confirmed
    assert result.loglik == pytest.approx(sum(markov_log_prob(s, list(ALPHABET), init, trans) for s in everything),
                                          rel=1e-12)
    assert result.bic == pytest.approx(-2 * result.loglik + (2 + 3 * 3) * np.log(10), rel=1e-12)
    assert result.summary().loc["trans[b->HALT]", "estimate"] == pytest.approx(trans[1, 3], rel=1e-12)


def test_per_task_generators_are_the_pooled_fits_of_each_task_alone(data, fits):
    result = fits["sequence-per-task"]
    for t, name in enumerate(data.task_names):
        alone = fit(SequencePooled("markov", **COLUMNS), task_alone(name), "em", n_init=1)
        mine = jax.tree_util.tree_map(lambda leaf: leaf[t], result.params.tasks)
        for leaf, reference in zip(mine, alone.params):
            np.testing.assert_allclose(leaf, reference, rtol=1e-12)
        init, trans = markov_estimate(SEQUENCES[name])
        np.testing.assert_allclose(probabilities(mine)[1], trans, rtol=1e-12)
    for leaf, reference in zip(result.params.pooled, fits["sequence-pooled"].params):
        np.testing.assert_allclose(leaf, reference, rtol=1e-12)
    halt_after_a = (2 + PSEUDO) / (2 + 4 * PSEUDO)  # task B: "a" only ever ends a sequence (twice)
    assert result.summary().loc["task B trans[a->HALT]", "estimate"] == pytest.approx(halt_after_a, rel=1e-12)


def test_per_task_log_predictive_of_training_rows_is_the_task_generators_log_probability(data, fits):
    result = fits["sequence-per-task"]
    design = result.model.design(data)
    scores = np.asarray(result.model.log_predictive(jax.tree_util.tree_map(jnp.asarray, result.params), design))
    stored = np.flatnonzero(np.asarray(design.lengths) > 0)
    for s in stored:
        t, length = int(design.task[s]), int(design.lengths[s])
        sequence = "".join(ALPHABET[i] for i in np.asarray(design.tokens[s, :length]))
        init, trans = probabilities(jax.tree_util.tree_map(lambda leaf: leaf[t], result.params.tasks))
        assert scores[s] == pytest.approx(markov_log_prob(sequence, list(ALPHABET), init, trans), rel=1e-12)
    assert np.all(scores[len(stored):] == 0.0)  # padding rows
    weights = np.asarray(design.counts)
    assert result.loglik == pytest.approx(float(np.sum(weights * scores)), rel=1e-12)


def test_per_task_hmm_steps_are_the_steps_of_each_task_alone(data):
    """Five Baum-Welch steps from the same start: vmapped over tasks or run on one task's rows."""
    model = SequencePerTask("hmm", num_states=2)
    rng = np.random.default_rng(3)
    shapes = [(3, 2), (3, 2, 3), (3, 2, 3)]  # [T, S], [T, S, S + END], [T, S, V]
    tasks = HMMParams(*(np.log(rng.dirichlet(np.ones(shape[-1]), shape[:-1])) for shape in shapes))
    start = PerTaskParams(tasks, jax.tree_util.tree_map(lambda leaf: leaf[0], tasks))
    params, objectives = _em_steps(model, start, model.design(data))
    objectives = np.asarray(objectives)
    assert np.all(np.diff(objectives) >= -1e-10 * np.abs(objectives[1:]))
    alone_model = SequencePooled("hmm", num_states=2)
    for t, name in enumerate(data.task_names):
        alone = alone_model.design(task_alone(name))
        first = jax.tree_util.tree_map(lambda leaf: leaf[t], start.tasks)
        expected, _ = _em_steps(alone_model, first, alone)
        for leaf, reference in zip(jax.tree_util.tree_map(lambda leaf: leaf[t], params.tasks), expected):
            np.testing.assert_allclose(leaf, reference, rtol=1e-9, atol=1e-12)
    pooled, _ = _em_steps(alone_model, start.pooled, alone_model.design(data))
    for leaf, reference in zip(params.pooled, pooled):
        np.testing.assert_allclose(leaf, reference, rtol=1e-9, atol=1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _em_steps(model, params, design):
    """Five EM steps of ``model`` from ``params``: the end point and the objectives."""
    return jax.lax.scan(lambda current, _: model.em_step(current, design), params, None, length=5)


def test_unseen_tasks_get_the_pooled_generator(data, fits):
    new = new_data(data)
    per_task, pooled = fits["sequence-per-task"], fits["sequence-pooled"]
    scores = {name: result.score(new) for name, result in fits.items()}
    assert all(np.all(np.isfinite(s)) for s in scores.values())
    init_a, trans_a = probabilities(jax.tree_util.tree_map(lambda leaf: leaf[0], per_task.params.tasks))
    init, trans = probabilities(pooled.params)
    rows = [(task, sequence) for task, sequences in NEW.items() for sequence in sequences]
    expected_per_task = [markov_log_prob(s, list(ALPHABET), *((init_a, trans_a) if task == "A" else (init, trans)))
                         for task, s in rows]
    np.testing.assert_allclose(scores["sequence-per-task"], expected_per_task, rtol=1e-12)
    np.testing.assert_allclose(scores["sequence-pooled"], [markov_log_prob(s, list(ALPHABET), init, trans)
                                                           for _, s in rows], rtol=1e-12)
    np.testing.assert_allclose(scores["sequence-per-task"][2:], scores["sequence-pooled"][2:], rtol=1e-12)


def test_pooled_next_symbol_scores_are_sequence_lda_with_its_generator_as_the_one_topic(data, fits):
    pooled = fits["sequence-pooled"]
    params = jax.tree_util.tree_map(jnp.asarray, pooled.params)
    lda = SequenceLDA(1, "markov")
    lda_params = SequenceLDAParams(jax.tree_util.tree_map(lambda leaf: leaf[None], params), jnp.zeros(1),
                                   jnp.ones((data.num_tasks, 1)))
    design = lda.design(new_data(data))
    mine, theirs = pooled.model.score_columns(params, design), lda.score_columns(lda_params, design)
    assert set(mine) == {"next_correct", "next_total"}
    for column in mine:
        np.testing.assert_array_equal(mine[column], theirs[column])
    np.testing.assert_allclose(pooled.model.log_predictive(params, design), lda.log_predictive(lda_params, design),
                               rtol=1e-12)


def test_save_load_score_is_bit_identical(data, fits, tmp_path):
    new = new_data(data)
    for name, result in fits.items():
        path = tmp_path / f"{name}.json"
        result.save(path)
        loaded = Fit.load(path)
        assert loaded.model == result.model and loaded.labels == result.labels
        for leaf, reference in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(result.params)):
            assert leaf.dtype == reference.dtype and np.array_equal(leaf, reference)
        pd.testing.assert_frame_equal(loaded.score_table(new), result.score_table(new), check_exact=True)
        assert loaded.summary().equals(result.summary())


@pytest.mark.parametrize("name", ["sequence-per-task", "sequence-pooled"])
def test_cli_fit_then_score(name, tmp_path):
    frame(SEQUENCES).to_csv(tmp_path / "train.csv", index=False)
    argv = ["fit", str(tmp_path / "train.csv"), "--model", name, "--task", "task", "--sequence", "seq",
            "--generator", "markov", "--method", "em", "--n-init", "1", "--out", str(tmp_path / "fit.json")]
    result = run_main(argv)
    assert result.status == 0, result.err
    assert f"fitting {name} to 10 rows in 3 tasks with EM" in result.out
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert saved["model"]["name"] == name and saved["model"]["config"]["sequence_column"] == "seq"

    new = pd.DataFrame({"task": ["C", "A", "Z", "A", "B"], "seq": ["bca", "ab", "aab", "ab", "b"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    result = run_main(["score", str(tmp_path / "fit.json"), str(tmp_path / "new.csv"),
                       "--out", str(tmp_path / "scores.csv")])
    assert result.status == 0, result.err
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["task", "seq", "loglik", "next_correct", "next_total"]

    alphabet = saved["labels"]["alphabet"]
    pooled = saved["pooled"] if name == "sequence-per-task" else saved["generator"]
    generators = saved.get("generators", {})
    for row in scores.itertuples():
        generator = generators.get(row.task, pooled)  # unseen task Z: the pooled generator
        init, trans = np.asarray(generator["init"]), np.asarray(generator["trans"])
        ids = [alphabet.index(symbol) for symbol in row.seq]
        assert row.loglik == pytest.approx(markov_log_prob(row.seq, alphabet, init, trans), rel=1e-5)
        assert row.next_total == len(row.seq) + 1
        assert row.next_correct == reference_hits(ids, reference_next(ids, np.ones(1), init[None], trans[None]))
    assert np.isfinite(scores["loglik"]).all() and scores["loglik"][1] == scores["loglik"][3]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_states"):
        SequencePerTask("hmm")
    with pytest.raises(ValueError, match="unknown generator"):
        SequencePooled("lstm")
