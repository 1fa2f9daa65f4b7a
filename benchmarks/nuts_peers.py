r"""NUTS per effective sample, ours against Stan in the same run, on the paper's simulation.

::

    python benchmarks/nuts_peers.py --json results/nuts_peers.json          # K = 10 x 1,000, 500 + 500, 4 chains
    python benchmarks/nuts_peers.py --tasks 4 --per-task 50 --warmup 50 --samples 50 --chains 2 --no-stan

Both samplers run the same posterior: the paper's mixture GLMM with g = 2 (Table 1
parameters, ``mtl_jax.experiments.simulation.simulate_study``), random intercepts in the
mixing logit and in the component means, the priors of our NumPyro program and its
non-centred task effects (Stan: ``benchmarks/mixture_glmm.stan``, run by ``rstan`` through
``benchmarks/nuts_peers.R``). Every chain on both sides starts at the same EM estimate (ours
adds the backend's small jitter), with the same warm-up and draws; Stan runs its chains on
``--cores`` processes, ours vectorised in one program.

**Columns.** ``compile s``: ours, the first ``fit`` less the second, which reads its programs
from the persistent compilation cache (see :func:`run_ours`); Stan, the C++ build of the model.
``sampling s``: warm-up and draws, compilation excluded. ``min ESS``: the smallest bulk
effective sample size (arviz) over the population-level parameters, after every draw is relabelled to the EM estimate (label switching); ``s / ESS``: sampling seconds
per effective draw of that slowest parameter; ``R-hat``: the largest (rank-normalised,
arviz); ``divergences`` after warm-up; ``leapfrog``: mean steps per draw; ``Stan / ours``: the
ratio of seconds per effective sample (the issue's goal: >= 50x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from mtl_jax import MixtureGLMM, TaskData, fit
from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import cast_floats, load_average, resolve_dtype
from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.infer.compile_clock import enable_persistent_cache
from mtl_jax.infer.nuts import MASS_MATRICES
from mtl_jax.infer.svi import PARAMETERISATIONS, align_draws
from mtl_jax.models.mixture_glmm.params import MixtureParams

HERE = Path(__file__).resolve().parent
STAN_MODEL = HERE / "mixture_glmm.stan"
R_SCRIPT = HERE / "nuts_peers.R"
COVARIATES = ("x1", "x2", "x3", "x4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10, help="number of tasks")
    parser.add_argument("--per-task", type=int, default=1000, help="rows per task")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up steps per chain, both sides")
    parser.add_argument("--samples", type=int, default=500, help="kept draws per chain, both sides")
    parser.add_argument("--chains", type=int, default=4, help="chains, both sides")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="Stan's parallel chains")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, EM starts, both samplers")
    parser.add_argument("--mass-matrix", choices=MASS_MATRICES, default="diagonal", help="our NUTS metric")
    parser.add_argument("--parameterisation", choices=PARAMETERISATIONS, default="noncentred",
                        help="our task effects (Stan's program is non-centred)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="our precision")
    parser.add_argument("--no-stan", action="store_true", help="run our side only")
    parser.add_argument("--rscript", default="Rscript", help="the Rscript executable")
    parser.add_argument("--peer-timeout", type=float, default=7200.0, help="seconds allowed for the Stan run")
    parser.add_argument("--json", type=Path, default=Path("results/nuts_peers.json"), help="output JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, sample with both, print the table and write ``--json``."""
    args = build_parser().parse_args(argv)
    enable_persistent_cache()  # the second of our two fits reads its programs from it (run_ours)
    if min(args.tasks, args.per_task, args.warmup, args.samples, args.chains, args.cores) < 1:
        raise SystemExit("--tasks, --per-task, --warmup, --samples, --chains and --cores must be positive")
    data = simulated_data(args)
    model = MixtureGLMM(num_components=2)
    start = fit(model, data, method="em", seed=args.seed, n_init=4, standard_errors=False)
    rows = {"ours": run_ours(model, data, start, args)}
    if args.no_stan:
        rows["stan"] = {"skipped": "--no-stan"}
    else:
        missing = stan_missing(args.rscript)
        if missing:
            print(f"Stan skipped: {missing}")
            rows["stan"] = {"skipped": missing}
        else:
            rows["stan"] = run_stan(model, data, start, args)
    ours, stan = rows["ours"], rows["stan"]
    if "seconds_per_ess" in stan:
        stan["stan_over_ours"] = stan["seconds_per_ess"] / ours["seconds_per_ess"]
    output = {"config": {**vars(args), "json": str(args.json)}, "data": {"tasks": args.tasks, "rows": len(data.y)},
              "load_average": load_average(), "samplers": rows}
    output["table"] = format_table(rows)
    print(output["table"])
    write_results(output, args.json)
    return output


def simulated_data(args) -> TaskData:
    """The first replicate of the paper's simulation (g = 2) as a ``TaskData`` in ``--dtype``."""
    study = simulate_study(jax.random.key(args.seed), 2, num_tasks=args.tasks, n_per_task=args.per_task)
    x = np.asarray(study.train.x_comp, dtype=np.float64)
    frame = pd.DataFrame({"task": np.asarray(study.train.task), "y": np.asarray(study.train.y, np.float64)[:, 0]})
    for j, name in enumerate(COVARIATES, start=1):
        frame[name] = x[:, j]
    data = TaskData.from_dataframe(frame, task="task", response="y", covariates=list(COVARIATES), standardize=False)
    return cast_floats(data, resolve_dtype(args.dtype))


def posterior_checks(named: dict[str, np.ndarray]) -> dict:
    """Smallest bulk ESS and largest R-hat over named draws ``[chains, draws]`` (arviz)."""
    import arviz as az

    posterior = az.from_dict(posterior=named)
    ess = az.ess(posterior, method="bulk")
    rhat = az.rhat(posterior)
    ess_values = {name: float(ess[name]) for name in named}
    rhat_values = {name: float(rhat[name]) for name in named}
    slowest = min(ess_values, key=ess_values.get)
    return {"min_ess_bulk": ess_values[slowest], "min_ess_parameter": slowest,
            "max_rhat": max(rhat_values.values()), "ess_bulk": ess_values, "rhat": rhat_values}


def run_ours(model, data, start, args) -> dict:
    """NUTS through the public ``fit`` from the EM estimate, twice; timings and checks of the aligned draws.

    The first fit compiles; the second, with the same seed, reads its programs from the
    persistent compilation cache (the command line's, :func:`enable_persistent_cache`), so
    its wall time is the sampling plus a few seconds of tracing (an upper bound on our
    sampling time). ``compile s`` is the difference of the two: near zero when the cache
    already held the programs from an earlier run; with the cache off
    (``MTL_JAX_CACHE_DIR=off``) the sampling time includes a second compilation.
    """
    def sample():
        return fit(model, data, method="nuts", seed=args.seed, init_params=start.params, num_warmup=args.warmup,
                   num_samples=args.samples, num_chains=args.chains, mass_matrix=args.mass_matrix,
                   parameterisation=args.parameterisation)

    first = sample()
    result = sample()
    checks = posterior_checks(model.named_parameters(result.draws, result.labels, leading=2))
    sampling = result.timings["fit"]
    row = {"compile_seconds": first.timings["fit"] - sampling, "sampling_seconds": sampling,
           "seconds_per_ess": sampling / checks["min_ess_bulk"],
           "divergences": result.diagnostics["num_divergences"],
           "mean_leapfrog_steps": result.diagnostics.get("mean_leapfrog_steps"), **checks}
    print(f"ours: sampling {sampling:.1f} s, min ESS {checks['min_ess_bulk']:.0f}, R-hat {checks['max_rhat']:.3f}")
    return row


def stan_missing(rscript: str) -> str | None:
    """Why Stan cannot run here, or ``None``."""
    path = shutil.which(rscript)
    if path is None:
        return f"Rscript not found ({rscript!r}): install R and rstan to run Stan"
    probe = subprocess.run([path, "--vanilla", "-e", "cat(requireNamespace('rstan', quietly = TRUE) && "
                            "requireNamespace('jsonlite', quietly = TRUE))"], capture_output=True, text=True,
                           timeout=300)
    if probe.stdout.strip() != "TRUE":
        return "R packages rstan and jsonlite are not installed (apt-get install r-cran-rstan)"
    return None


def stan_data(model, data) -> dict:
    """The data block of ``mixture_glmm.stan`` (with the prior scales of our program)."""
    y = np.asarray(data.y, np.float64)[:, 0]
    x = np.asarray(data.X, np.float64)
    return {"N": len(y), "K": len(data.task_names), "Q": x.shape[1], "QM": x.shape[1], "X": x.tolist(),
            "XM": x.tolist(), "y": y.tolist(), "task": (np.asarray(data.task) + 1).tolist(),
            "y_mean": float(y.mean()), "y_sd": float(y.std()), "coef_scale": model.priors.coef_scale,
            "sd_scale": model.priors.sd_scale}


def stan_start(model, params) -> dict:
    """``params`` as one start of the Stan program (the same sites as ours, Stan's shapes)."""
    sites = {name: np.asarray(value, np.float64) for name, value in model.site_values(params).items()}
    return {"mixing_coef": sites["mixing_coef"][0].tolist(),
            "component_coef": sites["component_coef"][:, :, 0].T.tolist(),
            "component_scale": sites["component_scale"][:, 0].tolist(),
            "mixing_effects_sd": float(sites["mixing_effects_sd"][0]),
            "component_effects_sd": sites["component_effects_sd"][:, 0].tolist(),
            "mixing_effects_z": sites["mixing_effects_z"][:, 0].tolist(),
            "component_effects_z": sites["component_effects_z"][:, :, 0].tolist()}


def stan_draws(frame: pd.DataFrame, chains: int, num_tasks: int, q: int) -> MixtureParams:
    """Stan's draws (one row per draw, ``chain`` column) as :class:`MixtureParams` ``[chains, draws, ...]``."""
    def column(name):
        return frame.sort_values("chain", kind="stable")[name].to_numpy().reshape(chains, -1)

    def stack(pattern, *shape):
        names = [pattern.format(*(i + 1 for i in index)) for index in np.ndindex(*shape)]  # Stan counts from 1
        return np.stack([column(name) for name in names], axis=-1).reshape((chains, -1) + shape)

    mixing_coef = stack("mixing_coef[{}]", q)[:, :, None, :]
    component_coef = np.swapaxes(stack("component_coef[{},{}]", q, 2), 2, 3)[..., None]
    scale = stack("component_scale[{}]", 2)
    lam_sd = column("mixing_effects_sd")
    phi_sd = stack("component_effects_sd[{}]", 2)
    a = stack("mixing_effects_z[{}]", num_tasks) * lam_sd[..., None]
    b = stack("component_effects_z[{},{}]", num_tasks, 2) * phi_sd[:, :, None, :]
    return MixtureParams(
        mixing_coef=mixing_coef, component_coef=component_coef, component_cov=(scale**2)[..., None, None],
        mixing_cov=(lam_sd**2)[..., None, None], component_effects_cov=(phi_sd**2)[..., None, None],
        mixing_effects=a[..., None], component_effects=b[..., None, None],
        class_logits=np.zeros(a.shape + (2,)))


def run_stan(model, data, start, args) -> dict:
    """Stan's NUTS through ``Rscript`` from the EM estimate; timings and checks of the aligned draws."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "data.json").write_text(json.dumps(stan_data(model, data)))
        (scratch / "inits.json").write_text(json.dumps([stan_start(model, start.params)] * args.chains))
        command = [shutil.which(args.rscript), "--vanilla", str(R_SCRIPT), str(STAN_MODEL), str(scratch / "data.json"),
                   str(scratch / "inits.json"), str(args.warmup), str(args.samples), str(args.chains),
                   str(args.cores), str(args.seed + 1), str(scratch / "draws.csv"), str(scratch / "out.csv")]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
        except subprocess.TimeoutExpired:
            return {"failed": f"Stan did not finish within {args.peer_timeout} s"}
        if completed.returncode != 0:
            return {"failed": f"R failed: {completed.stderr.strip()[-1000:]}"}
        values = pd.read_csv(scratch / "out.csv").set_index("name")["value"].to_dict()
        draws = stan_draws(pd.read_csv(scratch / "draws.csv"), args.chains, len(data.task_names), data.X.shape[1])
    reference = jax.tree_util.tree_map(np.asarray, start.params)
    aligned = align_draws(model, cast_floats(draws, reference.component_coef.dtype), reference)
    labels = model.labels(data)
    checks = posterior_checks(model.named_parameters(aligned, labels, leading=2))
    row = {"compile_seconds": values["compile_seconds"], "sampling_seconds": values["sample_seconds"],
           "seconds_per_ess": values["sample_seconds"] / checks["min_ess_bulk"],
           "divergences": int(values["divergences"]), "mean_leapfrog_steps": values["mean_leapfrog_steps"],
           "max_treedepth_hits": int(values["max_treedepth_hits"]), **checks}
    print(f"stan: sampling {row['sampling_seconds']:.1f} s, min ESS {checks['min_ess_bulk']:.0f}, "
          f"R-hat {checks['max_rhat']:.3f}")
    return row


def format_table(rows: dict) -> str:
    header = (f"{'sampler':8s} {'compile s':>10s} {'sampling s':>11s} {'min ESS':>8s} {'s / ESS':>9s} "
              f"{'R-hat':>6s} {'divergences':>11s} {'leapfrog':>9s} {'Stan / ours':>12s}")
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        if "skipped" in row or "failed" in row:
            lines.append(f"{name:8s} {row.get('skipped') or row.get('failed')}")
            continue
        leapfrog = row.get("mean_leapfrog_steps")
        ratio = row.get("stan_over_ours")
        lines.append(f"{name:8s} {row['compile_seconds']:10.1f} {row['sampling_seconds']:11.1f} "
                     f"{row['min_ess_bulk']:8.0f} {row['seconds_per_ess']:9.4f} {row['max_rhat']:6.3f} "
                     f"{row['divergences']:11d} {'-' if leapfrog is None else f'{leapfrog:.1f}':>9s} "
                     f"{'-' if ratio is None else f'{ratio:.1f}x':>12s}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
