"""Test configuration: float64 for reference parity (float32 tests cast explicitly), four
CPU devices for the sharding tests, and a compilation cache on disk shared by the test
processes."""

import gc
import os
import tempfile
from pathlib import Path

# Compiled executables are kept on disk and reused by every process of the run (the xdist
# workers, notebook kernels and CLI subprocesses inherit these variables): most of the
# suite's time is XLA compiling the same programs again in another module or process.
# Set before JAX is imported so that subprocesses and this process agree.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mtl_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Four CPU devices (one host's cores split four ways) so that the sharded paths run
# without accelerators; a computation not placed on a mesh still runs on device 0 alone.
# An environment variable rather than jax.config so that subprocesses get them too.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's in-memory compilation caches after each test module.

    Every compiled executable keeps its machine code in memory maps of its own; the whole
    suite compiles thousands of them and would pass the kernel's limit on memory maps per
    process (``vm.max_map_count``, 65,530 by default), at which point the compiler aborts.
    (The disk cache above still serves later modules.)
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _program_store_off_after_module():
    """An in-process ``mtl-jax`` (``cli.main``) switches the store of traced programs on for its
    process, as the command line does; each test module starts with it off again."""
    yield
    from mtl_jax.infer import program_cache

    program_cache.disable()

