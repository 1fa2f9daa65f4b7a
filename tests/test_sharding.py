"""Batches of fits and tasks sharded over devices (mtl_jax.infer.sharding), on the four fake
CPU devices of conftest.py, and a two-process jax.distributed run on loopback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding, PartitionSpec
from support import run_main

from mtl_jax.experiments import run_experiment
from mtl_jax.experiments.table2 import simulate_replicates
from mtl_jax.infer.em import em_fit, run_em_backend
from mtl_jax.infer.sharding import AXIS, batch_map, device_mesh, gather_batch, place_batch, resolve_devices
from mtl_jax.models.mixture_glmm import MixtureGLMM



@pytest.fixture(autouse=True)
def _four_devices():
    """Every test here shards over up to 4 devices: fail (never skip) when conftest.py's 4 CPU devices are missing."""
    assert jax.device_count() >= 4, f"needs 4 devices (tests/conftest.py asks for 4 CPU devices), has {jax.device_count()}"

# Three replicates: on two devices the batch is padded to four. The model without random
# effects compiles in a third of the time of the multitask one; the batch sharding does not
# look inside the fits.
TINY = {
    "experiment": "simulation_study",
    "components": [2],
    "models": ["independence"],
    "replicates": 3,
    "num_tasks": 4,
    "n_per_task": 40,
    "n_init": 1,
    "max_iter": 40,
    "dtype": "float64",
}
COMPARED = ("loglik", "n_iter", "converged", "bias_v", "bias_w", "bias_sigma2", "explained_variance")


def test_place_batch_pads_shards_and_gather_trims():
    mesh = device_mesh(2)
    batch = {"x": np.arange(6.0).reshape(3, 2), "key": jax.random.split(jax.random.key(0), 3)}
    placed = place_batch(batch, mesh)
    assert placed["x"].shape == (4, 2) and placed["key"].shape == (4,)
    assert placed["x"].sharding == NamedSharding(mesh, PartitionSpec(AXIS))
    shards = sorted((shard.index[0].start, np.asarray(shard.data).tolist()) for shard in placed["x"].addressable_shards)
    assert shards == [(0, [[0.0, 1.0], [2.0, 3.0]]), (2, [[4.0, 5.0], [4.0, 5.0]])]  # padding repeats the last
    assert jax.dtypes.issubdtype(placed["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(placed["key"])[:3], jax.random.key_data(batch["key"]))
    np.testing.assert_array_equal(gather_batch(placed["x"], 3), batch["x"])
    with pytest.raises(ValueError, match="leading"):
        place_batch({"a": np.zeros(3), "b": np.zeros(2)}, mesh)


def test_batch_map_equals_vmap_and_each_device_holds_its_share():
    def fn(x, key):  # a while_loop whose trip count depends on the element, as EM's does
        steps = jax.lax.while_loop(lambda c: c[0] < x[0], lambda c: (c[0] + 1.0, c[1] * 0.5), (0.0, 1.0))
        return {"value": jnp.sum(x**2) * steps[1] + jax.random.normal(key), "steps": steps[0]}

    x = np.arange(15.0).reshape(5, 3) % 7
    keys = jax.random.split(jax.random.key(1), 5)
    mesh = device_mesh(4)
    placed = place_batch((x, keys), mesh)
    sharded = jax.jit(batch_map(fn, mesh))(*placed)
    assert sharded["value"].shape == (8,)
    assert {shard.data.shape for shard in sharded["value"].addressable_shards} == {(2,)}
    assert {shard.device for shard in sharded["value"].addressable_shards} == set(mesh.devices.flat)
    expected = jax.vmap(fn)(x, keys)
    for name in expected:
        np.testing.assert_allclose(gather_batch(sharded[name], 5), expected[name], rtol=1e-13)
    # a few elements at a time (lax.map over batches, 5 = 2 + 2 + 1), alone and on each device
    for batched in (jax.jit(batch_map(fn, None, 2))(x, keys), gather_batch(jax.jit(batch_map(fn, mesh, 1))(*placed), 5)):
        for name in expected:
            np.testing.assert_allclose(batched[name], expected[name], rtol=1e-13)


def test_resolve_devices_defaults_to_all_and_rejects_bad_counts():
    assert resolve_devices(None) == jax.device_count() == 4
    assert resolve_devices(2) == 2
    for bad, message in ((5, "devices=5 but 4 device"), (0, "devices=0"), (2.5, "whole number"), (True, "whole")):
        with pytest.raises(ValueError, match=message):
            resolve_devices(bad)


@pytest.fixture(scope="module")
def one_device():
    """The tiny study on one device (plain vmap), in process."""
    return run_experiment({**TINY, "devices": 1}, progress=False)


def per_replicate(results):
    return results["results"]["2"]["independence"]["per_replicate"]


def assert_same_study(results, reference):
    for name in COMPARED:
        np.testing.assert_allclose(per_replicate(results)[name], per_replicate(reference)[name], rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    assert per_replicate(results)["n_iter"] and len(per_replicate(results)["loglik"]) == 3


def test_run_devices_2_pads_three_replicates_and_equals_one_device(one_device, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = run_main(["run", str(config), "--devices", "2", "--out-dir", str(tmp_path)])
    assert run.status == 0, run.err
    results = json.loads((tmp_path / "tiny.json").read_text())
    assert results["config"]["devices"] == 2
    assert_same_study(results, one_device)


def test_bad_devices_exit_2_with_a_clear_message(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = run_main(["run", str(config), "--devices", "9", "--out-dir", str(tmp_path)])
    assert run.status == 2 and "devices=9 but 4 device(s) are available" in run.err
    config.write_text(yaml.safe_dump({"experiment": "school_study", "devices": 2}))
    run = run_main(["run", str(config), "--out-dir", str(tmp_path)])
    assert run.status == 2 and "'school_study' runs on one device" in run.err
    csv = tmp_path / "rows.csv"
    csv.write_text("task,y,x\na,1.0,0.5\nb,2.0,0.1\n")
    run = run_main(["fit", str(csv), "--task", "task", "--response", "y", "--covariates", "x", "--components", "1",
                    "--method", "em", "--devices", "0", "--out", str(tmp_path / "fit.json")])
    assert run.status == 2 and "devices=0" in run.err
    run = run_main(["run", str(config), "--coordinator", "127.0.0.1:1", "--out-dir", str(tmp_path)])
    assert run.status == 2 and "--num-processes N and --process-id I" in run.err


def test_task_sharded_em_equals_unsharded_and_splits_the_tasks():
    """A linear mixed model (g = 1: task random intercepts, the cheapest EM to compile) with
    its four tasks on two devices."""
    study = simulate_replicates(jax.random.split(jax.random.key(3), 1), 1, 4, 30)
    design = jax.tree_util.tree_map(lambda leaf: leaf[0], study.train)
    model, key, options = MixtureGLMM(1), jax.random.key(4), dict(n_init=2, max_iter=30)
    mesh = device_mesh(2)
    plain = em_fit(model, design, key, **options)
    compiled = em_fit.lower(model, design, key, mesh=mesh, **options).compile()
    # The compiled step really is partitioned: XLA added the cross-task reductions.
    assert "all-reduce" in compiled.as_text()
    sharded = compiled(design, key)
    np.testing.assert_allclose(sharded.restart_logliks, plain.restart_logliks, rtol=1e-11)
    assert int(sharded.n_iter) == int(plain.n_iter) > 1
    for got, expected in zip(jax.tree_util.tree_leaves(sharded.params), jax.tree_util.tree_leaves(plain.params)):
        np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    # Per-task leaves end split over the devices (two tasks each), population leaves replicated.
    effects = sharded.params.component_effects
    assert effects.sharding.spec[0] == AXIS and {s.data.shape[0] for s in effects.addressable_shards} == {2}
    assert sharded.params.component_coef.sharding.is_fully_replicated
    # The backend (fit(..., devices=2), mtl-jax fit --devices 2) runs the same program.
    backend = run_em_backend(model, design, key, devices=2, **options)
    np.testing.assert_allclose(backend.loglik, float(plain.loglik), rtol=1e-11)
    np.testing.assert_allclose(backend.params.component_effects, plain.params.component_effects, rtol=1e-8,
                               atol=1e-10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_split_the_study_and_equal_one_device(one_device, tmp_path):
    """``mtl-jax run --coordinator ...`` in two processes of two CPU devices each (jax.distributed
    over loopback, gloo collectives): the replicates are split over devices of both processes
    and process 0 writes what one device computes."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen([sys.executable, "-m", "mtl_jax.cli", "run", str(config), "--out-dir", str(tmp_path / str(i)),
                          "--coordinator", address, "--num-processes", "2", "--process-id", str(i)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert not (tmp_path / "1").exists()  # only process 0 writes
    results = json.loads((tmp_path / "0" / "tiny.json").read_text())
    assert_same_study(results, one_device)
