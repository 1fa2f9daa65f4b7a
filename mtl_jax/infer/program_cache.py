r"""Traced programs kept on disk, so that a repeated command neither traces nor lowers.

JAX's persistent compilation cache (:func:`mtl_jax.infer.compile_clock.enable_persistent_cache`)
skips XLA's compilation of a program it has seen, but a new process still traces the Python
function to a jaxpr and lowers it to StableHLO before it can look the program up: for the EM
fit of a 200-row linear mixed model with its standard errors that is ~8 s of a ~10 s repeated
``mtl-jax fit``. :func:`cached_program` is ``jax.jit`` plus a store of the lowered programs
(:mod:`jax.export`): the first call with given static arguments and argument shapes exports
the program to ``<directory>/<key>.hlo`` (serialized StableHLO) and ``<key>.json`` (the
output's pytree structure); later calls, in this process or another, deserialize it and run
it through ``jax.jit(exported.call)``, whose compilation the persistent cache then serves.

The store is off until :func:`enable` is called (the command line does, through
``enable_persistent_cache``); off, a :func:`cached_program` is exactly its ``jax.jit``. On,
every call of one signature runs the exported program, the first included, so a fit gives
the same numbers whether its program was traced or read.

**Key.** SHA-256 over the function's module and name, its static arguments and the input's
pytree structure (their pickled bytes: written for hashing only, never read back), every
input's shape, dtype and weak type, the backend, the JAX settings that change tracing
(``jax_enable_x64``, matmul precision, dtype and rank promotion, PRNG implementation), and a
fingerprint of the code that is traced: the source of every module of this package (and of
the module defining the function) and the versions of JAX, jaxlib, NumPyro, optax and Equinox. Editing the package or upgrading one of
them misses the store instead of serving a stale program.

**Compiler options.** A static argument that carries ``compiler_options`` (a model class
attribute, e.g. :attr:`mtl_jax.models.mixture_glmm.MixtureGLMM.compiler_options`) compiles
the program with those XLA options (``jax.jit(..., compiler_options=...)``), where this XLA
accepts them (:func:`compiler_options`); the others compile with XLA's defaults.

**Falls back to** ``jax.jit`` (for that signature, this process) when the static arguments
cannot be pickled, the output holds a pytree node other than tuples, lists, dicts, ``None``
and named tuples of this package, the call is inside a trace, or export fails (a host
callback, a multi-device sharding). Nothing is read but the files this module wrote: the
HLO through :func:`jax.export.deserialize`, the structure as JSON.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import pickle
import sys
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import jax

_PACKAGE = "mtl_jax"
_TRACING_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
                     "jax_numpy_dtype_promotion", "jax_default_prng_impl")
_VERSIONED = ("jax", "jaxlib", "numpyro", "optax", "equinox")

_state: dict[str, Any] = {"directory": None, "fingerprint": None}
_programs: "weakref.WeakSet[CachedProgram]" = weakref.WeakSet()


def enable(directory: str | os.PathLike) -> Path:
    """Keep exported programs in ``directory`` (created) from now on; returns it."""
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    _state["directory"] = path
    forget()
    return path


def disable() -> None:
    """Stop reading and writing the store: every :func:`cached_program` is its ``jax.jit`` again."""
    _state["directory"] = None
    forget()


def forget() -> None:
    """Drop the programs this process has read or exported, as a new process starts without them."""
    for program in list(_programs):
        program._served.clear()  # noqa: SLF001 - this module's own state


def directory() -> Path | None:
    """The store's directory, or ``None`` when it is off."""
    return _state["directory"]


def code_fingerprint() -> str:
    """SHA-256 of this package's sources and the versions of the libraries it traces."""
    if _state["fingerprint"] is None:
        digest = hashlib.sha256(sys.version.encode())
        for name in _VERSIONED:
            try:
                digest.update(f"{name}={importlib.metadata.version(name)}".encode())
            except importlib.metadata.PackageNotFoundError:
                digest.update(f"{name}=absent".encode())
        root = Path(__file__).resolve().parents[1]
        for source in sorted(root.rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode())
            digest.update(source.read_bytes())
        _state["fingerprint"] = digest.hexdigest()
    return _state["fingerprint"]


def encode_structure(treedef) -> Any:
    """JSON form of a pytree structure, or raise ``TypeError`` for a node it cannot name."""
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return "*"
    kind, aux = treedef.node_data()
    children = [encode_structure(child) for child in treedef.children()]
    if kind is type(None):
        return None
    if kind in (tuple, list):
        return {kind.__name__: children}
    if kind is dict:
        if not all(isinstance(key, str) for key in aux):
            raise TypeError("dict keys other than strings")
        return {"dict": dict(zip(aux, children))}
    if issubclass(kind, tuple) and hasattr(kind, "_fields") and kind.__module__.split(".")[0] == _PACKAGE:
        return {"namedtuple": f"{kind.__module__}:{kind.__qualname__}", "children": children}
    raise TypeError(f"pytree node {kind!r}")


def decode_structure(encoded: Any):
    """The pytree structure that :func:`encode_structure` wrote."""

    def build(node):
        if node == "*":
            return 0
        if node is None:
            return None
        if "namedtuple" in node:
            module, name = node["namedtuple"].split(":")
            if module.split(".")[0] != _PACKAGE:
                raise TypeError(f"not a class of {_PACKAGE}: {node['namedtuple']}")
            kind = functools.reduce(getattr, name.split("."), importlib.import_module(module))
            return kind(*map(build, node["children"]))
        if "dict" in node:
            return {key: build(child) for key, child in node["dict"].items()}
        (kind, children), = node.items()
        return {"tuple": tuple, "list": list}[kind](map(build, children))

    return jax.tree_util.tree_structure(build(encoded))


class CachedProgram:
    """``jax.jit(fun, static_argnames=...)``, served from the store when it is on (module docstring).

    Attribute access other than calling and lowering (``trace``, ...) goes to the ``jax.jit``
    function without compiler options. As a method (decorating a function in a class body)
    the instance is the first argument, and must be static like any other non-array argument.
    """

    def __init__(self, fun: Callable, static_argnames: tuple[str, ...]):
        self._by_options = {(): jax.jit(fun, static_argnames=static_argnames)}
        self.jitted = self._by_options[()]
        self._fun = fun
        self._static_argnames = static_argnames
        self._names = tuple(inspect.signature(fun).parameters)
        self._served: dict[Any, Any] = {}
        self._source = hashlib.sha256(Path(inspect.getsourcefile(fun)).read_bytes()).hexdigest()
        functools.update_wrapper(self, fun)
        _programs.add(self)

    def __get__(self, instance, owner=None):
        return self if instance is None else functools.partial(self, instance)

    def __getattr__(self, name: str):
        if name == "jitted":  # not yet set (while constructing)
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def _cache_size(self) -> int:
        """Programs compiled for this function: by ``jax.jit`` plus those served from the store."""
        return (sum(jitted._cache_size() for jitted in self._by_options.values())
                + sum(call is not None for call in self._served.values()))

    def _bind(self, args, kwargs) -> dict:
        bound = dict(zip(self._names, args))
        bound.update(kwargs)
        return bound

    def _options(self, bound: dict) -> dict[str, str]:
        """The compiler options of the first static argument that carries any (module docstring)."""
        for name in self._static_argnames:
            options = getattr(bound.get(name), "compiler_options", None)
            if options:
                return compiler_options(options)
        return {}

    def _jitted_for(self, bound: dict):
        """``jax.jit`` of the function with the compiler options these arguments ask for.

        Inside another trace the plain ``jax.jit``: a nested program is compiled with the
        enclosing one, under its options (JAX refuses options on a nested ``jax.jit``)."""
        if not _top_level():
            return self.jitted
        options = self._options(bound)
        key = tuple(sorted(options.items()))
        if key not in self._by_options:
            self._by_options[key] = jax.jit(self._fun, static_argnames=self._static_argnames, compiler_options=options)
        return self._by_options[key]

    def __call__(self, *args, **kwargs):
        bound = self._bind(args, kwargs)
        served = self._serve(bound)
        if served is None:
            return self._jitted_for(bound)(*args, **kwargs)
        (call, out_tree), leaves, _ = served
        return jax.tree_util.tree_unflatten(out_tree, call(*leaves))

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower`` of the program for these arguments (with their compiler options)."""
        return self._jitted_for(self._bind(args, kwargs)).lower(*args, **kwargs)

    def compile(self, *args, **kwargs) -> Callable:
        """Ahead of time: the program for these arguments, compiled; call it with the
        non-static arguments by keyword (as ``jax.jit(...).lower(...).compile()``)."""
        bound = self._bind(args, kwargs)
        served = self._serve(bound)
        if served is None:
            return self._jitted_for(bound).lower(*args, **kwargs).compile()
        (call, out_tree), leaves, in_tree = served
        compiled = call.lower(*leaves).compile()

        def run(**dynamic):
            given, structure = jax.tree_util.tree_flatten(dynamic)
            if structure != in_tree:
                raise TypeError(f"{self.__name__} was compiled for the arguments {in_tree}, not {structure}")
            return jax.tree_util.tree_unflatten(out_tree, compiled(*given))

        return run

    def _serve(self, bound: dict):
        """``((jax.jit(exported.call), output structure), input leaves, their structure)`` from the
        store, or ``None``: plain jit."""
        if _state["directory"] is None:
            return None
        static = tuple(sorted((name, value) for name, value in bound.items() if name in self._static_argnames))
        dynamic = {name: value for name, value in bound.items() if name not in self._static_argnames}
        leaves, in_tree = jax.tree_util.tree_flatten(dynamic)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return None
        avals = tuple(jax.typeof(leaf) for leaf in leaves)
        signature = (static, in_tree, avals)
        if signature not in self._served:
            self._served[signature] = self._load_or_export(static, in_tree, leaves, avals, self._options(bound))
        served = self._served[signature]
        return None if served is None else (served, leaves, in_tree)

    def _key(self, static, in_tree, avals) -> str | None:
        if any(isinstance(value, jax.sharding.Mesh) and value.size > 1 for _, value in static):
            return None  # a program over several devices
        settings = tuple(getattr(jax.config, name) for name in _TRACING_SETTINGS)
        try:
            described = pickle.dumps((self._fun.__module__, self._fun.__qualname__, static, in_tree,
                                      [(a.shape, str(a.dtype), a.weak_type) for a in avals],
                                      jax.default_backend(), settings))
        except (pickle.PicklingError, TypeError, AttributeError):
            return None
        return hashlib.sha256((code_fingerprint() + self._source).encode() + described).hexdigest()

    def _load_or_export(self, static, in_tree, leaves, avals, options: dict[str, str]):
        """``(jax.jit(exported.call), output structure)`` from the store or a new export; ``None``: plain jit."""
        key = self._key(static, in_tree, avals)
        if key is None:
            return None
        store = _state["directory"]
        hlo, structure = store / f"{key}.hlo", store / f"{key}.json"
        if hlo.exists() and structure.exists():
            try:
                exported = jax.export.deserialize(bytearray(hlo.read_bytes()))
                return (jax.jit(exported.call, compiler_options=options),
                        decode_structure(json.loads(structure.read_text())))
            except Exception:  # noqa: BLE001 - a damaged or foreign entry is re-exported below
                pass
        static_values = dict(static)
        out_trees = []

        def flat(*flat_leaves):
            out = self._fun(**jax.tree_util.tree_unflatten(in_tree, flat_leaves), **static_values)
            out_leaves, out_tree = jax.tree_util.tree_flatten(out)
            out_trees.append(out_tree)
            return out_leaves

        try:
            exported = jax.export.export(jax.jit(flat))(*leaves)
            encoded = encode_structure(out_trees[0])
            blob = exported.serialize()
        except Exception:  # noqa: BLE001 - not exportable: this signature runs on plain jax.jit
            return None
        try:  # the .json last: an entry is complete once both exist
            _write_atomically(hlo, bytes(blob))
            _write_atomically(structure, json.dumps(encoded).encode())
        except OSError as error:  # a full or read-only disk costs the next process a trace, not this fit
            warnings.warn(f"could not store the traced program {self.__name__} in {store}: {error}", stacklevel=3)
        return jax.jit(exported.call, compiler_options=options), out_trees[0]


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (concurrent writers are safe)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
        raise


def _top_level() -> bool:
    """Whether no trace is under way (a call now runs a program rather than adding to one)."""
    from jax._src import core  # no public equivalent of this check

    return core.trace_state_clean()


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0.0).compile()
    except Exception:  # noqa: BLE001 - XLA rejects an option it does not know (another version)
        return False
    return True


def compiler_options(options: dict[str, str]) -> dict[str, str]:
    """``options`` where this XLA accepts them all, else ``{}`` (XLA's defaults; checked once per set).

    For ``jax.jit(..., compiler_options=...)`` of a program that should compile as a
    model's :func:`cached_program` programs do (benchmarks timing a model's step)."""
    key = tuple(sorted(options.items()))
    return dict(key) if key and _accepted(key) else {}


def cached_program(fun: Callable | None = None, *, static_argnames: tuple[str, ...] | str = ()):
    """Decorator: :class:`CachedProgram` of ``fun`` (``jax.jit`` with the store; module docstring).

    Static arguments are named (``static_argnames``); for a method, include ``"self"``.
    """
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    if fun is None:
        return functools.partial(cached_program, static_argnames=names)
    return CachedProgram(fun, names)
