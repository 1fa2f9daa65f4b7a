r"""Speed of Sequential LDA's EM: one HMM against hmmlearn and dynamax, LDA against scikit-learn, scaling.

::

    python benchmarks/sequence_speed.py --sequences 2000 --length 100 --symbols 20 --states 5 \
        --documents 2000 --tokens-per-document 100 --vocabulary 1000 --topics 10 \
        --scaling-tasks 20 --scaling-per-task 100 --scaling-factors 1 10 100 --json results/sequence_speed.json

Every time is seconds per EM iteration, warm: our steps are compiled ahead of time and run
once (compile time reported apart), then the median of ``--repeats`` runs is taken. The
peers are optional (``pip install -e ".[bench]"``); an absent peer is skipped with a
message. Data are simulated with fixed seeds (``--seed``). Everything runs in float64,
the peers' precision (hmmlearn and scikit-learn compute in float64 only).

(a) **HMM** (the issue's goals: at least 8x hmmlearn and 5x dynamax per iteration): one
    categorical HMM with ``--states`` states over ``--symbols`` symbols (a single topic,
    every sequence with weight 1, no halting state, so that the likelihood is the peers'
    prefix likelihood) fitted to ``--sequences`` sequences of ``--length`` symbols drawn
    from a random HMM. Ours is one Baum-Welch step of the package's generator,
    ``HMM(halting=False, pseudo_count=0).m_step`` (the expected counts are the gradient
    of the log-likelihood, a forward pass and its reverse-mode backward pass, then the
    rows are normalised: the maximum-likelihood E- and M-step). hmmlearn's
    ``CategoricalHMM`` runs ``fit`` with ``n_iter = k``, ``tol = 0``, ``init_params = ""``,
    ``params = "ste"`` on the concatenated sequences with their ``lengths``; dynamax's
    ``CategoricalHMM.fit_em`` (flat Dirichlet priors, i.e. maximum likelihood; the whole
    call jitted) runs ``k`` iterations (``k = --hmm-iterations``; time divided by ``k``).
    All three start from the same random point. Parity after one iteration from it: the
    total log-likelihood at the start (the first E-step's) and at the new parameters
    (each library's own scorer), and the new parameters.
(b) **LDA**: the categorical generator with one token per sequence is LDA, a task being a
    document: ``--documents`` documents of ``--tokens-per-document`` tokens over
    ``--vocabulary`` words from ``--topics`` random topics, stored as one row per distinct
    (document, word) with its count (what ``SequenceData.from_lists`` stores). Ours is
    ``SequenceLDA(generator="categorical").em_step``; the peer is scikit-learn's
    ``LatentDirichletAllocation(learning_method="batch")`` on the same document-term
    matrix with the same number of E-step rounds per iteration (``--inner-iterations`` as
    ``max_doc_update_iter``, ``mean_change_tol = 0``). ``fit`` ends with one more E-step
    pass, so its time per iteration is ``(T(1 + k) - T(1)) / k`` (``k = --lda-iterations``).
    The two optimise slightly different objectives: scikit-learn's is variational Bayes
    with Dirichlet priors on the topics (its topics are variational Dirichlets), ours a
    MAP point estimate of the topics plus a Newton update of ``alpha`` (which
    scikit-learn keeps fixed); the work per iteration is alike.
(c) **Scaling**: ``SequenceLDA(--scaling-topics, generator="markov")`` (halting Markov
    topics over ``--symbols`` symbols) on ``--scaling-tasks`` tasks of
    ``--scaling-per-task`` sequences of ``--length`` symbols, and on ``--scaling-factors``
    times as many tasks: seconds per EM iteration and their ratio to the base size.

Data of (b) and (c) are padded to the package's buckets (:func:`sequence_data`), as
``SequenceData`` stores them. Ratios, not absolute times, are the point: absolute numbers
depend on the machine (on a CPU, XLA uses every core; hmmlearn and scikit-learn run on one).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix

from mtl_jax.data.sequences import SequenceData, bucket_length, bucket_rows
from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import compile_and_run, median_time, resolve_dtype
from mtl_jax.models.sequence_lda import SequenceLDA, vem
from mtl_jax.models.sequence_lda.generators import HMM, HMMParams

#: The issue's goals: peer time per iteration over ours.
GOALS = {"hmmlearn": 8.0, "dynamax": 5.0}


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (``benchmarks/peers.py`` reads its sequence settings with them too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hmm = parser.add_argument_group("(a) HMM against hmmlearn and dynamax")
    hmm.add_argument("--sequences", type=int, default=2000, help="N sequences")
    hmm.add_argument("--length", type=int, default=100, help="T symbols per sequence (also in (c))")
    hmm.add_argument("--symbols", type=int, default=20, help="V symbols (also in (c))")
    hmm.add_argument("--states", type=int, default=5, help="S hidden states")
    hmm.add_argument("--hmm-iterations", type=int, default=5, help="EM iterations per timed peer fit")
    hmm.add_argument("--hmmlearn-implementation", choices=("scaling", "log"), default="scaling",
                     help="hmmlearn's forward-backward (scaling: its faster one)")
    lda = parser.add_argument_group("(b) LDA against scikit-learn")
    lda.add_argument("--documents", type=int, default=2000)
    lda.add_argument("--tokens-per-document", type=int, default=100)
    lda.add_argument("--vocabulary", type=int, default=1000, help="V words")
    lda.add_argument("--topics", type=int, default=10, help="K topics")
    lda.add_argument("--lda-iterations", type=int, default=5, help="k of the peer's (T(1 + k) - T(1)) / k")
    scaling = parser.add_argument_group("(c) scaling of Markov-topic Sequential LDA")
    scaling.add_argument("--scaling-tasks", type=int, default=20, help="tasks at the base size")
    scaling.add_argument("--scaling-per-task", type=int, default=100, help="sequences per task")
    scaling.add_argument("--scaling-topics", type=int, default=3, help="K Markov topics")
    scaling.add_argument("--scaling-factors", type=int, nargs="+", default=[1, 10, 100],
                         help="multiples of the base number of tasks")
    parser.add_argument("--inner-iterations", type=int, default=20, help="E-step rounds per EM iteration, (b) and (c)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("results/sequence_speed.json"), help="output file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the benchmark, write ``--json``; return the results."""
    args = build_parser().parse_args(argv)
    output = measure(args)
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.json)
    return output


def measure(args, parts: Sequence[str] = ("hmm", "lda", "scaling")) -> dict:
    """Run the ``parts`` of the benchmark (each from its own seeds, whichever run) under ``args``.

    Returns:
        ``{"config", "dtype", "hmm", "lda", "scaling"}``, the parts not run left out.
    """
    dtype = resolve_dtype("float64")  # like the peers, and for the parity checks
    hmm_rng, lda_rng, scaling_rng = np.random.default_rng(args.seed).spawn(3)
    lda_key, scaling_key = jax.random.split(jax.random.key(args.seed))
    runs = {"hmm": lambda: hmm_part(args, hmm_rng), "lda": lambda: lda_part(args, lda_rng, lda_key),
            "scaling": lambda: scaling_part(args, scaling_rng, scaling_key)}
    output = {"config": {**vars(args), "json": str(args.json)}, "dtype": str(dtype)}
    output.update({part: runs[part]() for part in parts})
    return output


# ------------------------------------------------------------------------- data
def random_simplex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Flat-Dirichlet probability vectors along the last axis of ``shape``."""
    return rng.dirichlet(np.ones(shape[-1]), shape[:-1])


def sample_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw from each row of ``probs [n, m]`` (inverse CDF), ``[n]``."""
    below = np.cumsum(probs, axis=-1) < rng.random((probs.shape[0], 1))
    return np.minimum(below.sum(axis=-1), probs.shape[-1] - 1)


def sample_hmm(rng, init, trans, emit, topic, length: int) -> np.ndarray:
    """Sequences of ``length`` symbols from HMM topics without halting, int32 ``[n, length]``.

    Sequence ``i`` comes from topic ``topic[i]`` with initial states ``init [K, S]``,
    moves ``trans [K, S, S]`` and emissions ``emit [K, S, V]``; a Markov chain over the
    symbols is the HMM whose emissions are the identity.
    """
    state = sample_categorical(rng, init[topic])
    tokens = np.empty((len(topic), length), np.int32)
    for position in range(length):
        tokens[:, position] = sample_categorical(rng, emit[topic, state])
        state = sample_categorical(rng, trans[topic, state])
    return tokens


def sequence_data(tokens, lengths, task, counts, num_tasks: int, num_symbols: int) -> SequenceData:
    """Distinct encoded rows as a :class:`SequenceData` padded to the package's buckets.

    What ``SequenceData.from_lists`` stores for these rows (``bucket_rows`` rows,
    ``bucket_length`` positions; padding rows of length and count 0), without its
    per-symbol Python encoding, which would dominate the larger sizes.
    """
    num_rows, num_positions = bucket_rows(len(tokens)), bucket_length(int(np.max(lengths)))
    pad = num_rows - len(tokens)
    return SequenceData(
        tokens=jnp.asarray(np.pad(tokens, ((0, pad), (0, num_positions - tokens.shape[1])))),
        values=None,
        lengths=jnp.asarray(np.pad(lengths, (0, pad)), jnp.int32),
        task=jnp.asarray(np.pad(task, (0, pad)), jnp.int32),
        counts=jnp.asarray(np.pad(np.asarray(counts, float), (0, pad))),
        task_names=tuple(f"task{t}" for t in range(num_tasks)),
        alphabet=tuple(f"s{v}" for v in range(num_symbols)),
    )


def _ratio(peer: dict, ours: dict) -> float:
    """Peer time per iteration over ours (how many times faster ours is)."""
    return peer["seconds_per_iteration"] / ours["seconds_per_iteration"]


# ----------------------------------------------------------------------- (a) HMM
def hmm_part(args, rng: np.random.Generator) -> dict:
    """Part (a): one Baum-Welch step of our HMM against hmmlearn and dynamax, same data and start."""
    S, V, N, T = args.states, args.symbols, args.sequences, args.length
    shapes = ((1, S), (1, S, S), (1, S, V))
    truth = [random_simplex(rng, shape) for shape in shapes]
    tokens = sample_hmm(rng, *truth, np.zeros(N, int), T)
    lengths = np.full(N, T, np.int32)
    generator = HMM(V, S, halting=False, pseudo_count=0.0)
    probs = [random_simplex(rng, shape[1:]) for shape in shapes]  # the start (pi, A, B)
    start = HMMParams(*(jnp.log(p)[None] for p in probs))
    inputs = dict(params=start, tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths), weights=jnp.ones((N, 1)))
    step = jax.jit(lambda params, tokens, lengths, weights: generator.m_step(params, tokens, lengths, weights))
    run = compile_and_run(step, **inputs)
    seconds, one_step = median_time(lambda: run.compiled(**inputs), args.repeats)
    log_likelihoods = jax.jit(vem.topic_log_likelihoods, static_argnums=0)
    ours = {
        "seconds_per_iteration": seconds,
        "compile_seconds": run.compile_seconds,
        **{f"loglik_{name}": float(jnp.sum(log_likelihoods(generator, params, inputs["tokens"], inputs["lengths"])))
           for name, params in (("start", start), ("one_step", one_step))},
    }
    reference = {**ours, "one_step": [np.exp(np.asarray(leaf[0])) for leaf in one_step]}
    return {
        "data": {"sequences": N, "length": T, "symbols": V, "states": S, "tokens": N * T},
        "ours": ours,
        "hmmlearn": _hmmlearn_peer(args, probs, tokens, lengths, reference),
        "dynamax": _dynamax_peer(args, probs, tokens, reference),
    }


def _parity(ours: dict, loglik_start: float, loglik_one_step: float, one_step: Sequence[np.ndarray]) -> dict:
    """A peer's first iteration against ours (``ours`` with our ``one_step`` probabilities ``(pi, A, B)``).

    Returns the peer's log-likelihoods, their largest absolute and relative differences
    from ours, and the largest absolute difference of the parameters after the step.
    """
    pairs = [(float(loglik_start), ours["loglik_start"]), (float(loglik_one_step), ours["loglik_one_step"])]
    return {
        "loglik_start": pairs[0][0],
        "loglik_one_step": pairs[1][0],
        "loglik_max_abs_difference": max(abs(a - b) for a, b in pairs),
        "loglik_max_relative_difference": max(abs(a - b) / abs(b) for a, b in pairs),
        "max_abs_param_difference": max(float(np.max(np.abs(np.asarray(a) - b)))
                                        for a, b in zip(one_step, ours["one_step"])),
    }


def _hmmlearn_peer(args, probs, tokens, lengths, ours: dict) -> dict:
    """hmmlearn's ``CategoricalHMM`` from the start ``probs = (pi, A, B)``: time per iteration and parity."""
    try:
        from hmmlearn.hmm import CategoricalHMM
    except ImportError:
        return {"skipped": "hmmlearn is not installed (pip install hmmlearn)"}
    X = tokens.reshape(-1, 1)

    def fitted(n_iter: int):
        model = CategoricalHMM(n_components=args.states, n_features=args.symbols, n_iter=n_iter, tol=0.0,
                               init_params="", params="ste", implementation=args.hmmlearn_implementation)
        model.startprob_, model.transmat_, model.emissionprob_ = (p.copy() for p in probs)
        return model.fit(X, lengths)

    k = args.hmm_iterations
    seconds, model = median_time(lambda: fitted(k), args.repeats)
    first = fitted(1)
    result = {
        "implementation": args.hmmlearn_implementation,
        "iterations": int(model.monitor_.iter),
        "seconds_per_iteration": seconds / k,
        **_parity(ours, first.monitor_.history[0], first.score(X, lengths),
                  (first.startprob_, first.transmat_, first.emissionprob_)),
    }
    result["over_ours_time_per_iteration"] = _ratio(result, ours)
    return result


def _dynamax_peer(args, probs, tokens, ours: dict) -> dict:
    """dynamax's ``CategoricalHMM.fit_em`` (flat priors) from the same start: time per iteration and parity."""
    try:
        from dynamax.hidden_markov_model import CategoricalHMM
    except ImportError:
        return {"skipped": "dynamax is not installed (pip install dynamax)"}
    hmm = CategoricalHMM(args.states, 1, args.symbols, initial_probs_concentration=1.0,
                         transition_matrix_concentration=1.0, emission_prior_concentration=1.0)
    pi, A, B = (jnp.asarray(p) for p in probs)
    start, props = hmm.initialize(initial_probs=pi, transition_matrix=A, emission_probs=B[:, None, :])
    emissions = jnp.asarray(tokens)[:, :, None]

    def em(num_iters: int):
        return jax.jit(lambda params, emissions: hmm.fit_em(params, props, emissions, num_iters=num_iters,
                                                             verbose=False))

    k = args.hmm_iterations
    run = compile_and_run(em(k), params=start, emissions=emissions)
    seconds, _ = median_time(lambda: run.compiled(params=start, emissions=emissions), args.repeats)
    one_step, log_probs = em(1)(start, emissions)
    # fit_em reports log prior + log-likelihood; the flat Dirichlet log prior is a constant.
    loglik_start = float(log_probs[0] - hmm.log_prior(start))
    loglik_one_step = float(jnp.sum(jax.vmap(lambda x: hmm.marginal_log_prob(one_step, x))(emissions)))
    result = {
        "iterations": k,
        "seconds_per_iteration": seconds / k,
        "compile_seconds": run.compile_seconds,
        **_parity(ours, loglik_start, loglik_one_step, (one_step.initial.probs, one_step.transitions.transition_matrix,
                                                        one_step.emissions.probs[:, 0])),
    }
    result["over_ours_time_per_iteration"] = _ratio(result, ours)
    return result


# ----------------------------------------------------------------------- (b) LDA
def lda_part(args, rng: np.random.Generator, key) -> dict:
    """Part (b): categorical Sequential LDA (one token per sequence) against scikit-learn's batch LDA."""
    D, V, K = args.documents, args.vocabulary, args.topics
    beta = rng.dirichlet(np.full(V, 0.1), K)
    theta = rng.dirichlet(np.ones(K), D)
    counts = rng.multinomial(args.tokens_per_document, theta @ beta)  # [D, V] document-term matrix
    document, word = np.nonzero(counts)
    design = sequence_data(word[:, None].astype(np.int32), np.ones(len(word), np.int32), document,
                           counts[document, word], D, V)
    model = SequenceLDA(K, "categorical", inner_iterations=args.inner_iterations)
    params = model.init(key, design)
    run = compile_and_run(jax.jit(model.em_step), params=params, design=design)
    seconds, _ = median_time(lambda: run.compiled(params=params, design=design), args.repeats)
    ours = {"seconds_per_iteration": seconds, "compile_seconds": run.compile_seconds}
    return {
        "data": {"documents": D, "tokens_per_document": args.tokens_per_document, "vocabulary": V, "topics": K,
                 "rows": int(len(word))},
        "ours": ours,
        "sklearn": _sklearn_peer(args, counts, ours),
    }


def _sklearn_peer(args, counts: np.ndarray, ours: dict) -> dict:
    """scikit-learn's batch ``LatentDirichletAllocation`` on the document-term ``counts``: time per iteration."""
    try:
        from sklearn.decomposition import LatentDirichletAllocation
    except ImportError:
        return {"skipped": "scikit-learn is not installed (pip install scikit-learn)"}
    X = csr_matrix(counts)

    def fit(max_iter: int):
        return LatentDirichletAllocation(
            n_components=args.topics, learning_method="batch", max_iter=max_iter, evaluate_every=-1,
            max_doc_update_iter=args.inner_iterations, mean_change_tol=0.0, random_state=args.seed,
        ).fit(X)

    k = args.lda_iterations
    base, _ = median_time(lambda: fit(1), args.repeats)
    more, _ = median_time(lambda: fit(1 + k), args.repeats)
    result = {"iterations": k, "seconds_per_iteration": (more - base) / k, "seconds_one_iteration_fit": base}
    result["over_ours_time_per_iteration"] = _ratio(result, ours)
    return result


# ------------------------------------------------------------------- (c) scaling
def scaling_part(args, rng: np.random.Generator, key) -> dict:
    """Part (c): Markov-topic Sequential LDA seconds per EM iteration as the number of tasks grows."""
    V, K, T = args.symbols, args.scaling_topics, args.length
    init, trans = random_simplex(rng, (K, V)), random_simplex(rng, (K, V, V))
    identity = np.broadcast_to(np.eye(V), (K, V, V))
    model = SequenceLDA(K, "markov", inner_iterations=args.inner_iterations)
    rows = []
    for factor in args.scaling_factors:
        num_tasks = args.scaling_tasks * factor
        task = np.repeat(np.arange(num_tasks), args.scaling_per_task)
        topic = sample_categorical(rng, rng.dirichlet(np.ones(K), num_tasks)[task])
        tokens = sample_hmm(rng, init, trans, identity, topic, T)
        design = sequence_data(tokens, np.full(len(task), T), task, np.ones(len(task)), num_tasks, V)
        params = model.init(key, design)
        run = compile_and_run(jax.jit(model.em_step), params=params, design=design)
        seconds, _ = median_time(lambda: run.compiled(params=params, design=design), args.repeats)
        rows.append({"factor": factor, "tasks": num_tasks, "sequences": len(task), "tokens": len(task) * T,
                     "seconds_per_iteration": seconds, "compile_seconds": run.compile_seconds})
    for row in rows:
        row["over_base_time_per_iteration"] = row["seconds_per_iteration"] / rows[0]["seconds_per_iteration"]
    return {"topics": K, "symbols": V, "length": T, "rows": rows}


# ------------------------------------------------------------------------- table
def format_table(output: dict) -> str:
    """The measurements as a text table: ms per iteration, compile time, ratios and parity."""
    hmm, lda, scaling = output["hmm"], output["lda"], output["scaling"]
    labels = {"hmmlearn": f"hmmlearn CategoricalHMM ({hmm['hmmlearn'].get('implementation', '')})",
              "dynamax": "dynamax CategoricalHMM.fit_em"}
    rows = [("(a) HMM, ours: HMM.m_step (Baum-Welch)", hmm["ours"], "")]
    for peer, label in labels.items():
        result = hmm[peer]
        if "skipped" in result:
            rows.append((f"(a) HMM, {peer}", None, f"skipped: {result['skipped']}"))
            continue
        rows.append((f"(a) HMM, {label}", result,
                     f"{peer} / ours = {result['over_ours_time_per_iteration']:.2f} (goal >= {GOALS[peer]:g}); "
                     f"loglik rel diff {result['loglik_max_relative_difference']:.1e}, "
                     f"max |param diff| {result['max_abs_param_difference']:.1e}"))
    rows.append(("(b) LDA, ours: SequenceLDA categorical", lda["ours"], ""))
    sklearn = lda["sklearn"]
    if "skipped" in sklearn:
        rows.append(("(b) LDA, scikit-learn", None, f"skipped: {sklearn['skipped']}"))
    else:
        rows.append(("(b) LDA, scikit-learn batch LDA", sklearn,
                     f"sklearn / ours = {sklearn['over_ours_time_per_iteration']:.2f} (VB with topic priors)"))
    for row in scaling["rows"]:
        rows.append((f"(c) Markov SequenceLDA x{row['factor']}: {row['sequences']:,} sequences", row,
                     f"time / x{scaling['rows'][0]['factor']} = {row['over_base_time_per_iteration']:.2f}"))
    frame = pd.DataFrame([
        {
            "measurement": name,
            "ms/iteration": "" if rates is None else f"{1e3 * rates['seconds_per_iteration']:.2f}",
            "compile s": "" if rates is None or "compile_seconds" not in rates else f"{rates['compile_seconds']:.2f}",
            "note": note,
        }
        for name, rates, note in rows
    ])
    data, lda_data, config = hmm["data"], lda["data"], output["config"]
    header = (
        f"(a) N={data['sequences']:,} x T={data['length']}, V={data['symbols']}, S={data['states']}; "
        f"(b) {lda_data['documents']:,} docs x {lda_data['tokens_per_document']} tokens, V={lda_data['vocabulary']:,}, "
        f"K={lda_data['topics']}; (c) K={scaling['topics']}, {config['scaling_per_task']} sequences per task; "
        f"{output['dtype']}, median of {config['repeats']}"
    )
    return header + "\n" + frame.to_string(index=False)


if __name__ == "__main__":
    main()
