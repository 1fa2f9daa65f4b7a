r"""Float32 against float64: the same EM fits in both precisions over a grid of hard cases.

::

    python benchmarks/float32_grid.py --num-tasks 2 10 100 1000 10000 --components 1 2 4 \
        --ratios 1e-2 1 1e2 1e4 1e6 --n-per-task 20 --json results/float32_grid.json

For every cell of the grid (number of components ``g``, number of tasks ``K``, and the
ratio ``r = n_i phi / sigma^2`` of a task's random-effect information to its residual
noise) one data set is simulated in float64 with ``n_i`` observations per task::

    x ~ N(0, 1),   b_i ~ N(0, phi),   phi = r sigma^2 / n_i,
    g = 1:  y = 3.5 + 0.7 x + b_i + N(0, sigma^2),
    g > 1:  component h = 0..g-1 has intercept 3.5 + 2h and slope 0.7 + 0.5h; the label
            is drawn with logits (a_i, 0), a_i ~ N(0, lambda I) (v = 0), so that the
            model's mixing random effects have a variance away from zero.

The design is built directly (``MixtureDesign``: ``x_comp = x_mix = (1, x)``) and fitted
by ``mtl_jax.fit(model, design, "em", ...)`` with ``MixtureGLMM(g)`` (for ``g = 1`` the
linear mixed model with task random intercepts), once in float64 and once in float32 (the
design's float leaves cast with :func:`mtl_jax.experiments.common.cast_floats`). With
``--same-start`` (the default) the float32 fit starts from the float64 fit's estimate, so
the differences measure numerics, not different local optima; with ``--no-same-start``
both fits use the same seed and random restarts. The float32 estimate is relabelled to
the float64 one before comparing (a no-op from the same start).

Reported per cell (worst over the entries, ``a32`` and ``a64`` the two estimates):

* ``fixed``: ``max |a32 - a64| / max(|a64|, 1e-3)`` over ``v`` and ``W``;
* ``Sigma``, ``phi``, ``Lambda``: the same for the residual variances, the
  component-effect variances and the diagonal of ``Lambda``, with the floor
  ``1e-3 sigma^2`` in place of ``1e-3``; ``variances`` is the worst of the three;
* ``loglik/obs``: ``|loglik32 - loglik64| / n``, the marginal log-likelihood difference
  per observation (nats);
* ``fixed@steps`` and ``var@steps`` (with ``--same-start``): the float32 estimate against
  float64 EM run for as many steps as float32 took from the same start. The fit
  differences above also contain where each precision stops (the EM tolerance is floored
  at ``10 eps``, about ``1.2e-6`` in float32, so a float32 fit can stop while float64 is
  still crawling towards a variance boundary); these two isolate the arithmetic;
* ``converged`` of both fits, their iteration counts, and, where float32 is off by more
  than ``1e-3`` in any of the measures above (or its log-likelihood is not finite),
  whether float32 flagged itself (``converged`` false or a warning). An off cell that is
  not flagged is a silent failure, counted in the summary line; ``warn 64/32`` counts
  the warnings of the two fits (the float64 fit's own problems, e.g. an empty
  component, show there), and ``float64_estimate_fits_float32`` in the JSON says
  whether the float64 estimate is finite once cast to float32 (a start from it needs that).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax

# Float64 must be switched on before any array (or module-level constant) is made; every
# float32 array below is then built explicitly.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import mtl_jax  # noqa: E402
from mtl_jax.experiments import write_results  # noqa: E402
from mtl_jax.experiments.common import cast_floats  # noqa: E402
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM  # noqa: E402

#: Relative difference above which a cell counts as "off".
TOLERANCE = 1e-3


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the grid, write ``--json``; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1e-2, 1.0, 1e2, 1e4, 1e6], metavar="R",
                        help="values of n_i * phi / sigma^2")
    parser.add_argument("--num-tasks", type=int, nargs="+", default=[2, 10, 100, 1000, 10000], metavar="K")
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 4], metavar="G")
    parser.add_argument("--n-per-task", type=int, default=20, help="n_i, observations per task")
    parser.add_argument("--sigma2", type=float, default=1.0, help="residual variance sigma^2")
    parser.add_argument("--mixing-var", type=float, default=1.0, help="lambda, variance of a_i (g > 1)")
    parser.add_argument("--n-init", type=int, default=2, help="EM random restarts of the float64 fit")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-8, help="EM tolerance (floored at 10 eps of the dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-start", action=argparse.BooleanOptionalAction, default=True,
                        help="start the float32 fit from the float64 estimate (default: on)")
    parser.add_argument("--json", type=Path, default=Path("results/float32_grid.json"), help="output file")
    args = parser.parse_args(argv)
    if min(args.components) < 1 or min(args.num_tasks) < 1 or args.n_per_task < 1:
        parser.error("--components, --num-tasks and --n-per-task must be positive")

    cells = []
    grid = itertools.product(args.components, args.num_tasks, enumerate(args.ratios))
    for g, num_tasks, (index, ratio) in grid:
        cell = run_cell(args, g, num_tasks, ratio, np.random.default_rng([args.seed, g, num_tasks, index]))
        cells.append(cell)
        print(_progress_line(cell), flush=True)
    output = {
        "config": {**vars(args), "json": str(args.json)},
        "tolerance": TOLERANCE,
        "cells": cells,
        "summary": summarize_cells(cells),
    }
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.json)
    return output


def simulate(rng: np.random.Generator, *, num_components: int, num_tasks: int, n_per_task: int, ratio: float,
             sigma2: float, mixing_var: float):
    """One float64 data set of the grid (module docstring): the design and ``{"phi", "num_obs"}``."""
    g, n = num_components, num_tasks * n_per_task
    phi = ratio * sigma2 / n_per_task
    task = np.repeat(np.arange(num_tasks, dtype=np.int32), n_per_task)
    x = rng.normal(size=n)
    b = rng.normal(scale=math.sqrt(phi), size=num_tasks)
    if g == 1:
        z = np.zeros(n, dtype=int)
    else:
        a = rng.normal(scale=math.sqrt(mixing_var), size=(num_tasks, g - 1))
        logits = np.column_stack([a[task], np.zeros(n)])
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        z = (prob.cumsum(axis=1) < rng.uniform(size=(n, 1))).sum(axis=1)
    intercept, slope = 3.5 + 2.0 * z, 0.7 + 0.5 * z
    y = intercept + slope * x + b[task] + rng.normal(scale=math.sqrt(sigma2), size=n)
    x_design = jnp.asarray(np.column_stack([np.ones(n), x]), jnp.float64)
    return MixtureDesign(
        y=jnp.asarray(y[:, None], jnp.float64),
        x_comp=x_design,
        x_mix=x_design,
        task=jnp.asarray(task),
        num_tasks=num_tasks,
    ), {"phi": phi, "num_obs": n}


def run_cell(args, g: int, num_tasks: int, ratio: float, rng: np.random.Generator) -> dict:
    """Fit one grid cell in both precisions and compare (one entry of the results' ``cells``)."""
    design64, truth = simulate(
        rng, num_components=g, num_tasks=num_tasks, n_per_task=args.n_per_task, ratio=ratio,
        sigma2=args.sigma2, mixing_var=args.mixing_var,
    )
    design32 = cast_floats(design64, jnp.float32)
    model = MixtureGLMM(g)
    options = dict(n_init=args.n_init, max_iter=args.max_iter, tol=args.tol)
    fit64, seconds64 = _quiet_fit(model, design64, seed=args.seed, **options)
    with np.errstate(over="ignore"):  # an overflow to inf is reported, not warned about
        start32 = cast_floats(fit64.params, jnp.float32)
        representable = all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(start32))
    options32 = dict(options, n_init=1, init_params=start32) if args.same_start else options
    fit32, seconds32 = _quiet_fit(model, design32, seed=args.seed, **options32)

    p64 = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), fit64.params)
    p32 = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), fit32.params)
    if g > 1 and all(np.all(np.isfinite(p.component_coef)) for p in (p32, p64)):
        p32 = jax.tree_util.tree_map(np.asarray, model.align(p32, p64))
    variance_scale = 1e-3 * args.sigma2
    diffs = {
        "fixed": _worst_relative(_fixed(p32), _fixed(p64), 1e-3),
        "Sigma": _worst_relative(p32.component_cov, p64.component_cov, variance_scale),
        "phi": _worst_relative(p32.component_effects_cov[:, 0], p64.component_effects_cov[:, 0], variance_scale),
        "Lambda": _worst_relative(np.diagonal(p32.mixing_cov), np.diagonal(p64.mixing_cov), variance_scale)
        if g > 1 else None,
    }
    diffs["variances"] = _worst(diffs["Sigma"], diffs["phi"], diffs["Lambda"])
    if args.same_start:
        stepped = _float64_steps(model, fit64.params, design64, fit32.n_iter)
        diffs["fixed_same_steps"] = _worst_relative(_fixed(p32), _fixed(stepped), 1e-3)
        diffs["variances_same_steps"] = _worst_relative(_variances(p32), _variances(stepped), variance_scale)
    n = truth["num_obs"]
    diffs["loglik_per_obs"] = abs(fit32.loglik - fit64.loglik) / n
    off = not all(value <= TOLERANCE for value in (diffs["fixed"], diffs["variances"], diffs["loglik_per_obs"]))
    flagged = (not fit32.converged) or bool(fit32.warnings)
    return {
        "components": g,
        "num_tasks": num_tasks,
        "ratio": ratio,
        "phi": truth["phi"],
        "num_obs": n,
        "relative_difference": diffs,
        "off": off,
        "float32_flagged": flagged,
        "silent": off and not flagged,
        "float64": _fit_summary(fit64, n, seconds64),
        "float32": _fit_summary(fit32, n, seconds32),
        "float32_leaks_float64": _leaks_float64(model, fit32.params, design32),
        "float64_estimate_fits_float32": representable,
    }


def _fixed(params) -> np.ndarray:
    """``v`` and ``W``, flattened."""
    return np.concatenate([np.ravel(params.mixing_coef), np.ravel(params.component_coef)])


def _variances(params) -> np.ndarray:
    """``Sigma``, ``phi`` and the diagonal of ``Lambda``, flattened."""
    return np.concatenate([np.ravel(params.component_cov), np.ravel(params.component_effects_cov),
                           np.diagonal(np.asarray(params.mixing_cov))])


_EM_STEPS = {}


def _float64_steps(model, params, design, steps: int):
    """``params`` after ``steps`` float64 EM steps (one jitted step per model and shape, reused)."""
    step = _EM_STEPS.setdefault(model, jax.jit(lambda p, d: model.em_step(p, d)[0]))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    for _ in range(steps):
        params = step(params, design)
    return jax.tree_util.tree_map(np.asarray, params)


def _quiet_fit(model, design, **options):
    """``mtl_jax.fit(model, design, "em", ...)`` (its warnings kept in the Fit, not printed) and its seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mtl_jax.FitWarning)
        result = mtl_jax.fit(model, design, "em", **options)
    return result, time.perf_counter() - start


def _fit_summary(result, num_obs: int, seconds: float) -> dict:
    return {
        "converged": bool(result.converged),
        "n_iter": int(result.n_iter),
        "loglik": float(result.loglik),
        "loglik_per_obs": float(result.loglik) / num_obs,
        "warnings": list(result.warnings),
        "seconds": seconds,
        "dtype": str(np.asarray(result.params.component_coef).dtype),
    }


def _leaks_float64(model, params32, design32) -> bool:
    """Whether one EM step or the score, traced in float32, produces any float64 value."""
    params32 = cast_floats(jax.tree_util.tree_map(jnp.asarray, params32), jnp.float32)
    shapes = jax.eval_shape(lambda p, d: (model.em_step(p, d), model.score(p, d)), params32, design32)
    return any(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(shapes))


def _worst_relative(a32, a64, scale: float) -> float | None:
    """``max |a32 - a64| / max(|a64|, scale)`` (NaN if either has a non-finite entry)."""
    a32, a64 = np.asarray(a32, np.float64).ravel(), np.asarray(a64, np.float64).ravel()
    if a64.size == 0:
        return None
    if not (np.all(np.isfinite(a32)) and np.all(np.isfinite(a64))):
        return float("nan")
    return float(np.max(np.abs(a32 - a64) / np.maximum(np.abs(a64), scale)))


def _worst(*values):
    """The largest of the values that are not ``None`` (NaN wins)."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return float("nan") if any(math.isnan(value) for value in present) else max(present)


def summarize_cells(cells: list[dict]) -> dict:
    """Worst differences over the grid and the counts of off, flagged and silent cells."""
    diffs = [cell["relative_difference"] for cell in cells]
    return {
        "cells": len(cells),
        "worst": {key: _worst(*(d[key] for d in diffs)) for key in diffs[0]},
        "off_with_float64_not_converged": sum(cell["off"] and not cell["float64"]["converged"] for cell in cells),
        "off": sum(cell["off"] for cell in cells),
        "off_and_flagged": sum(cell["off"] and cell["float32_flagged"] for cell in cells),
        "silent": sum(cell["silent"] for cell in cells),
        "float64_not_converged": sum(not cell["float64"]["converged"] for cell in cells),
        "float32_not_converged": sum(not cell["float32"]["converged"] for cell in cells),
        "float64_leaks": sum(cell["float32_leaks_float64"] for cell in cells),
    }


def _fmt(value) -> str:
    return "" if value is None else f"{value:.1e}"


def format_table(output: dict) -> str:
    """One row per cell, then the summary line."""
    rows = []
    for cell in output["cells"]:
        diffs = cell["relative_difference"]
        f64, f32 = cell["float64"], cell["float32"]
        rows.append(
            {
                "g": cell["components"],
                "K": cell["num_tasks"],
                "n_i phi/s2": f"{cell['ratio']:g}",
                "fixed": _fmt(diffs["fixed"]),
                "Sigma": _fmt(diffs["Sigma"]),
                "phi": _fmt(diffs["phi"]),
                "Lambda": _fmt(diffs["Lambda"]),
                "loglik/obs": _fmt(diffs["loglik_per_obs"]),
                "fixed@steps": _fmt(diffs.get("fixed_same_steps")),
                "var@steps": _fmt(diffs.get("variances_same_steps")),
                "conv 64/32": f"{'yn'[not f64['converged']]}/{'yn'[not f32['converged']]}",
                "iter 64/32": f"{f64['n_iter']}/{f32['n_iter']}",
                "off": "OFF" if cell["off"] else "",
                "f32 flagged": ("yes" if cell["float32_flagged"] else "NO (silent)") if cell["off"] else "",
                "warn 64/32": f"{len(f64['warnings'])}/{len(f32['warnings'])}",
            }
        )
    config, summary = output["config"], output["summary"]
    header = (
        f"float32 vs float64 EM, n_i = {config['n_per_task']}, sigma^2 = {config['sigma2']:g}, "
        f"lambda = {config['mixing_var']:g}, n_init = {config['n_init']}, max_iter = {config['max_iter']}, "
        f"tol = {config['tol']:g}, {'same start' if config['same_start'] else 'separate random starts'}; "
        f"relative differences |a32 - a64| / max(|a64|, scale), loglik/obs absolute (nats)"
    )
    worst = summary["worst"]
    footer = (
        f"worst: fixed {_fmt(worst['fixed'])}, variances {_fmt(worst['variances'])}, "
        f"loglik/obs {_fmt(worst['loglik_per_obs'])}; off (> {output['tolerance']:g}) in "
        f"{summary['off']}/{summary['cells']} cells ({summary['off_with_float64_not_converged']} with float64 "
        f"not converged), {summary['off_and_flagged']} flagged by float32, {summary['silent']} silent; "
        f"worst at the same steps: fixed {_fmt(worst.get('fixed_same_steps'))}, variances "
        f"{_fmt(worst.get('variances_same_steps'))}; float64 not converged in {summary['float64_not_converged']}, "
        f"float32 not converged in {summary['float32_not_converged']}; float64 leaks in float32 "
        f"traces: {summary['float64_leaks']}"
    )
    return header + "\n" + pd.DataFrame(rows).to_string(index=False) + "\n" + footer


def _progress_line(cell: dict) -> str:
    diffs = cell["relative_difference"]
    return (
        f"g={cell['components']} K={cell['num_tasks']} r={cell['ratio']:g}: fixed {_fmt(diffs['fixed'])}, "
        f"variances {_fmt(diffs['variances'])}, loglik/obs {_fmt(diffs['loglik_per_obs'])}, "
        f"float64 {cell['float64']['seconds']:.1f} s, float32 {cell['float32']['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
