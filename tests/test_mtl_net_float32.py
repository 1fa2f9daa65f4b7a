"""The multitask net in float32 (what GPUs run) against float64, in hard regimes: features far
from zero on a tiny spread, saturated logits, near-noiseless Gaussian tasks, 1,000 heads."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mtl_jax.data.personal import PersonData
from mtl_jax.models.mtl_net import MTLNet


def hard_frame(regime: str, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    people = 1000 if regime == "many_heads" else 6
    rows = 5 if regime == "many_heads" else 60
    n = people * rows
    x = rng.normal(size=(n, 3))
    if regime == "far_from_zero":
        x = 1e4 + 1e-2 * x  # normalised from float64 statistics before the cast
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(user=np.repeat(np.arange(people), rows).astype(str))
    z = (x - x.mean(0)) / x.std(0)
    if regime == "small_noise":
        frame["y_Label"] = 3.0 + z @ np.array([1.0, -2.0, 0.5]) + 1e-4 * rng.normal(size=n)
    else:
        frame["y_Label"] = (z[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(float)
    return frame


def start(model, frame, scale):
    """One starting point (drawn in float64, kept as numpy) for both precisions."""
    with jax.enable_x64(True):
        params = model.init(jax.random.key(0), PersonData.from_dataframe(frame, person="user"))
        return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf) * scale, params)


def losses_and_grads(model, frame, dtype, params, log_sd):
    with jax.enable_x64(dtype == "float64"):
        data = PersonData.from_dataframe(frame, person="user")
        params = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, data.X.dtype), params)
        params = eqx.tree_at(lambda p: p.log_noise_sd, params, jnp.full_like(params.log_noise_sd, log_sd))

        def total(p):
            return jnp.sum(model.task_losses(p, data, jnp.ones_like(data.y))) + model.penalty(p, data, jnp.ones_like(data.y))

        value, grads = jax.value_and_grad(total)(params)
        return float(value), [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)], data.X.dtype


@pytest.mark.parametrize("regime, scale, log_sd", [
    ("far_from_zero", 1.0, 0.0),
    ("saturated_logits", 40.0, 0.0),   # |eta| in the hundreds: softplus, not log(1 + exp)
    ("small_noise", 1.0, -8.0),         # Gaussian sd e^-8
    ("many_heads", 1.0, 0.0),
])
def test_float32_losses_and_gradients_match_float64(regime, scale, log_sd):
    model = MTLNet(hidden=(8,))
    frame = hard_frame(regime)
    params = start(model, frame, scale)
    value32, grads32, dtype32 = losses_and_grads(model, frame, "float32", params, log_sd)
    value64, grads64, dtype64 = losses_and_grads(model, frame, "float64", params, log_sd)
    assert dtype32 == jnp.float32 and dtype64 == jnp.float64
    assert np.isfinite(value32)
    np.testing.assert_allclose(value32, value64, rtol=2e-5)
    for g32, g64 in zip(grads32, grads64):
        np.testing.assert_allclose(g32, g64, rtol=2e-3, atol=2e-4 * max(1.0, np.abs(g64).max()))
