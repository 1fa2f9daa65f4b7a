r"""NUTS on a model's NumPyro program, chains started apart, draws aligned before diagnostics.

Chains run vectorised (one XLA program for all chains). Chain ``c`` starts at EM restart
``c`` (aligned to the best restart) plus a jitter of ``init_jitter`` standard normals in
the unconstrained space, so that R-hat can see chains that end in different modes. A
mixture posterior is invariant to permuting the components, so each draw is aligned to
the best EM point (``model.align``) before anything is summarised; :func:`mtl_jax.fit`
then computes R-hat and ESS on the aligned draws with the same arviz call as
:meth:`mtl_jax.Fit.summary`, and ``converged`` is that R-hat below 1.05.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.infer.program_cache import cached_program
from mtl_jax.infer.progress import run_in_pieces
from mtl_jax.infer.results import BackendResult
from mtl_jax.infer.svi import (PARAMETERISATIONS, align, align_draws, count_option, program_for, require_counts,
                               starting_points)


MASS_MATRICES = ("diagonal", "population", "dense")


def sampled_sites(program, design, values, *, population_only: bool = False) -> list[str]:
    """The latent sample sites of ``program`` (traced at ``values``): the only keys NUTS may be started with.

    ``site_values`` also holds the other parameterisation's sites; a key that is not a site
    of the program would join the sampler's state with a flat potential and drift without
    bound, spoiling step-size adaptation and the U-turn test. ``population_only`` keeps
    the sites outside every plate (the population-level parameters, not the per-task ones).
    The program is traced abstractly (``jax.eval_shape``): ``values`` may be shapes only.
    """
    from numpyro import handlers

    names = []

    def record(values, design):
        trace = handlers.trace(handlers.substitute(handlers.seed(program, 0), data=values)).get_trace(design)
        names.extend(name for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]
                     and not (population_only and site["cond_indep_stack"]))

    jax.eval_shape(record, values, design)
    return sorted(names)


def mass_matrix_structure(mass_matrix: str, program, design, values):
    r"""NUTS's ``dense_mass`` for one of :data:`MASS_MATRICES`.

    ``"diagonal"``: one scale per coordinate. ``"population"``: one dense block over the
    population-level sites (outside every plate; their posterior correlations, e.g. an
    intercept against the dummies of a categorical covariate, are what a diagonal metric
    cannot follow, so trees grow deep), diagonal for the task effects, whose number grows
    with the tasks (a dense block over them would cost :math:`O(K^2)` memory and warm-up
    draws). ``"dense"``: one dense block over everything.
    """
    if mass_matrix not in MASS_MATRICES:
        raise ValueError(f"unknown mass_matrix {mass_matrix!r}; choose one of {list(MASS_MATRICES)}")
    if mass_matrix == "population":
        return [tuple(sampled_sites(program, design, values, population_only=True))]
    return mass_matrix == "dense"


def chain_starts(model, design, key, *, num_chains: int, init_jitter: float = 0.1, init_params=None,
                 parameterisation: str = "noncentred"):
    """``(reference, starts)``: the alignment reference and each chain's start, unconstrained.

    Without ``init_params``, chain ``c`` starts at EM restart ``c`` aligned to the best one
    (:func:`mtl_jax.infer.svi.starting_points`); ``init_params`` is one point for every
    chain or a ``list`` of ``num_chains`` points (the first is then the reference and the
    others are aligned to it). Each start is mapped to the program's sampled sites
    (``model.site_values``), to the unconstrained space (``unconstrain_fn``), and moved by
    ``init_jitter`` standard normals there; ``parameterisation`` picks the program's
    form of the task effects (:func:`mtl_jax.infer.svi.program_for`).

    Returns:
        The reference point and a dict of unconstrained site values with a leading
        ``[num_chains]`` axis (NUTS's ``init_params``).

    Raises:
        ValueError: for a list of starts whose length is not ``num_chains``, or a start
            that is not finite in the unconstrained space.
    """
    key_start, key_jitter = jax.random.split(key)
    if isinstance(init_params, list):
        if len(init_params) != num_chains:
            raise ValueError(f"init_params has {len(init_params)} starts for {num_chains} chains")
        reference, _ = starting_points(model, design, key_start, init_params[0])
        starts = [reference] + [align(model, starting_points(model, design, key_start, point)[0], reference)
                                for point in init_params[1:]]
    else:
        reference, starts = starting_points(model, design, key_start, init_params, num=num_chains)
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *starts)
    sites = sampled_sites(program_for(model, parameterisation), design, jax.eval_shape(model.site_values, reference))
    jittered = jittered_starts(model, design, stacked, key_jitter, init_jitter, parameterisation=parameterisation,
                               sites=tuple(sites))
    bad = [name for name, value in jittered.items() if not np.all(np.isfinite(np.asarray(value)))]
    if bad:
        raise ValueError(f"a chain's start is not finite in the unconstrained space at site(s) {bad}")
    return reference, jittered


@cached_program(static_argnames=("model", "parameterisation", "sites"))
def jittered_starts(model, design, starts, key, init_jitter, *, parameterisation: str, sites: tuple[str, ...]):
    """Each chain's start (``starts``: parameters with a leading ``[C]`` axis) at the program's
    ``sites`` in the unconstrained space, plus ``init_jitter`` standard normals: a dict of ``[C, ...]``."""
    from numpyro.infer.util import unconstrain_fn

    program = program_for(model, parameterisation)

    def unconstrained(start):
        values = model.site_values(start)
        return unconstrain_fn(program, (design,), {}, {name: values[name] for name in sites})

    leaves, treedef = jax.tree_util.tree_flatten(jax.vmap(unconstrained)(starts))
    noise_keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + init_jitter * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, noise_keys)])


def _kernel(model, design, key, starts, *, num_warmup: int, target_accept: float, parameterisation: str,
            dense_mass):
    """A NumPyro NUTS kernel of the model's program and its chains' initial state (vectorised over ``[C]``)."""
    from numpyro.infer import NUTS

    kernel = NUTS(program_for(model, parameterisation), target_accept_prob=target_accept,
                  dense_mass=list(dense_mass) if isinstance(dense_mass, tuple) else dense_mass)
    num_chains = jax.tree_util.tree_leaves(starts)[0].shape[0]
    return kernel, kernel.init(jax.random.split(key, num_chains), num_warmup, init_params=starts,
                               model_args=(design,))


_KERNEL_OPTIONS = ("model", "num_warmup", "target_accept", "parameterisation", "dense_mass")


@cached_program(static_argnames=_KERNEL_OPTIONS)
def initial_state(model, design, key, starts, *, num_warmup: int, target_accept: float, parameterisation: str,
                  dense_mass):
    """NUTS's state before its first transition: chains at ``starts`` (unconstrained sites, leading
    ``[C]``), chain ``c`` on ``jax.random.split(key, C)[c]``; warm-up adapts over ``num_warmup``
    transitions (``target_accept``, ``dense_mass`` as NumPyro's, a list as a tuple)."""
    return _kernel(model, design, key, starts, num_warmup=num_warmup, target_accept=target_accept,
                   parameterisation=parameterisation, dense_mass=dense_mass)[1]


@cached_program(static_argnames=_KERNEL_OPTIONS + ("length",))
def transitions(model, design, key, starts, state, first, total, *, num_warmup: int, target_accept: float,
                parameterisation: str, dense_mass, length: int):
    """Transitions ``first, ..., first + length - 1`` of the chains from ``state``, those before ``total``.

    The kernel is that of :func:`initial_state` (same arguments; its initialisation is traced
    only to build the kernel and is not computed). Transitions ``< num_warmup`` adapt the
    step size and the mass matrix.

    Returns:
        ``(state, (draws, diverging, num_steps))``: the state after the last transition
        before ``total``; per transition ``[length, C, ...]`` the model's parameters
        (constrained, ``model.from_sites``), whether the trajectory diverged, its leapfrog
        steps (entries past ``total`` repeat the last state's).
    """
    kernel, _ = _kernel(model, design, key, starts, num_warmup=num_warmup, target_accept=target_accept,
                        parameterisation=parameterisation, dense_mass=dense_mass)
    constrain = jax.vmap(kernel.postprocess_fn((design,), {}))

    def transition(state, index):
        state = jax.lax.cond(index < total, lambda s: kernel.sample(s, (design,), {}), lambda s: s, state)
        sites = constrain(state.z)
        return state, (model.from_sites({name: sites[name] for name in model.param_sites()}), state.diverging,
                       state.num_steps)

    return jax.lax.scan(transition, state, first + jnp.arange(length))


def sample_chains(model, design, key, starts, *, num_warmup: int, num_samples: int, target_accept: float,
                  parameterisation: str, dense_mass, progress: bool = False):
    """NUTS chains from ``starts`` (unconstrained sites, leading ``[C]``): warm-up, then ``num_samples`` draws.

    One program runs the transitions (:func:`transitions`) in pieces (:mod:`mtl_jax.infer.progress`;
    the warm-up's draws are dropped as they come); with ``progress`` a bar advances after each.

    Returns:
        ``(draws, diverging, num_steps)`` as host arrays with leading ``[C, num_samples]``
        axes (the draws as the model's parameters).
    """
    options = dict(num_warmup=num_warmup, target_accept=target_accept, parameterisation=parameterisation,
                   dense_mass=dense_mass)
    state = initial_state(model, design, key, starts, **options)
    total = num_warmup + num_samples

    def advance(state, first, length):
        return transitions(model, design, key, starts, state, first, total, length=length, **options)

    _, draws = run_in_pieces(advance, state, total, "nuts", progress, keep_from=num_warmup)
    return jax.tree_util.tree_map(lambda leaf: np.swapaxes(leaf, 0, 1), draws)


def run_nuts_backend(
    model,
    design,
    key,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 4,
    target_accept: float = 0.8,
    init_jitter: float = 0.1,
    parameterisation: str = "noncentred",
    mass_matrix: str = "diagonal",
    init_params=None,
    progress: bool = False,
) -> BackendResult:
    """NUTS from dispersed starts; draws aligned to the best EM point.

    Args:
        model: the model; its ``numpyro_model``, ``site_values``, ``from_sites`` and
            ``param_sites`` are used.
        design: the data.
        key: PRNG key (EM starts, jitter, the chains).
        num_warmup: adaptation steps per chain (step size, mass matrix).
        num_samples: kept draws per chain.
        num_chains: chains, vectorised.
        target_accept: NUTS target acceptance probability.
        init_jitter: sd of the normal jitter added to each chain's start (unconstrained).
        parameterisation: ``"noncentred"`` (default: no funnel between the task effects
            and their variances) or ``"centred"`` task effects (data rich per task).
        mass_matrix: the metric adapted in warm-up, one of :data:`MASS_MATRICES`
            (:func:`mass_matrix_structure`; default diagonal).
        init_params: one starting point for every chain (then only the jitter disperses
            them), or a ``list`` of one point per chain (the first is the alignment
            reference); see :func:`chain_starts`.
        progress: show a progress bar over the transitions (warm-up and draws).

    Returns:
        Posterior means of the aligned draws as ``params``; the draws
        ``[num_chains, num_samples, ...]``; ``diagnostics`` with ``num_divergences`` and
        ``mean_leapfrog_steps`` (gradient evaluations per draw);
        ``converged`` only says the sampler ran (:func:`mtl_jax.fit` adds the R-hat
        check); ``n_iter = num_samples``; an empty trace.
    """
    require_counts(1, num_samples=num_samples, num_chains=num_chains)
    require_counts(0, num_warmup=num_warmup)
    key_start, key_chains = jax.random.split(key)
    reference, init = chain_starts(model, design, key_start, num_chains=num_chains, init_jitter=init_jitter,
                                   init_params=init_params, parameterisation=parameterisation)
    # NumPyro's integrator works in JAX's default float (float64 under jax_enable_x64): the
    # chains start there too, whatever the data's dtype, or a tree's branches disagree.
    init = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.result_type(float)), init)
    dense_mass = mass_matrix_structure(mass_matrix, program_for(model, parameterisation), design,
                                       jax.eval_shape(model.site_values, reference))
    raw, diverging, num_steps = sample_chains(
        model, design, key_chains, init, num_warmup=num_warmup, num_samples=num_samples,
        target_accept=target_accept, parameterisation=parameterisation,
        dense_mass=tuple(dense_mass) if isinstance(dense_mass, list) else dense_mass, progress=progress)
    draws = align_draws(model, raw, reference)
    return BackendResult(
        params=jax.tree_util.tree_map(lambda leaf: leaf.mean(axis=(0, 1)), draws),
        converged=True,
        n_iter=num_samples,
        trace=np.zeros(0),
        draws=draws,
        diagnostics={"num_divergences": int(np.sum(diverging)),
                     "mean_leapfrog_steps": float(np.mean(num_steps))},
    )


CLI_OPTIONS = (
    ("--num-warmup", dict(type=count_option(0), metavar="N", help="NUTS warm-up steps per chain (default 500)")),
    ("--num-samples", dict(type=count_option(1), metavar="N", help="NUTS draws per chain (default 500)")),
    ("--num-chains", dict(type=count_option(1), metavar="N", help="NUTS chains (default 4)")),
    ("--target-accept", dict(type=float, metavar="P", help="NUTS target acceptance (default 0.8)")),
    ("--nuts-parameterisation", dict(choices=PARAMETERISATIONS, dest="parameterisation",
                                     help="task effects in the NumPyro program (default noncentred)")),
    ("--mass-matrix", dict(choices=MASS_MATRICES, help="NUTS metric: diagonal (default), a dense block "
                                                       "over the population-level parameters, or dense")),
)
"""Command-line options of :func:`run_nuts_backend` (``--nuts-parameterisation`` sets ``parameterisation``)."""
