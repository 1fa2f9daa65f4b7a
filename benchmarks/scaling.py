"""Scaling of one multitask EM fit to many tasks and observations.

::

    python benchmarks/scaling.py --num-tasks 10000 --n 1000000 --components 2 --json results/scaling.json

Generates a large design on the device (``x = (1, four N(0, 1))``, balanced or random
task sizes, responses from ``MixtureGLMM(g)`` with the Table 1 parameters and random
effects drawn from their distributions), fits it once by EM from one start, and reports
compile and run time separately, seconds per EM iteration (the run time includes the
final Laplace marginal log-likelihood), the iteration count, the log-likelihood, and the
peak memory: the process's maximum resident set size and, where the device reports
them, JAX's device memory statistics. ``--acceleration squarem`` fits by SQUAREM
(:func:`mtl_jax.infer.em.run_squarem`); the iterations are then EM steps, beside the
accepted cycles and rejected extrapolations.

**Memory-bandwidth floor.** Beside the EM iteration it times, in the same run, one pass
that reads every byte of the design once (:func:`data_pass`: column sums of ``y``,
``x_comp``, ``x_mix`` and a per-task count over ``task``; the faster of two compilations,
XLA's defaults and the model's compiler options), the least any iteration must do, and
one EM iteration alone (``--iterations`` steps of the compiled ``MixtureGLMM.em_step`` in
a ``lax.fori_loop``, median of ``--repeats``). The ratio
``em_step / floor`` is how far an iteration is from the memory-bandwidth floor.
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import pandas as pd

from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import compile_and_run, load_average, median_time, resolve_dtype
from mtl_jax.experiments.simulation import table1_params
from mtl_jax.infer.em import ACCELERATIONS, em_fit
from mtl_jax.infer.program_cache import cached_program, compiler_options
from mtl_jax.linalg import segment_sum
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM


def data_pass(design: MixtureDesign):
    """Read every byte of the design once: column sums of ``y``, ``x_comp``, ``x_mix`` and rows per task."""
    counts = segment_sum(jnp.ones_like(design.task, design.y.dtype), design.task, design.num_tasks)
    return design.y.sum(0), design.x_comp.sum(0), design.x_mix.sum(0), counts


def floor_time(model, design: MixtureDesign, repeats: int) -> float:
    """Median seconds of :func:`data_pass`, the faster of XLA's default compilation and the model's options."""
    passes = (jax.jit(data_pass), jax.jit(data_pass, compiler_options=compiler_options(model.compiler_options)))
    return min(median_time(lambda: one_pass(design), repeats)[0] for one_pass in passes)


@cached_program(static_argnames=("model", "iterations"))
def em_steps(model, params, design, iterations: int):
    """``iterations`` EM steps from ``params`` (no stopping rule), in one compiled loop."""
    return jax.lax.fori_loop(0, iterations, lambda _, prm: model.em_step(prm, design)[0], params)


def design_bytes(design: MixtureDesign) -> int:
    """Bytes of the design's arrays."""
    return sum(leaf.nbytes for leaf in (design.y, design.x_comp, design.x_mix, design.task))


@functools.partial(jax.jit, static_argnames=("num_obs", "num_tasks", "num_components", "random_sizes", "dtype"))
def generate(key, *, num_obs: int, num_tasks: int, num_components: int, random_sizes: bool, dtype) -> MixtureDesign:
    """Draw a design of ``n = num_obs`` observations over ``K = num_tasks`` tasks.

    Balanced: observation ``j`` belongs to task ``j mod K`` (sizes differ by at most
    one). Random: each observation's task is uniform on ``0..K-1`` (multinomial sizes).
    """
    model = MixtureGLMM(num_components)
    key_effects, key_x, key_task, key_y = jax.random.split(key, 4)
    params = model.sample_effects(key_effects, table1_params(num_components, num_tasks, dtype=dtype), num_tasks)
    x = jnp.concatenate([jnp.ones((num_obs, 1), dtype), jax.random.normal(key_x, (num_obs, 4), dtype)], axis=1)
    if random_sizes:
        task = jax.random.randint(key_task, (num_obs,), 0, num_tasks, dtype=jnp.int32)
    else:
        task = jnp.arange(num_obs, dtype=jnp.int32) % num_tasks
    design = MixtureDesign(y=jnp.zeros((num_obs, 1), dtype), x_comp=x, x_mix=x, task=task, num_tasks=num_tasks)
    _, y = model.simulate(key_y, params, design)
    return MixtureDesign(y=y, x_comp=x, x_mix=x, task=task, num_tasks=num_tasks)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the benchmark, write ``--json``; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=1_000_000, help="total observations")
    parser.add_argument("--components", type=int, default=2, help="g, 2..8 (Table 1)")
    parser.add_argument("--task-sizes", choices=("balanced", "random"), default="balanced")
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--acceleration", choices=ACCELERATIONS, default="none",
                        help="EM acceleration (mtl_jax.infer.em.run_squarem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--iterations", type=int, default=10, help="EM steps per timed em_step run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the floor and em_step (median)")
    parser.add_argument("--json", type=Path, default=Path("results/scaling.json"), help="output file")
    args = parser.parse_args(argv)

    dtype = resolve_dtype(args.dtype)
    data_key, fit_key = jax.random.split(jax.random.key(args.seed))
    start = time.perf_counter()
    design = jax.block_until_ready(
        generate(
            data_key,
            num_obs=args.n,
            num_tasks=args.num_tasks,
            num_components=args.components,
            random_sizes=args.task_sizes == "random",
            dtype=dtype,
        )
    )
    generated = time.perf_counter()
    static = dict(model=MixtureGLMM(args.components), n_init=1, max_iter=args.max_iter, tol=args.tol,
                  acceleration=args.acceleration)
    run = compile_and_run(em_fit, static=static, design=design, key=fit_key)
    result = run.output
    n_iter = int(result.n_iter)
    model = static["model"]
    floor_seconds = floor_time(model, design, args.repeats)
    start_params = model.init(fit_key, design)
    steps_seconds, _ = median_time(lambda: em_steps(model, start_params, design, args.iterations), args.repeats)
    output = {
        "config": {**vars(args), "json": str(args.json)},
        "dtype": str(dtype),
        "generate_seconds": generated - start,
        **run.timing,
        "iterations": n_iter,
        "cycles": int(result.n_cycles),
        "rejected_extrapolations": int(result.rejected),
        "objective": float(result.trace[int(result.n_cycles) - 1]),
        "seconds_per_iteration": run.run_seconds / max(n_iter, 1),
        "converged": bool(result.converged),
        "loglik": float(result.loglik),
        "design_bytes": design_bytes(design),
        "floor_seconds": floor_seconds,
        "floor_gb_per_second": design_bytes(design) / floor_seconds / 1e9,
        "em_step_seconds": steps_seconds / args.iterations,
        "em_step_over_floor": steps_seconds / args.iterations / floor_seconds,
        "load_average": load_average(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_memory_stats": jax.devices()[0].memory_stats(),
    }
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.json)
    return output


def format_table(output: dict) -> str:
    """The measurements as a two-column text table."""
    config = output["config"]
    rows = {
        "design": f"n={config['n']:,} obs, K={config['num_tasks']:,} tasks ({config['task_sizes']}), "
        f"g={config['components']}, {output['dtype']}",
        "generate (s)": f"{output['generate_seconds']:.2f}",
        "compile (s)": f"{output['compile_seconds']:.2f}",
        "run (s)": f"{output['run_seconds']:.2f}",
        "EM iterations": f"{output['iterations']} ({'converged' if output['converged'] else 'not converged'})",
        "acceleration": f"{config['acceleration']} ({output['cycles']} cycles, "
        f"{output['rejected_extrapolations']} rejected)",
        "EM objective": f"{output['objective']:.2f}",
        "s / iteration": f"{output['seconds_per_iteration']:.4f}",
        "one em_step (s)": f"{output['em_step_seconds']:.4f}",
        "floor: one pass (s)": f"{output['floor_seconds']:.5f} ({output['design_bytes'] / 1e6:.1f} MB, "
        f"{output['floor_gb_per_second']:.1f} GB/s)",
        "em_step / floor": f"{output['em_step_over_floor']:.1f}x",
        "log-likelihood": f"{output['loglik']:.2f}",
        "peak RSS (MB)": f"{output['peak_rss_mb']:.0f}",
    }
    stats = output["device_memory_stats"]
    if stats and "peak_bytes_in_use" in stats:
        rows["device peak (MB)"] = f"{stats['peak_bytes_in_use'] / 2**20:.0f}"
    return pd.Series(rows).to_string()


if __name__ == "__main__":
    main()
