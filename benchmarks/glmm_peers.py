r"""Our EM fits of GLMMs and mixtures against R's lme4, glmmTMB and flexmix on the same data.

::

    python benchmarks/glmm_peers.py --tasks 50 --per-task 20 --repeats 3 --n-init 4 \
        --out results/glmm_peers.json

Each case simulates one data set in Python (fixed ``--seed``; ``--tasks`` tasks of
``--per-task`` rows, a covariate ``x ~ N(0, 1)``), fits it with our
:class:`~mtl_jax.models.mixture_glmm.MixtureGLMM` by EM and with each R peer through
``Rscript`` (``benchmarks/glmm_peers.R``; the data go over as a temporary CSV written with
17 significant digits, the estimates come back as a CSV):

========================= ========================================= =======================================
case                      ours                                      peers (R)
========================= ========================================= =======================================
``gaussian_intercept``    ``MixtureGLMM(1)``: exact REML            ``lmer(y ~ x + (1|task))`` REML,
                                                                    ``glmmTMB(..., REML=TRUE)``
``gaussian_slope``        ``random_slopes=("x",)``, full ``Phi``    ``(1 + x | task)``, same two peers
``bernoulli``             ``family="bernoulli"``: PQL, approx. REML ``glmer(y ~ x + (1|task), binomial)``
                                                                    Laplace (``nAGQ=1``), ``glmmTMB`` ML
``binomial``              ``family="binomial"``, trials column      ``cbind(y, trials - y) ~ ...``
``poisson``               ``family="poisson"``, offset column       ``... + offset(log_exposure)``
``mixture_gaussian``      ``MixtureGLMM(2, membership="task")``     flexmix ``y ~ x | task``,
                          (EM for the marginal likelihood)          ``FLXMRlmm(random = ~ 1)``, ML
``mixture_binomial``      ``membership="task",                      flexmix ``FLXMRglm("binomial")``
                          component_random_effects=False``
``mixture_poisson``       same, ``family="poisson"`` with offset    ``FLXMRglm("poisson", offset=)``
========================= ========================================= =======================================

**Same criterion?** Both sides fit the same model in every case (flexmix's
``y ~ x | task`` is membership per task), but not always by the same criterion:

* the Gaussian GLMMs: REML on both sides, so the estimates agree up to the optimisers'
  tolerances (the peers' log-likelihood is then their REML criterion, not compared);
* the mixtures of GLMs without random effects: maximum likelihood on both sides, so the
  estimates and the log-likelihoods agree;
* the non-Gaussian GLMMs: ours is PQL with approximate REML variance components (the
  paper's method), ``glmer`` and ``glmmTMB`` maximise the Laplace approximation of the
  likelihood. The estimates differ by the methods' difference, reported as it is; the
  peer's log-likelihood (Laplace, at its maximum) should be at least ours (the same
  Laplace approximation at our estimate);
* the Gaussian mixture with random intercepts: maximum likelihood on both sides (our
  default ``residual_update="ml"`` with membership per task is EM for the marginal
  likelihood, flexmix's ``FLXMRlmm`` maximises it too), so the estimates and the
  log-likelihoods agree up to the EM tolerances.

**Timing.** Ours: the jitted EM fit (``em_fit``) is compiled ahead of time and run once
(``compile_seconds``), then timed warm (median of ``--repeats`` runs after a warm-up).
The peers: ``system.time`` around the fitting call alone inside R, median of
``--repeats`` runs after one untimed warm-up (R start-up and package loading are not
counted). The mixtures use ``--n-init`` random starts on both sides (ours vmapped,
flexmix's ``stepFlexmix(nrep = --n-init)`` one after another); a GLMM has one optimum and
one start. Both sides' EM stop at ``--tol`` (relative change of the objective) or
``--max-iter`` iterations; lme4 and glmmTMB use their default optimiser settings.

**Agreement.** Estimates are compared by name (``w[h, col]``, ``sigma2[h]``, ``phi[h]``,
``phi[h, label]``, ``phi[h, label1, label2]``, ``pi[h]`` the class proportions), after the
peer's components are matched to ours (Hungarian matching on ``w``, against label
switching). A relative difference is ``|ours - peer| / |peer|``; for a covariance
``phi[h, a, b]`` the scale is ``sqrt(phi[h, a] phi[h, b])`` of the peer (a difference of
correlations). The table shows the largest over the fixed effects and proportions
(``w``, ``pi``, and ``v`` for membership per observation, flexmix's concomitant
coefficients re-referenced to our last component) and over the variance components (``sigma2``, ``phi``) apart.

Without ``Rscript`` (``--rscript``), or without a peer's R package, that peer is skipped
with a message and our side still runs. Computation is in float64 (``--dtype float32``
for ours in single precision).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from scipy.special import expit, softmax

from mtl_jax.data import TaskData
from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import cast_floats, compile_and_run, median_time, resolve_dtype
from mtl_jax.infer.em import em_fit
from mtl_jax.metrics import match_components
from mtl_jax.models.mixture_glmm import MixtureGLMM

R_SCRIPT = Path(__file__).with_suffix(".R")
PEERS = ("lme4", "glmmTMB", "flexmix")


class Case(NamedTuple):
    """One benchmark case: how its data are simulated, our model, and its R peers.

    The truth: task ``i`` in class ``h`` (drawn with ``class_probabilities``) has the
    linear predictor ``coef[h] . (1, x) + b_i . z + o`` with ``b_i ~ N(0, phi[h])``
    (``z = (1, x)[:r]``, ``r`` the size of ``phi[h]``; no effect when ``phi`` is empty)
    and ``o`` the log exposure of the Poisson cases; Gaussian responses add
    ``N(0, sigma2[h])`` noise, binomial ones have 1 to 10 trials per row.

    Attributes:
        name: the case's name (also its key in ``benchmarks/glmm_peers.R``).
        model: our model.
        peers: the R packages fitting the same data.
        same_criterion: whether ours and the peers fit the same model by the same
            criterion (REML for both, or ML for both), so that they should agree.
        coef: ``[g][2]`` true intercepts and slopes.
        phi: ``[g][r][r]`` true covariances of the task effects (``()``: none).
        sigma2: ``[g]`` true residual variances (Gaussian cases).
        class_probabilities: ``[g]`` probabilities of the task classes.
        covariates: the data's covariate columns (all of them in the model's designs).
    """

    name: str
    model: MixtureGLMM
    peers: tuple[str, ...]
    same_criterion: bool
    coef: tuple
    phi: tuple = ()
    sigma2: tuple = ()
    class_probabilities: tuple = (1.0,)
    covariates: tuple[str, ...] = ("x",)


_TASK_MIXTURE = dict(num_components=2, covariates=("x",), mixing_covariates=(), membership="task")
CASES = {case.name: case for case in (
    Case("gaussian_intercept", MixtureGLMM(1, covariates=("x",)), ("lme4", "glmmTMB"), True,
         coef=((1.0, 0.5),), phi=(((0.5,),),), sigma2=(1.0,)),
    Case("gaussian_slope", MixtureGLMM(1, covariates=("x",), random_slopes=("x",)), ("lme4", "glmmTMB"), True,
         coef=((1.0, 0.5),), phi=(((0.5, 0.1), (0.1, 0.25)),), sigma2=(1.0,)),
    Case("bernoulli", MixtureGLMM(1, covariates=("x",), family="bernoulli"), ("lme4", "glmmTMB"), False,
         coef=((-0.3, 0.8),), phi=(((0.6,),),)),
    Case("binomial", MixtureGLMM(1, covariates=("x",), family="binomial"), ("lme4", "glmmTMB"), False,
         coef=((-0.3, 0.8),), phi=(((0.6,),),)),
    Case("poisson", MixtureGLMM(1, covariates=("x",), family="poisson"), ("lme4", "glmmTMB"), False,
         coef=((0.3, 0.5),), phi=(((0.4,),),)),
    Case("mixture_gaussian", MixtureGLMM(**_TASK_MIXTURE), ("flexmix",), True,
         coef=((1.0, 0.5), (-1.0, -0.8)), phi=(((0.5,),), ((0.3,),)), sigma2=(0.25, 0.5),
         class_probabilities=(0.4, 0.6)),
    Case("mixture_binomial", MixtureGLMM(**_TASK_MIXTURE, family="binomial", component_random_effects=False),
         ("flexmix",), True, coef=((1.0, 0.5), (-1.0, -0.8)), class_probabilities=(0.4, 0.6)),
    Case("mixture_poisson", MixtureGLMM(**_TASK_MIXTURE, family="poisson", component_random_effects=False),
         ("flexmix",), True, coef=((1.0, 0.5), (-0.5, -0.6)), class_probabilities=(0.4, 0.6)),
)}


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (``benchmarks/peers.py`` reads its GLMM settings with them too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50, help="number of tasks")
    parser.add_argument("--per-task", type=int, default=20, help="rows per task")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per measurement (median), both sides")
    parser.add_argument("--n-init", type=int, default=4, help="random starts of the mixtures, both sides")
    parser.add_argument("--tol", type=float, default=1e-10, help="EM relative tolerance, ours and flexmix")
    parser.add_argument("--max-iter", type=int, default=5000, help="EM iteration limit, ours and flexmix")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, our random starts and R's")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"cases to run (default all: {', '.join(CASES)})")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="R peers to run")
    parser.add_argument("--rscript", default="Rscript", help="the Rscript executable")
    parser.add_argument("--peer-timeout", type=float, default=1800.0,
                        help="seconds allowed per R call (warm-up and repeats)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="our precision")
    parser.add_argument("--out", type=Path, default=Path("results/glmm_peers.json"), help="output JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the cases, print the table, write ``--out``."""
    args = build_parser().parse_args(argv)

    dtype = resolve_dtype(args.dtype)
    r_setup = probe_r(args.rscript)
    print(f"R: {r_setup['version'] or r_setup['missing']}")
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.cases:
            case = CASES[name]
            rng = np.random.default_rng([args.seed, list(CASES).index(name)])  # a case's data do not depend on --cases
            frame = simulate(case, rng, args.tasks, args.per_task)
            csv = Path(scratch) / f"{name}.csv"
            frame.to_csv(csv, index=False, float_format="%.17g")
            ours = fit_ours(case, frame, args, dtype)
            peers = {}
            for peer in case.peers:
                if peer not in args.peers:
                    continue
                missing = r_setup["missing"] or r_setup["packages"].get(peer)
                if missing:
                    print(f"{name}: {peer} skipped: {missing}")
                    peers[peer] = {"skipped": missing}
                    continue
                peers[peer] = compare(case, ours, run_peer(case, peer, csv, args, Path(scratch)))
            cases.append({"case": name, "family": case.model.family, "components": case.model.num_components,
                          "same_criterion": case.same_criterion,
                          "data": {"tasks": args.tasks, "per_task": args.per_task, "rows": len(frame)},
                          "ours": ours, "peers": peers})
    output = {"config": {**vars(args), "out": str(args.out)}, "dtype": str(dtype), "r": r_setup, "cases": cases}
    table = format_table(cases)
    print(table)
    output["table"] = table
    write_results(output, args.out)
    return output


# ---------------------------------------------------------------------------- data
def simulate(case: Case, rng: np.random.Generator, tasks: int, per_task: int) -> pd.DataFrame:
    """One data set of ``case`` (see :class:`Case`): columns ``task, x, y, trials, log_exposure``."""
    family = case.model.family
    classes = rng.choice(len(case.class_probabilities), size=tasks, p=case.class_probabilities)  # [K]
    task = np.repeat(np.arange(tasks), per_task)  # [n]
    x = rng.normal(size=task.size)
    design = np.column_stack([np.ones(task.size), x])  # [n, 2]
    eta = np.einsum("nq,nq->n", design, np.asarray(case.coef)[classes[task]])
    if case.phi:
        r = len(case.phi[0])
        effects = np.stack([rng.multivariate_normal(np.zeros(r), case.phi[h]) for h in classes])  # [K, r]
        eta += np.einsum("nr,nr->n", design[:, :r], effects[task])
    trials = rng.integers(1, 11, task.size) if family == "binomial" else np.ones(task.size, int)
    log_exposure = np.log(rng.uniform(0.5, 2.0, task.size))
    if family == "gaussian":
        y = eta + rng.normal(size=task.size) * np.sqrt(np.asarray(case.sigma2)[classes[task]])
    elif family == "poisson":
        y = rng.poisson(np.exp(eta + log_exposure)).astype(float)
    else:
        y = rng.binomial(trials, expit(eta)).astype(float)
    return pd.DataFrame({"task": [f"task{i:04d}" for i in task], "x": x, "y": y, "trials": trials,
                         "log_exposure": log_exposure})


# ---------------------------------------------------------------------------- ours
def fit_ours(case: Case, frame: pd.DataFrame, args, dtype) -> dict:
    """Our EM fit of ``case``'s model: compile time, warm seconds per fit (and per iteration), estimates by name.

    With membership per observation the mixing coefficients are kept as ``v[h, col]``; with
    membership per task (intercepts only) they are reported as the class proportions ``pi[h]``.
    """
    model = case.model
    data = TaskData.from_dataframe(frame, task="task", response="y", covariates=list(case.covariates),
                                   standardize=False,
                                   trials="trials" if model.family == "binomial" else None,
                                   offset="log_exposure" if model.family == "poisson" else None)
    design = cast_floats(model.design(data), dtype)
    key = jax.random.key(args.seed)
    n_init = args.n_init if model.num_components > 1 else 1
    static = dict(model=model, n_init=n_init, max_iter=args.max_iter, tol=args.tol)
    run = compile_and_run(em_fit, static=static, design=design, key=key)
    seconds, result = median_time(lambda: run.compiled(design=design, key=key), args.repeats)
    per_task = model.membership == "task"
    estimates = {name: float(value) for name, value in model.named_parameters(result.params, model.labels(data)).items()
                 if not (per_task and name.startswith("v["))}
    if per_task and model.num_components > 1:  # the class proportions, from the mixing intercepts (last class the reference)
        logits = np.append(np.asarray(result.params.mixing_coef, float)[:, 0], 0.0)
        estimates.update({f"pi[{h + 1}]": float(p) for h, p in enumerate(softmax(logits))})
    print(f"{case.name}: ours {seconds:.4f} s per fit ({int(result.n_iter)} iterations, "
          f"compile {run.compile_seconds:.1f} s), loglik {float(result.loglik):.6f}")
    return {"model": repr(model), "n_init": n_init, "compile_seconds": run.compile_seconds,
            "first_run_seconds": run.run_seconds, "seconds_per_fit": seconds, "iterations": int(result.n_iter),
            "seconds_per_iteration": seconds / max(int(result.n_iter), 1),
            "converged": bool(result.converged), "loglik": float(result.loglik), "estimates": estimates}


# ---------------------------------------------------------------------------- R
def probe_r(rscript: str) -> dict:
    """Where ``rscript`` is, R's version, and each peer package's version or why it is missing.

    Returns:
        ``{"rscript", "version", "missing", "packages", "versions"}``: ``missing`` says why
        no peer can run (no Rscript), else ``None``; ``packages[peer]`` is ``None`` for an
        installed package and a message otherwise; ``versions[peer]`` its version (or ``None``).
    """
    path = shutil.which(rscript)
    setup = {"rscript": path, "version": None, "missing": None, "packages": {}, "versions": {}}
    if path is None:
        setup["missing"] = f"Rscript not found ({rscript!r}): install R to run the R peers"
        return setup
    probe = ("cat(R.version.string, '\\n'); for (p in c(%s)) cat(p, if (requireNamespace(p, quietly = TRUE)) "
             "as.character(packageVersion(p)) else '-', '\\n')" % ", ".join(f"'{peer}'" for peer in PEERS))
    completed = subprocess.run([path, "--vanilla", "-e", probe], capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        setup["missing"] = f"Rscript failed: {completed.stderr.strip()[-500:]}"
        return setup
    lines = completed.stdout.strip().splitlines()
    setup["version"] = lines[0].strip()
    for line in lines[1:]:
        peer, version = line.split()
        setup["versions"][peer] = None if version == "-" else version
        setup["packages"][peer] = (f"R package {peer!r} is not installed (install.packages('{peer}'))"
                                   if version == "-" else None)
    return setup


def run_peer(case: Case, peer: str, csv: Path, args, scratch: Path) -> dict:
    """Fit ``case`` with ``peer`` in R; its estimates by name, log-likelihood and seconds per fit.

    Returns:
        ``{"estimates", "loglik", "loglik_kind", "converged", "seconds_per_fit",
        "seconds_min", "seconds_max", ...}``, or ``{"failed": message}`` when R fails.
    """
    out = scratch / f"{case.name}_{peer}.out.csv"
    command = [shutil.which(args.rscript), "--vanilla", str(R_SCRIPT), case.name, peer, str(csv), str(out),
               str(args.repeats), str(args.n_init), repr(args.tol), str(args.max_iter), str(args.seed)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"R did not finish within {args.peer_timeout} s"}
    if completed.returncode != 0:
        message = f"R failed: {completed.stderr.strip()[-1000:]}"
        print(f"{case.name}: {peer} {message}")
        return {"failed": message}
    values = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("name")["value"].to_dict()
    result = {"loglik_kind": values.pop("loglik_kind"), "seconds_per_fit": float(values.pop("seconds")),
              "seconds_min": float(values.pop("seconds_min")), "seconds_max": float(values.pop("seconds_max")),
              "loglik": float(values.pop("loglik")), "converged": bool(float(values.pop("converged")))}
    for extra in ("iterations", "components"):
        if extra in values:
            result[extra] = int(float(values.pop(extra)))
    result["estimates"] = {name: float(value) for name, value in values.items()}
    print(f"{case.name}: {peer} {result['seconds_per_fit']:.4f} s per fit, loglik {result['loglik']:.6f}")
    return result


# ---------------------------------------------------------------------------- agreement
_NAME = re.compile(r"^(?P<base>\w+)\[(?P<h>\d+)(?P<rest>.*)\]$")


def relabel(estimates: dict, order: Sequence[int]) -> dict:
    """``estimates`` with component ``order[h] + 1`` renamed ``h + 1`` (in every ``name[h, ...]``)."""
    new_index = {int(old) + 1: new + 1 for new, old in enumerate(order)}
    out = {}
    for name, value in estimates.items():
        match = _NAME.match(name)
        out[f"{match['base']}[{new_index[int(match['h'])]}{match['rest']}]" if match else name] = value
    return out


def mixing_from_concomitant(estimates: dict, g: int) -> dict:
    """``estimates`` with a peer's concomitant coefficients ``u[h, col]`` as our ``v[h, col] = u[h, col] - u[g, col]``.

    flexmix's multinomial concomitant model has its own reference class; ours is the last
    component, so the peer's coefficients are re-referenced after its components are matched.
    """
    out = {name: value for name, value in estimates.items() if not name.startswith("u[")}
    for name, value in estimates.items():
        match = _NAME.match(name)
        if match and match["base"] == "u" and int(match["h"]) < g:
            out[f"v[{match['h']}{match['rest']}]"] = value - estimates[f"u[{g}{match['rest']}]"]
    return out


def component_coefficients(estimates: dict, g: int) -> np.ndarray:
    """``[g, q]`` the ``w[h, col]`` estimates, columns in name order."""
    return np.asarray([[value for name, value in sorted(estimates.items()) if name.startswith(f"w[{h + 1}, ")]
                       for h in range(g)])


def relative_differences(ours: dict, peer: dict) -> dict[str, float]:
    """``|ours - peer| / scale`` per shared name: ``|peer|``, or ``sqrt(phi[h, a] phi[h, b])`` for a covariance."""
    out = {}
    for name in sorted(ours.keys() & peer.keys()):
        match = _NAME.match(name)
        labels = [label.strip() for label in match["rest"].split(",")[1:]] if match else []
        scale = abs(peer[name])
        if match and match["base"] == "phi" and len(labels) == 2:
            h = match["h"]
            scale = math.sqrt(peer[f"phi[{h}, {labels[0]}]"] * peer[f"phi[{h}, {labels[1]}]"])
        difference = abs(ours[name] - peer[name])
        out[name] = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
    return out


def compare(case: Case, ours: dict, peer: dict) -> dict:
    """``peer``'s result with its components matched to ours, relative differences and the time ratio."""
    if "failed" in peer:
        return peer
    g = case.model.num_components
    if peer.get("components", g) != g:
        peer["failed"] = f"the peer kept {peer['components']} of {g} components (one emptied)"
        return peer
    estimates = peer["estimates"]
    if g > 1:
        order = match_components(component_coefficients(estimates, g), component_coefficients(ours["estimates"], g))
        estimates = relabel(estimates, order)
        peer["matched_order"] = [int(h) + 1 for h in order]
    peer["estimates"] = estimates = mixing_from_concomitant(estimates, g)
    differences = relative_differences(ours["estimates"], estimates)
    fixed = [value for name, value in differences.items() if name.startswith(("w[", "v[", "pi["))]
    variance = [value for name, value in differences.items() if name.startswith(("sigma2[", "phi["))]
    peer.update({
        "relative_differences": differences,
        "max_relative_difference": max(differences.values()),
        "max_relative_difference_fixed": max(fixed),
        "max_relative_difference_variance": max(variance) if variance else None,
        "peer_over_ours_time": peer["seconds_per_fit"] / ours["seconds_per_fit"],
        "loglik_peer_minus_ours": peer["loglik"] - ours["loglik"] if peer["loglik_kind"] == "marginal" else None,
    })
    return peer


# ---------------------------------------------------------------------------- table
def format_table(cases: list[dict]) -> str:
    """One row per (case, peer): times, their ratio, the largest relative differences, log-likelihoods."""
    rows = []
    for case in cases:
        ours = case["ours"]
        base = {"case": case["case"], "same crit.": "yes" if case["same_criterion"] else "no",
                "ours s/fit": f"{ours['seconds_per_fit']:.4f}", "compile s": f"{ours['compile_seconds']:.1f}",
                "loglik ours": f"{ours['loglik']:.3f}"}
        if not case["peers"]:
            rows.append({**base, "peer": "(none run)"})
        for peer, result in case["peers"].items():
            if "skipped" in result or "failed" in result:
                rows.append({**base, "peer": peer, "note": result.get("skipped") or result["failed"][:80]})
                continue
            delta = result["loglik_peer_minus_ours"]
            variance = result["max_relative_difference_variance"]
            rows.append({**base, "peer": peer, "peer s/fit": f"{result['seconds_per_fit']:.4f}",
                         "peer/ours": f"{result['peer_over_ours_time']:.2f}",
                         "max rel diff w,pi": f"{result['max_relative_difference_fixed']:.2e}",
                         "max rel diff var": "-" if variance is None else f"{variance:.2e}",
                         "loglik peer-ours": "REML crit." if delta is None else f"{delta:.2e}",
                         "note": "" if result["converged"] else "peer not converged"})
    columns = ["case", "peer", "same crit.", "ours s/fit", "compile s", "peer s/fit", "peer/ours",
               "max rel diff w,pi", "max rel diff var", "loglik ours", "loglik peer-ours", "note"]
    return pd.DataFrame(rows).reindex(columns=columns).astype(object).fillna("").to_string(index=False)


if __name__ == "__main__":
    main()
