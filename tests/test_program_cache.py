"""The on-disk store of traced programs (:mod:`mtl_jax.infer.program_cache`): a program read
back gives exactly the numbers of ``jax.jit``, a new process neither traces nor exports it
again, and a changed function, signature or library misses the store."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from mtl_jax import MixtureGLMM, TaskData, fit
from mtl_jax.infer import program_cache
from mtl_jax.infer.program_cache import cached_program, decode_structure, encode_structure
from mtl_jax.models.mixture_glmm.params import MixtureDesign, MixtureParams

TRACES = []


@cached_program(static_argnames="power")
def moments(x, y, power):
    """A pytree out of named tuples, dicts, lists and None, traced once per signature."""
    TRACES.append(power)
    return MixtureParams(jnp.sum(x ** power), {"twice": 2 * y, "none": None, "pair": [y, x[:1]]},
                         *[jnp.cumsum(x)] * 6)


@cached_program
def as_design(x):
    """Output with a pytree node the store cannot name (an Equinox module)."""
    return MixtureDesign(y=x[:, None], x_comp=x[:, None], x_mix=x[:, None], task=jnp.zeros(x.shape, jnp.int32),
                         num_tasks=1)


def plain_moments(x, y, power):
    return moments.jitted(x, y, power)


@pytest.fixture
def store(tmp_path):
    """The store switched on in a fresh directory for one test (off again afterwards)."""
    directory = program_cache.enable(tmp_path / "programs")
    TRACES.clear()
    yield directory
    program_cache.disable()


def entries(directory):
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


def assert_same_tree(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_off_by_default_and_off_it_is_jax_jit():
    fresh = subprocess.run([sys.executable, "-c", "import mtl_jax; from mtl_jax.infer import program_cache; "
                            "print(program_cache.directory())"], capture_output=True, text=True)
    assert fresh.stdout.strip() == "None", fresh.stderr
    program_cache.disable()
    x = jnp.linspace(0.0, 1.0, 5)
    assert_same_tree(moments(x, 1.5, 3), plain_moments(x, 1.5, 3))


def test_a_new_process_reads_the_program_instead_of_tracing(store):
    x, y = jnp.linspace(-1.0, 2.0, 7), jnp.float32(0.25)
    first = moments(x, y, power=3)
    assert TRACES == [3]
    written = entries(store)
    assert sorted(name.rsplit(".", 1)[1] for name in written) == ["hlo", "json"]
    again = moments(x, y, power=3)  # same process: served from memory
    program_cache.forget()  # as a new process: nothing in memory
    jax.clear_caches()
    read = moments(x, y, power=3)
    assert TRACES == [3], "the stored program was traced again"
    assert entries(store) == written, "the stored program was exported again"
    reference = plain_moments(x, y, 3)
    for got in (first, again, read):
        assert_same_tree(got, reference)


def test_static_values_shapes_and_code_each_have_their_entry(store, monkeypatch):
    x = jnp.arange(4.0)
    reference = plain_moments(x, 1.0, 2)
    TRACES.clear()
    moments(x, 1.0, 2)
    moments(x, 1.0, 3)  # another static value
    moments(jnp.arange(5.0), 1.0, 3)  # another shape
    moments(x.astype(jnp.float32), 1.0, 3)  # another dtype
    assert TRACES == [2, 3, 3, 3] and len(entries(store)) == 8
    program_cache.forget()
    monkeypatch.setitem(program_cache._state, "fingerprint", "an edited package")
    assert_same_tree(moments(x, 1.0, 2), reference)
    assert TRACES == [2, 3, 3, 3, 2] and len(entries(store)) == 10


def test_inside_a_trace_it_is_the_jitted_function(store):
    x = jnp.arange(3.0)
    got = jax.vmap(lambda row: moments(row, 2.0, 2).mixing_coef)(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(got, [5.0, 20.0])
    assert not entries(store)


def test_outputs_it_cannot_name_run_on_jax_jit(store):
    x = jnp.arange(3.0)
    design = as_design(x)
    assert isinstance(design, MixtureDesign) and design.num_tasks == 1
    np.testing.assert_array_equal(design.y[:, 0], x)
    assert not entries(store)
    with pytest.raises(TypeError, match="pytree node"):
        encode_structure(jax.tree_util.tree_structure(design))


def test_a_damaged_entry_is_exported_again(store):
    x = jnp.arange(3.0)
    reference = plain_moments(x, 1.0, 2)
    moments(x, 1.0, 2)
    traced = len(TRACES)
    (damaged,) = store.glob("*.hlo")
    damaged.write_bytes(b"not a program")
    program_cache.forget()
    assert_same_tree(moments(x, 1.0, 2), reference)
    assert len(TRACES) == traced + 1 and damaged.read_bytes() != b"not a program"


def test_structure_round_trip():
    tree = {"a": (1, [2, None]), "b": MixtureParams(*range(8))}
    treedef = jax.tree_util.tree_structure(tree)
    encoded = json.loads(json.dumps(encode_structure(treedef)))
    assert decode_structure(encoded) == treedef
    with pytest.raises(TypeError, match="not a class of mtl_jax"):
        decode_structure({"namedtuple": "os:stat_result", "children": []})


@pytest.fixture(scope="module")
def lmm_frame():
    rng = np.random.default_rng(0)
    task = np.repeat(np.arange(12), 8)
    x = rng.normal(size=task.size)
    y = 1.0 + 2.0 * x + rng.normal(size=12)[task] + 0.5 * rng.normal(size=task.size)
    return pd.DataFrame({"task": task, "x": x, "y": y})


def test_em_fit_from_the_store_equals_the_jitted_fit(lmm_frame, store, monkeypatch):
    data = TaskData.from_dataframe(lmm_frame, task="task", response="y", covariates=["x"])
    model = MixtureGLMM(2, mixing_random_effects=False, component_random_effects=False)  # compiles quickly
    program_cache.disable()
    reference = fit(model, data)
    program_cache.enable(store)
    exported = fit(model, data)
    steps = []
    original = MixtureGLMM.em_step
    monkeypatch.setattr(MixtureGLMM, "em_step", lambda self, *a: steps.append(1) or original(self, *a))
    program_cache.forget()
    jax.clear_caches()
    read = fit(model, data)
    assert not steps, "the EM program was traced again"
    for got in (exported, read):
        assert_same_tree(got.params, reference.params)
        assert got.loglik == reference.loglik and got.n_iter == reference.n_iter
        assert got.diagnostics["standard_errors"] == reference.diagnostics["standard_errors"]


def test_repeated_cli_fit_reads_every_program(lmm_frame, tmp_path):
    csv = tmp_path / "lmm.csv"
    lmm_frame.to_csv(csv, index=False)
    env = dict(os.environ, MTL_JAX_CACHE_DIR=str(tmp_path / "cache"))
    outputs = []
    for run in range(2):
        out = tmp_path / f"fit{run}.json"
        done = subprocess.run([sys.executable, "-m", "mtl_jax.cli", "fit", str(csv), "--task", "task", "--response",
                               "y", "--covariates", "x", "--components", "1", "--method", "em", "--out", str(out)],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(out.read_text()))
        if run == 0:
            written = entries(tmp_path / "cache" / "programs")
    assert len(written) >= 8  # the EM fit, standard errors, checks and task tables, each .hlo + .json
    assert entries(tmp_path / "cache" / "programs") == written, "the second run traced and exported again"
    for key in ("params", "loglik", "task_tables"):
        assert outputs[1][key] == outputs[0][key]
    assert outputs[1]["diagnostics"]["standard_errors"] == outputs[0]["diagnostics"]["standard_errors"]


def test_ahead_of_time_compile_runs_the_stored_program(store):
    x, y = jnp.linspace(0.0, 1.0, 4), jnp.float64(3.0)
    reference = plain_moments(x, y, 2)
    compiled = moments.compile(x=x, y=y, power=2)
    assert_same_tree(compiled(x=2 * x, y=y), plain_moments(2 * x, y, 2))
    assert_same_tree(compiled(x=x, y=y), reference)
    assert len(entries(store)) == 2
    with pytest.raises(TypeError, match="compiled for the arguments"):
        compiled(x=x)
    program_cache.disable()  # off: jax.jit's ahead-of-time path, called the same way
    assert_same_tree(moments.compile(x=x, y=y, power=2)(x=x, y=y), reference)


def test_a_store_that_cannot_be_written_costs_no_fit(store, monkeypatch):
    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(program_cache, "_write_atomically", full_disk)
    x = jnp.arange(6.0)
    with pytest.warns(UserWarning, match="could not store the traced program moments"):
        got = moments(x, 0.5, 4)
    assert_same_tree(got, plain_moments(x, 0.5, 4))
    assert not entries(store)
    assert_same_tree(moments(x, 0.5, 4), got)  # served from memory, no second warning or trace


class _Owner:
    """A static argument asking for XLA options, as a model's ``compiler_options`` class attribute does."""

    def __init__(self, options):
        self.compiler_options = options

    def __hash__(self):
        return hash(tuple(sorted(self.compiler_options.items())))

    def __eq__(self, other):
        return isinstance(other, _Owner) and other.compiler_options == self.compiler_options


@cached_program(static_argnames="owner")
def softmax_rows(owner, x):
    """A softmax over a short minor axis (the E-step's ``[n, g]``), the kind of reduction the options change."""
    return jax.nn.softmax(x, axis=-1)


NO_LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_compiler_options_of_a_static_argument_reach_xla(store):
    """The model's options compile its programs (XLA's text shows no library fusion), a nested
    call inside another trace compiles with the enclosing program, an option this XLA does
    not know is dropped, and every variant computes the same numbers."""
    assert program_cache.compiler_options(MixtureGLMM.compiler_options) == MixtureGLMM.compiler_options
    assert program_cache.compiler_options({"xla_cpu_no_such_option": "1"}) == {}
    x = jax.random.normal(jax.random.key(0), (4096, 2))
    with_options, without = _Owner(NO_LIBRARY_FUSIONS), _Owner({})
    if jax.default_backend() == "cpu":
        assert "ynn_fusion" not in softmax_rows.lower(with_options, x).compile().as_text()
    want = np.asarray(jax.nn.softmax(np.asarray(x), axis=-1))
    for owner in (with_options, without, _Owner({"xla_cpu_no_such_option": "1"})):
        np.testing.assert_allclose(np.asarray(softmax_rows(owner, x)), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(softmax_rows.compile(owner, x=x)(x=x)), want, rtol=1e-6)
        nested = jax.jit(lambda v: softmax_rows(owner, v) * 2)(x)  # a nested jax.jit cannot take options
        np.testing.assert_allclose(np.asarray(nested), 2 * want, rtol=1e-6)
