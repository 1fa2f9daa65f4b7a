"""Test configuration: float64 for reference parity (float32 tests cast explicitly)."""

import jax

jax.config.update("jax_enable_x64", True)
