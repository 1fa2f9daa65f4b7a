r"""NUTS on a model's NumPyro program, with mixture components relabelled before diagnostics.

Chains run vectorised (one XLA program for all chains) from an EM fit. A mixture
posterior is invariant to permuting the components (up to the priors), so a chain may
visit several labellings; summaries and R-hat are only meaningful once every draw is
put in one labelling. Each draw is therefore matched to the EM estimate: the order
minimising :math:`\sum_h \lVert W^{(s)}_{\text{order}[h]} - \hat W_h \rVert_1` (Hungarian
algorithm, :func:`mtl_jax.metrics.match_components`), applied with
:meth:`MixtureGLMM.relabel`. R-hat (split Gelman-Rubin) and the effective sample size
are then computed per population-level parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS
from numpyro.infer.initialization import init_to_value

from mtl_jax.infer.results import BackendResult
from mtl_jax.infer.svi import site_values, starting_point
from mtl_jax.metrics import match_components
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

#: Fields whose R-hat and ESS are reported (the random effects are per task).
POPULATION_FIELDS = ("mixing_coef", "component_coef", "component_cov", "mixing_var", "component_var")


def relabel_draws(
    model: MixtureGLMM, draws: MixtureParams, reference: MixtureParams
) -> tuple[MixtureParams, int]:
    """Put every draw's components in the order of ``reference``.

    Args:
        model: the model (its ``relabel`` permutes one parameter point).
        draws: parameters with leading axes ``[chain, draw]``.
        reference: one parameter point, e.g. the EM estimate.

    Returns:
        The relabelled draws (numpy, same shapes) and how many draws needed a
        non-identity order.
    """
    lead = draws.component_coef.shape[:2]
    flat = jax.tree_util.tree_map(lambda leaf: jnp.reshape(leaf, (-1,) + leaf.shape[2:]), draws)
    coef = np.asarray(flat.component_coef)
    orders = np.stack([match_components(draw, reference.component_coef) for draw in coef])
    relabelled = jax.vmap(model.relabel)(flat, jnp.asarray(orders))
    permuted = int(np.sum(np.any(orders != np.arange(orders.shape[1]), axis=1)))
    restored = jax.tree_util.tree_map(
        lambda leaf: np.asarray(leaf).reshape(lead + leaf.shape[1:]), relabelled
    )
    return restored, permuted


def convergence_diagnostics(draws: MixtureParams) -> dict[str, dict[str, np.ndarray]]:
    """Split R-hat and ESS of each population-level field, from ``[chain, draw, ...]`` draws.

    Fields that are empty or constant (switched-off random-effect parts are zeros in every
    draw) have no R-hat and are left out.
    """
    r_hat, ess = {}, {}
    for field in POPULATION_FIELDS:
        values = np.asarray(getattr(draws, field))
        if values.size == 0 or np.ptp(values) == 0:
            continue
        r_hat[field] = np.asarray(split_gelman_rubin(values))
        ess[field] = np.asarray(effective_sample_size(values))
    return {"r_hat": r_hat, "ess": ess}


def run_nuts_backend(
    model: MixtureGLMM,
    design: MixtureDesign,
    key: Array,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 2,
    init_params: MixtureParams | None = None,
    target_accept: float = 0.8,
    progress: bool = False,
) -> BackendResult:
    """NUTS from an EM fit; draws relabelled to the EM estimate; R-hat and ESS.

    Args:
        model: the model description; its ``numpyro_model`` is the program sampled.
        design: the data.
        key: PRNG key (EM starts and the chains).
        num_warmup: adaptation steps per chain (step size, diagonal mass matrix).
        num_samples: kept draws per chain.
        num_chains: chains, vectorised.
        init_params: starting point of every chain and the relabelling reference;
            ``None`` runs :func:`mtl_jax.infer.em.em_fit` with two starts.
        target_accept: NUTS target acceptance probability.
        progress: show NumPyro's progress bar.

    Returns:
        Posterior means of the relabelled draws as ``params``; the relabelled draws
        ``[num_chains, num_samples, ...]``; ``diagnostics`` with ``r_hat`` and ``ess``
        (per population-level field), ``max_r_hat``, ``min_ess``, ``num_divergences``
        and ``relabelled_draws`` (draws whose components were permuted);
        ``converged = max_r_hat < 1.05``; ``n_iter = num_samples``; an empty trace.
    """

    key_start, key_chains = jax.random.split(key)
    reference = starting_point(model, design, key_start, init_params)
    kernel = NUTS(
        model.numpyro_model,
        target_accept_prob=target_accept,
        init_strategy=init_to_value(values=site_values(model, reference)),
    )
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=progress,
    )
    mcmc.run(key_chains, design, extra_fields=("diverging",))
    samples = mcmc.get_samples(group_by_chain=True)
    raw = MixtureParams(**{field: samples[field] for field in MixtureParams._fields})
    draws, permuted = relabel_draws(model, raw, reference)
    diagnostics = convergence_diagnostics(draws)
    max_r_hat = float(np.max(np.concatenate([np.ravel(v) for v in diagnostics["r_hat"].values()])))
    diagnostics.update(
        max_r_hat=max_r_hat,
        min_ess=float(np.min(np.concatenate([np.ravel(v) for v in diagnostics["ess"].values()]))),
        num_divergences=int(np.sum(mcmc.get_extra_fields()["diverging"])),
        relabelled_draws=permuted,
    )
    return BackendResult(
        params=MixtureParams(*(leaf.mean(axis=(0, 1)) for leaf in draws)),
        converged=bool(max_r_hat < 1.05),
        n_iter=num_samples,
        trace=np.zeros(0),
        draws=draws._asdict(),
        diagnostics=diagnostics,
    )
