r"""Speed of the EM fits: one fit, vmapped replicates vs a Python loop, and two peers.

::

    python benchmarks/speed.py --num-tasks 10 --n-per-task 1000 --components 2 \
        --replicates 4 --n-init 4 --iterations 50 --repeats 3 --json results/speed.json

Data are replicates of the paper's simulation study (Table 1 design). Every jitted fit is
compiled ahead of time and run once (its ``compile_seconds`` and ``first_run_seconds`` are
reported); every other timing is the median of ``--repeats`` further runs. To compare like
with like, the EM fits of rows (a)-(d) run a fixed number of iterations (``tol = 0``):

(a) one EM fit of the multitask model ``MixtureGLMM(g)`` (``--n-init`` restarts in parallel);
(b) all ``--replicates`` fits in one jitted, vmapped call;
(c) the same fits one after another in a Python loop (same compiled fit as (a));
(d) peer: the independence model (no random effects) by our ``em_fit`` against a plain,
    vectorised NumPy/SciPy implementation of the same EM updates, from the same start
    and for the same number of iterations; the maximum parameter difference checks
    that both compute the same thing;
(e) peer (needs the optional ``statsmodels``): the linear mixed model
    ``MixtureGLMM(1, mixing_random_effects=False)`` fitted to convergence against
    ``statsmodels`` ``MixedLM`` REML on the same data.

Ratios, not absolute times, are the point: absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.linalg import solve
from scipy.special import log_softmax, logsumexp, softmax

from mtl_jax.experiments import write_results
from mtl_jax.experiments.simulation import TABLE1_W
from mtl_jax.experiments.common import cast_floats, compile_and_run, median_time, resolve_dtype, unstack_tree
from mtl_jax.experiments.table2 import fit_replicates, simulate_replicates
from mtl_jax.infer.em import em_fit
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

_LOG_2PI = np.log(2.0 * np.pi)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (``benchmarks/peers.py`` reads its statsmodels settings with them too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=10)
    parser.add_argument("--n-per-task", type=int, default=1000)
    parser.add_argument("--components", type=int, default=2, help="g, 2..8 (Table 1)")
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--n-init", type=int, default=4, help="EM random restarts in (a)-(c)")
    parser.add_argument("--iterations", type=int, default=50, help="EM iterations of every fit in (a)-(d)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--json", type=Path, default=Path("results/speed.json"), help="output file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the benchmark, write ``--json``; return the results."""
    args = build_parser().parse_args(argv)

    dtype = resolve_dtype(args.dtype)
    data_key, fit_key, lmm_key = jax.random.split(jax.random.key(args.seed), 3)
    studies = simulate_replicates(
        jax.random.split(data_key, args.replicates), args.components, args.num_tasks, args.n_per_task
    )
    designs = cast_floats(studies.train, dtype)
    keys = jax.random.split(fit_key, args.replicates)
    static = dict(model=MixtureGLMM(args.components), n_init=args.n_init, max_iter=args.iterations, tol=0.0)
    replicate_designs = unstack_tree(designs)
    first = replicate_designs[0]

    single = compile_and_run(em_fit, static=static, design=first, key=keys[0])
    single_seconds, result = median_time(lambda: single.compiled(design=first, key=keys[0]), args.repeats)
    batched = compile_and_run(fit_replicates, static=static, designs=designs, keys=keys)
    batched_seconds, results = median_time(lambda: batched.compiled(designs=designs, keys=keys), args.repeats)
    looped_seconds, _ = median_time(
        lambda: [single.compiled(design=design, key=key) for design, key in zip(replicate_designs, keys)],
        args.repeats,
    )
    single_iterations = int(result.n_iter)
    total_iterations = int(np.sum(results.n_iter))
    output = {
        "config": {**vars(args), "json": str(args.json)},
        "dtype": str(dtype),
        "num_obs_per_fit": int(first.y.shape[0]),
        "single_fit": {**_rates(single_seconds, 1, single_iterations), **_first_run(single)},
        "vmapped_replicates": {**_rates(batched_seconds, args.replicates, total_iterations), **_first_run(batched)},
        "looped_replicates": _rates(looped_seconds, args.replicates, total_iterations),
        "loop_over_vmap_time_ratio": looped_seconds / batched_seconds,
        "numpy_peer": _numpy_peer(args, first, keys[0]),
        "statsmodels_lmm": statsmodels_peer(args, lmm_key, dtype),
    }
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.json)
    return output


def _first_run(run) -> dict:
    """Compile time and first run (not in the median) of a :class:`~mtl_jax.experiments.common.TimedRun`."""
    return {"compile_seconds": run.compile_seconds, "first_run_seconds": run.run_seconds}


def _rates(seconds: float, fits: int, iterations: int) -> dict:
    """Seconds per call, per fit and per EM iteration (``iterations`` summed over the fits)."""
    return {
        "seconds": seconds,
        "fits": fits,
        "iterations": iterations,
        "seconds_per_fit": seconds / fits,
        "seconds_per_iteration": seconds / max(iterations, 1),
    }


# ----------------------------------------------------------------- (d) NumPy peer
def numpy_independence_em(y, x_comp, x_mix, v, w, sigma2, num_iterations: int, variance_floor: float = 1e-6):
    r"""EM for a mixture of linear regressions with concomitant covariates, in NumPy.

    The same updates as ``MixtureGLMM(g, mixing_random_effects=False,
    component_random_effects=False)`` with ``residual_update="reml"``: per iteration the
    E-step :math:`\tau_{jh} \propto \pi_h(x^m_j) N(y_j; w_h^T x^c_j, \sigma_h^2)`, one
    Newton step for ``v`` with step halving (:func:`_numpy_mixing_step`), weighted least
    squares for each ``w_h`` with the model's ridge, :math:`\delta n I / \overline{y^2}` on
    the information :math:`G_h / \sigma_h^2` (``delta`` the variance floor; the Newton
    information of ``v`` gets :math:`\delta n I`), and
    :math:`\sigma_h^2 = (\sum_j \tau_{jh} r_{jh}^2 + \sigma_h^{2,\text{old}}\operatorname{tr}(G_h(G_h+\rho_h I)^{-1})
    + \delta n s^2) / (\sum_j \tau_{jh} + \delta n) + \delta s^2`, ``G_h`` the weighted
    Gram matrix, :math:`\rho_h = \delta n \sigma_h^{2,\text{old}} / \overline{y^2}` and ``s^2``
    the variance of ``y`` (the REML correction, a prior count of
    :math:`\delta n` rows at the response variance, and the variance floor).

    Args:
        y: responses ``[n]``.
        x_comp: component design ``[n, q_c]``.
        x_mix: mixing design ``[n, q_m]``.
        v: start of the mixing coefficients ``[g-1, q_m]``.
        w: start of the component coefficients ``[g, q_c]``.
        sigma2: start of the residual variances ``[g]``.
        num_iterations: EM iterations to run (no stopping rule).
        variance_floor: the model's ``variance_floor`` :math:`\delta`.

    Returns:
        ``(v, w, sigma2, loglik)`` after ``num_iterations`` iterations, ``loglik`` the
        mixture log-likelihood at the returned parameters.
    """
    for _ in range(num_iterations):
        tau = softmax(_numpy_log_joint(y, x_comp, x_mix, v, w, sigma2), axis=1)
        v = _numpy_mixing_step(v, x_mix, tau, variance_floor * len(y))
        w, sigma2 = _numpy_component_step(y, x_comp, tau, sigma2, variance_floor)
    return v, w, sigma2, float(logsumexp(_numpy_log_joint(y, x_comp, x_mix, v, w, sigma2), axis=1).sum())


def _numpy_logits(v, x_mix):
    """Mixing logits ``[n, g]``: ``x_mix @ v.T`` and a zero column for the reference component."""
    return np.column_stack([x_mix @ v.T, np.zeros(len(x_mix))])


def _numpy_log_joint(y, x_comp, x_mix, v, w, sigma2):
    """``log pi_h(x_j) + log N(y_j; w_h^T x_j, sigma_h^2)``, ``[n, g]``."""
    resid = y[:, None] - x_comp @ w.T
    log_density = -0.5 * (_LOG_2PI + np.log(sigma2) + resid**2 / sigma2)
    return log_softmax(_numpy_logits(v, x_mix), axis=1) + log_density


def _numpy_mixing_step(v, x_mix, tau, ridge):
    r"""One Newton step on :math:`Q(v) = \sum_{jh} \tau_{jh} \log \pi_h(x_j; v)`, halved until ``Q`` does not drop.

    Gradient :math:`\sum_j (\tau_{jh} - \pi_{jh}) x_j`; information
    :math:`\sum_j (\operatorname{diag}\pi_j - \pi_j\pi_j^T)_{hk}\, x_j x_j^T` over the
    ``g - 1`` free components, plus ``ridge`` times the identity (a damping).
    """
    g1, q = v.shape

    def objective(coef):
        return np.sum(tau * log_softmax(_numpy_logits(coef, x_mix), axis=1))

    pi = softmax(_numpy_logits(v, x_mix), axis=1)[:, :g1]
    grad = ((tau[:, :g1] - pi).T @ x_mix).ravel()
    weight = pi[:, :, None] * (np.eye(g1) - pi[:, None, :])  # [n, g-1, g-1]
    info = np.tensordot(weight[..., None] * x_mix[:, None, None, :], x_mix, axes=(0, 0))  # [h, k, a, c]
    info = info.transpose(0, 2, 1, 3).reshape(g1 * q, g1 * q) + ridge * np.eye(g1 * q)
    step = solve(info, grad, assume_a="pos").reshape(g1, q)
    base, t = objective(v), 1.0
    value = objective(v + step)
    while not value >= base and t > 2.0**-30:
        t /= 2
        value = objective(v + t * step)
    return v + t * step if value >= base else v


def _numpy_component_step(y, x, tau, sigma2, variance_floor):
    """Ridge-weighted least squares per component and the REML-corrected residual variances."""
    n, q = x.shape
    prior_count, scale = variance_floor * n, np.var(y)
    gram = np.tensordot(tau[:, :, None] * x[:, None, :], x, axes=(0, 0))  # [g, q, q]
    ridge = prior_count * sigma2 / np.mean(y**2)  # [g]: the model's ridge in Gram-matrix units
    inverse = np.linalg.inv(gram + ridge[:, None, None] * np.eye(q))
    w = np.einsum("hab,hb->ha", inverse, (tau * y[:, None]).T @ x)
    resid = y[:, None] - x @ w.T
    correction = sigma2 * np.einsum("hab,hba->h", gram, inverse)  # sum_j tau_j Var(x_j' w_h)
    scatter = np.sum(tau * resid**2, axis=0) + correction + prior_count * scale
    return w, scatter / (tau.sum(axis=0) + prior_count) + variance_floor * scale


def _numpy_peer(args, design: MixtureDesign, key) -> dict:
    """Row (d): our independence EM against :func:`numpy_independence_em`, same start and iterations."""
    model = MixtureGLMM(args.components, mixing_random_effects=False, component_random_effects=False)
    start = jax.jit(model.init)(key, design)
    static = dict(model=model, n_init=1, max_iter=args.iterations, tol=0.0)
    ours = compile_and_run(em_fit, static=static, design=design, key=key, init_params=start)
    ours_seconds, result = median_time(
        lambda: ours.compiled(design=design, key=key, init_params=start), args.repeats
    )
    n_iter = int(result.n_iter)
    arrays = [np.asarray(a, dtype=float) for a in (design.y[:, 0], design.x_comp, design.x_mix)]
    begin = [
        np.asarray(a, dtype=float) for a in (start.mixing_coef, start.component_coef[..., 0], start.component_cov[:, 0, 0])
    ]
    numpy_seconds, (v, w, sigma2, loglik) = median_time(
        lambda: numpy_independence_em(*arrays, *begin, num_iterations=n_iter, variance_floor=model.variance_floor),
        args.repeats,
    )
    difference = max(
        np.max(np.abs(v - np.asarray(result.params.mixing_coef))),
        np.max(np.abs(w - np.asarray(result.params.component_coef[..., 0]))),
        np.max(np.abs(sigma2 - np.asarray(result.params.component_cov[:, 0, 0]))),
    )
    return {
        "iterations": n_iter,
        "ours": {**_rates(ours_seconds, 1, n_iter), **_first_run(ours)},
        "numpy": _rates(numpy_seconds, 1, n_iter),
        "numpy_over_ours_time_per_iteration": numpy_seconds / ours_seconds,
        "max_abs_param_difference": float(difference),
        "loglik_difference": float(loglik - float(result.loglik)),
        "numpy_dtype": "float64",
    }


# ------------------------------------------------------------- (e) statsmodels peer
@functools.partial(jax.jit, static_argnames=("num_tasks", "n_per_task", "dtype"))
def simulate_lmm(key, num_tasks: int, n_per_task: int, dtype) -> MixtureDesign:
    r"""Linear mixed model data: :math:`y_{ij} = w_1^T x_{ij} + B_i + e_{ij}`, ``B ~ N(0, 1)``, ``e ~ N(0, 0.5)``.

    ``x = (1, four N(0, 1))`` and ``w_1`` as in Table 1; returns the design with ``y [n, 1]``.
    """
    model = MixtureGLMM(1, mixing_random_effects=False)
    params = MixtureParams(
        mixing_coef=jnp.zeros((0, 5), dtype),
        component_coef=jnp.asarray(TABLE1_W[:1, :, None], dtype),
        component_cov=jnp.full((1, 1, 1), 0.5, dtype),
        mixing_cov=jnp.zeros((0, 0), dtype),
        component_effects_cov=jnp.ones((1, 1, 1), dtype),
        mixing_effects=jnp.zeros((num_tasks, 0), dtype),
        component_effects=jnp.zeros((num_tasks, 1, 1, 1), dtype),
        class_logits=jnp.zeros((num_tasks, 1), dtype),
    )
    key_effects, key_x, key_y = jax.random.split(key, 3)
    params = model.sample_effects(key_effects, params, num_tasks)
    n = num_tasks * n_per_task
    x = jnp.concatenate([jnp.ones((n, 1), dtype), jax.random.normal(key_x, (n, 4), dtype)], axis=1)
    task = jnp.repeat(jnp.arange(num_tasks, dtype=jnp.int32), n_per_task)
    design = MixtureDesign(y=jnp.zeros((n, 1), dtype), x_comp=x, x_mix=x, task=task, num_tasks=num_tasks)
    _, y = model.simulate(key_y, params, design)
    return MixtureDesign(y=y, x_comp=x, x_mix=x, task=task, num_tasks=num_tasks)


def statsmodels_peer(args, key, dtype) -> dict:
    """Row (e): our REML EM for the linear mixed model against statsmodels ``MixedLM`` REML."""
    try:
        from statsmodels.regression.mixed_linear_model import MixedLM
    except ImportError:
        return {"skipped": "statsmodels is not installed (pip install statsmodels)"}
    design = simulate_lmm(key, num_tasks=args.num_tasks, n_per_task=args.n_per_task, dtype=dtype)
    model = MixtureGLMM(1, mixing_random_effects=False)
    static = dict(model=model, n_init=1, max_iter=2000, tol=1e-12)
    ours = compile_and_run(em_fit, static=static, design=design, key=key)
    ours_seconds, result = median_time(lambda: ours.compiled(design=design, key=key), args.repeats)
    y, x, task = (np.asarray(a) for a in (design.y[:, 0], design.x_comp, design.task))
    reference_seconds, reference = median_time(
        lambda: MixedLM(y.astype(float), x.astype(float), groups=task).fit(reml=True), args.repeats
    )
    fixed = np.max(np.abs(np.asarray(reference.fe_params) - np.asarray(result.params.component_coef[0, :, 0])))
    variances = np.array([float(np.asarray(reference.cov_re).ravel()[0]), float(reference.scale)])
    ours_variances = np.array([float(result.params.component_effects_cov[0, 0, 0]), float(result.params.component_cov[0, 0, 0])])
    return {
        "ours": {
            **_rates(ours_seconds, 1, int(result.n_iter)), **_first_run(ours), "converged": bool(result.converged)
        },
        "statsmodels": {"seconds_per_fit": reference_seconds, "converged": bool(reference.converged)},
        "statsmodels_over_ours_time_per_fit": reference_seconds / ours_seconds,
        "max_abs_fixed_effect_difference": float(fixed),
        "max_abs_variance_component_difference": float(np.max(np.abs(variances - ours_variances))),
        "variance_components": {"statsmodels": variances.tolist(), "ours": ours_variances.tolist()},
    }


def format_table(output: dict) -> str:
    """The measurements as a text table (times in seconds and milliseconds)."""
    peer, lmm = output["numpy_peer"], output["statsmodels_lmm"]
    rows = [
        ("(a) one EM fit (MTL)", output["single_fit"], ""),
        ("(b) replicates, one vmapped call", output["vmapped_replicates"], ""),
        (
            "(c) replicates, Python loop",
            output["looped_replicates"],
            f"loop / vmap time = {output['loop_over_vmap_time_ratio']:.2f}",
        ),
        ("(d) independence EM, ours", peer["ours"], ""),
        (
            "(d) independence EM, NumPy",
            peer["numpy"],
            f"NumPy / ours per iteration = {peer['numpy_over_ours_time_per_iteration']:.2f}; "
            f"max |param diff| = {peer['max_abs_param_difference']:.1e}",
        ),
    ]
    if "skipped" in lmm:
        rows.append(("(e) LMM vs statsmodels", None, f"skipped: {lmm['skipped']}"))
    else:
        rows.append(("(e) LMM REML, ours", lmm["ours"], ""))
        rows.append(
            (
                "(e) LMM REML, statsmodels MixedLM",
                lmm["statsmodels"],
                f"statsmodels / ours per fit = {lmm['statsmodels_over_ours_time_per_fit']:.2f}; "
                f"max |fixed diff| = {lmm['max_abs_fixed_effect_difference']:.1e}, "
                f"max |variance diff| = {lmm['max_abs_variance_component_difference']:.1e}",
            )
        )
    frame = pd.DataFrame(
        [
            {
                "measurement": name,
                "s/fit": "" if rates is None else f"{rates['seconds_per_fit']:.4f}",
                "ms/iteration": "" if rates is None or "seconds_per_iteration" not in rates
                else f"{1e3 * rates['seconds_per_iteration']:.3f}",
                "iterations": "" if rates is None or "iterations" not in rates else str(rates["iterations"]),
                "compile s": "" if rates is None or "compile_seconds" not in rates
                else f"{rates['compile_seconds']:.2f}",
                "note": note,
            }
            for name, rates, note in rows
        ]
    )
    header = (
        f"K={output['config']['num_tasks']} tasks x {output['config']['n_per_task']} obs, "
        f"g={output['config']['components']}, {output['config']['replicates']} replicates, "
        f"n_init={output['config']['n_init']}, {output['dtype']}, median of {output['config']['repeats']}"
    )
    return header + "\n" + frame.to_string(index=False)


if __name__ == "__main__":
    main()
