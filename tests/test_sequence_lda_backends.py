"""Sequential LDA through the generic SVI and NUTS backends: the NumPyro program against an
independent density, label-switching invariance, and EM / SVI / NUTS agreement."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density
from scipy.special import logsumexp
from scipy.stats import dirichlet, invgamma, norm

from mtl_jax import SequenceData, SequenceLDA, fit
from mtl_jax.models.sequence_lda import SequenceLDAParams
from mtl_jax.models.sequence_lda.generators import MarkovParams

SEQUENCES = {"x": ["ab", "abb", "ab", "b"], "y": ["ba", "aab", "a"], "z": ["bbb", "ab"]}


def _markov_log_p(sequence, init, trans, alphabet):
    """Independent reference: pi_{x1} prod A_{x_l x_l+1} A_{x_L, HALT} (HALT the last column)."""
    ids = [alphabet.index(symbol) for symbol in sequence]
    steps = sum(np.log(trans[u, v]) for u, v in zip(ids[:-1], ids[1:]))
    return np.log(init[ids[0]]) + steps + np.log(trans[ids[-1], -1])


@pytest.mark.parametrize("alpha_mode", ["symmetric", "asymmetric"])
def test_program_log_density_matches_independent_density(alpha_mode):
    data = SequenceData.from_lists(SEQUENCES)
    alphabet = list(data.alphabet)
    model = SequenceLDA(2, "markov", alpha=alpha_mode, pseudo_count=0.3)
    rng = np.random.default_rng(3)
    K, V, T = 2, len(alphabet), len(SEQUENCES)
    init = rng.dirichlet(np.ones(V), K)
    trans = rng.dirichlet(np.ones(V + 1), (K, V))
    theta = rng.dirichlet(np.ones(K), T)
    log_alpha = np.array(0.4) if alpha_mode == "symmetric" else np.array([0.4, -0.7])
    values = {"init": jnp.asarray(init), "trans": jnp.asarray(trans), "log_alpha": jnp.asarray(log_alpha),
              "theta": jnp.asarray(theta)}
    got, _ = log_density(model.numpyro_model, (model.design(data),), {}, values)

    alpha = np.broadcast_to(np.exp(log_alpha), (K,))
    expected = sum(dirichlet.logpdf(row, np.full(V, 1.3)) for row in init)
    expected += sum(dirichlet.logpdf(trans[k, u], np.full(V + 1, 1.3)) for k in range(K) for u in range(V))
    expected += norm.logpdf(log_alpha).sum()
    expected += sum(dirichlet.logpdf(theta[t], alpha) for t in range(T))
    for t, name in enumerate(data.task_names):
        for sequence in SEQUENCES[name]:
            expected += logsumexp([np.log(theta[t, k]) + _markov_log_p(sequence, init[k], trans[k], alphabet)
                                   for k in range(K)])
    assert float(got) == pytest.approx(expected, rel=1e-12)


def _gaussian_frame(sequences):
    """Long format (task, seq, pos, value) of ``{task: [list of floats]}``."""
    import pandas as pd

    rows = [(task, j, position, value) for task, task_sequences in sequences.items()
            for j, sequence in enumerate(task_sequences) for position, value in enumerate(sequence)]
    return pd.DataFrame(rows, columns=["task", "seq", "pos", "value"])


def _gaussian_hmm_log_p(x, init, trans, mean, var):
    """Independent reference: the sum over every hidden path of pi A N(x | mu, var) A_END."""
    S = len(init)
    total = 0.0
    for path in itertools.product(range(S), repeat=len(x)):
        p = init[path[0]] * norm.pdf(x[0], mean[path[0]], np.sqrt(var[path[0]]))
        for u, v, value in zip(path[:-1], path[1:], x[1:]):
            p *= trans[u, v] * norm.pdf(value, mean[v], np.sqrt(var[v]))
        total += p * trans[path[-1], S]
    return np.log(total)


def test_gaussian_hmm_program_log_density_matches_independent_density():
    sequences = {"x": [[0.3, -1.2, 0.8], [2.1]], "y": [[1.5, 1.7], [-0.4, 0.2, 0.1]], "z": [[0.9]]}
    data = SequenceData.from_long(_gaussian_frame(sequences), task="task", sequence_id="seq", position="pos",
                                  value="value")
    a, m0, v0 = 0.3, 0.0, 1.0  # the emission prior's mean and variance are the generator's defaults
    model = SequenceLDA(2, "gaussian-hmm", num_states=2, pseudo_count=a, alpha="asymmetric")
    rng = np.random.default_rng(5)
    K, S, T = 2, 2, 3
    init, trans = rng.dirichlet(np.ones(S), K), rng.dirichlet(np.ones(S + 1), (K, S))
    mean, var = rng.normal(size=(K, S)), rng.uniform(0.3, 2.0, (K, S))
    theta, log_alpha = rng.dirichlet(np.ones(K), T), np.array([0.2, -0.3])
    values = {"init": init, "trans": trans, "mean": mean, "var": var, "log_alpha": log_alpha, "theta": theta}
    got, _ = log_density(model.numpyro_model, (model.design(data),), {},
                         {name: jnp.asarray(value) for name, value in values.items()})

    expected = sum(dirichlet.logpdf(init[k], np.full(S, 1 + a)) for k in range(K))
    expected += sum(dirichlet.logpdf(trans[k, s], np.full(S + 1, 1 + a)) for k in range(K) for s in range(S))
    expected += norm.logpdf(mean, m0, np.sqrt(v0 / a)).sum() + invgamma.logpdf(var, 1 + a, scale=a * v0).sum()
    expected += norm.logpdf(log_alpha).sum()
    expected += sum(dirichlet.logpdf(theta[t], np.exp(log_alpha)) for t in range(T))
    for t, name in enumerate(data.task_names):
        for x in sequences[name]:
            expected += logsumexp([np.log(theta[t, k]) + _gaussian_hmm_log_p(x, init[k], trans[k], mean[k], var[k])
                                   for k in range(K)])
    assert float(got) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="pseudo_count > 0"):
        log_density(SequenceLDA(2, "gaussian-hmm", num_states=2, pseudo_count=0.0).numpyro_model,
                    (model.design(data),), {}, {name: jnp.asarray(value) for name, value in values.items()})


def test_sites_round_trip_and_gamma_gives_theta():
    data = SequenceData.from_lists(SEQUENCES)
    model = SequenceLDA(2, "markov", alpha="symmetric")
    params = model.init(jax.random.key(4), model.design(data))
    draws = {name: np.stack([value, value]) for name, value in model.site_values(params).items()}
    draws["gamma"] = np.stack([params.gamma, 2.0 * params.gamma])
    back = model.from_sites(draws)
    assert back.log_alpha.shape == (2, 2)
    np.testing.assert_allclose(back.topics.log_trans[1], params.topics.log_trans, atol=1e-12)
    np.testing.assert_allclose(back.log_alpha[0], params.log_alpha, atol=0)



def test_every_topic_permutation_leaves_scores_unchanged_and_align_undoes_it():
    data = SequenceData.from_lists(SEQUENCES)
    model = SequenceLDA(3, "markov", alpha="asymmetric", inner_iterations=5)
    design = model.design(data)
    rng = np.random.default_rng(7)
    params = SequenceLDAParams(
        MarkovParams(jnp.log(rng.dirichlet(np.ones(2), 3)), jnp.log(rng.dirichlet(np.ones(3), (3, 2)))),
        jnp.asarray([0.3, -0.5, 1.1]), jnp.asarray(rng.uniform(0.5, 4.0, (3, 3))))
    score, predictive = float(model.score(params, design)), np.asarray(model.log_predictive(params, design))
    for order in itertools.permutations(range(3)):
        order = np.array(order)
        permuted = SequenceLDAParams(jax.tree_util.tree_map(lambda leaf: leaf[order], params.topics),
                                     params.log_alpha[order], params.gamma[:, order])
        assert float(model.score(permuted, design)) == pytest.approx(score, rel=1e-10)
        np.testing.assert_allclose(model.log_predictive(permuted, design), predictive, rtol=1e-12)
        aligned = model.align(permuted, params)
        for got, want in zip(jax.tree_util.tree_leaves(aligned), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(got, want)


def _two_topic_data():
    """4 tasks x 15 sequences over ``ab``: topic A sticks to ``a``, topic B to ``b``."""
    rng = np.random.default_rng(11)
    trans = np.array([[[0.75, 0.05, 0.2], [0.6, 0.2, 0.2]], [[0.2, 0.6, 0.2], [0.05, 0.75, 0.2]]])
    init = np.array([[0.9, 0.1], [0.1, 0.9]])
    tasks = {}
    for t, weight in enumerate([0.85, 0.7, 0.3, 0.15]):
        sequences = []
        for _ in range(15):
            k = 0 if rng.uniform() < weight else 1
            state = rng.choice(2, p=init[k])
            sequence = [state]
            while (step := rng.choice(3, p=trans[k, state])) < 2 and len(sequence) < 12:
                state = step
                sequence.append(state)
            sequences.append("".join("ab"[s] for s in sequence))
        tasks[f"task{t}"] = sequences
    return SequenceData.from_lists(tasks)


@pytest.fixture(scope="module")
def three_fits():
    data = _two_topic_data()
    model = SequenceLDA(2, "markov", alpha="symmetric")
    em = fit(model, data, "em", seed=0)
    return (data, model, em,
            fit(model, data, "svi", seed=1, num_steps=400, learning_rate=0.02, num_samples=100,
                init_params=em.params),
            fit(model, data, "nuts", seed=2, num_warmup=150, num_samples=150, num_chains=2, init_params=em.params))


def test_em_svi_and_nuts_transition_probabilities_agree(three_fits):
    data, model, em, svi, nuts = three_fits
    draws = np.exp(np.asarray(nuts.draws.topics.log_trans))
    assert draws.shape[:2] == (2, 150)
    mean, sd = draws.mean(axis=(0, 1)), draws.std(axis=(0, 1))
    for other in (em, svi):
        aligned = model.align(jax.tree_util.tree_map(np.asarray, other.params), nuts.params)
        gap = np.abs(np.exp(np.asarray(aligned.topics.log_trans)) - mean) / sd
        assert gap.max() < 3.0, (other.method, gap)
    assert nuts.diagnostics["num_divergences"] <= 3
    for fitted in (svi, nuts):
        theta = np.asarray(fitted.params.gamma) / np.asarray(fitted.params.gamma).sum(-1, keepdims=True)
        assert theta.shape == (4, 2) and np.all(np.isfinite(fitted.score(data)))


def _two_gaussian_topic_data():
    """4 tasks x 12 real sequences: topic A's two states emit near -3 and -1, topic B's near 1 and 3."""
    rng = np.random.default_rng(12)
    means = np.array([[-3.0, -1.0], [1.0, 3.0]])
    sequences = {}
    for t, weight in enumerate([0.9, 0.7, 0.3, 0.1]):
        task_sequences = []
        for _ in range(12):
            k = 0 if rng.uniform() < weight else 1
            state, sequence = rng.integers(2), []
            while True:
                sequence.append(rng.normal(means[k, state], 0.4))
                if rng.uniform() < 0.25 or len(sequence) == 8:
                    break
                state = state if rng.uniform() < 0.7 else 1 - state
            task_sequences.append(sequence)
        sequences[f"task{t}"] = task_sequences
    return SequenceData.from_long(_gaussian_frame(sequences), task="task", sequence_id="seq", position="pos",
                                  value="value")


def test_gaussian_hmm_em_svi_and_nuts_agree():
    data = _two_gaussian_topic_data()
    model = SequenceLDA(2, "gaussian-hmm", num_states=2)
    em = fit(model, data, "em", seed=0)
    svi = fit(model, data, "svi", seed=1, num_steps=200, learning_rate=0.02, num_samples=50, init_params=em.params)
    nuts = fit(model, data, "nuts", seed=2, num_warmup=150, num_samples=150, num_chains=2, init_params=em.params)
    assert nuts.converged and nuts.diagnostics["num_divergences"] <= 3
    draws = np.asarray(nuts.draws.topics.mean)  # [chains, draws, K, S]
    mean, sd = draws.mean(axis=(0, 1)), draws.std(axis=(0, 1))
    assert np.sort(mean.ravel()) == pytest.approx([-3.0, -1.0, 1.0, 3.0], abs=0.5)
    for other in (em, svi):
        aligned = model.align(jax.tree_util.tree_map(np.asarray, other.params), nuts.params)
        gap = np.abs(np.asarray(aligned.topics.mean) - mean) / sd
        assert gap.max() < 3.0, (other.method, gap)
    assert np.all(np.isfinite(svi.score(data))) and np.all(np.isfinite(nuts.score(data)))
