r"""Studies and large fits over several devices: a 1-D device mesh, batches sharded along it,
and EM with its tasks sharded.

Two kinds of work spread over devices:

* **A batch of independent fits** (simulation replicates, restarts, CV folds,
  hyperparameter grids): every leaf of the batch has a leading axis of size ``R``.
  :func:`place_batch` pads ``R`` to a multiple ``R'`` of the number of devices ``N``
  (repeating the last element, so padding never feeds a fit data it could not handle) and
  places each leaf as one global array of shape ``[R', ...]`` sharded along that axis,
  ``R' / N`` elements per device. :func:`batch_map` runs ``jax.vmap(fn)`` inside
  ``jax.shard_map``, so each device runs its own slice without talking to the others (a
  ``lax.while_loop`` stops on each device when its own slowest element does).
  :func:`gather_batch` brings the outputs back to the host, across processes when the run
  spans several, and drops the padding.

* **One fit with very many tasks** (:func:`constrain_rows`, :func:`constrain_tasks`,
  used by :func:`mtl_jax.infer.em.em_fit` when given a mesh): inside the jitted fit, the
  design's row-indexed leaves are laid out along the mesh, and so is every per-task leaf
  of the parameters (those outside the model's ``population(params)``, with the task axis
  first); population-level leaves are replicated. XLA's SPMD partitioner then splits the
  per-task E-step work (task sums, per-task Newton systems, BLUPs) over the devices and
  inserts the collectives for the population-level sums (fixed-effect information,
  covariance updates) itself, so the model's mathematics is written once. The
  annotations change the layout only, never a value: the fit equals the unsharded one up
  to the order of floating-point sums. Uneven sizes (``K`` or ``n`` not a multiple of
  ``N``) are padded by XLA internally.

Devices are counted globally (:func:`jax.device_count`): after
``jax.distributed.initialize`` (:func:`initialize_distributed`) a mesh spans the devices of
every process, each process takes part in every sharded call with the same host data, and
:func:`gather_batch` returns the whole batch to each of them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS",
    "batch_map",
    "constrain_rows",
    "constrain_tasks",
    "device_mesh",
    "gather_batch",
    "initialize_distributed",
    "place_batch",
    "resolve_devices",
    "to_host",
]

AXIS = "devices"
"""Name of the mesh's one axis."""


def resolve_devices(requested: int | None) -> int:
    """The number of devices to use: ``requested``, or every device JAX sees when ``None``.

    Raises:
        ValueError: for a count that is not a whole number, below 1, above
            :func:`jax.device_count`, or (with several processes) not a multiple of the
            number of processes.
    """
    available = jax.device_count()
    if requested is None:
        return available
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)):
        raise ValueError(f"devices must be a whole number of devices, got {requested!r}")
    requested = int(requested)
    if not 1 <= requested <= available:
        kinds = sorted({device.platform for device in jax.devices()})
        raise ValueError(f"devices={requested} but {available} device(s) are available "
                         f"({', '.join(kinds)}; jax.devices() lists them); choose 1 to {available}")
    if requested % jax.process_count():
        raise ValueError(f"devices={requested} is not a multiple of the {jax.process_count()} processes; "
                         "each process must contribute the same number of devices")
    return requested


def device_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D :class:`jax.sharding.Mesh` with axis :data:`AXIS` over ``num_devices`` devices.

    ``None`` takes every device (:func:`resolve_devices`). With several processes each
    contributes ``num_devices / process_count`` of its local devices.
    """
    count = resolve_devices(num_devices)
    per_process = count // jax.process_count()
    devices = [device for process in range(jax.process_count())
               for device in jax.local_devices(process_index=process)[:per_process]]
    return Mesh(np.asarray(devices), (AXIS,))


def batch_size(tree) -> int:
    """The common leading size ``R`` of a batch's leaves.

    Raises:
        ValueError: when the batch has no array leaf, a scalar leaf, or leaves of different leading sizes.
    """
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(tree)}
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"a batch needs array leaves that share one leading (batch) axis; leading sizes {sizes}")
    return sizes.pop()


def place_batch(tree, mesh: Mesh):
    """``tree``'s leaves ``[R, ...]`` padded to ``[R', ...]`` and sharded along ``mesh``.

    ``R'`` is ``R`` rounded up to a multiple of ``mesh.size``; the padding repeats the last
    element. Each leaf becomes a global array with ``NamedSharding(mesh, P(AXIS))``
    (device ``d`` holds elements ``d R'/N .. (d+1) R'/N - 1``). PRNG key arrays stay key
    arrays. Every process must pass the same values.

    Returns:
        The placed tree; :func:`gather_batch` undoes the padding of outputs.
    """
    size = batch_size(tree)
    padded = -(-size // mesh.size) * mesh.size
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))

    def place(leaf):
        impl = jax.random.key_impl(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else None
        host = np.asarray(jax.random.key_data(leaf) if impl is not None else leaf)
        host = np.concatenate([host, np.repeat(host[-1:], padded - size, axis=0)])
        placed = jax.device_put(host, sharding)
        return placed if impl is None else jax.random.wrap_key_data(placed, impl=impl)

    return jax.tree_util.tree_map(place, tree)


def to_host(tree):
    """The host (NumPy) values of ``tree``'s leaves; leaves spread over several processes are
    all-gathered first, so every process gets the whole value."""
    from jax.experimental import multihost_utils

    def gather(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(leaf)

    return jax.tree_util.tree_map(gather, tree)


def gather_batch(tree, size: int):
    """:func:`to_host` of a batch output placed by :func:`place_batch`, trimmed to its first ``size`` elements."""
    return jax.tree_util.tree_map(lambda leaf: leaf[:size], to_host(tree))


def batch_map(fn: Callable, mesh: Mesh | None = None, batch_size: int | None = None) -> Callable:
    """``jax.vmap(fn)`` over the leading axis of every argument, split over ``mesh``'s devices.

    Without a mesh (or with one device) this is ``jax.vmap(fn)``. Otherwise each device
    maps ``fn`` over its own ``R'/N`` elements inside ``jax.shard_map`` (no communication);
    the arguments' leading size must be a multiple of ``mesh.size`` (:func:`place_batch`),
    and the outputs keep the leading axis, sharded the same way. Call it inside ``jax.jit``.

    ``batch_size`` maps a device's elements ``batch_size`` at a time, one batch after
    another (``jax.lax.map``): a loop inside ``fn`` then stops when the slowest element of
    its batch does, not of all of them. ``None``: all at once.
    """
    if batch_size is None:
        mapped = jax.vmap(fn)
    else:
        def mapped(*args):
            return jax.lax.map(lambda element: fn(*element), args, batch_size=batch_size)
    if mesh is None or mesh.size == 1:
        return mapped
    # check_vma=False: the elements never communicate, and loops inside model code start
    # their carries from fresh (unsharded) zeros, which the varying-axes check would reject.
    return jax.shard_map(mapped, mesh=mesh, in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS),
                         check_vma=False)


def _constrain_leading(leaf, mesh: Mesh):
    """``leaf`` laid out along ``mesh`` by its first axis (rest replicated)."""
    spec = PartitionSpec(AXIS, *([None] * (leaf.ndim - 1)))
    return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))


def constrain_rows(design, num_rows: int, mesh: Mesh):
    """``design`` with every leaf of leading size ``num_rows`` (one entry per row) split over ``mesh``.

    Inside ``jax.jit`` only (a sharding constraint); other leaves are left to XLA.
    """

    def constrain(leaf):
        if getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == num_rows:
            return _constrain_leading(leaf, mesh)
        return leaf

    return jax.tree_util.tree_map(constrain, design)


def constrain_tasks(model, params, mesh: Mesh):
    """``params`` with its per-task leaves split over ``mesh`` along their first (task) axis.

    Per-task leaves are those outside ``model.population(params)`` (see
    :mod:`mtl_jax.models.protocol`; its contract puts the task axis first); population
    leaves are replicated on every device. Inside ``jax.jit`` only.
    """
    population = {id(leaf) for leaf in jax.tree_util.tree_leaves(model.population(params))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def constrain(leaf):
        if id(leaf) in population or getattr(leaf, "ndim", 0) == 0:
            return jax.lax.with_sharding_constraint(leaf, replicated)
        return _constrain_leading(leaf, mesh)

    return jax.tree_util.tree_map(constrain, params)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``) before any computation.

    Args:
        coordinator: ``host:port`` of process 0's coordinator service.
        num_processes, process_id: the number of processes and this one's index
            (``0 .. num_processes - 1``).

    With all three ``None`` nothing happens. Clusters that JAX detects by itself (SLURM,
    Open MPI, Cloud TPU) need none of them: call ``jax.distributed.initialize()`` there.

    Raises:
        ValueError: when only some are given, or ``process_id`` is out of range.
    """
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}, "
                         f"got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
