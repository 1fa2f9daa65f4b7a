"""Test configuration: float64 for reference parity (float32 tests cast explicitly)."""

import gc

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compilation caches after each test module.

    Every compiled executable keeps its machine code in memory maps of its own; the whole
    suite compiles thousands of them and would pass the kernel's limit on memory maps per
    process (``vm.max_map_count``, 65,530 by default), at which point the compiler aborts.
    """
    yield
    jax.clear_caches()
    gc.collect()
