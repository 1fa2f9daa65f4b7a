r"""Stochastic variational inference on a model's NumPyro program.

The model's ``numpyro_model(design)`` is fitted with NumPyro's SVI: an autoguide ``q``
maximises :math:`\operatorname{ELBO}(q) = E_q[\log p(y, \theta) - \log q(\theta)]` by optax
Adam on one-sample reparameterised gradients. The guide starts at the model's point
estimate (EM where the model has it, else ``init``), so SVI refines a good point rather
than searching a label-switched landscape from scratch; the guide's draws are aligned to
that point (``model.align``) before they are summarised.

Guides: ``"normal"`` (mean-field Gaussian in the unconstrained space, AutoNormal),
``"lowrank"`` (low-rank plus diagonal covariance) and ``"map"`` (a point mass, AutoDelta).

Task-level effects are fitted in the program's *centred* form by default
(``numpyro_model(design, centred=True)``): the guide's factor of each effect is then free of
its variance, and the variance's factor sees :math:`E_q[b b^T]`, as variational EM does. In
the non-centred form :math:`b = L z` a mean-field guide cannot tie ``z`` to ``L``; on a
Bernoulli mixture with per-task random slopes (50 tasks x 40 rows) it settled on
heavy-tailed variance factors (draw means of the slope variance 10-250 against NUTS's
0.3-0.5), which the centred form does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.infer.em import em_fit
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.infer.progress import run_in_pieces
from mtl_jax.infer.results import BackendResult, float_dtype

#: Guides by name: the :mod:`numpyro.infer.autoguide` class of each (imported when SVI runs).
GUIDES = {"normal": "AutoNormal", "map": "AutoDelta", "lowrank": "AutoLowRankMultivariateNormal"}
PARAMETERISATIONS = ("centred", "noncentred")


def require_counts(minimum: int, **counts: int) -> None:
    """Raise a ``ValueError`` naming every count (a backend option) below ``minimum``."""
    low = [f"{name}={value}" for name, value in counts.items() if value < minimum]
    if low:
        raise ValueError(f"{', '.join(low)}: must be at least {minimum}")


def count_option(minimum: int):
    """An ``argparse`` type: an integer of at least ``minimum`` (else the flag's error, status 2)."""
    import argparse

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def program_for(model, parameterisation: str):
    """``model.numpyro_model`` with its task effects centred or not (:data:`PARAMETERISATIONS`)."""
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; choose one of {list(PARAMETERISATIONS)}")
    return functools.partial(model.numpyro_model, centred=parameterisation == "centred")


def starting_points(model, design, key, init_params=None, num: int = 1):
    """``(reference, starts)``: the best point and ``num`` starting points (restarts).

    With ``init_params`` every start is that point, cast to the design's floating dtype
    (:func:`mtl_jax.infer.results.float_dtype`). Otherwise EM with ``max(num, 2)``
    restarts when the model has ``em_step`` (the reference is the best restart and each
    start is a restart aligned to it; a failed restart is replaced by the reference),
    else the model's ``init``.
    """
    dtype = float_dtype(design)
    if init_params is not None:
        point = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, dtype), init_params)
        return point, [point] * num
    if not hasattr(model, "em_step"):
        point = model.init(key, design)
        return point, [point] * num
    result = em_fit(model, design, key, n_init=max(num, 2))
    reference = result.params
    starts = []
    for r in range(num):
        point = jax.tree_util.tree_map(lambda leaf: leaf[r], result.restart_params)
        finite = np.isfinite(float(result.restart_logliks[r]))
        starts.append(align(model, point, reference) if finite else reference)
    return reference, starts


def align(model, params, reference):
    """``model.align`` where the model has label switching, else ``params``."""
    return model.align(params, reference) if hasattr(model, "align") else params


def align_draws(model, draws, reference):
    """Align every draw (leaves ``[chain, draw, ...]``) to ``reference``; numpy leaves back."""
    leaves, treedef = jax.tree_util.tree_flatten(draws)
    lead = leaves[0].shape[:2]
    flat = [np.asarray(leaf).reshape((lead[0] * lead[1],) + leaf.shape[2:]) for leaf in leaves]
    out = []
    for s in range(flat[0].shape[0]):
        point = jax.tree_util.tree_unflatten(treedef, [leaf[s] for leaf in flat])
        out.append([np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(align(model, point, reference))])
    stacked = [np.stack(column).reshape(lead + column[0].shape) for column in zip(*out)]
    return jax.tree_util.tree_unflatten(treedef, stacked)


def loss_settled(losses: np.ndarray, rtol: float = 1e-4) -> bool:
    r"""Whether the loss (negative ELBO) has plateaued.

    With ``m = max(T // 10, 5)`` for ``T`` steps, compares the last ``m`` losses with the
    ``m`` before them: settled when the mean has moved by less than twice its standard
    error (the one-sample noise) or by less than ``rtol`` relative. A still-falling loss
    moves by more than its noise and is not settled; a run with a non-finite loss at any
    step never settles (its optimiser state has seen NaN or infinite gradients), and
    fewer than ``10`` steps never do.
    """
    losses = np.asarray(losses, float)
    m = max(len(losses) // 10, 5)
    if len(losses) < 2 * m or not np.all(np.isfinite(losses)):
        return False
    last, before = losses[-m:], losses[-2 * m:-m]
    shift = abs(last.mean() - before.mean())
    noise = np.sqrt(last.var(ddof=1) / m + before.var(ddof=1) / m)
    return bool(shift <= 2.0 * noise or shift <= rtol * abs(before.mean()))


def _svi(model, design, key, start, *, guide: str, learning_rate: float, parameterisation: str):
    """NumPyro's SVI of the model's program with the ``guide`` located at ``start``, its autoguide and initial state."""
    from numpyro.infer import SVI, Trace_ELBO, autoguide
    from numpyro.infer.initialization import init_to_value

    program = program_for(model, parameterisation)
    auto = getattr(autoguide, GUIDES[guide])(program, init_loc_fn=init_to_value(values=model.site_values(start)))
    svi = SVI(program, auto, optax.adam(learning_rate), Trace_ELBO())
    return svi, auto, svi.init(key, design)


_SVI_OPTIONS = ("model", "guide", "learning_rate", "parameterisation")


@cached_program(static_argnames=_SVI_OPTIONS)
def initial_guide(model, design, key, start, *, guide: str, learning_rate: float, parameterisation: str):
    """SVI's state before its first step: the ``guide`` (one of :data:`GUIDES`) located at the parameters
    ``start``, Adam at ``learning_rate``, ``key`` the ELBO's noise; the program's task effects in
    ``parameterisation`` (:data:`PARAMETERISATIONS`)."""
    return _svi(model, design, key, start, guide=guide, learning_rate=learning_rate,
                parameterisation=parameterisation)[2]


@cached_program(static_argnames=_SVI_OPTIONS + ("length",))
def adam_steps(model, design, key, start, state, first, total, *, guide: str, learning_rate: float,
               parameterisation: str, length: int):
    """Adam steps ``first, ..., first + length - 1`` on the ELBO from ``state``, those before ``total``.

    The SVI is that of :func:`initial_guide` (same arguments; its initialisation is traced
    only to build it and is not computed).

    Returns:
        ``(state, losses [length])``: the state after the last step before ``total`` and
        the loss (negative ELBO) of each step (NaN past ``total``).
    """
    svi, _, _ = _svi(model, design, key, start, guide=guide, learning_rate=learning_rate,
                     parameterisation=parameterisation)
    loss = jax.eval_shape(svi.update, state, design)[1]
    nan = jnp.full(loss.shape, jnp.nan, loss.dtype)

    def step(state, index):
        return jax.lax.cond(index < total, lambda s: svi.update(s, design), lambda s: (s, nan), state)

    return jax.lax.scan(step, state, first + jnp.arange(length))


@cached_program(static_argnames=_SVI_OPTIONS + ("num_samples",))
def guide_draws(model, design, key, start, state, key_draws, *, guide: str, learning_rate: float,
                parameterisation: str, num_samples: int):
    """``num_samples`` draws of the fitted guide (``state``), pushed through the model: the model's
    parameters with a leading ``[S]`` axis (``model.from_sites``), unaligned."""
    from numpyro.infer import Predictive

    svi, auto, _ = _svi(model, design, key, start, guide=guide, learning_rate=learning_rate,
                        parameterisation=parameterisation)
    predictive = Predictive(svi.model, guide=auto, params=svi.get_params(state), num_samples=num_samples,
                            return_sites=list(model.param_sites()))
    return model.from_sites(predictive(key_draws, design))


def run_svi_backend(
    model,
    design,
    key,
    *,
    guide: str = "normal",
    num_steps: int = 3000,
    learning_rate: float = 0.01,
    num_samples: int = 1000,
    parameterisation: str | None = None,
    init_params=None,
    progress: bool = False,
) -> BackendResult:
    """SVI with an autoguide started at the model's point estimate.

    Args:
        model: the model; its ``numpyro_model``, ``site_values``, ``from_sites`` and
            ``param_sites`` are used.
        design: the data.
        key: PRNG key (EM starts, ELBO noise, posterior draws).
        guide: ``"normal"``, ``"map"`` or ``"lowrank"``.
        num_steps: Adam steps.
        learning_rate: Adam step size.
        num_samples: guide draws ``S`` pushed through the model for the summaries.
        parameterisation: ``"centred"`` or ``"noncentred"`` task effects (module docstring);
            ``None``: centred for the ``"normal"`` and ``"lowrank"`` guides, non-centred for
            ``"map"`` (a point mass on centred effects runs into the unbounded density at
            zero effect variance).
        init_params: starting point; ``None`` runs EM (two restarts) where the model has it.
        progress: show a progress bar over the Adam steps.

    Returns:
        Posterior means of the aligned draws as ``params``; the draws with axes
        ``[1, S, ...]`` marked independent (no R-hat/ESS); the loss per step as
        ``trace``; ``converged`` from :func:`loss_settled`; ``n_iter = num_steps``.
    """
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose one of {sorted(GUIDES)}")
    require_counts(1, num_steps=num_steps, num_samples=num_samples)
    key_start, key_svi, key_draws = jax.random.split(key, 3)
    reference, _ = starting_points(model, design, key_start, init_params)
    if parameterisation is None:
        parameterisation = "noncentred" if guide == "map" else "centred"
    options = dict(guide=guide, learning_rate=learning_rate, parameterisation=parameterisation)
    state = initial_guide(model, design, key_svi, reference, **options)

    def advance(state, first, length):
        return adam_steps(model, design, key_svi, reference, state, first, num_steps, length=length, **options)

    state, losses = run_in_pieces(advance, state, num_steps, "svi", progress)
    raw = guide_draws(model, design, key_svi, reference, state, key_draws, num_samples=num_samples, **options)
    draws = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[None], raw)
    draws = align_draws(model, draws, reference)
    window = max(num_steps // 10, 1)
    return BackendResult(
        params=jax.tree_util.tree_map(lambda leaf: leaf.mean(axis=(0, 1)), draws),
        converged=loss_settled(losses),
        n_iter=num_steps,
        trace=losses,
        draws=draws,
        diagnostics={"guide": guide, "final_loss": float(np.mean(losses[-window:]))},
        iid_draws=True,
    )


CLI_OPTIONS = (
    ("--guide", dict(choices=sorted(GUIDES), help="SVI guide (default normal)")),
    ("--num-steps", dict(type=count_option(1), metavar="N", help="SVI Adam steps (default 3000)")),
    ("--learning-rate", dict(type=float, metavar="LR", help="SVI Adam step size (default 0.01)")),
    ("--svi-samples", dict(type=count_option(1), metavar="S", dest="num_samples",
                           help="SVI guide draws for the summaries (default 1000)")),
    ("--svi-parameterisation", dict(choices=PARAMETERISATIONS, dest="parameterisation",
                                    help="task effects in the NumPyro program (default centred; "
                                         "noncentred for --guide map)")),
)
"""Command-line options of :func:`run_svi_backend` (``--svi-samples`` sets ``num_samples``,
``--svi-parameterisation`` sets ``parameterisation``)."""
