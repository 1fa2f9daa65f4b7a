"""Asymptotic covariance of the variance components against the dense brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.infer.em import em_fit
from mtl_jax.models.mixture_glmm import MixtureGLMM
from mtl_jax.models.variance_components import (
    variance_component_covariance,
    variance_component_names,
)


def dense_reml_covariance(model, params, design):
    """Form Pi = -Hessian of L over (v, W, a, b) densely, invert, and apply section 3 literally."""
    g, K = model.num_components, design.num_tasks
    shapes = [params.mixing_coef.shape, params.component_coef.shape,
              params.mixing_effects.shape, params.component_effects.shape]
    sizes = [int(np.prod(s)) for s in shapes]

    def objective(flat):
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        v, w, a, b = (part.reshape(shape) for part, shape in zip(parts, shapes))
        return model.objective(params._replace(mixing_coef=v, component_coef=w, mixing_effects=a,
                                               component_effects=b), design)

    flat = jnp.concatenate([params.mixing_coef.ravel(), params.component_coef.ravel(),
                            params.mixing_effects.ravel(), params.component_effects.ravel()])
    keep = np.ones(flat.size, bool)
    start_a, start_b = sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]
    if not model.has_mixing_effects:
        keep[start_a:start_b] = False
    if not model.component_random_effects:
        keep[start_b:] = False
    pi = -np.asarray(jax.jit(jax.hessian(objective))(flat))[np.ix_(keep, keep)]
    h = np.linalg.inv(pi)
    index = np.cumsum(keep) - 1  # position in the kept vector
    p = params.component_coef.shape[-1]
    blocks, theta = [], []
    if model.has_mixing_effects:
        for hh in range(g - 1):
            blocks.append(index[start_a + np.arange(K) * (g - 1) + hh])
            theta.append(float(params.mixing_var[hh]))
    if model.component_random_effects:
        for hh in range(g):
            for k in range(p):
                blocks.append(index[start_b + np.arange(K) * g * p + hh * p + k])
                theta.append(float(params.component_var[hh, k]))
    c = len(blocks)
    r = np.zeros((c, c))
    for s in range(c):
        for t in range(c):
            hst = h[np.ix_(blocks[s], blocks[t])]
            if s == t:
                r[s, s] = np.trace(np.linalg.matrix_power(np.eye(K) - hst / theta[s], 2)) / theta[s] ** 2
            else:
                r[s, t] = np.trace(hst @ hst.T) / (theta[s] * theta[t])
    return 2 * np.linalg.inv(r)


@pytest.mark.parametrize("effects", [(True, True), (True, False), (False, True)])
def test_matches_dense_brute_force(effects):
    study = simulate_study(jax.random.key(3), 2, num_tasks=5, n_per_task=40)
    model = MixtureGLMM(2, mixing_random_effects=effects[0], component_random_effects=effects[1])
    params = em_fit(model, study.train, jax.random.key(0), n_init=2, max_iter=200).params
    got = np.asarray(variance_component_covariance(model, params, study.train))
    want = dense_reml_covariance(model, params, study.train)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert len(variance_component_names(model)) == got.shape[0]
    assert np.all(np.linalg.eigvalsh(got) > 0)


