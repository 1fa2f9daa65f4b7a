"""Next-symbol prediction of Sequential LDA: the prefix-filtered mixture, argmax hits, CLI columns."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from support import run_main
from test_sequence_cli import FIT, training_frame

from mtl_jax import SequenceData, SequenceLDA
from mtl_jax.models.sequence_lda.generators import MarkovParams
from mtl_jax.models.sequence_lda.model import SequenceLDAParams

ALPHABET = ("a", "b")
# Two hand-set Markov topics over "ab" with HALT: topic 1 sticks to "a", topic 2 to "b".
INIT = np.array([[0.7, 0.3], [0.2, 0.8]])
TRANS = np.array([[[0.6, 0.1, 0.3], [0.5, 0.3, 0.2]],
                  [[0.2, 0.5, 0.3], [0.1, 0.7, 0.2]]])
GAMMA = np.array([[6.0, 2.0], [1.5, 4.5]])  # tasks A, B
ALPHA = np.array([0.5, 2.0])


def reference_next(ids: list[int], weights: np.ndarray, init: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """``[len + 1, V + 1]`` by hand: Bayes over topics on each prefix, then the mixture."""
    K, V = init.shape
    table = []
    for j in range(len(ids) + 1):
        prefix = np.array([init[k, ids[0]] * np.prod([trans[k, u, v] for u, v in zip(ids[:j - 1], ids[1:j])])
                           if j else 1.0 for k in range(K)])
        posterior = weights * prefix / np.sum(weights * prefix)
        following = [np.append(init[k], 0.0) if j == 0 else trans[k, ids[j - 1]] for k in range(K)]
        table.append(sum(posterior[k] * following[k] for k in range(K)))
    return np.array(table)


def reference_hits(ids: list[int], table: np.ndarray) -> int:
    """Brute-force count of prefixes whose argmax is the true next outcome (HALT = V at the end)."""
    truth = list(ids) + [table.shape[1] - 1]
    return sum(int(np.argmax(table[j]) == truth[j]) for j in range(len(truth)))


def hand_set():
    """The hand-set model, parameters and a design with tasks A, B and the unseen task Z."""
    model = SequenceLDA(num_topics=2, generator="markov", alpha="asymmetric")
    params = SequenceLDAParams(MarkovParams(jnp.log(INIT), jnp.log(TRANS)), jnp.log(ALPHA), jnp.asarray(GAMMA))
    data = SequenceData.from_lists({"A": ["abba", "a", "aab"], "B": ["bbab", "ba"], "Z": ["abbb", "b"]},
                                   alphabet=ALPHABET, task_names=("A", "B"), allow_empty_tasks=True)
    return model, params, model.design(data)


def stored_rows(design):
    """``(row, task id, symbol ids)`` of each stored (non-padding) row."""
    for s in np.flatnonzero(np.asarray(design.lengths) > 0):
        yield s, int(design.task[s]), np.asarray(design.tokens[s, :int(design.lengths[s])]).tolist()


@pytest.mark.parametrize("generator, states, halting", [("markov", None, True), ("markov", None, False),
                                                        ("hmm", 3, True), ("categorical", None, True)])
def test_next_outcome_distribution_sums_to_one_at_every_prefix(generator, states, halting):
    model = SequenceLDA(num_topics=3, generator=generator, num_states=states, halting=halting)
    data = SequenceData.from_lists({"A": ["abcab", "cc"], "B": ["bacabca", "a"]}, alphabet=("a", "b", "c"))
    design = model.design(data)
    log_probs = np.asarray(model.next_symbol_log_probs(model.init(jax.random.key(3), design), design))
    assert log_probs.shape == (design.tokens.shape[0], design.tokens.shape[1] + 1, 4)
    for s, _, ids in stored_rows(design):
        np.testing.assert_allclose(np.exp(log_probs[s, :len(ids) + 1]).sum(-1), 1.0, rtol=1e-12)


def test_markov_mixture_matches_bayes_over_topics_on_the_prefix():
    model, params, design = hand_set()
    table = np.exp(np.asarray(model.next_symbol_log_probs(params, design)))
    means = {0: GAMMA[0] / GAMMA[0].sum(), 1: GAMMA[1] / GAMMA[1].sum(), 2: ALPHA / ALPHA.sum()}
    checked = 0
    for s, task, ids in stored_rows(design):
        np.testing.assert_allclose(table[s, :len(ids) + 1], reference_next(ids, means[task], INIT, TRANS),
                                   rtol=1e-12, atol=1e-15)
        checked += 1
    assert checked == 7


def test_filtering_changes_the_prediction():
    """After "bbb" the weight has moved to the "b" topic: P(b) exceeds the unfiltered mixture's."""
    model, params, design = hand_set()
    s = next(s for s, _, ids in stored_rows(design) if ids == [0, 1, 1, 1])  # "abbb", task Z
    filtered = np.exp(np.asarray(model.next_symbol_log_probs(params, design)))[s, 4]
    unfiltered = (ALPHA / ALPHA.sum()) @ TRANS[:, 1]
    assert filtered[1] > unfiltered[1] + 0.05


def test_unseen_task_starts_from_the_prior_mean():
    model, params, design = hand_set()
    table = np.exp(np.asarray(model.next_symbol_log_probs(params, design)))
    rows = {task: s for s, task, _ in stored_rows(design)}
    np.testing.assert_allclose(table[rows[2], 0], np.append(ALPHA @ INIT / ALPHA.sum(), 0.0), rtol=1e-12)
    np.testing.assert_allclose(table[rows[0], 0], np.append(GAMMA[0] @ INIT / GAMMA[0].sum(), 0.0), rtol=1e-12)


def test_next_correct_is_the_brute_force_count():
    model, params, design = hand_set()
    columns = {name: np.asarray(value) for name, value in model.score_columns(params, design).items()}
    means = {0: GAMMA[0] / GAMMA[0].sum(), 1: GAMMA[1] / GAMMA[1].sum(), 2: ALPHA / ALPHA.sum()}
    counts = []
    for s, task, ids in stored_rows(design):
        counts.append(reference_hits(ids, reference_next(ids, means[task], INIT, TRANS)))
        assert columns["next_correct"][s] == counts[-1]
        assert columns["next_total"][s] == len(ids) + 1
    assert len(set(counts)) > 1  # not a constant
    padding = np.asarray(design.lengths) == 0
    assert not columns["next_total"][padding].any() and not columns["next_correct"][padding].any()


def test_without_halt_the_end_is_not_counted():
    model, params, design = hand_set()
    no_halt = SequenceLDA(num_topics=2, generator="categorical")
    topics = no_halt.init(jax.random.key(0), design).topics
    totals = np.asarray(no_halt.score_columns(params._replace(topics=topics), design)["next_total"])
    np.testing.assert_array_equal(totals, np.asarray(design.lengths))


def test_cli_score_writes_next_symbol_columns_per_input_row(tmp_path):
    train = tmp_path / "train.csv"
    training_frame().to_csv(train, index=False)
    fit_path = tmp_path / "fit.json"
    result = run_main(["fit", str(train), *FIT, "--out", str(fit_path)])
    assert result.status == 0, result.err
    saved = json.loads(fit_path.read_text())

    new = pd.DataFrame({"task": ["C", "A", "Z", "A", "B"], "seq": ["bbab", "aab", "abbb", "aab", "b"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    result = run_main(["score", str(fit_path), str(tmp_path / "new.csv"), "--out", str(tmp_path / "scores.csv")])
    assert result.status == 0, result.err
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["task", "seq", "loglik", "next_correct", "next_total"]
    assert list(scores["next_total"]) == [len(seq) + 1 for seq in new["seq"]]

    alphabet = saved["labels"]["alphabet"]
    init, trans = np.asarray(saved["topics"]["init"]), np.asarray(saved["topics"]["trans"])
    alpha = np.asarray(saved["alpha"])
    weights = {**{task: np.asarray(p) for task, p in saved["topic_proportions"].items()}, "Z": alpha / alpha.sum()}
    expected = []
    for task, seq in zip(new["task"], new["seq"]):
        ids = [alphabet.index(symbol) for symbol in seq]
        expected.append(reference_hits(ids, reference_next(ids, weights[task], init, trans)))
    assert list(scores["next_correct"]) == expected
