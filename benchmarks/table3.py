"""Reproduce Table 3 of the mixture-GLMM paper (ILEA school data) and write JSON.

::

    python benchmarks/table3.py                                   # the paper's settings
    python benchmarks/table3.py --splits 2 --n-init 1 --max-iter 60 --json t3.json

Prints one line per model and the table of ours beside the paper's (see
:mod:`mtl_jax.experiments.school`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mtl_jax.experiments import write_results
from mtl_jax.experiments.school import DEFAULT_CONFIG, PAPER_TABLE3, run_school_study


def main(argv: Sequence[str] | None = None) -> dict:
    """Parses ``argv`` (``None``: ``sys.argv[1:]``), runs the study and writes ``--json``.

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The results of :func:`mtl_jax.experiments.school.run_school_study`.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=DEFAULT_CONFIG["splits"],
                        help="random 8:3 train/test splits within each school")
    parser.add_argument("--n-init", type=int, default=DEFAULT_CONFIG["n_init"], help="EM random restarts")
    parser.add_argument("--max-iter", type=int, default=DEFAULT_CONFIG["max_iter"])
    parser.add_argument("--tol", type=float, default=DEFAULT_CONFIG["tol"])
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG["seed"])
    parser.add_argument("--models", nargs="+", choices=list(PAPER_TABLE3), default=DEFAULT_CONFIG["models"])
    parser.add_argument("--dtype", choices=("float32", "float64"), default=DEFAULT_CONFIG["dtype"])
    parser.add_argument("--json", type=Path, default=Path("results/table3.json"), help="output file")
    args = parser.parse_args(argv)
    results = run_school_study(
        {
            "splits": args.splits,
            "n_init": args.n_init,
            "max_iter": args.max_iter,
            "tol": args.tol,
            "seed": args.seed,
            "models": args.models,
            "dtype": args.dtype,
        }
    )
    write_results(results, args.json)
    return results


if __name__ == "__main__":
    main()
