"""Command-line interface: ``mtl-jax run | fit | predict``.

::

    mtl-jax run configs/simulation_study.yaml [--out-dir results]
    mtl-jax fit scores.csv --task school --response score --covariates x1 x2 \\
        --components 2 --method em --out fit.json
    mtl-jax predict fit.json new_scores.csv --out predictions.csv

``run`` executes a paper experiment described by a YAML file, ``fit`` fits a mixture GLMM
to a CSV file and saves the :class:`mtl_jax.Fit` as JSON, and ``predict`` applies a saved
fit to new rows. Bad input (missing files, invalid data, unknown options) ends with
``mtl-jax: error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from mtl_jax.data import TaskData
from mtl_jax.infer.fit import BACKENDS, fit
from mtl_jax.infer.results import Fit
from mtl_jax.models.mixture_glmm import MixtureGLMM

PROG = "mtl-jax"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success.

    Raises:
        SystemExit: With status 2 on bad arguments or bad input (missing file, invalid
            data or YAML), after printing ``mtl-jax: error: <message>`` to stderr.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.command(args)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as error:  # DataError is a ValueError
        parser.exit(2, f"{PROG}: error: {error}\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    """Builds the argument parser with its three subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Probabilistic multitask learning on JAX."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a paper experiment from a YAML config",
        description="Run the experiment of a YAML config and write its results as JSON.",
    )
    run.add_argument("config", type=Path, help="YAML file, e.g. configs/simulation_study.yaml")
    run.add_argument("--out-dir", type=Path, default=Path("results"),
                     help="directory for <config name>.json (default: results)")
    run.set_defaults(command=_run)

    fit_ = commands.add_parser(
        "fit", help="fit a mixture GLMM to a CSV file",
        description="Fit a multitask mixture GLMM to a CSV file and save the fit as JSON.",
    )
    fit_.add_argument("data", type=Path, help="CSV file, one row per observation")
    fit_.add_argument("--task", required=True, help="column holding the task labels")
    fit_.add_argument("--response", required=True, nargs="+", metavar="COL",
                      help="response column(s)")
    fit_.add_argument("--covariates", required=True, nargs="+", metavar="COL",
                      help="covariates of the component means")
    fit_.add_argument("--mixing-covariates", nargs="+", metavar="COL",
                      help="covariates of the mixing proportions (default: --covariates)")
    fit_.add_argument("--categorical", nargs="+", default=[], metavar="COL",
                      help="covariates to dummy-code (non-numeric columns always are)")
    fit_.add_argument("--components", required=True, type=int, metavar="G",
                      help="number of mixture components")
    fit_.add_argument("--method", required=True, choices=sorted(BACKENDS),
                      help="inference backend")
    fit_.add_argument("--no-mixing-random-effects", dest="mixing_random_effects",
                      action="store_false", help="drop the task effects in the mixing logits")
    fit_.add_argument("--no-component-random-effects", dest="component_random_effects",
                      action="store_false", help="drop the task effects in the component means")
    fit_.add_argument("--no-standardize", dest="standardize", action="store_false",
                      help="use continuous covariates unscaled")
    fit_.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    fit_.add_argument("--n-init", type=int, metavar="N",
                      help="random restarts (default: the backend's)")
    fit_.add_argument("--max-iter", type=int, metavar="N",
                      help="iteration limit (default: the backend's)")
    fit_.add_argument("--out", required=True, type=Path, help="output JSON file")
    fit_.set_defaults(command=_fit)

    predict = commands.add_parser(
        "predict", help="predict new rows with a saved fit",
        description="Append pred_<response> columns to a CSV file using a saved fit. "
        "Tasks not seen in training get population-level predictions.",
    )
    predict.add_argument("fit", type=Path, help="JSON file written by 'mtl-jax fit'")
    predict.add_argument("data", type=Path, help="CSV file with the task and covariate columns")
    predict.add_argument("--out", required=True, type=Path, help="output CSV file")
    predict.set_defaults(command=_predict)
    return parser


def _run(args: argparse.Namespace) -> None:
    """``mtl-jax run``: runs one experiment and writes ``<out-dir>/<config stem>.json``."""
    config = yaml.safe_load(args.config.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{args.config} must hold a YAML mapping of settings")
    from mtl_jax.experiments import run_experiment, write_results

    write_results(run_experiment(config, progress=True), args.out_dir / f"{args.config.stem}.json")


def _fit(args: argparse.Namespace) -> None:
    """``mtl-jax fit``: encodes the CSV, fits, saves the JSON and prints a summary."""
    mixing = args.mixing_covariates or args.covariates
    sources = list(dict.fromkeys([*args.covariates, *mixing]))
    data = TaskData.from_csv(
        args.data,
        task=args.task,
        response=args.response,
        covariates=sources,
        categorical=args.categorical,
        standardize=args.standardize,
    )
    model = MixtureGLMM(
        num_components=args.components,
        covariates=tuple(args.covariates),
        mixing_covariates=tuple(mixing),
        mixing_random_effects=args.mixing_random_effects,
        component_random_effects=args.component_random_effects,
    )
    options = _backend_options(args)
    shown = ", ".join(f"{key}={value}" for key, value in options.items() if key != "progress")
    print(
        f"fitting a {args.components}-component mixture GLMM to {data.num_obs} rows in "
        f"{data.num_tasks} tasks with {args.method.upper()}"
        + (f" ({shown})" if shown else "")
        + " ...",
        flush=True,
    )
    result = fit(model, data, args.method, seed=args.seed, **options)
    result.save(args.out)
    print(
        f"done in {result.timings['fit']:.1f} s: loglik {result.loglik:.4f}, "
        f"BIC {result.bic:.4f}, converged {result.converged}, n_iter {result.n_iter}"
    )
    print(result.summary().to_string())
    print(f"fit written to {args.out}")


def _backend_options(args: argparse.Namespace) -> dict:
    """Backend keyword options from the command line, checked against its signature.

    ``n_init`` and ``max_iter`` take the command-line value when given and otherwise the
    backend's default (so that the progress line can show them); ``progress=True`` is
    passed when the backend accepts it.

    Raises:
        ValueError: If an option was given that the backend does not accept.
    """
    parameters = inspect.signature(BACKENDS[args.method]).parameters
    options = {}
    for name in ("n_init", "max_iter"):
        value = getattr(args, name)
        if name not in parameters:
            if value is not None:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"method {args.method!r} does not take {flag}")
            continue
        default = parameters[name].default
        if value is not None:
            options[name] = value
        elif default is not inspect.Parameter.empty:
            options[name] = default
    if "progress" in parameters:
        options["progress"] = True
    return options


def _predict(args: argparse.Namespace) -> None:
    """``mtl-jax predict``: writes the input rows plus ``pred_<response>`` columns."""
    result = Fit.load(args.fit)
    frame = pd.read_csv(args.data)
    predictions = result.predict(frame)
    for k, name in enumerate(result.response_names):
        frame[f"pred_{name}"] = predictions[:, k]
    frame.to_csv(args.out, index=False)
    print(f"{len(frame)} predictions written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
