"""Reproduce Table 2 of the mixture-GLMM paper (simulation study) and write JSON.

::

    python benchmarks/table2.py                               # the paper's sizes
    python benchmarks/table2.py --components 2 --replicates 2 --n-per-task 200 --json t2.json

Prints one line per fitted model and the table of ours beside the paper's (see
:mod:`mtl_jax.experiments.table2`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mtl_jax.experiments import write_results
from mtl_jax.experiments.table2 import DEFAULT_CONFIG, run_simulation_study


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the study, write ``--json``; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, nargs="+", default=DEFAULT_CONFIG["components"], metavar="G")
    parser.add_argument("--models", nargs="+", choices=("independence", "mtl"), default=DEFAULT_CONFIG["models"],
                        help="which models to fit (default both)")
    parser.add_argument("--replicates", type=int, default=DEFAULT_CONFIG["replicates"])
    parser.add_argument("--num-tasks", type=int, default=DEFAULT_CONFIG["num_tasks"])
    parser.add_argument("--n-per-task", type=int, default=DEFAULT_CONFIG["n_per_task"])
    parser.add_argument("--n-init", type=int, default=DEFAULT_CONFIG["n_init"], help="EM random restarts")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_CONFIG["max_iter"])
    parser.add_argument("--tol", type=float, default=DEFAULT_CONFIG["tol"])
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG["seed"])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--json", type=Path, default=Path("results/table2.json"), help="output file")
    args = parser.parse_args(argv)
    results = run_simulation_study(
        {
            "components": args.components,
            "models": args.models,
            "replicates": args.replicates,
            "num_tasks": args.num_tasks,
            "n_per_task": args.n_per_task,
            "n_init": args.n_init,
            "max_iter": args.max_iter,
            "tol": args.tol,
            "seed": args.seed,
            "dtype": args.dtype,
        }
    )
    write_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
