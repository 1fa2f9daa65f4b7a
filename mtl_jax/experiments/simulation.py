"""The mixture-GLMM paper's simulation study (section 4, Table 1).

``K = 10`` tasks (hospitals) with ``1000`` training and ``1000`` test observations each;
``x = (1, four N(0, 1))`` serves both the mixing proportions and the component means;
``sigma_h^2 = 0.5``; ``lambda_h = phi_h = 1``; ``v_h`` and ``w_h`` from Table 1. Test
observations come from the same tasks, with the same random effects, as the training ones.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

#: Table 1: rows h = 1..7 of v_h and h = 1..8 of w_h (the same for h <= 7).
TABLE1_V = np.array(
    [
        [0.5, 0.5, 0.5, -0.5, -0.5],
        [-0.5, -0.5, -0.5, 0.5, 0.5],
        [1.0, -1.0, -1.0, 1.0, 1.0],
        [-1.0, 1.0, 1.0, -1.0, -1.0],
        [0.8, 0.8, -0.8, -0.8, 0.8],
        [-0.8, -0.8, 0.8, 0.8, -0.8],
        [1.2, -1.2, 1.2, 1.2, -1.2],
    ]
)
TABLE1_W = np.concatenate([TABLE1_V, [[-1.2, 1.2, -1.2, -1.2, 1.2]]])


class SimulatedStudy(NamedTuple):
    """One replicate: training and test designs plus the truth that generated them."""

    train: MixtureDesign
    test: MixtureDesign
    truth: MixtureParams
    train_labels: jax.Array
    test_labels: jax.Array


def table1_params(num_components: int, num_tasks: int = 10, sigma2: float = 0.5, variance: float = 1.0,
                  dtype=None) -> MixtureParams:
    """True parameters of Table 1 for ``g`` components (random effects still zero).

    Table 1 gives ``g = 2..8``; ``g = 1`` (its first ``w`` row alone, no mixing part: a
    linear mixed model) is the one-component case of the same design.
    """
    g = num_components
    if not 1 <= g <= 8:
        raise ValueError(f"Table 1 defines g = 1..8 components, got {g}")
    dtype = dtype or jnp.asarray(0.0).dtype
    return MixtureParams(
        mixing_coef=jnp.asarray(TABLE1_V[: g - 1], dtype),
        component_coef=jnp.asarray(TABLE1_W[:g, :, None], dtype),
        component_cov=jnp.full((g, 1, 1), sigma2, dtype),
        mixing_cov=variance * jnp.eye(g - 1, dtype=dtype),
        component_effects_cov=jnp.full((g, 1, 1), variance, dtype),
        mixing_effects=jnp.zeros((num_tasks, g - 1), dtype),
        component_effects=jnp.zeros((num_tasks, g, 1, 1), dtype),
        class_logits=jnp.zeros((num_tasks, g), dtype),
    )


def simulate_study(key, num_components: int, num_tasks: int = 10, n_per_task: int = 1000) -> SimulatedStudy:
    """Draw one replicate of the simulation study (jittable; vmap over ``key``)."""
    model = MixtureGLMM(num_components)
    params = table1_params(num_components, num_tasks)
    key_effects, key_train, key_test = jax.random.split(key, 3)
    truth = model.sample_effects(key_effects, params, num_tasks)

    def draw(k):
        key_x, key_y = jax.random.split(k)
        n = num_tasks * n_per_task
        dtype = params.component_coef.dtype
        x = jnp.concatenate([jnp.ones((n, 1), dtype), jax.random.normal(key_x, (n, 4), dtype)], axis=1)
        task = jnp.repeat(jnp.arange(num_tasks, dtype=jnp.int32), n_per_task)
        design = MixtureDesign(y=jnp.zeros((n, 1), dtype), x_comp=x, x_mix=x, task=task, num_tasks=num_tasks)
        labels, y = model.simulate(key_y, truth, design)
        return eqx.tree_at(lambda d: d.y, design, y), labels

    train, train_labels = draw(key_train)
    test, test_labels = draw(key_test)
    return SimulatedStudy(train, test, truth, train_labels, test_labels)

