r"""One closed-form VB sweep of the DP-HBLR against the same sweep as explicit NumPy loops.

::

    python benchmarks/hblr_vb.py --tasks 29 --rows-per-task 200 --features 9 --repeats 30 \
        --numpy-repeats 3 --dtype float64 float32 --out results/hblr_vb.json

**What is timed.** One sweep of :func:`mtl_jax.models.hblr.vb.sweep` (the model's ``em_step``):
:math:`\xi` and the ELBO at the current point, :math:`q(W)`, :math:`\xi` recomputed,
:math:`q(c)`, then :math:`q(v)` and :math:`q(\alpha)` with the better of the kept and the
size-sorted cluster order (:func:`~mtl_jax.models.hblr.vb.update_sticks_and_alpha`).

* ours: ``jax.jit(vb.sweep)`` compiled ahead of time (compile time reported apart), called
  on the advancing parameters with ``block_until_ready``; the median of ``--repeats``
  sweeps after 3 untimed ones;
* NumPy loop: the same sweep in plain NumPy, in the style of the original
  PersonalizedMultitaskLearning HBLR code (:class:`NumpySweep`): a Python loop per cluster
  and per row for the moments :math:`E[t_{nk}]`, :math:`E[t_{nk}^2]` (hence :math:`\xi` and
  the bound), for the outer products and linear terms of :math:`q(W_k)`; per task and per
  cluster for the membership logits (with the **minus** sign of the Jaakkola–Jordan
  :math:`\lambda` term, as in :mod:`mtl_jax.models.hblr.vb`; the original had a plus) and
  the softmax; per cluster for the sticks, :math:`E[\pi]` and :math:`\alpha`. It includes
  every step of ours, the ELBO at the old point (which ``sweep`` returns) and the stick
  reordering rule: relabel the clusters in decreasing size, update the sticks and
  :math:`\alpha` for both orders, keep the sorted one only if its ``membership + sticks +
  alpha`` ELBO terms are strictly larger. Only the :math:`d \times d` inverse
  (``np.linalg.solve``), Cholesky log-determinant and small dot products are vectorised.
  The NumPy loop always runs in float64 (it is the reference); it runs
  ``max(--numpy-repeats, 3)`` sweeps from the start, each timed, and its time is their median.

**Data.** ``--tasks`` tasks of ``--rows-per-task`` rows, ``--features`` standard normal
features standardised over all rows (as the data layer does), every row a labelled
training row; the tasks fall in ``min(3, tasks)`` true clusters (round robin), each a
logistic regression with intercept :math:`N(0, 1)` and slopes :math:`N(0, 1.5^2)`. The
model is :class:`~mtl_jax.models.hblr.HBLR` with its default prior; ``K`` is ``--clusters``
or the model's default truncation for that many tasks. Both sides start from the model's
``init`` (one restart, key ``--seed``: Dirichlet memberships, :math:`q(W)` at the prior).

**Check, in the same run.** After one and after three sweeps from the start, the largest
absolute difference of ``mean``, ``cov``, ``membership``, ``cluster_weight``, ``stick_a``,
``stick_b`` and ``alpha``; in float64 it must be at most ``--atol`` (default 1e-8) or the
run raises (after writing its JSON); so must the relative difference of the ELBO each
sweep returns. In float32 ours is compared with the float64 reference and the differences
are reported, not enforced.

**Columns of the table.** ``case``: tasks x rows per task, ``d`` (intercept included), ``K``;
``dtype`` (ours); ``ours ms/sweep``, ``NumPy loop ms/sweep``: medians; ``ratio``: NumPy over
ours (the goal is ``>= 100``); ``compile s``; ``max |diff|``: the largest parameter
difference after 1 and 3 sweeps, and the ELBO's largest relative one. On a shared machine the
absolute times move with the load (the load average is printed); the ratio is the point.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from scipy.special import betaln, digamma, gammaln

from mtl_jax.experiments.common import cpu_threads, load_average

#: The goal: NumPy-loop time per sweep over ours.
GOAL = 100.0
#: The check compares the parameters after these many sweeps from the start.
CHECK_AFTER = (1, 3)
FIELDS = ("mean", "cov", "membership", "cluster_weight", "stick_a", "stick_b", "alpha")


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the benchmark, write ``--out``; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[29], help="tasks M per case")
    parser.add_argument("--rows-per-task", type=int, nargs="+", default=[200], help="rows per task, per case")
    parser.add_argument("--features", type=int, nargs="+", default=[9], help="features q per case (d = q + 1)")
    parser.add_argument("--clusters", type=int, nargs="+", default=None,
                        help="truncation K per case (default: the model's default for that many tasks)")
    parser.add_argument("--repeats", type=int, default=30, help="timed sweeps of ours (median)")
    parser.add_argument("--numpy-repeats", type=int, default=3,
                        help="timed sweeps of the NumPy loop (median; at least 3 are run for the check)")
    parser.add_argument("--dtype", nargs="+", choices=("float64", "float32"), default=["float64"],
                        help="our dtype(s); the NumPy reference is float64")
    parser.add_argument("--atol", type=float, default=1e-8,
                        help="largest absolute parameter difference allowed in float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/hblr_vb.json"), help="output JSON file")
    args = parser.parse_args(argv)
    sizes = [args.tasks, args.rows_per_task, args.features] + ([args.clusters] if args.clusters else [])
    count = max(map(len, sizes))
    if any(len(values) not in (1, count) for values in sizes):
        parser.error("--tasks, --rows-per-task, --features and --clusters take one value, or one per case")
    if args.repeats < 1 or args.numpy_repeats < 1:
        parser.error("--repeats and --numpy-repeats must be positive")
    pick = lambda values, i: values[i] if len(values) > 1 else values[0]  # noqa: E731
    cases = [(pick(args.tasks, i), pick(args.rows_per_task, i), pick(args.features, i),
              pick(args.clusters, i) if args.clusters else None) for i in range(count)]
    for tasks, rows, features, clusters in cases:
        if min(tasks, rows, features) < 1 or (clusters is not None and clusters < 1):
            parser.error("tasks, rows per task, features and clusters must be positive")

    jax.config.update("jax_enable_x64", True)  # the float64 side and the reference
    output = {
        "config": {**vars(args), "out": str(args.out)},
        "goal_numpy_over_ours": GOAL,
        "check_after_sweeps": list(CHECK_AFTER),
        "environment": {"jax": jax.__version__, "jax_backend": jax.default_backend(), "numpy": np.__version__,
                        "cpu_threads": cpu_threads(), "load_average_start": load_average()},
        "cases": [],
    }
    failures = []
    for index, (tasks, rows, features, clusters) in enumerate(cases):
        rng = np.random.default_rng([args.seed, index])
        X, y, task = synthetic_data(rng, tasks, rows, features)
        reference = None
        for dtype in args.dtype:
            case = run_case(args, X, y, task, tasks, clusters, dtype, jax.random.key(args.seed + index), reference)
            reference = case.pop("_reference")  # the NumPy loop runs once per data set
            output["cases"].append(case)
            if dtype == "float64" and not case["check"]["agree"]:
                failures.append(case["name"])
    output["environment"]["load_average_end"] = load_average()
    table = format_table(output)
    print(table)
    output["table"] = table
    from mtl_jax.experiments import write_results

    write_results(output, args.out)
    if failures:
        raise RuntimeError(f"ours and the NumPy loop disagree beyond {args.atol:g} in float64: {failures}")
    return output


# ------------------------------------------------------------------------- setup
def synthetic_data(rng: np.random.Generator, tasks: int, rows: int, features: int):
    """``(X, y, task)``: standardised features, 0/1 labels from ``min(3, tasks)`` clusters of logistic regressions."""
    true_clusters = min(3, tasks)
    weights = np.concatenate([rng.normal(0.0, 1.0, (true_clusters, 1)),
                              rng.normal(0.0, 1.5, (true_clusters, features))], axis=1)
    task = np.repeat(np.arange(tasks), rows).astype(np.int32)
    X = rng.standard_normal((tasks * rows, features))
    X = (X - X.mean(axis=0)) / X.std(axis=0) if X.shape[0] > 1 else X
    eta = np.einsum("nd,nd->n", np.concatenate([np.ones((X.shape[0], 1)), X], axis=1),
                    weights[task % true_clusters])
    y = (rng.random(X.shape[0]) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return X, y, task


def person_data(X, y, task, tasks: int, dtype):
    """The data as a :class:`~mtl_jax.data.personal.PersonData` (users as tasks, all training rows)."""
    import jax.numpy as jnp

    from mtl_jax.data.personal import PersonData, PersonSchema

    n, features = X.shape
    columns = tuple(f"x{j}" for j in range(features))
    schema = PersonSchema(person="person", labels=("y",), features=columns, normalise="none", columns=columns,
                          mean=(0.0,) * features, sd=(1.0,) * features, fill=(0.0,) * features,
                          binary=(True,), label_levels=(None,))
    return PersonData(X=jnp.asarray(X, dtype), y=jnp.asarray(y, dtype), weight=jnp.ones(n, dtype),
                      task=jnp.asarray(task), split=jnp.zeros(n, jnp.int32), task_binary=jnp.ones(tasks, bool),
                      task_names=tuple(f"p{m}" for m in range(tasks)), num_labels=1, schema=schema)


def as_numpy(params):
    """The parameters as float64 NumPy arrays (same :class:`HBLRParams` fields)."""
    return type(params)(*(np.asarray(leaf, np.float64) for leaf in params))


# --------------------------------------------------------------------- the case
def run_case(args, X, y, task, tasks: int, clusters, dtype: str, key, reference) -> dict:
    """Time ours in ``dtype`` (and, once per data set, the NumPy loop) and check after 1 and 3 sweeps."""
    import jax.numpy as jnp

    from mtl_jax.models.hblr import HBLR
    from mtl_jax.models.hblr import vb

    model = HBLR(clusters=clusters)
    jdtype = jnp.float64 if dtype == "float64" else jnp.float32
    design = person_data(X, y, task, tasks, jdtype)
    rows = model.rows(design)
    prior = model.prior(X.shape[1], jdtype)
    # one start for every dtype and for the NumPy loop: the model's init in float64
    design64 = person_data(X, y, task, tasks, jnp.float64)
    start64 = model.init(key, design64)
    start = jax.block_until_ready(jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jdtype), start64))
    K, d = start.mean.shape

    # ours: compiled ahead of time, then the sweeps of the check, then the timed ones.
    began = time.perf_counter()
    compiled = jax.jit(vb.sweep).lower(start, rows, prior).compile()
    compile_seconds = time.perf_counter() - began
    ours_states, ours_elbos, params = {}, [], start
    for sweep_number in range(1, max(CHECK_AFTER) + 1):
        params, objective = jax.block_until_ready(compiled(params, rows, prior))
        ours_elbos.append(float(objective))
        if sweep_number in CHECK_AFTER:
            ours_states[sweep_number] = as_numpy(params)
    for _ in range(3):  # warm-up
        params, _ = jax.block_until_ready(compiled(params, rows, prior))
    seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        params, _ = jax.block_until_ready(compiled(params, rows, prior))
        seconds.append(time.perf_counter() - began)
    ours = {"seconds_per_sweep": float(np.median(seconds)), "min_seconds_per_sweep": float(np.min(seconds)),
            "compile_seconds": compile_seconds, "repeats": args.repeats, "elbo_per_sweep": ours_elbos}

    # the NumPy loop, float64, from the same start (once per data set; a float32 case reuses it).
    if reference is None:
        numpy_start = as_numpy(start64)
        rows64 = model.rows(design64)  # the same rows ours sees (x with its intercept, s, use, task)
        loop = NumpySweep(np.asarray(rows64.x), np.asarray(rows64.s), np.asarray(rows64.use),
                          np.asarray(rows64.task), tasks, as_numpy(model.prior(X.shape[1], jnp.float64)))
        states, elbos, seconds, state = {}, [], [], numpy_start
        for sweep_number in range(1, max(args.numpy_repeats, max(CHECK_AFTER)) + 1):
            began = time.perf_counter()
            state, objective = loop.sweep(state)
            seconds.append(time.perf_counter() - began)
            elbos.append(objective)
            if sweep_number in CHECK_AFTER:
                states[sweep_number] = state
        reference = {"seconds_per_sweep": float(np.median(seconds)), "min_seconds_per_sweep": float(np.min(seconds)),
                     "sweeps": len(seconds), "elbo_per_sweep": elbos, "states": states,
                     "reordered_per_sweep": loop.reordered}
    ours_elbo = np.asarray(ours_elbos)
    numpy_elbo = np.asarray(reference["elbo_per_sweep"][: len(ours_elbo)])
    check = {"after_sweeps": {},
             "elbo_max_abs_difference": float(np.max(np.abs(ours_elbo - numpy_elbo))),
             "elbo_max_relative_difference":
             float(np.max(np.abs(ours_elbo - numpy_elbo) / np.maximum(np.abs(numpy_elbo), 1e-300)))}
    for sweep_number in CHECK_AFTER:
        check["after_sweeps"][str(sweep_number)] = {
            field: float(np.max(np.abs(getattr(ours_states[sweep_number], field)
                                       - getattr(reference["states"][sweep_number], field)), initial=0.0))
            for field in FIELDS}
    check["max_abs_param_difference"] = max(max(fields.values()) for fields in check["after_sweeps"].values())
    check["atol"] = args.atol
    check["agree"] = bool(check["max_abs_param_difference"] <= args.atol
                          and check["elbo_max_relative_difference"] <= args.atol)
    check["enforced"] = dtype == "float64"
    final = reference["states"][max(CHECK_AFTER)]
    numpy = {key: reference[key] for key in ("seconds_per_sweep", "min_seconds_per_sweep", "sweeps",
                                                "elbo_per_sweep", "reordered_per_sweep")}
    numpy["over_ours_time"] = numpy["seconds_per_sweep"] / ours["seconds_per_sweep"]
    numpy["dtype"] = "float64"
    return {
        "name": f"{tasks} x {X.shape[0] // tasks}, d={d}, K={K}",
        "dtype": dtype,
        "data": {"tasks": tasks, "rows_per_task": X.shape[0] // tasks, "rows": X.shape[0], "features": X.shape[1],
                 "d": d, "clusters": K, "true_clusters": min(3, tasks),
                 "occupied_after_3_sweeps": int(np.sum(np.bincount(np.argmax(final.membership, axis=1),
                                                                   minlength=K) > 0))},
        "ours": ours,
        "numpy_loop": numpy,
        "check": check,
        "_reference": reference,
    }


# ------------------------------------------------------------- the NumPy loop
def jj_lambda(xi: float) -> float:
    r""":math:`\lambda(\xi) = \tanh(\xi/2)/(4\xi)`, its series :math:`1/8 - \xi^2/96` below 1e-3."""
    xi = abs(xi)
    if xi < 1e-3:
        return 0.125 - xi * xi / 96.0
    return math.tanh(xi / 2.0) / (4.0 * xi)


def log_sigmoid(z: float) -> float:
    r""":math:`\log\sigma(z)`, stable for either sign."""
    return -(max(-z, 0.0) + math.log1p(math.exp(-abs(z))))


class NumpySweep:
    """The VB sweep of :func:`mtl_jax.models.hblr.vb.sweep` as explicit loops (module docstring).

    Args:
        x: ``[n, d]`` rows, intercept first; s: ``[n]`` :math:`2y - 1`; use: ``[n]`` 1 for a row that
        enters; task: ``[n]`` task ids; num_tasks: ``M``; prior: a float64 :class:`~mtl_jax.models.hblr.Prior`.
    """

    def __init__(self, x, s, use, task, num_tasks: int, prior):
        self.x, self.s, self.use, self.task, self.M = x, s, use, task, num_tasks
        self.prior_mean, self.prior_var = np.asarray(prior.mean), np.asarray(prior.var)
        self.tau1, self.tau2 = float(prior.alpha_shape), float(prior.alpha_rate)
        self.reordered = []  # per sweep: whether the size-sorted cluster order was kept

    # ---- per row and cluster
    def moments(self, mean, cov):
        """``(xi, E[h])`` ``[n, K]``: :math:`\\xi_{nk} = E[t^2]^{1/2}` and the bound's expectation at that
        :math:`\\xi` (so its :math:`\\lambda` term, written out, is zero up to rounding)."""
        N, K = self.x.shape[0], mean.shape[0]
        xi, bound = np.zeros((N, K)), np.zeros((N, K))
        for k in range(K):
            for n in range(N):
                x_n = self.x[n]
                mu = float(x_n @ mean[k])
                var = max(float(x_n @ cov[k] @ x_n), 0.0)
                second = var + mu * mu
                xi[n, k] = math.sqrt(second)
                bound[n, k] = self.expected_bound(mu, second, xi[n, k], self.s[n])
        return xi, bound

    @staticmethod
    def expected_bound(mu: float, second: float, xi: float, s: float) -> float:
        """:math:`E[h] = \\log\\sigma(\\xi) + (s\\mu - \\xi)/2 - \\lambda(\\xi)(E[t^2] - \\xi^2)` (minus sign)."""
        return log_sigmoid(xi) + (s * mu - xi) / 2.0 - jj_lambda(xi) * (second - xi * xi)

    def task_bound(self, bound):
        """``[M, K]``: the sum of ``bound`` over each task's rows that enter."""
        N, K = bound.shape
        total = np.zeros((self.M, K))
        for k in range(K):
            for n in range(N):
                if self.use[n] > 0:
                    total[self.task[n], k] += bound[n, k]
        return total

    # ---- the updates
    def update_weights(self, membership, xi):
        """q(W_k) per cluster: accumulate the outer products and linear terms row by row."""
        N, K, d = self.x.shape[0], membership.shape[1], self.x.shape[1]
        mean, cov = np.zeros((K, d)), np.zeros((K, d, d))
        for k in range(K):
            precision = np.diag(1.0 / self.prior_var)
            linear = self.prior_mean / self.prior_var
            for n in range(N):
                if self.use[n] > 0:
                    r = membership[self.task[n], k]
                    precision = precision + 2.0 * r * jj_lambda(xi[n, k]) * np.outer(self.x[n], self.x[n])
                    linear = linear + r * self.s[n] / 2.0 * self.x[n]
            inverse = np.linalg.solve(precision, np.eye(d))
            cov[k] = (inverse + inverse.T) / 2.0
            mean[k] = np.linalg.solve(precision, linear)
        return mean, cov

    def update_membership(self, log_pi, task_bound):
        """q(c_m) per task: softmax over the clusters of :math:`E[\\log\\pi_k] + \\sum_{n\\in m}E[h]`."""
        K = log_pi.shape[0]
        membership = np.zeros((self.M, K))
        for m in range(self.M):
            logits = [log_pi[k] + task_bound[m, k] for k in range(K)]
            top = max(logits)
            weights = [math.exp(value - top) for value in logits]
            total = sum(weights)
            for k in range(K):
                membership[m, k] = weights[k] / total
        return membership

    @staticmethod
    def expected_log_sticks(stick_a, stick_b):
        """``(E[log v], E[log(1 - v)])`` per stick."""
        total = digamma(stick_a + stick_b)
        return digamma(stick_a) - total, digamma(stick_b) - total

    def expected_log_pi(self, stick_a, stick_b):
        """:math:`E[\\log\\pi_k] = E[\\log v_k] + \\sum_{j<k}E[\\log(1 - v_j)]` (``log v_K = 0``)."""
        log_v, log_1mv = self.expected_log_sticks(stick_a, stick_b)
        K = stick_a.shape[0] + 1
        log_pi, before = np.zeros(K), 0.0
        for k in range(K):
            log_pi[k] = (log_v[k] if k < K - 1 else 0.0) + before
            if k < K - 1:
                before += log_1mv[k]
        return log_pi

    @staticmethod
    def expected_pi(stick_a, stick_b):
        """:math:`E[\\pi_k] = E[v_k]\\prod_{j<k}E[1 - v_j]`."""
        K = stick_a.shape[0] + 1
        pi, remaining = np.zeros(K), 1.0
        for k in range(K):
            mean_v = stick_a[k] / (stick_a[k] + stick_b[k]) if k < K - 1 else 1.0
            pi[k] = mean_v * remaining
            remaining *= 1.0 - mean_v
        return pi

    def sticks_and_alpha(self, membership, alpha):
        """q(v) then q(alpha): ``(stick_a, stick_b, alpha)`` for the clusters in this order."""
        K = membership.shape[1]
        counts = np.zeros(K)
        for k in range(K):
            for m in range(self.M):
                counts[k] += membership[m, k]
        stick_a, stick_b = np.zeros(K - 1), np.zeros(K - 1)
        for k in range(K - 1):
            stick_a[k] = 1.0 + counts[k]
            stick_b[k] = alpha + sum(counts[j] for j in range(k + 1, K))
        _, log_1mv = self.expected_log_sticks(stick_a, stick_b)
        rate = self.tau2 - sum(log_1mv)
        return stick_a, stick_b, (self.tau1 + K - 1) / rate

    def stick_order_terms(self, membership, stick_a, stick_b, alpha) -> float:
        """The ELBO terms that depend on the cluster order: ``membership + sticks + alpha``."""
        M, K = membership.shape
        log_pi = self.expected_log_pi(stick_a, stick_b)
        term = 0.0
        for m in range(M):
            for k in range(K):
                p = membership[m, k]
                term += p * log_pi[k] - (p * math.log(p) if p > 0 else 0.0)
        a = self.tau1 + K - 1
        rate = a / alpha
        log_alpha = digamma(a) - math.log(rate)
        _, log_1mv = self.expected_log_sticks(stick_a, stick_b)
        for k in range(K - 1):
            g1, g2 = stick_a[k], stick_b[k]
            term += log_alpha + (alpha - 1.0) * log_1mv[k]
            term += (betaln(g1, g2) - (g1 - 1.0) * digamma(g1) - (g2 - 1.0) * digamma(g2)
                     + (g1 + g2 - 2.0) * digamma(g1 + g2))  # the entropy of Beta(g1, g2)
        a0, b0 = self.tau1, self.tau2  # - KL(Gamma(a, rate) || Gamma(a0, b0))
        term -= ((a - a0) * digamma(a) - gammaln(a) + gammaln(a0) + a0 * (math.log(rate) - math.log(b0))
                 + a * (b0 - rate) / rate)
        return float(term)

    def weights_kl(self, mean, cov) -> float:
        """:math:`\\sum_k \\operatorname{KL}(q(W_k)\\,\\|\\,p(W_k))`."""
        K, d = mean.shape
        total = 0.0
        for k in range(K):
            log_det = 2.0 * float(np.sum(np.log(np.diag(np.linalg.cholesky(cov[k])))))
            quadratic = float(np.sum((np.diag(cov[k]) + (mean[k] - self.prior_mean) ** 2) / self.prior_var))
            total += 0.5 * (quadratic - d + float(np.sum(np.log(self.prior_var))) - log_det)
        return total

    def sweep(self, params):
        """One sweep, in the order of ``vb.sweep``: ``(new_params, ELBO at params)``."""
        # the ELBO at the old point, optimal xi
        xi, bound = self.moments(params.mean, params.cov)
        likelihood = float(np.sum(params.membership * self.task_bound(bound)))
        objective = (likelihood + self.stick_order_terms(params.membership, params.stick_a, params.stick_b,
                                                         params.alpha)
                     - self.weights_kl(params.mean, params.cov))
        # q(W), then xi recomputed, then q(c)
        mean, cov = self.update_weights(params.membership, xi)
        xi, bound = self.moments(mean, cov)
        membership = self.update_membership(self.expected_log_pi(params.stick_a, params.stick_b),
                                            self.task_bound(bound))
        # q(v), q(alpha): the kept order or the clusters sorted by size, the better stick-order terms
        kept = (mean, cov, membership, *self.sticks_and_alpha(membership, params.alpha))
        order = np.argsort(-membership.sum(axis=0), kind="stable")
        moved_membership = membership[:, order]
        moved = (mean[order], cov[order], moved_membership, *self.sticks_and_alpha(moved_membership, params.alpha))
        better = self.stick_order_terms(*moved[2:]) > self.stick_order_terms(*kept[2:])
        mean, cov, membership, stick_a, stick_b, alpha = moved if better else kept
        self.reordered.append(bool(better and np.any(order != np.arange(order.size))))
        new = type(params)(mean=mean, cov=cov, membership=membership, cluster_weight=self.expected_pi(stick_a, stick_b),
                           stick_a=stick_a, stick_b=stick_b, alpha=np.asarray(alpha))
        return new, float(objective)


# ------------------------------------------------------------------------- table
def format_table(output: dict) -> str:
    """The measurements as a text table: ms per sweep on both sides, their ratio and the agreement check."""
    rows = []
    for case in output["cases"]:
        check = case["check"]
        ratio = case["numpy_loop"]["over_ours_time"]
        after = check["after_sweeps"]
        rows.append({
            "case": case["name"], "dtype": case["dtype"],
            "ours ms/sweep": f"{1e3 * case['ours']['seconds_per_sweep']:.3f}",
            "NumPy loop ms/sweep": f"{1e3 * case['numpy_loop']['seconds_per_sweep']:.1f}",
            "ratio": f"{ratio:.0f}x" + ("" if ratio >= GOAL else " (< goal)"),
            "compile s": f"{case['ours']['compile_seconds']:.2f}",
            "max |diff|": (("ok" if check["agree"] else ("FAILED" if check["enforced"] else "reported"))
                           + " " + ", ".join(f"{n}: {max(after[n].values()):.1e}" for n in after)
                           + f"; ELBO rel {check['elbo_max_relative_difference']:.1e}"),
        })
    env, config = output["environment"], output["config"]
    header = (f"one closed-form VB sweep of the DP-HBLR (vb.sweep, jitted) vs the same sweep as NumPy loops "
              f"(float64); median of {config['repeats']} (ours) and of max({config['numpy_repeats']}, 3) (NumPy) "
              f"sweeps; goal NumPy/ours >= {GOAL:g}; max |diff| after sweeps {', '.join(map(str, CHECK_AFTER))}"
              f"\n{env['cpu_threads']} CPU cores; load average (1 min) {_load(env, 'start')} at start, "
              f"{_load(env, 'end')} at end")
    columns = ["case", "dtype", "ours ms/sweep", "NumPy loop ms/sweep", "ratio", "compile s", "max |diff|"]
    return header + "\n" + pd.DataFrame(rows, columns=columns).to_string(index=False)


def _load(env: dict, when: str) -> str:
    value = env.get(f"load_average_{when}")
    return "?" if value is None else f"{value[0]:g}"


if __name__ == "__main__":
    main()
