r"""MTMKL's kernel-weight solver against ``scipy.optimize.minimize(method="SLSQP")`` on the same objective.

::

    python benchmarks/mtmkl_solver.py --tasks 10 30 --rows 60 200 --modalities 3 8 --out results/mtmkl_solver.json

**Problem.** Synthetic per-task data: ``--tasks`` tasks of between half of ``--rows`` and
``--rows`` rows each (uniform at random), ``--modalities`` blocks of
``--features-per-modality`` standard normal features; the labels follow a logistic model
on the first modality only (a slope per task around a shared one). The objective is
:math:`J(\eta) = \sum_t D_t(\eta_t) + V R(\eta)` of :mod:`mtl_jax.models.mtmkl.solver`
(RBF kernels normalised by :mod:`mtl_jax.models.mtmkl.kernels`, ``--C``, ``--V``,
``--regulariser``), minimised from uniform weights over the product of simplices.

**Contenders.** ``newton`` (the model's optimiser: projected Newton steps in one jitted
``lax.while_loop``), ``eg`` (exponentiated gradient, same loop) and ``slsqp``
(``scipy.optimize.minimize``, ``method="SLSQP"``, one equality constraint per task and
bounds ``[0, 1]``, ``ftol=1e-14``), SLSQP given our jitted objective and Danskin gradient
(the same batched Cholesky solves): the comparison is of the optimisers, not of the
linear algebra. SLSQP is how the original project fitted MTMKL.

**What is timed.** ``seconds to target``: the wall time to first reach
:math:`J \le J_{\rm best} + \mathrm{rtol}\,|J_{\rm best}|` (``--rtol``, default 1e-6),
:math:`J_{\rm best}` the smallest objective any contender reached. For SLSQP, the time of
the first objective evaluation at or below the target (its evaluations are timed as they
happen). For ``newton`` and ``eg``, the first step ``k`` whose objective is at or below the
target is read from the trace, and the solver is run again with ``max_iter = k`` (compiled
beforehand) and timed. ``total seconds`` is each one's own run to its stopping rule.
Compile times are excluded (reported apart). Every timing is the median of ``--repeats``.
Float64 unless ``--float32``.

On a CPU shared with other jobs, run with
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``: XLA's
thread pool on oversubscribed cores made the same jitted call 10x slower from one run to
the next (measured: 18 s then 210 s), which no timing survives.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def _problem(tasks: int, rows: int, modalities: int, width: int, C: float, seed: int, dtype):
    import jax.numpy as jnp

    from mtl_jax.models.baselines.solvers import pad_by_task
    from mtl_jax.models.mtmkl import kernels, solver

    rng = np.random.default_rng(seed)
    sizes = rng.integers(max(rows // 2, 2), rows + 1, size=tasks)
    task = np.repeat(np.arange(tasks), sizes)
    X = rng.normal(size=(task.size, modalities * width))
    slopes = 1.5 + 0.5 * rng.normal(size=(tasks, width))
    y = (rng.uniform(size=task.size) < 1 / (1 + np.exp(-np.einsum("nq,nq->n", X[:, :width], slopes[task])))) * 1.0
    Xp, yp, wp, _ = pad_by_task(X.astype(dtype), y.astype(dtype), np.ones(task.size, dtype), task, tasks)
    blocks = tuple((f"m{p}", p * width, (p + 1) * width) for p in range(modalities))
    mask = jnp.asarray(kernels.modality_mask(blocks, X.shape[1], dtype))
    gamma = jnp.asarray(kernels.default_gamma(np.asarray(mask), None), dtype)
    scale = kernels.kernel_scale(jnp.asarray(X.astype(dtype)), mask, "rbf")
    problem = solver.build_problem(jnp.asarray(Xp), jnp.asarray(yp), jnp.asarray(wp), mask, gamma, scale, "rbf", C)
    return problem, int(task.size), int(Xp.shape[1])


def _median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _ours(problem, V, regulariser, method, tol, max_iter, repeats):
    from mtl_jax.models.mtmkl import solver

    def run(limit):
        result = solver.optimise_eta(problem, V, regulariser, None, tol, limit, method)
        result.objective.block_until_ready()
        return result

    start = time.perf_counter()
    result = run(max_iter)
    compile_seconds = time.perf_counter() - start
    total = _median_seconds(lambda: run(max_iter), repeats)
    trace = np.asarray(result.trace)[: int(result.n_iter) + 1]
    return {"objective": float(result.objective), "iterations": int(result.n_iter),
            "converged": bool(result.converged), "total_seconds": total, "compile_seconds": compile_seconds,
            "trace": trace.tolist()}, run


def _slsqp(problem, V, regulariser, repeats):
    import jax
    import jax.numpy as jnp
    from scipy.optimize import minimize

    from mtl_jax.models.mtmkl import solver

    K, P = problem.grams.shape[:2]
    dtype = problem.grams.dtype
    function = jax.jit(lambda e: solver.objective_and_gradient(e.reshape(K, P), problem, V, regulariser)[:2])
    start = time.perf_counter()
    jax.block_until_ready(function(jnp.full(K * P, 1.0 / P, dtype)))
    compile_seconds = time.perf_counter() - start
    constraints = [{"type": "eq", "fun": (lambda x, t=t: x[P * t:P * t + P].sum() - 1.0),
                    "jac": (lambda x, t=t: np.eye(K)[t].repeat(P))} for t in range(K)]
    runs = []
    for _ in range(repeats):
        log = []
        start = time.perf_counter()

        def fun(x):
            value, gradient = function(jnp.asarray(x, dtype))
            value = float(value)
            log.append((time.perf_counter() - start, value))
            return value, np.asarray(gradient, dtype=float).ravel()

        result = minimize(fun, np.full(K * P, 1.0 / P), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * (K * P),
                          constraints=constraints, options={"maxiter": 1000, "ftol": 1e-14})
        runs.append((time.perf_counter() - start, result, log))
    total, result, log = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"objective": float(result.fun), "iterations": int(result.nit), "converged": bool(result.success),
            "message": str(result.message), "total_seconds": total, "compile_seconds": compile_seconds,
            "evaluations": log}


def run_case(tasks, rows, modalities, args, dtype) -> dict:
    problem, n, m = _problem(tasks, rows, modalities, args.features_per_modality, args.C, args.seed, dtype)
    results, runners = {}, {}
    for method, limit in (("newton", args.max_iter), ("eg", args.eg_max_iter)):
        results[method], runners[method] = _ours(problem, args.V, args.regulariser, method, args.tol, limit,
                                                 args.repeats)
    results["slsqp"] = _slsqp(problem, args.V, args.regulariser, args.repeats)
    best = min(r["objective"] for r in results.values())
    target = best + args.rtol * abs(best)
    for method in ("newton", "eg"):
        trace = np.asarray(results[method]["trace"])
        reached = np.flatnonzero(trace <= target)
        if reached.size:
            k = int(reached[0])
            runners[method](max(k, 1))  # compile for this max_iter
            results[method]["seconds_to_target"] = _median_seconds(lambda: runners[method](max(k, 1)), args.repeats)
            results[method]["iterations_to_target"] = k
        else:
            results[method]["seconds_to_target"] = None
        del results[method]["trace"]
    times = [t for t, value in results["slsqp"].pop("evaluations") if value <= target]
    results["slsqp"]["seconds_to_target"] = times[0] if times else None
    for r in results.values():
        r["objective_minus_best"] = r["objective"] - best
    return {"data": {"tasks": tasks, "rows": n, "padded_rows": m, "modalities": modalities,
                     "features_per_modality": args.features_per_modality},
            "best_objective": best, "target": target, "results": results}


def _table(cases) -> str:
    lines = [f"{'case':<28}{'method':<8}{'s to target':>12}{'total s':>10}{'iters':>7}{'J - J_best':>13}",
             "-" * 78]
    for case in cases:
        d = case["data"]
        label = f"K={d['tasks']} n={d['rows']} P={d['modalities']}"
        for method, r in case["results"].items():
            to_target = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.4f}"
            lines.append(f"{label:<28}{method:<8}{to_target:>12}{r['total_seconds']:>10.4f}{r['iterations']:>7}"
                         f"{r['objective_minus_best']:>13.2e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the cases, prints the table and writes the JSON (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 30], help="tasks per case")
    parser.add_argument("--rows", type=int, nargs="+", default=[60, 150], help="largest rows per task, per case")
    parser.add_argument("--modalities", type=int, nargs="+", default=[3, 8], help="modalities per case")
    parser.add_argument("--features-per-modality", type=int, default=3)
    parser.add_argument("--C", type=float, default=1.0, dest="C", help="LS-SVM regularisation")
    parser.add_argument("--V", type=float, default=0.1, dest="V", help="regulariser weight")
    parser.add_argument("--regulariser", choices=("pull", "similarity"), default="pull")
    parser.add_argument("--tol", type=float, default=1e-10, help="our relative stopping tolerance")
    parser.add_argument("--max-iter", type=int, default=500, help="most Newton steps")
    parser.add_argument("--eg-max-iter", type=int, default=300,
                        help="most exponentiated-gradient steps (slow near zero weights: 'not reached' is common)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="target: relative distance to the best objective")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32", action="store_true", help="float32 (default float64)")
    parser.add_argument("--out", type=Path, default=Path("results/mtmkl_solver.json"), help="output JSON file")
    args = parser.parse_args(argv)
    sizes = [args.tasks, args.rows, args.modalities]
    count = max(len(s) for s in sizes)
    if any(len(s) not in (1, count) for s in sizes):
        parser.error("--tasks, --rows and --modalities take one value or one per case")
    sizes = [s * count if len(s) == 1 else s for s in sizes]

    import jax

    if not args.float32:  # (never switched off: a float32 run casts its arrays instead)
        jax.config.update("jax_enable_x64", True)
    dtype = np.float32 if args.float32 else np.float64
    cases = []
    for k, n, p in zip(*sizes):
        cases.append(run_case(k, n, p, args, dtype))
        print(_table(cases[-1:]).splitlines()[-3:], flush=True)
    table = _table(cases)
    print(table)
    output = {"config": {key: value for key, value in vars(args).items() if key != "out"},
              "dtype": np.dtype(dtype).name, "environment": {"jax": jax.__version__, "device": str(jax.devices()[0]),
                                                              "machine": platform.machine()},
              "cases": cases, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
