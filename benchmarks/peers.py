r"""Our fits against their peers on the same data in the same run: one table of seconds per fit and per iteration.

::

    python benchmarks/peers.py --json results/peers.json          # the issue's sizes
    python benchmarks/peers.py --peers flexmix lme4 --paper-tasks 10 --lmm-tasks 1000 --json small.json

An aggregator: every row is measured by the benchmark script that owns it, called here
with that script's own flags (``--glmm-args``, ``--mixedlm-args``, ``--sequence-args``,
``--net-args``, each a quoted string of the script's flags; see its ``--help``), and this
script only adds the sizes below, runs them in one process and puts the rows in one table.

================ ============================================= ========================================== =========
family           ours                                          peer                                       goal
================ ============================================= ========================================== =========
``glmm``         the paper's simulation (``--paper-tasks``     flexmix (R, ``benchmarks/glmm_peers.R``):
                 ``x --paper-per-task``, Table 1, g = 2):
                 ``paper_independence``: the mixture of         ``FLXMRglm`` + ``FLXPmultinom`` concomitant  50x at
                 regressions with concomitant covariates, no    (same model, ML)                          K=10,
                 random effects, ML (``residual_update="ml"``)                                              100x at
                 ``paper_mixture_lmm``: membership per task,    ``y ~ x | task``, ``FLXMRlmm(random=~1)``  K=100
                 random intercepts, ML                         (same model, ML)                           (x 1,000)
                 ``paper_mtl``: the paper's model,             the ``FLXMRlmm`` fit above, the nearest
                 ``MixtureGLMM(2)``                            flexmix gets (a different model: no check)
``glmm``         g = 1 LMM, ``--lmm-tasks x --lmm-per-task``   lme4 ``lmer(y ~ x + (1|task))``, REML      5x at
                 (``glmm_peers``' ``gaussian_intercept``),                                                K=10^5
                 exact REML
``glmm``         g = 1 LMM, five covariates                    statsmodels ``MixedLM`` REML
                 (``speed.py`` part (e))
``sequence``     one Baum-Welch step of an HMM                 hmmlearn, dynamax (``sequence_speed.py``)  8x, 5x
``sequence``     one EM step of categorical Sequential LDA     scikit-learn batch LDA (timing only: VB
                                                               with topic priors, not the same objective)
``net``          one Adam step of ``MTLNet``                   the same net in PyTorch                    1.5x
                                                               (``mtl_net_step.py``)
================ ============================================= ========================================== =========

**Columns.** ``ours s/fit`` and ``peer s/fit``: warm seconds per fit to convergence (our
fits are compiled ahead of time and run once first; the compile time is in ``compile
s``), the median of the owning script's ``--repeats``; ``ms/it``: milliseconds per
iteration, i.e. per fit divided by the iterations (``its``, ours/peer: EM iterations of
the start kept, both sides running the same ``--n-init`` starts; for lme4 the optimiser's
function evaluations), or the timed step itself where a row times single iterations or
steps (sequence, net); ``peer/ours``: the peer's time over ours per fit, or per
iteration/step where no fit is timed (``basis``); ``goal``: the issue's goal for that
ratio and whether it is met; ``agreement``: the check that both compute the same thing
(largest relative difference of the estimates and the log-likelihood difference, or the
owning script's parity check).

**Same computation?** ``paper_independence`` and ``paper_mixture_lmm`` fit the same model
by maximum likelihood on both sides, from ``--n-init`` random starts each, so they should
reach the same optimum; but flexmix's Gaussian ``FLXMRglm`` divides the weighted residual
sum of squares by ``n - rank`` (all rows, a degrees-of-freedom correction), so its
``sigma2`` differs from the ML value by about ``rank / n`` and the other estimates and the
log-likelihood follow to that order. lme4 and ours are both REML (see
``glmm_peers.py``). Random starts can end in different local optima on either side: the
log-likelihood difference says which side found the better one.

**Choosing rows.** ``--peers`` picks the groups of rows (``flexmix``, ``lme4``,
``statsmodels``, ``hmm``: hmmlearn and dynamax, ``lda``: scikit-learn, ``torch``).

**Absent peers.** R (``--glmm-args="--rscript ..."``), flexmix, lme4, statsmodels,
hmmlearn, dynamax, scikit-learn and torch are optional: a row whose peer is missing says
``skipped`` with the reason, and our side is still timed. The JSON (``--json``) has every
row with the owning script's full result, the R setup and the load average at the start
and end (other work on a shared machine skews the timings). Ratios, not absolute times,
are the point; on a CPU XLA uses every core, most peers one.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import cpu_threads, load_average, resolve_dtype
from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.models.mixture_glmm import MixtureGLMM

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling benchmark scripts, also when this file is loaded by path
    sys.path.insert(0, str(HERE))

import glmm_peers  # noqa: E402
import mtl_net_step  # noqa: E402
import sequence_speed  # noqa: E402
import speed  # noqa: E402

#: The peers, each a group of rows of the table (``--peers``).
PEERS = ("flexmix", "lme4", "statsmodels", "hmm", "lda", "torch")
PAPER_COVARIATES = ("x1", "x2", "x3", "x4")
#: The issue's goals for flexmix per fit on the paper's simulation, by tasks (1,000 rows each).
FLEXMIX_GOALS = {10: 50.0, 100: 100.0}
#: The issue's goal for lme4 per fit at g = 1, and the number of tasks it is set at.
LME4_GOAL, LME4_GOAL_TASKS = 5.0, 100_000

#: Our models of the paper's simulation; the first two are fitted by flexmix too (same model,
#: maximum likelihood on both sides), the third is the paper's model, which flexmix cannot fit.
PAPER_CASES = {case.name: case for case in (
    glmm_peers.Case("paper_independence",
                    MixtureGLMM(2, covariates=PAPER_COVARIATES, mixing_random_effects=False,
                                component_random_effects=False, residual_update="ml"),
                    ("flexmix",), True, coef=(), covariates=PAPER_COVARIATES),
    glmm_peers.Case("paper_mixture_lmm",
                    MixtureGLMM(2, covariates=PAPER_COVARIATES, mixing_covariates=(), membership="task"),
                    ("flexmix",), True, coef=(), covariates=PAPER_COVARIATES),
    glmm_peers.Case("paper_mtl", MixtureGLMM(2, covariates=PAPER_COVARIATES), (), False, coef=(),
                    covariates=PAPER_COVARIATES),
)}
#: The paper's model is timed against this case's flexmix fit.
NEAREST_FLEXMIX = "paper_mixture_lmm"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                        help="rows to run (hmm: hmmlearn and dynamax, lda: scikit-learn)")
    parser.add_argument("--paper-tasks", type=int, nargs="+", default=[10, 100],
                        help="K tasks of the paper's simulation, one flexmix comparison per value")
    parser.add_argument("--paper-per-task", type=int, default=1000, help="rows per task of the paper's simulation")
    parser.add_argument("--paper-cases", nargs="+", choices=list(PAPER_CASES), default=list(PAPER_CASES),
                        help="which of our models of the paper's simulation to run (default all)")
    parser.add_argument("--lmm-tasks", type=int, default=LME4_GOAL_TASKS, help="tasks of the g = 1 LMM against lme4")
    parser.add_argument("--lmm-per-task", type=int, default=10, help="rows per task of the g = 1 LMM against lme4")
    parser.add_argument("--glmm-args", default="", metavar="FLAGS",
                        help="benchmarks/glmm_peers.py flags for the flexmix and lme4 rows (--repeats, --n-init, "
                             "--tol, --max-iter, --seed, --rscript, --peer-timeout, --dtype)")
    parser.add_argument("--mixedlm-args", default="", metavar="FLAGS",
                        help="benchmarks/speed.py flags for the statsmodels row (--num-tasks, --n-per-task, "
                             "--repeats, --seed, --dtype)")
    parser.add_argument("--sequence-args", default="", metavar="FLAGS",
                        help="benchmarks/sequence_speed.py flags for the HMM and LDA rows")
    parser.add_argument("--net-args", default="", metavar="FLAGS",
                        help="benchmarks/mtl_net_step.py flags for the net rows")
    parser.add_argument("--json", type=Path, default=Path("results/peers.json"), help="output JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the rows, print the table, write ``--json``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = {
        "glmm": glmm_peers.build_parser().parse_args(shlex.split(args.glmm_args)),
        "mixedlm": speed.build_parser().parse_args(shlex.split(args.mixedlm_args)),
        "sequence": sequence_speed.build_parser().parse_args(shlex.split(args.sequence_args)),
        "net": mtl_net_step.parse_args(shlex.split(args.net_args)),
    }
    output = {
        "config": {**vars(args), "json": str(args.json),
                   "settings": {name: {key: str(value) if isinstance(value, Path) else value
                                       for key, value in vars(flags).items()} for name, flags in settings.items()}},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_threads": cpu_threads(),
                        "load_average_start": load_average()},
        "rows": [],
    }
    rows = output["rows"]
    if {"flexmix", "lme4"} & set(args.peers):
        r_setup = glmm_peers.probe_r(settings["glmm"].rscript)
        output["environment"]["r"] = r_setup
        print(f"R: {r_setup['version'] or r_setup['missing']}")
        with tempfile.TemporaryDirectory() as scratch:
            if "flexmix" in args.peers:
                for tasks in args.paper_tasks:
                    rows += paper_rows(settings["glmm"], r_setup, tasks, args.paper_per_task, Path(scratch),
                                       args.paper_cases)
            if "lme4" in args.peers:
                rows.append(lme4_row(settings["glmm"], r_setup, args.lmm_tasks, args.lmm_per_task, Path(scratch)))
    if "statsmodels" in args.peers:
        rows.append(statsmodels_row(settings["mixedlm"]))
    parts = [part for part in ("hmm", "lda") if part in args.peers]
    if parts:
        rows += sequence_rows(settings["sequence"], parts)
    if "torch" in args.peers:
        rows += net_rows(settings["net"])
    output["environment"]["load_average_end"] = load_average()
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.json)
    return output


# ---------------------------------------------------------------------------- rows
def make_row(family: str, case: str, data: str, peer: str, ours: dict, theirs: dict | None, *, basis: str,
             goal: float | None = None, agreement: str = "", agreement_value: float | None = None,
             details: dict | None = None) -> dict:
    """One row of the table.

    Args:
        family, case, data, peer: what is compared, on what.
        ours, theirs: each side's ``seconds_per_fit``, ``seconds_per_iteration``,
            ``iterations`` (any may be absent) and ours ``compile_seconds``; ``theirs`` is
            ``{"skipped": why}`` or ``{"failed": why}`` when the peer did not run, and
            ``None`` when there is no peer on this row.
        basis: ``"fit"``, ``"iteration"`` or ``"step"``: what ``ratio`` (peer / ours) compares.
        goal: the issue's goal for ``ratio`` (``None``: none at this size).
        agreement, agreement_value: the check that both compute the same thing, in words
            and as its largest difference (``None``: no check).
        details: the owning script's full result, kept in the JSON.
    """
    keys = ("seconds_per_fit", "seconds_per_iteration", "iterations", "compile_seconds")
    row = {"family": family, "case": case, "data": data, "peer": peer, "basis": basis,
           "ours": {key: ours.get(key) for key in keys}, "goal": goal, "details": details or {}}
    if theirs is None or "skipped" in theirs or "failed" in theirs:
        reason = {} if theirs is None else {key: theirs[key] for key in ("skipped", "failed") if key in theirs}
        return {**row, **reason, "peer_result": None, "ratio": None, "goal_met": None,
                "agreement": agreement, "agreement_value": agreement_value}
    ratio_key = f"seconds_per_{basis}" if basis != "step" else "seconds_per_iteration"
    ratio = theirs[ratio_key] / row["ours"][ratio_key]
    return {**row, "peer_result": {key: theirs.get(key) for key in keys[:3]}, "ratio": ratio,
            "goal_met": None if goal is None else bool(ratio >= goal),
            "agreement": agreement, "agreement_value": agreement_value}


def per_iteration(result: dict) -> dict:
    """``result`` with ``seconds_per_iteration`` = seconds per fit / iterations, where both are known."""
    iterations = result.get("iterations")
    if iterations and "seconds_per_fit" in result:
        return {**result, "seconds_per_iteration": result["seconds_per_fit"] / iterations}
    return result


def glmm_agreement(peer: dict) -> tuple[str, float | None]:
    """The agreement of :func:`glmm_peers.compare`'s result: relative differences and log-likelihoods."""
    if "max_relative_difference" not in peer:
        return "", None
    variance = peer["max_relative_difference_variance"]
    delta = peer["loglik_peer_minus_ours"]
    text = (f"max rel diff: fixed {peer['max_relative_difference_fixed']:.1e}"
            + ("" if variance is None else f", var {variance:.1e}")
            + ("; REML crit." if delta is None else f"; loglik peer-ours {delta:.1e}")
            + ("" if peer["converged"] else "; peer not converged"))
    return text, peer["max_relative_difference"]


def paper_frame(seed: int, tasks: int, per_task: int) -> pd.DataFrame:
    """One training set of the paper's simulation (g = 2, Table 1): columns ``task, x1..x4, y``."""
    train = simulate_study(jax.random.key(seed), 2, tasks, per_task).train
    x = np.asarray(train.x_comp, float)[:, 1:]
    frame = pd.DataFrame(x, columns=list(PAPER_COVARIATES))
    frame.insert(0, "task", [f"task{i:04d}" for i in np.asarray(train.task)])
    frame["y"] = np.asarray(train.y, float)[:, 0]
    return frame


def peer_missing(r_setup: dict, peer: str) -> str | None:
    """Why ``peer`` (an R package) cannot run, or ``None``."""
    return r_setup["missing"] or r_setup["packages"].get(peer)


def paper_rows(args, r_setup: dict, tasks: int, per_task: int, scratch: Path,
               cases: Sequence[str] = tuple(PAPER_CASES)) -> list[dict]:
    """Our fits of the paper's simulation (the ``cases`` of :data:`PAPER_CASES`) against flexmix.

    ``args`` are ``glmm_peers``' flags. The paper's model is timed against the flexmix fit
    of :data:`NEAREST_FLEXMIX`, skipped when that case is not among ``cases``.
    """
    frame = paper_frame(args.seed, tasks, per_task)
    csv = scratch / f"paper_{tasks}x{per_task}.csv"
    frame.to_csv(csv, index=False, float_format="%.17g")
    dtype = resolve_dtype(args.dtype)
    data = f"K={tasks:,} x {per_task:,}, g=2"
    goal = FLEXMIX_GOALS.get(tasks) if per_task == 1000 else None
    missing = peer_missing(r_setup, "flexmix")
    rows, peers = [], {}
    for name, case in PAPER_CASES.items():
        if name not in cases:
            continue
        ours = glmm_peers.fit_ours(case, frame, args, dtype)
        if name == "paper_mtl":
            peer = peers.get(NEAREST_FLEXMIX, {"skipped": missing or f"{NEAREST_FLEXMIX} not run (--paper-cases)"})
            rows.append(make_row("glmm", name, data,
                                 f"flexmix ({NEAREST_FLEXMIX})", ours, per_iteration(peer), basis="fit", goal=goal,
                                 agreement="different models: not compared", details={"ours": ours}))
            continue
        if missing:
            print(f"{name}: flexmix skipped: {missing}")
            peer = {"skipped": missing}
        else:
            peer = glmm_peers.compare(case, ours, glmm_peers.run_peer(case, "flexmix", csv, args, scratch))
        peers[name] = peer
        text, value = glmm_agreement(peer)
        rows.append(make_row("glmm", name, data, "flexmix", ours, per_iteration(peer), basis="fit", goal=goal,
                             agreement=text, agreement_value=value, details={"ours": ours, "peer": peer}))
    return rows


def lme4_row(args, r_setup: dict, tasks: int, per_task: int, scratch: Path) -> dict:
    """Our g = 1 REML fit against ``lmer(y ~ x + (1|task))`` (``glmm_peers``' ``gaussian_intercept`` case)."""
    case = glmm_peers.CASES["gaussian_intercept"]
    frame = glmm_peers.simulate(case, np.random.default_rng([args.seed, tasks]), tasks, per_task)
    ours = glmm_peers.fit_ours(case, frame, args, resolve_dtype(args.dtype))
    missing = peer_missing(r_setup, "lme4")
    if missing:
        print(f"gaussian_intercept: lme4 skipped: {missing}")
        peer = {"skipped": missing}
    else:
        csv = scratch / f"lmm_{tasks}x{per_task}.csv"
        frame.to_csv(csv, index=False, float_format="%.17g")
        peer = glmm_peers.compare(case, ours, glmm_peers.run_peer(case, "lme4", csv, args, scratch))
    text, value = glmm_agreement(peer)
    return make_row("glmm", "lmm g=1 (REML)", f"K={tasks:,} x {per_task:,}, g=1", "lme4", ours,
                    per_iteration(peer), basis="fit", goal=LME4_GOAL if tasks == LME4_GOAL_TASKS else None,
                    agreement=text, agreement_value=value, details={"ours": ours, "peer": peer})


def statsmodels_row(args) -> dict:
    """``speed.py``'s part (e): our g = 1 REML fit against statsmodels ``MixedLM`` (``args``: its flags)."""
    result = speed.statsmodels_peer(args, jax.random.key(args.seed), resolve_dtype(args.dtype))
    data = f"K={args.num_tasks:,} x {args.n_per_task:,}, g=1"
    if "skipped" in result:
        print(f"statsmodels skipped: {result['skipped']}")
        return make_row("glmm", "lmm g=1 (REML), 5 covariates", data, "statsmodels MixedLM", {}, result,
                        basis="fit", details=result)
    fixed, variance = result["max_abs_fixed_effect_difference"], result["max_abs_variance_component_difference"]
    return make_row("glmm", "lmm g=1 (REML), 5 covariates", data, "statsmodels MixedLM", result["ours"],
                    result["statsmodels"], basis="fit", details=result,
                    agreement=f"max abs diff: fixed {fixed:.1e}, var {variance:.1e}",
                    agreement_value=max(fixed, variance))


def sequence_rows(args, parts: Sequence[str]) -> list[dict]:
    """``sequence_speed.py``'s HMM and/or LDA ``parts``: time per EM iteration against each peer (``args``: its flags)."""
    output = sequence_speed.measure(args, parts=parts)
    rows = []
    if "hmm" in output:
        hmm = output["hmm"]
        d = hmm["data"]
        data = f"N={d['sequences']:,} x T={d['length']}, V={d['symbols']}, S={d['states']}"
        for peer in ("hmmlearn", "dynamax"):
            result = hmm[peer]
            agreement, value = "", None
            if "skipped" not in result:
                agreement = (f"1 step: loglik rel diff {result['loglik_max_relative_difference']:.1e}, "
                             f"max |param diff| {result['max_abs_param_difference']:.1e}")
                value = max(result["loglik_max_relative_difference"], result["max_abs_param_difference"])
            rows.append(make_row("sequence", "HMM Baum-Welch step", data, peer, {**hmm["ours"], "iterations": 1},
                                 result, basis="iteration", goal=sequence_speed.GOALS[peer], agreement=agreement,
                                 agreement_value=value, details={"ours": hmm["ours"], "peer": result}))
    if "lda" in output:
        lda = output["lda"]
        d = lda["data"]
        rows.append(make_row("sequence", "LDA EM step (categorical)",
                             f"{d['documents']:,} docs x {d['tokens_per_document']}, V={d['vocabulary']:,}, "
                             f"K={d['topics']}", "scikit-learn", {**lda["ours"], "iterations": 1}, lda["sklearn"],
                             basis="iteration", agreement="timing only (VB with topic priors, not our objective)",
                             details=lda))
    return rows


def net_rows(args) -> list[dict]:
    """``mtl_net_step.py``: one Adam step of ``MTLNet`` against PyTorch, per case and device (``args``: its flags)."""
    output = mtl_net_step.measure(args)
    rows = []
    for case in output["cases"]:
        for device, result in case["devices"].items():
            ours = {"seconds_per_iteration": result["ours"]["seconds_per_step"], "iterations": 1,
                    "compile_seconds": result["ours"]["compile_seconds"]}
            peer = result["torch"]
            theirs = peer if "skipped" in peer else {"seconds_per_iteration": peer["seconds_per_step"],
                                                     "iterations": 1}
            agreement, value = "", None
            if "check" in result:
                check = result["check"]
                loss = max(check["loss_relative_difference"], check["loss_after_relative_difference"])
                agreement = (("ok" if check["agree"] else "FAILED")
                             + f": loss rel diff {loss:.1e}, max |param diff| {check['max_abs_param_difference']:.1e}")
                value = max(loss, check["max_abs_param_difference"])
            rows.append(make_row("net", f"MTLNet Adam step ({device})", case["name"], "torch", ours, theirs,
                                 basis="step", goal=mtl_net_step.GOAL, agreement=agreement, agreement_value=value,
                                 details=result))
    return rows


# ---------------------------------------------------------------------------- table
def _seconds(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{scale * value:.{digits}g}"


def format_table(output: dict) -> str:
    """The rows as a text table, under a header with the machine's cores and load."""
    lines = []
    for row in output["rows"]:
        ours, theirs = row["ours"], row["peer_result"] or {}
        iterations = "/".join("" if side.get("iterations") is None else str(side["iterations"])
                              for side in (ours, theirs))
        note = row.get("skipped") and f"skipped: {row['skipped']}" or row.get("failed") and f"failed: {row['failed']}"
        goal = ""
        if row["goal"] is not None:
            goal = f">= {row['goal']:g}" + ("" if row["goal_met"] is None else (" met" if row["goal_met"] else " NOT met"))
        lines.append({
            "family": row["family"], "case": row["case"], "data": row["data"], "peer": row["peer"],
            "ours s/fit": _seconds(ours["seconds_per_fit"]), "peer s/fit": _seconds(theirs.get("seconds_per_fit")),
            "ours ms/it": _seconds(ours["seconds_per_iteration"], 1e3),
            "peer ms/it": _seconds(theirs.get("seconds_per_iteration"), 1e3),
            "its ours/peer": iterations if theirs else "",
            "compile s": _seconds(ours["compile_seconds"], digits=3),
            "peer/ours": "" if row["ratio"] is None else f"{row['ratio']:.3g} per {row['basis']}",
            "goal": goal, "agreement": (note or row["agreement"])[:90],
        })
    env = output["environment"]
    header = (f"peers in the same run: {env['cpu_threads']} CPU cores, JAX {env['jax']} ({env['backend']}); "
              f"load average {env['load_average_start']} at start, {env.get('load_average_end')} at end")
    if "r" in env:
        header += f"; R: {env['r']['version'] or 'absent'}"
    return header + "\n" + pd.DataFrame(lines).astype(object).fillna("").to_string(index=False)


if __name__ == "__main__":
    main()
