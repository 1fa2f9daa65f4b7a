"""``mtl-jax fit|score --model sequence-lda``: data options, JSON fit, per-row scores in CSV order."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from support import run_main

FIT = ["--model", "sequence-lda", "--task", "task", "--sequence", "seq", "--topics", "2",
       "--generator", "markov", "--method", "em", "--n-init", "1", "--max-iter", "30"]


def training_frame() -> pd.DataFrame:
    """4 tasks x 10 strings over "ab": tasks A, B favour "a", C, D favour "b"."""
    rng = np.random.default_rng(0)
    rows = []
    for task, p_a in (("A", 0.8), ("B", 0.7), ("C", 0.2), ("D", 0.3)):
        for _ in range(10):
            length = int(rng.integers(1, 6))
            rows.append((task, "".join(np.where(rng.random(length) < p_a, "a", "b"))))
    return pd.DataFrame(rows, columns=["task", "seq"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, dict]:
    """The CLI fit of the training frame: the JSON path and its content."""
    folder = tmp_path_factory.mktemp("sequence_cli")
    csv, out = folder / "train.csv", folder / "fit.json"
    training_frame().to_csv(csv, index=False)
    result = run_main(["fit", str(csv), *FIT, "--out", str(out)])
    assert result.status == 0, result.err
    assert "fitting sequence-lda to 40 rows in 4 tasks with EM" in result.out
    return out, json.loads(out.read_text())


def markov_log_prob(sequence: str, alphabet: list[str], init: np.ndarray, trans: np.ndarray) -> float:
    """log P(sequence) under one Markov topic with halting (last column of ``trans``)."""
    ids = [alphabet.index(symbol) for symbol in sequence]
    log_p = np.log(init[ids[0]]) + np.log(trans[ids[-1], -1])
    for previous, current in zip(ids[:-1], ids[1:]):
        log_p += np.log(trans[previous, current])
    return float(log_p)


def test_fit_writes_the_json(fitted):
    _, saved = fitted
    assert saved["model"]["name"] == "sequence-lda"
    assert saved["model"]["config"]["sequence_column"] == "seq"
    assert saved["labels"]["alphabet"] == ["a", "b"] and saved["task_names"] == ["A", "B", "C", "D"]
    assert np.asarray(saved["topics"]["trans"]).shape == (2, 2, 3)  # [K, V, V + HALT]


def test_score_is_the_mixture_log_probability_per_input_row(fitted, tmp_path):
    path, saved = fitted
    new = pd.DataFrame({"task": ["C", "A", "Z", "A", "B"], "seq": ["bba", "ab", "aab", "ab", "b"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    result = run_main(["score", str(path), str(tmp_path / "new.csv"), "--out", str(tmp_path / "scores.csv")])
    assert result.status == 0, result.err
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores["task"]) == list(new["task"]) and list(scores["seq"]) == list(new["seq"])

    alphabet = saved["labels"]["alphabet"]
    init, trans = np.asarray(saved["topics"]["init"]), np.asarray(saved["topics"]["trans"])
    alpha = np.asarray(saved["alpha"])
    weights = {**{task: np.asarray(p) for task, p in saved["topic_proportions"].items()},
               "Z": alpha / alpha.sum()}  # unseen task: the prior mean
    expected = [np.log(sum(weights[task][k] * np.exp(markov_log_prob(seq, alphabet, init[k], trans[k]))
                           for k in range(len(alpha))))
                for task, seq in zip(new["task"], new["seq"])]
    np.testing.assert_allclose(scores["loglik"], expected, rtol=1e-5)
    assert scores["loglik"][1] == scores["loglik"][3]  # the duplicated row
    assert len(set(np.round(scores["loglik"], 8))) == 4


def test_score_names_the_row_and_symbol_outside_the_alphabet(fitted, tmp_path):
    path, _ = fitted
    pd.DataFrame({"task": ["A", "B"], "seq": ["ab", "abc"]}).to_csv(tmp_path / "bad.csv", index=False)
    result = run_main(["score", str(path), str(tmp_path / "bad.csv"), "--out", str(tmp_path / "s.csv")])
    assert result.status == 2
    assert "symbol 'c'" in result.err and "row 1" in result.err
    assert not (tmp_path / "s.csv").exists()


def test_fit_without_sequence_option_exits_2(tmp_path):
    training_frame().to_csv(tmp_path / "train.csv", index=False)
    argv = ["fit", str(tmp_path / "train.csv"), *[a for a in FIT if a not in ("--sequence", "seq")],
            "--out", str(tmp_path / "fit.json")]
    result = run_main(argv)
    assert result.status == 2 and "--sequence" in result.err
    assert not (tmp_path / "fit.json").exists()


def hmm_probability(init: np.ndarray, trans: np.ndarray, densities: np.ndarray) -> float:
    """P(sequence) under a halting HMM, by enumerating every hidden path (``densities [L, S]``)."""
    total = 0.0
    for path in itertools.product(range(len(init)), repeat=len(densities)):
        p = init[path[0]] * trans[path[-1], -1]
        for position, state in enumerate(path):
            p *= densities[position, state]
            if position:
                p *= trans[path[position - 1], state]
        total += p
    return total


@pytest.mark.parametrize("generator", ["hmm", "gaussian-hmm"])
def test_hmm_topics_fit_and_score_through_the_cli(generator, tmp_path):
    """``--generator hmm`` on strings and ``gaussian-hmm`` on ``--tokens numbers``: the scores
    are the task mixtures of path-enumerated HMM probabilities of the saved topics."""
    frame = training_frame()
    new = pd.DataFrame({"task": ["C", "Z", "A"], "seq": ["bba", "ab", "aab"]})
    tokens = "chars"
    if generator == "gaussian-hmm":  # the same strings as numbers: a -> -1, b -> +1, plus noise
        rng = np.random.default_rng(1)
        for table in (frame, new):
            table["seq"] = [" ".join(f"{(1.0 if c == 'b' else -1.0) + 0.3 * rng.normal():.4f}" for c in s)
                            for s in table["seq"]]
        tokens = "numbers"
    frame.to_csv(tmp_path / "train.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    options = [generator if a == "markov" else a for a in FIT]
    result = run_main(["fit", str(tmp_path / "train.csv"), *options, "--states", "2", "--tokens", tokens,
                       "--out", str(tmp_path / "fit.json")])
    assert result.status == 0, result.err
    result = run_main(["score", str(tmp_path / "fit.json"), str(tmp_path / "new.csv"),
                       "--out", str(tmp_path / "scores.csv")])
    assert result.status == 0, result.err
    scores = pd.read_csv(tmp_path / "scores.csv", dtype={"seq": str})

    saved = json.loads((tmp_path / "fit.json").read_text())
    topics = {name: np.asarray(value) for name, value in saved["topics"].items()}
    alpha = np.asarray(saved["alpha"])
    weights = {**{task: np.asarray(p) for task, p in saved["topic_proportions"].items()}, "Z": alpha / alpha.sum()}
    expected = []
    for task, sequence in zip(new["task"], new["seq"]):
        if generator == "hmm":
            ids = [saved["labels"]["alphabet"].index(c) for c in sequence]
            densities = [topics["emit"][k][:, ids].T for k in range(len(alpha))]
        else:
            x = np.asarray(sequence.split(), float)[:, None]
            densities = [norm.pdf(x, topics["mean"][k], np.sqrt(topics["var"][k])) for k in range(len(alpha))]
        expected.append(np.log(sum(weights[task][k] * hmm_probability(topics["init"][k], topics["trans"][k], densities[k])
                                   for k in range(len(alpha)))))
    np.testing.assert_allclose(scores["loglik"], expected, rtol=1e-5)
    assert ("next_correct" in scores) == (generator == "hmm")
