"""Sequence generators against brute force and independent numpy references (float64)."""

import itertools

import hmmlearn.hmm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from mtl_jax.models.sequence_lda.generators import (
    GENERATORS,
    HMM,
    Categorical,
    GaussianHMM,
    GaussianHMMParams,
    HMMParams,
    Markov,
    MarkovParams,
)

RNG = np.random.default_rng(0)


def _simplex(rng, *shape):
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def _trans(rng, S, halting, end_low=0.2, end_high=0.5):
    """Rows over S moves (and END, last column, with probability in [end_low, end_high])."""
    moves = _simplex(rng, S, S)
    if not halting:
        return moves
    end = rng.uniform(end_low, end_high, size=(S, 1))
    return np.concatenate([(1 - end) * moves, end], axis=1)


def _hmm(rng, S, V, halting):
    """Probabilities (pi, A, B) and the matching one-topic log-parameters."""
    pi, A, B = _simplex(rng, S), _trans(rng, S, halting), _simplex(rng, S, V)
    return (pi, A, B), HMMParams(*map(jnp.log, (pi, A, B)))


def _paths_prob(pi, A, obs, halting):
    """Sum over all hidden paths of pi * prod A * prod obs (* END): brute force."""
    T, S = obs.shape
    total = 0.0
    for z in itertools.product(range(S), repeat=T):
        p = pi[z[0]] * obs[0, z[0]]
        for t in range(1, T):
            p *= A[z[t - 1], z[t]] * obs[t, z[t]]
        if halting:
            p *= A[z[-1], S]
        total += p
    return total


def _pad(x, length=16, fill=None):
    """x padded to ``length`` with zeros, or with ``fill`` values."""
    out = np.zeros(length, dtype=np.asarray(x).dtype) if fill is None else fill.copy()
    out[: len(x)] = x
    return jnp.asarray(out)


@pytest.mark.parametrize("halting", [True, False])
def test_hmm_forward_equals_path_enumeration(halting):
    rng = np.random.default_rng(1)
    (pi, A, B), params = _hmm(rng, 3, 4, halting)
    model = HMM(num_symbols=4, num_states=3, halting=halting)
    log_prob = jax.jit(model.log_prob)
    for T in range(1, 6):
        x = rng.integers(0, 4, size=T)
        expected = np.log(_paths_prob(pi, A, B[:, x].T, halting))
        np.testing.assert_allclose(log_prob(params, _pad(x), T), expected, rtol=1e-12)


@pytest.mark.parametrize("halting", [True, False])
def test_gaussian_hmm_forward_equals_path_enumeration(halting):
    rng = np.random.default_rng(2)
    pi, A = _simplex(rng, 2), _trans(rng, 2, halting)
    mean, var = np.array([-1.0, 2.0]), np.array([0.5, 2.0])
    params = GaussianHMMParams(jnp.log(pi), jnp.log(A), jnp.asarray(mean), jnp.log(var))
    model = GaussianHMM(num_states=2, halting=halting)
    log_prob = jax.jit(model.log_prob)
    for T in range(1, 6):
        x = rng.normal(size=T)
        obs = norm.pdf(x[:, None], mean, np.sqrt(var))
        expected = np.log(_paths_prob(pi, A, obs, halting))
        np.testing.assert_allclose(log_prob(params, _pad(x), T), expected, rtol=1e-12)


def _all_strings(V, max_length, pad=16):
    """Every string over V symbols of length 1..max_length: tokens [n, pad], lengths [n]."""
    strings = [s for n in range(1, max_length + 1) for s in itertools.product(range(V), repeat=n)]
    tokens = np.zeros((len(strings), pad), dtype=np.int32)
    for i, s in enumerate(strings):
        tokens[i, : len(s)] = s
    return jnp.asarray(tokens), jnp.asarray([len(s) for s in strings])


def test_halting_models_are_distributions_over_finite_strings():
    rng = np.random.default_rng(3)
    n = 10
    tokens, lengths = _all_strings(2, n)
    # Markov: rows over {0, 1, HALT}, halt probability at least 0.2.
    init, trans = _simplex(rng, 2), _trans(rng, 2, True)
    markov = Markov(num_symbols=2)
    params = MarkovParams(jnp.log(init), jnp.log(trans))
    total = jnp.sum(jnp.exp(jax.vmap(markov.log_prob, (None, 0, 0))(params, tokens, lengths)))
    tail = (1 - trans[:, 2].min()) ** n  # P(length > n) <= (1 - min halt)^n
    assert 1 - tail <= total <= 1 + 1e-12
    # HMM: END probability of every state at least 0.2.
    (_, A, _), params = _hmm(rng, 2, 2, True)
    hmm = HMM(num_symbols=2, num_states=2)
    total = jnp.sum(jnp.exp(jax.vmap(hmm.log_prob, (None, 0, 0))(params, tokens, lengths)))
    tail = (1 - A[:, 2].min()) ** n
    assert 1 - tail <= total <= 1 + 1e-12
    assert total > 0.9  # the bound is not vacuous
    # Without halting: prefix probabilities of all strings of one length sum to 1.
    exactly = lengths == 5
    _, params = _hmm(rng, 2, 2, False)
    free = HMM(num_symbols=2, num_states=2, halting=False)
    log_p = jax.vmap(free.log_prob, (None, 0, 0))(params, tokens[exactly], lengths[exactly])
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_p)), 1.0, rtol=1e-12)


def _random_params(model, rng):
    """One topic of random parameters with strictly positive probabilities."""
    return jax.tree.map(lambda x: x[0], model.init(jax.random.PRNGKey(int(rng.integers(1000))), 2))


MODELS = {
    "categorical": Categorical(num_symbols=3),
    "markov": Markov(num_symbols=3),
    "markov-prefix": Markov(num_symbols=3, halting=False),
    "hmm": HMM(num_symbols=3, num_states=2),
    "hmm-prefix": HMM(num_symbols=3, num_states=2, halting=False),
    "gaussian-hmm": GaussianHMM(num_states=2),
}


@pytest.mark.parametrize("name", MODELS)
def test_padding_changes_neither_value_nor_gradient(name):
    rng = np.random.default_rng(4)
    model = MODELS[name]
    params = _random_params(model, rng)
    if model.observations == "tokens":
        x, garbage = rng.integers(0, 3, size=5), rng.integers(0, 3, size=16)
    else:
        x, garbage = rng.normal(size=5), 100 * rng.normal(size=16)

    value_and_grad = jax.jit(jax.value_and_grad(model.log_prob))
    exact = value_and_grad(params, jnp.asarray(x), 5)
    for padded in (_pad(x), _pad(x, fill=garbage)):
        value, grad = value_and_grad(params, padded, 5)
        np.testing.assert_allclose(value, exact[0], rtol=1e-13)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13), grad, exact[1])
    # A padding row (length 0) scores 0 with zero gradient.
    value, grad = value_and_grad(params, _pad(x), 0)
    assert value == 0 and all(np.all(g == 0) for g in jax.tree.leaves(grad))


def _corpus(rng, V, num, max_length, pad=8):
    lengths = rng.integers(1, max_length + 1, size=num)
    tokens = np.zeros((num, pad), dtype=np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(0, V, size=n)
    return tokens, lengths


def test_categorical_m_step_closed_form():
    rng = np.random.default_rng(5)
    tokens, lengths = _corpus(rng, 3, 7, 6)
    weights = rng.uniform(size=(7, 2))
    model = Categorical(num_symbols=3, pseudo_count=0.5)
    new = model.m_step(model.init(jax.random.PRNGKey(0), 2), tokens, lengths, weights)
    counts = np.full((2, 3), 0.5)
    for s in range(7):
        for l in range(lengths[s]):
            counts[:, tokens[s, l]] += weights[s]
    np.testing.assert_allclose(np.exp(new.log_beta), counts / counts.sum(1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("halting", [True, False])
def test_markov_m_step_closed_form(halting):
    rng = np.random.default_rng(6)
    tokens, lengths = _corpus(rng, 3, 9, 8)
    weights = rng.uniform(size=(9, 2))
    model = Markov(num_symbols=3, halting=halting, pseudo_count=0.5)
    new = model.m_step(model.init(jax.random.PRNGKey(0), 2), tokens, lengths, weights)
    init, trans = np.full((2, 3), 0.5), np.full((2, 3, 3 + halting), 0.5)
    for s in range(9):
        x = tokens[s, : lengths[s]]
        init[:, x[0]] += weights[s]
        for a, b in zip(x[:-1], x[1:]):
            trans[:, a, b] += weights[s]
        if halting:
            trans[:, x[-1], 3] += weights[s]
    np.testing.assert_allclose(np.exp(new.log_init), init / init.sum(-1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(np.exp(new.log_trans), trans / trans.sum(-1, keepdims=True), rtol=1e-12)


def _forward_backward(pi, A, obs, halting):
    """Textbook scaled forward-backward: expected initial, move/END and state counts."""
    T, S = obs.shape
    alpha, c = np.zeros((T, S)), np.zeros(T)
    alpha[0] = pi * obs[0]
    c[0] = alpha[0].sum()
    alpha[0] /= c[0]
    for t in range(1, T):
        alpha[t] = alpha[t - 1] @ A[:, :S] * obs[t]
        c[t] = alpha[t].sum()
        alpha[t] /= c[t]
    end = A[:, S] if halting else np.ones(S)
    beta = np.zeros((T, S))
    beta[T - 1] = end / (alpha[T - 1] @ end)
    for t in range(T - 2, -1, -1):
        beta[t] = A[:, :S] @ (obs[t + 1] * beta[t + 1]) / c[t + 1]
    gamma = alpha * beta
    trans = np.zeros_like(A)
    for t in range(T - 1):
        trans[:, :S] += alpha[t][:, None] * A[:, :S] * (obs[t + 1] * beta[t + 1])[None] / c[t + 1]
    if halting:
        trans[:, S] = gamma[T - 1]
    return gamma[0], trans, gamma


@pytest.mark.parametrize("halting", [True, False])
def test_hmm_gradient_counts_equal_forward_backward(halting):
    rng = np.random.default_rng(7)
    probs = [_hmm(rng, 3, 4, halting) for _ in range(2)]
    params = jax.tree.map(lambda *x: jnp.stack(x), *[p for _, p in probs])
    tokens, lengths = _corpus(rng, 4, 6, 7)
    weights = rng.uniform(size=(6, 2))
    model = HMM(num_symbols=4, num_states=3, halting=halting)
    counts = jax.jit(model.weighted_gradients)(params, jnp.asarray(tokens), jnp.asarray(lengths), weights)
    for k, ((pi, A, B), _) in enumerate(probs):
        init, trans, emit = np.zeros(3), np.zeros_like(A), np.zeros((3, 4))
        for s in range(6):
            x = tokens[s, : lengths[s]]
            g0, xi, gamma = _forward_backward(pi, A, B[:, x].T, halting)
            init += weights[s, k] * g0
            trans += weights[s, k] * xi
            for t, v in enumerate(x):
                emit[:, v] += weights[s, k] * gamma[t]
        np.testing.assert_allclose(counts[0][k], init, rtol=1e-10)
        np.testing.assert_allclose(counts[1][k], trans, rtol=1e-10)
        np.testing.assert_allclose(counts[2][k], emit, rtol=1e-10)


def _log_space_forward(log_init, log_trans, log_obs, length, halting):
    """Textbook forward algorithm in log space (logsumexp), one sequence, differentiable by AD."""
    S = log_init.shape[0]

    def step(alpha, inputs):
        position, log_ob = inputs
        moved = jax.scipy.special.logsumexp(alpha[:, None] + log_trans[:, :S], axis=0) + log_ob
        return jnp.where(position < length, moved, alpha), None

    alpha, _ = jax.lax.scan(step, log_init + log_obs[0], (jnp.arange(1, log_obs.shape[0]), log_obs[1:]))
    total = jax.scipy.special.logsumexp(alpha + (log_trans[:, S] if halting else 0.0))
    return jnp.where(length > 0, total, 0.0)


@pytest.mark.parametrize("halting", [True, False])
@pytest.mark.parametrize("emissions", ["categorical", "gaussian"])
def test_backward_algorithm_gradient_equals_autodiff_of_a_log_space_forward(halting, emissions):
    """The batched scaled forward pass and its custom gradient (the backward recursion)
    against reverse-mode AD of a log-space forward pass, on lengths 0..L with weights;
    Gaussian emission log-densities far below zero (data 15 standard deviations out)."""
    rng = np.random.default_rng(12)
    S, L = 3, 6
    lengths = jnp.arange(L + 1)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, size=L + 1))
    if emissions == "categorical":
        model = HMM(num_symbols=4, num_states=S, halting=halting)
        x = jnp.asarray(rng.integers(0, 4, size=(L + 1, L)))
        log_obs = lambda p, row: p.log_emit[:, row].T  # noqa: E731
    else:
        model = GaussianHMM(num_states=S, halting=halting)
        x = jnp.asarray(rng.normal(size=(L + 1, L)) + 15.0)
        log_obs = lambda p, row: jax.scipy.stats.norm.logpdf(row[:, None], p.mean, jnp.exp(0.5 * p.log_var))  # noqa: E731
    params = _random_params(model, rng)

    def ours(p):
        return jnp.sum(weights * model.log_probs(p, x, lengths))

    def reference(p):
        one = lambda row, n: _log_space_forward(p[0], p[1], log_obs(p, row), n, halting)  # noqa: E731
        return jnp.sum(weights * jax.vmap(one)(x, lengths))

    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    if emissions == "gaussian":
        assert ref_value < -1000.0  # the regime of the test: densities far below 1
    np.testing.assert_allclose(value, ref_value, rtol=1e-13)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-12)


def test_gaussian_hmm_m_step_equals_forward_backward_update():
    rng = np.random.default_rng(8)
    pi, A = _simplex(rng, 2), _trans(rng, 2, True)
    mean, var = np.array([-1.0, 1.5]), np.array([0.7, 1.3])
    params = GaussianHMMParams(*map(lambda a: jnp.asarray(a)[None], (np.log(pi), np.log(A), mean, np.log(var))))
    lengths = rng.integers(1, 7, size=5)
    values = rng.normal(size=(5, 8)) * (np.arange(8) < lengths[:, None])
    weights = rng.uniform(size=(5, 1))
    model = GaussianHMM(num_states=2, pseudo_count=0.3, prior_mean=0.2, prior_variance=2.0)
    new = jax.jit(model.m_step)(params, jnp.asarray(values), jnp.asarray(lengths), weights)
    init, trans, n, sx = 0.3 + np.zeros(2), 0.3 + np.zeros_like(A), np.zeros(2), np.zeros(2)
    occupancies = []
    for s in range(5):
        x = values[s, : lengths[s]]
        g0, xi, gamma = _forward_backward(pi, A, norm.pdf(x[:, None], mean, np.sqrt(var)), True)
        init += weights[s, 0] * g0
        trans += weights[s, 0] * xi
        n += weights[s, 0] * gamma.sum(0)
        sx += weights[s, 0] * gamma.T @ x
        occupancies.append((weights[s, 0] * gamma, x))
    mu = (sx + 0.3 * 0.2) / (n + 0.3)
    ss = sum(((g * (x[:, None] - mu) ** 2).sum(0) for g, x in occupancies))
    sigma2 = (ss + 0.3 * (mu - 0.2) ** 2 + 0.3 * 2.0) / (n + 0.3)
    np.testing.assert_allclose(np.exp(new.log_init[0]), init / init.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.exp(new.log_trans[0]), trans / trans.sum(1, keepdims=True), rtol=1e-10)
    np.testing.assert_allclose(new.mean[0], mu, rtol=1e-10)
    np.testing.assert_allclose(np.exp(new.log_var[0]), sigma2, rtol=1e-10)


def _log_prior(model, params):
    """Log of the M-step's prior, up to a constant (Dirichlet pseudo-counts, Gaussian prior)."""
    a = model.pseudo_count
    simplices = [p for f, p in params._asdict().items() if f.startswith("log_") and f != "log_var"]
    value = sum(a * jnp.sum(p) for p in simplices)
    if isinstance(model, GaussianHMM):
        var = jnp.exp(params.log_var)
        value += jnp.sum(-a / 2 * params.log_var - a * ((params.mean - model.prior_mean) ** 2 + model.prior_variance) / (2 * var))
    return value


@pytest.mark.parametrize("name", MODELS)
def test_m_steps_increase_the_weighted_objective(name):
    rng = np.random.default_rng(9)
    model = MODELS[name]
    tokens, lengths = _corpus(rng, 3, 20, 8)
    x = jnp.asarray(tokens) if model.observations == "tokens" else jnp.asarray(rng.normal(size=(20, 8)))
    weights = jnp.asarray(rng.dirichlet(np.ones(2), size=20))
    score = jax.vmap(jax.vmap(model.log_prob, (None, 0, 0)), (0, None, None), 1)

    @jax.jit
    def objective(params):
        return jnp.sum(weights * score(params, x, jnp.asarray(lengths))) + _log_prior(model, params)

    step = jax.jit(lambda params: model.m_step(params, x, jnp.asarray(lengths), weights))
    params = model.init(jax.random.PRNGKey(3), 2)
    trace = [objective(params)]
    for _ in range(8):
        params = step(params)
        trace.append(objective(params))
    assert np.all(np.diff(trace) >= -1e-9), trace
    assert trace[-1] > trace[0] + 1.0


@pytest.mark.parametrize("name", ["hmm", "gaussian-hmm"])
def test_float32_forward_at_T_20000(name):
    rng = np.random.default_rng(10)
    T = 20_000
    model = MODELS[name]
    params = _random_params(model, rng)
    x = rng.integers(0, 3, size=T) if name == "hmm" else rng.normal(size=T)
    exact = model.log_prob(params, jnp.asarray(x), T)
    single = model.log_prob(
        jax.tree.map(lambda p: p.astype(jnp.float32), params),
        jnp.asarray(x, dtype=jnp.int32 if name == "hmm" else jnp.float32),
        jnp.int32(T),
    )
    assert single.dtype == jnp.float32 and np.isfinite(single)
    assert abs(float(single) - float(exact)) <= 1e-4 * abs(float(exact))


def _simulate_hmm(rng, pi, A, B, num):
    """Sequences from a halting HMM (numpy): tokens [num, L], lengths [num]."""
    S = len(pi)
    sequences = []
    for _ in range(num):
        z, x = rng.choice(S, p=pi), []
        while True:
            x.append(rng.choice(B.shape[1], p=B[z]))
            nxt = rng.choice(S + 1, p=A[z])
            if nxt == S:
                break
            z = nxt
        sequences.append(x)
    length = max(map(len, sequences))
    tokens = np.zeros((num, length), dtype=np.int32)
    for i, x in enumerate(sequences):
        tokens[i, : len(x)] = x
    return tokens, np.array([len(x) for x in sequences])


def test_hmm_recovers_simulated_likelihood():
    rng = np.random.default_rng(11)
    pi = np.array([0.8, 0.2])
    A = np.array([[0.75, 0.15, 0.10], [0.2, 0.7, 0.1]])
    B = np.array([[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]])
    tokens, lengths = _simulate_hmm(rng, pi, A, B, 500)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    model = HMM(num_symbols=3, num_states=2, pseudo_count=1e-3)
    truth = HMMParams(*(jnp.log(p)[None] for p in (pi, A, B)))
    total = jax.jit(lambda p: jnp.sum(jax.vmap(model.log_prob, (None, 0, 0))(
        jax.tree.map(lambda a: a[0], p), tokens, lengths)))
    weights = jnp.ones((500, 1))
    step = jax.jit(lambda p: model.m_step(p, tokens, lengths, weights))
    params = model.init(jax.random.PRNGKey(0), 1)
    trace = [total(params)]
    for _ in range(150):
        params = step(params)
        trace.append(total(params))
    assert np.all(np.diff(trace) >= -1e-6)
    assert trace[-1] >= total(truth) - 3.0, (trace[-1], total(truth))


def test_hmm_matches_hmmlearn_without_halting():
    rng = np.random.default_rng(12)
    (pi, A, B), params = _hmm(rng, 3, 4, False)
    reference = hmmlearn.hmm.CategoricalHMM(n_components=3, n_features=4)
    reference.startprob_, reference.transmat_, reference.emissionprob_ = pi, A, B
    model = HMM(num_symbols=4, num_states=3, halting=False)
    for T in (1, 2, 7, 13):
        x = rng.integers(0, 4, size=T)
        np.testing.assert_allclose(
            model.log_prob(params, _pad(x), T), reference.score(x[:, None]), rtol=1e-10
        )


def _prefix_mass(pi, A, B, x):
    """P(a string starts with x) under a halting HMM: paths without the END factor."""
    if len(x) == 0:
        return 1.0
    return _paths_prob(pi, A, B[:, x].T, halting=False)


def test_hmm_next_symbol_distribution_by_enumeration():
    rng = np.random.default_rng(13)
    (pi, A, B), params = _hmm(rng, 2, 3, True)
    model = HMM(num_symbols=3, num_states=2)
    x = np.array([2, 0, 1])
    table = np.exp(model.next_symbol_log_probs(params, _pad(x, 8), 3))
    assert table.shape == (9, 4)
    for j in range(4):
        prefix = _prefix_mass(pi, A, B, x[:j])
        expected = [_prefix_mass(pi, A, B, np.append(x[:j], v)) / prefix for v in range(3)]
        expected.append(_paths_prob(pi, A, B[:, x[:j]].T, True) / prefix if j else 0.0)
        np.testing.assert_allclose(table[j], expected, rtol=1e-10, atol=1e-15)


def test_markov_next_symbol_distribution_by_prefix_masses():
    rng = np.random.default_rng(14)
    init, trans = _simplex(rng, 3), _trans(rng, 3, True)
    model = Markov(num_symbols=3)
    params = MarkovParams(jnp.log(init), jnp.log(trans))
    x = np.array([1, 1, 0])

    def prefix(s):  # P(a string starts with s)
        return init[s[0]] * np.prod([trans[a, b] for a, b in zip(s[:-1], s[1:])]) if len(s) else 1.0

    table = np.exp(model.next_symbol_log_probs(params, _pad(x, 8), 3))
    for j in range(4):
        expected = [prefix(np.append(x[:j], v)) / prefix(x[:j]) for v in range(3)]
        expected.append(prefix(x[:j]) * trans[x[j - 1], 3] / prefix(x[:j]) if j else 0.0)
        np.testing.assert_allclose(table[j], expected, rtol=1e-12)


def test_registry_names():
    assert set(GENERATORS) == {"categorical", "markov", "hmm", "gaussian-hmm"}
    assert GENERATORS["gaussian-hmm"].observations == "values"
    assert hash(HMM(num_symbols=3, num_states=2)) == hash(HMM(num_symbols=3, num_states=2))


@pytest.mark.parametrize("start_log_var", [np.log(1e-4), 0.0])
def test_gaussian_hmm_m_step_float32_far_from_zero_with_small_variances(start_log_var):
    """One Baum-Welch step in float32 against float64 on 20,000 values near 1000 with
    standard deviations 0.01 and 0.02, from variances about right or 10^4 too large."""
    rng = np.random.default_rng(13)
    N, L = 400, 50
    state = rng.integers(0, 2, size=(N, L))
    values = 1000.0 + np.where(state == 0, -0.05, 0.05) + np.where(state == 0, 0.01, 0.02) * rng.normal(size=(N, L))
    lengths = rng.integers(L // 2, L + 1, size=N)
    model = GaussianHMM(num_states=2, pseudo_count=1e-3, prior_mean=1000.0, prior_variance=1e-4)
    A = np.array([[0.8, 0.15, 0.05], [0.15, 0.8, 0.05]])
    params = GaussianHMMParams(
        jnp.log(jnp.array([[0.5, 0.5]])), jnp.log(jnp.asarray(A))[None],
        jnp.array([[999.96, 1000.03]]), jnp.full((1, 2), start_log_var),
    )
    weights = rng.uniform(0.5, 1.5, size=(N, 1))
    step = jax.jit(model.m_step)
    exact = step(params, jnp.asarray(values), jnp.asarray(lengths), jnp.asarray(weights))
    single = step(
        jax.tree.map(lambda p: p.astype(jnp.float32), params),
        jnp.asarray(values, jnp.float32), jnp.asarray(lengths, jnp.int32), jnp.asarray(weights, jnp.float32),
    )
    assert single.mean.dtype == jnp.float32
    np.testing.assert_allclose(single.mean, exact.mean, atol=2e-4)  # float32 spacing at 1000 is 6e-5
    np.testing.assert_allclose(np.exp(single.log_var), np.exp(exact.log_var), rtol=1e-3)
    np.testing.assert_allclose(single.log_trans, exact.log_trans, atol=1e-4)
