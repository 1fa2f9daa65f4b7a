"""Command-line interface: ``mtl-jax run | fit | predict | score | plot``.

::

    mtl-jax run configs/simulation_study.yaml [--out-dir results] [--fresh] [--quiet] [--devices N]
    mtl-jax run CONFIG --coordinator HOST:PORT --num-processes N --process-id I   # one per host
    mtl-jax fit scores.csv --model mixture-glmm --task school --response score \\
        --covariates x1 x2 --components 2 --method em --out fit.json
    mtl-jax fit scores.csv ... --components 1 2 3 4 --method em --out fit.json   # choose g by BIC
    mtl-jax predict fit.json new_scores.csv --out predictions.csv
    mtl-jax score fit.json new_scores.csv --out scores.csv
    mtl-jax plot fit.json --kind random-effects --out effects.png
    mtl-jax plot em.json svi.json nuts.json --kind compare --out compare.png

``run`` executes a paper experiment described by a YAML file, journaling each finished
unit of work in ``<out-dir>/<config stem>.jsonl`` so that rerunning a killed run resumes
it (``--fresh`` starts over; ``--quiet`` turns off progress lines and bars); studies that
vmap their replicates split them over ``--devices N`` (default every device); with
``--coordinator/--num-processes/--process-id`` a study runs over the devices of several
processes, process 0 writing the results (no journal then); ``fit`` fits any
registered model (``--model``, default ``mixture-glmm``; each model adds its own options)
with any of its backends (``--method``) and saves the :class:`mtl_jax.Fit` as JSON
(format ``mtl_jax.fit/2``); ``predict`` appends ``pred_<response>`` columns to new rows;
``score`` appends ``loglik``, each row's natural-log predictive density, then any per-row
columns the model adds (sequence-lda: ``next_correct``, ``next_total``). Rows of tasks not
seen in training get population-level answers (their random effects integrated out).
``plot`` draws a figure of :mod:`mtl_jax.plots` from saved fits as PNG (``--kind
random-effects | trajectories | clusters | trace | compare``; ``compare`` takes several fit files,
labelled by their method; ``trajectories`` needs ``--data CSV --time COL``).

Several ``--components`` values (a model with a ``num_components`` field) fit the model
once per value (:func:`mtl_jax.select_components`), print the table of ``g``, loglik, BIC
and convergence, save the fit with the smallest BIC to ``--out`` (an ordinary fit file,
so ``predict`` and ``score`` take it as it is), and write the table beside it as
``<out stem>.selection.json``: ``{"criterion": "bic", "best": g, "table": [{"g",
"loglik", "bic", "num_parameters", "converged", "n_iter", "warnings"}, ...]}``. One value
is a single fit.

Every backend's options are listed by ``mtl-jax fit --help`` (from
:data:`mtl_jax.infer.fit.BACKEND_OPTIONS`): EM and VB ``--n-init --max-iter --tol --devices``
(``--devices N`` shards the tasks over N devices); SVI
``--guide --num-steps --learning-rate --svi-samples --svi-parameterisation``; NUTS
``--num-warmup --num-samples --num-chains --target-accept --nuts-parameterisation``. Unset options take the backend's defaults; an option of
another backend than ``--method`` is an error. Problems of a fit (no convergence, a
variance at its boundary, ...) are printed as ``warning: <problem>`` lines on stderr.

Exit status: 0 on success; 2 on bad input (missing files, invalid data, unknown or
misplaced options), after ``mtl-jax: error: <message>`` on stderr; 1 when the fit failed
(a non-finite estimate, or an error inside the backend), after the same kind of message.
A failed fit writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import pandas as pd
import yaml

import mtl_jax
from mtl_jax.infer.compile_clock import enable_persistent_cache
from mtl_jax.infer.fit import BACKEND_OPTIONS, BACKENDS, FitWarning, fit
from mtl_jax.infer.results import Fit
from mtl_jax.infer.selection import candidate_models, select_components
from mtl_jax.models.protocol import MODELS, model_class, supports

PROG = "mtl-jax"
DEFAULT_MODEL = "mixture-glmm"
PLOT_KINDS = ("random-effects", "trajectories", "clusters", "trace", "compare")


class FitFailed(RuntimeError):
    """The fit failed (non-finite estimate, or an error inside the backend); nothing was written."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success.

    Raises:
        SystemExit: status 2 on bad arguments or bad input, status 1 when a fit failed;
            both after ``mtl-jax: error: <message>`` on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    enable_persistent_cache()
    parser = _parser(_model_name(argv))
    args = parser.parse_args(argv)
    try:
        args.command(args)
    except FitFailed as error:
        parser.exit(1, f"{PROG}: error: {error}\n")
    except (ValueError, OSError, yaml.YAMLError) as error:  # DataError is a ValueError
        parser.exit(2, f"{PROG}: error: {error}\n")
    return 0


def _model_name(argv: list[str]) -> str:
    """The ``--model`` of a ``fit`` command line (its options depend on it)."""
    pre = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=DEFAULT_MODEL)
    known, _ = pre.parse_known_args(argv)
    return known.model


def _parser(model_name: str) -> argparse.ArgumentParser:
    """Builds the argument parser; ``fit`` carries the options of model ``model_name``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Probabilistic multitask learning on JAX.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {mtl_jax.__version__}")
    # No abbreviations: a prefix of one option (--task, --out) must never be read as another
    # (--task-weighting, --out-dir).
    commands = parser.add_subparsers(required=True, metavar="COMMAND",
                                     parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))

    run = commands.add_parser(
        "run", help="run a paper experiment from a YAML config",
        description="Run the experiment of a YAML config and write its results as JSON "
                    "(and its figure as PNG, for experiments that draw one).",
    )
    run.add_argument("config", type=Path, help="YAML file, e.g. configs/simulation_study.yaml")
    run.add_argument("--out-dir", type=Path, default=Path("results"),
                     help="directory for <config name>.json and .png (default: results)")
    run.add_argument("--fresh", action="store_true",
                     help="discard the journal <out-dir>/<config name>.jsonl of an earlier run and start over "
                          "(default: resume, skipping the units it records)")
    run.add_argument("--quiet", action="store_true", help="no progress lines or bars, no result table")
    run.add_argument("--devices", type=int, metavar="N", default=None,
                     help="split the study's replicates over N devices (overrides the config's devices:; "
                          "default: every device JAX sees, over all processes)")
    hosts = run.add_argument_group("several processes (hosts)",
                                   "join a jax.distributed run: start the same command once per process; "
                                   "process 0 writes the results")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    run.set_defaults(command=_run)

    fit_ = commands.add_parser(
        "fit", help="fit a model to a CSV file",
        description="Fit a registered multitask model to a CSV file and save the fit as JSON.",
    )
    fit_.add_argument("data", type=Path, help="CSV file, one row per observation")
    fit_.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS) or [DEFAULT_MODEL],
                      help=f"model family (default: {DEFAULT_MODEL})")
    cls = model_class(model_name) if model_name in MODELS or model_name == DEFAULT_MODEL else None
    if cls is not None:
        cls.add_data_arguments(fit_)
        cls.add_arguments(fit_)
    inference = fit_.add_argument_group("inference options")
    inference.add_argument("--method", required=True, choices=sorted(BACKENDS), help="inference backend")
    inference.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
    for methods, flag, keyword, spec in _backend_flags():
        extra = {key: value for key, value in spec.items() if key not in ("help", "dest")}
        if "metavar" not in extra and "choices" not in extra:
            extra["metavar"] = keyword.upper()
        inference.add_argument(flag, dest=f"{'/'.join(methods)}:{keyword}", default=None,
                               help=f"[{'/'.join(methods)}] {spec.get('help', '')}", **extra)
    fit_.add_argument("--out", required=True, type=Path, help="output JSON file")
    fit_.set_defaults(command=_fit)

    for name, action, column in (("predict", _predict, "pred_<response>"), ("score", _score, "loglik")):
        sub = commands.add_parser(
            name, help=f"append {column} to new rows with a saved fit",
            description=f"Append {column} column(s) to a CSV file using a saved fit. Tasks not seen in "
            "training get population-level answers (their random effects integrated out).",
        )
        sub.add_argument("fit", type=Path, help="JSON file written by 'mtl-jax fit'")
        sub.add_argument("data", type=Path, help="CSV file with the task and covariate columns"
                         + (" and the response" if name == "score" else ""))
        sub.add_argument("--out", required=True, type=Path, help="output CSV file")
        sub.set_defaults(command=action)

    plot = commands.add_parser(
        "plot", help="draw a figure of saved fit(s) as PNG",
        description="Draw a figure of saved fit(s) (mtl_jax.plots): random-effects (predicted task effects with "
                    "intervals), trajectories (each task's response over time by most probable class; needs "
                    "--data and --time), trace (EM objective or SVI loss per iteration), compare (the "
                    "parameters of several fits side by side, labelled by method).",
    )
    plot.add_argument("fits", type=Path, nargs="+", metavar="FIT", help="JSON file(s) written by 'mtl-jax fit' "
                      "(several for --kind compare)")
    plot.add_argument("--kind", required=True, choices=PLOT_KINDS, help="which figure")
    plot.add_argument("--out", required=True, type=Path, help="output PNG file")
    plot.add_argument("--part", choices=("component", "mixing"), default=None,
                      help="[random-effects] which effects (default: component)")
    plot.add_argument("--level", type=float, default=0.95, help="[random-effects, compare] interval level "
                      "(default: 0.95)")
    plot.add_argument("--data", type=Path, metavar="CSV", help="[trajectories] CSV file of the tasks' rows")
    plot.add_argument("--time", metavar="COL", help="[trajectories] column on the x axis")
    plot.add_argument("--response", metavar="COL", help="[trajectories] response column (default: the fit's first)")
    plot.set_defaults(command=_plot)
    return parser


def _run(args: argparse.Namespace) -> None:
    """``mtl-jax run``: runs one experiment and writes ``<out-dir>/<config stem>.json`` (and ``.png``, if it has a figure).

    Each finished unit of work is journaled in ``<out-dir>/<config stem>.jsonl``; rerunning
    the same command resumes from it (:mod:`mtl_jax.experiments.checkpoint`).
    """
    config = yaml.safe_load(args.config.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{args.config} must hold a YAML mapping of settings")
    from mtl_jax.experiments import run_experiment, write_plot, write_results
    from mtl_jax.experiments.checkpoint import journal_path
    from mtl_jax.infer.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.devices is not None:
        config["devices"] = args.devices
    lead = jax.process_index() == 0
    path = args.out_dir / f"{args.config.stem}.json"
    journal = journal_path(path) if jax.process_count() == 1 else None  # one journal per single-process run
    results = run_experiment(config, progress=lead and not args.quiet, journal=journal, resume=not args.fresh)
    if lead:
        path = write_results(results, path)
        write_plot(config["experiment"], results, path)


def _fit(args: argparse.Namespace) -> None:
    """``mtl-jax fit``: encodes the CSV, fits (each of several ``--components`` and keeps the BIC
    choice), saves the JSON (and the BIC table) and prints a summary."""
    options = _backend_options(args)  # check all that can be checked before the (long) fit
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"the directory of --out {args.out} does not exist")
    model = model_class(args.model).from_arguments(args)
    if not supports(model, args.method):
        raise ValueError(f"model {args.model!r} has no method {args.method!r}; "
                         f"choose one of {sorted(set(model.methods) & set(BACKENDS))}")
    components = getattr(args, "components", None) or []
    selecting = len(components) > 1
    if selecting:
        candidate_models(model, components)  # bad values are bad input (status 2), not a failed fit
    frame = model.read_frame(args.data, args) if hasattr(model, "read_frame") else pd.read_csv(args.data)
    data = model.data_from_frame(frame, args)
    shown = ", ".join(f"{key}={value}" for key, value in options.items() if key != "progress")
    rows = model.num_observations(model.design(data))
    print(f"fitting {args.model} to {rows} rows in {data.num_tasks} tasks with {args.method.upper()}"
          + (f" ({shown})" if shown else "")
          + (f" for g in {sorted(components)}, choosing by BIC" if selecting else "") + " ...", flush=True)
    with warnings.catch_warnings():  # printed below, once each
        warnings.simplefilter("ignore", FitWarning)
        try:
            if selecting:
                selection = select_components(model, data, components, args.method, seed=args.seed, **options)
                result = selection.best
            else:
                result = fit(model, data, args.method, seed=args.seed, **options)
        except (ValueError, ArithmeticError) as error:  # the input was valid: the computation failed
            raise FitFailed(f"the {args.method} fit failed ({type(error).__name__}: {error})") from None
    if selecting:
        table = selection.table[["loglik", "bic", "converged"]].rename(columns={"bic": "BIC"})
        print(table.assign(chosen=["*" if g == selection.best_components else "" for g in table.index]).to_string())
    for problem in result.warnings:
        print(f"warning: {problem}", file=sys.stderr)
    try:
        result.save(args.out)
    except ValueError as error:
        raise FitFailed(str(error)) from None
    if selecting:
        table_path = args.out.with_name(f"{args.out.stem}.selection.json")
        table_path.write_text(json.dumps(selection.to_dict(), indent=2))
        print(f"BIC chooses g = {selection.best_components}; table written to {table_path}")
    timings = result.timings
    print(f"done in {timings['fit'] + timings['score']:.1f} s (compile {timings['compile']:.1f} s, "
          f"run {timings['run']:.1f} s): loglik {result.loglik:.4f}, BIC {result.bic:.4f}, "
          f"converged {result.converged}, n_iter {result.n_iter}")
    print(result.summary().to_string())
    print(f"fit written to {args.out}")


def _backend_flags():
    """``(methods, flag, backend keyword, argparse keywords)`` of every backend option.

    Two backends may share a keyword (SVI's ``--svi-samples`` and NUTS's ``--num-samples``
    both set ``num_samples``), so each flag gets its own destination ``"<methods>:<keyword>"``;
    the keywords of :data:`BACKEND_OPTIONS` are read, never changed.
    """
    for methods, specs in BACKEND_OPTIONS.items():
        for flag, spec in specs:
            yield methods, flag, spec.get("dest", flag.lstrip("-").replace("-", "_")), spec


def _backend_options(args: argparse.Namespace) -> dict:
    """The chosen backend's options given on the command line (another backend's is an error)."""
    options, stray = {}, []
    for methods, flag, keyword, _ in _backend_flags():
        value = getattr(args, f"{'/'.join(methods)}:{keyword}", None)
        if value is None:
            continue
        if args.method in methods:
            options[keyword] = value
        else:
            stray.append(f"{flag} (an option of {' and '.join(map(repr, methods))})")
    if stray:
        raise ValueError(f"method {args.method!r} does not take {', '.join(stray)}")
    if "devices" in options:
        from mtl_jax.infer.sharding import resolve_devices

        resolve_devices(options["devices"])
    if args.method in ("svi", "nuts", "map"):
        options["progress"] = True
    return options


def _predict(args: argparse.Namespace) -> None:
    """``mtl-jax predict``: writes the input rows plus ``pred_<response>`` columns."""
    result = _load_fit(args.fit)
    frame = pd.read_csv(args.data)
    predictions = result.predict(frame).reshape(len(frame), -1)
    for k, name in enumerate(result.response_names):
        frame[f"pred_{name}"] = predictions[:, k]
    frame.to_csv(args.out, index=False)
    print(f"{len(frame)} predictions written to {args.out}")


def _score(args: argparse.Namespace) -> None:
    """``mtl-jax score``: writes the input rows plus ``loglik`` (natural log predictive density)
    and the model's extra score columns (:meth:`mtl_jax.Fit.score_table`)."""
    result = _load_fit(args.fit)
    frame = pd.read_csv(args.data)
    for name, values in result.score_table(frame).items():
        frame[name] = values.to_numpy()
    frame.to_csv(args.out, index=False)
    print(f"{len(frame)} rows scored (total loglik {frame['loglik'].sum():.4f}) and written to {args.out}")


def _plot(args: argparse.Namespace) -> None:
    """``mtl-jax plot``: draws one figure of :mod:`mtl_jax.plots` with the Agg backend and writes it as PNG."""
    trajectory_only = {"--data": args.data, "--time": args.time, "--response": args.response}
    if args.kind == "trajectories":
        if args.data is None or args.time is None:
            raise ValueError("--kind trajectories needs --data CSV and --time COL")
    elif any(value is not None for value in trajectory_only.values()):
        raise ValueError(f"{', '.join(flag for flag, value in trajectory_only.items() if value is not None)}: "
                         f"only for --kind trajectories, not {args.kind}")
    if args.part is not None and args.kind != "random-effects":
        raise ValueError(f"--part: only for --kind random-effects, not {args.kind}")
    if args.kind != "compare" and len(args.fits) > 1:
        raise ValueError(f"--kind {args.kind} draws one fit; got {len(args.fits)} files (only compare takes several)")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"the directory of --out {args.out} does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtl_jax import plots

    fits = [_load_fit(path) for path in args.fits]
    if args.kind == "random-effects":
        figure = plots.random_effects(fits[0], part=args.part or "component", level=args.level)
    elif args.kind == "trajectories":
        frame = pd.read_csv(args.data)
        figure = plots.trajectories(fits[0], frame, args.time, response=args.response)
    elif args.kind == "clusters":
        figure = plots.cluster_memberships(fits[0])
    elif args.kind == "trace":
        figure = plots.em_trace(fits[0])
    else:
        methods = [result.method for result in fits]
        unique = len(set(methods)) == len(methods)
        figure = plots.compare_estimates({method if unique else f"{method}: {path.stem}": result
                                          for method, path, result in zip(methods, args.fits, fits)},
                                         level=args.level)
    figure.savefig(args.out, dpi=120)
    plt.close(figure)
    print(f"{args.kind} figure written to {args.out}")


def _load_fit(path: Path) -> Fit:
    """:meth:`Fit.load`, with a malformed fit file reported as bad input."""
    try:
        return Fit.load(path)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{path} is not a valid mtl_jax fit file ({type(error).__name__}: {error})") from None


if __name__ == "__main__":
    sys.exit(main())
