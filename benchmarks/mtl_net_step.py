r"""One training step of the hard-shared multitask net (``MTLNet``) against the same net in PyTorch.

::

    python benchmarks/mtl_net_step.py --rows 5000 50000 --tasks 30 1000 --features 20 \
        --hidden 64 32 --binary 0.5 --repeats 20 --out results/mtl_net_step.json

**What is timed.** One full-batch training step on a synthetic per-person data set: every
row of every task in the batch, forward pass, backward pass and Adam update.

* ours: the step of :func:`mtl_jax.infer.optimize.make_step` (``task_weighting="equal"``,
  ``task_sampling="all"``: the sum over tasks of each task's mean negative log-likelihood,
  plus :meth:`MTLNet.penalty`, ``jax.value_and_grad``, ``optax.adam``), jitted and
  compiled ahead of time (compile time reported apart), then called on the advancing
  training state with ``block_until_ready``;
* PyTorch: the same net written in ``torch`` (``nn.Linear`` trunk of the same widths and
  activation, per-task head deviations stacked as a ``[K, H]`` parameter plus the
  population head, gathered by task index and applied as ``(h * w[task]).sum(1)``; the
  per-task mean loss by ``index_add_``; the same L2 penalty), timed as ``zero_grad`` +
  forward + ``backward`` + ``torch.optim.Adam.step`` (same learning rate and Adam
  constants).

Both start from the same weights (ours, copied into the torch modules; the head
deviations are drawn ``N(0, 0.1^2)`` rather than left at zero so that every term has a
gradient in the check) and see the same batch. Each timing is the median of
``--repeats`` steps (the minimum is in the JSON too) after ``--warmup`` untimed ones; the
two sides take turns in rounds of consecutive steps, so that both see the same load of a
shared machine (the load average at the start and end is printed: on a busy machine the
numbers move by tens of percent between runs). On the CPU, XLA uses every core the
process may run on (its own thread pool); torch is timed with ``torch.set_num_threads``
at the same number and at 1 (``--torch-threads``), and the faster is the peer: with more
OpenMP threads than free cores torch's steps can become many times slower, which would
flatter us. With ``--device auto`` (the default) the step is also timed on a GPU when
JAX sees one (torch there when ``torch.cuda.is_available()``); both then compute float32
matrix products in full float32 (no TF32) unless ``--tf32``. Everything is float32.
Without ``torch`` installed (``pip install -e ".[bench]"``) the peer is skipped with a
message and ours is still timed.

Memory note (CPU): XLA allocates each call's temporary buffers afresh (about 55 MiB for
the 50,000-row case, ``compiled.memory_analysis().temp_size_in_bytes``); above glibc's
32 MiB mmap threshold that is a new mapping every step, whose 4 KiB pages all fault on
first touch. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment (recorded in the
output) lets such mappings use transparent huge pages, which removes most of that cost
for both sides.

**Correctness, in the same run.** From the same initial weights, one step on each side:
the objective each side returns for the step (the loss at the initial weights) and the
objective each side computes at its updated weights must agree to ``--loss-rtol``
(relative), and every updated parameter to ``--param-atol`` (absolute).

**Cases.** ``--rows``, ``--tasks`` and ``--features`` take one value per case (a single
value is used by every case); the defaults are a small case (5,000 rows, 30 tasks) and a
many-tasks case (50,000 rows, 1,000 heads), 20 features, shared layers ``--hidden 64 32``.
Rows are spread over the tasks at random (every task has at least one), stored sorted by
task as a person's rows are; ``--binary`` of the tasks have 0/1 labels
(Bernoulli-logit), the others Gaussian labels.

**Columns of the table.**

* ``case``: rows x features, tasks (K), hidden widths;
* ``device``: where both sides ran;
* ``ours ms/step``, ``torch ms/step``: median wall time of one training step (ms), torch
  at its fastest thread count;
* ``torch threads: ms``: torch's median per thread count tried;
* ``torch/ours``: the ratio of the two (above 1: ours is faster; the goal is
  ``>= 1.5``); absolute times depend on the machine, the ratio is the point;
* ``ours scan ms/step``, ``torch/ours scan``: ours run as ``--scan-steps`` steps per call
  in ``lax.scan`` (how :func:`~mtl_jax.infer.optimize.train` runs them, ``eval_every``
  steps per call: no per-step dispatch, and XLA's buffers are allocated once per call),
  per step, and torch's time over it;
* ``compile s``: our ahead-of-time compilation of the single step (once per case and device);
* ``check``: ``ok`` when the loss and the updated parameters agree, with the largest
  relative loss difference and the largest absolute parameter difference after one step.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from mtl_jax.data.personal import PersonData, PersonSchema
from mtl_jax.experiments import write_results
from mtl_jax.experiments.common import compile_and_run, cpu_threads, load_average
from mtl_jax.infer.optimize import TrainState, make_step
from mtl_jax.models.mtl_net import MTLNet

#: The goal: PyTorch's time per step over ours.
GOAL = 1.5
DTYPE = jnp.float32


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (``benchmarks/peers.py`` reads its net settings with them too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 50000], help="rows per case")
    parser.add_argument("--tasks", type=int, nargs="+", default=[30, 1000], help="tasks (heads) K per case")
    parser.add_argument("--features", type=int, nargs="+", default=[20], help="features q per case")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 32], help="shared layer widths (every case)")
    parser.add_argument("--activation", default="relu", choices=("relu", "tanh", "gelu"))
    parser.add_argument("--binary", type=float, default=0.5, help="fraction of tasks with 0/1 labels")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="Adam step size")
    parser.add_argument("--l2-shared", type=float, default=1e-4)
    parser.add_argument("--l2-task", type=float, default=1e-2)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--scan-steps", type=int, default=10,
                        help="also time ours as S steps per call in lax.scan, as train() runs them (0: not)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: the CPU, and the GPU too when JAX sees one")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=None,
                        help="torch CPU thread counts to time, the fastest is the peer (default: every core "
                             "this process may use, as XLA does, and 1)")
    parser.add_argument("--tf32", action="store_true", help="on a GPU, TF32 matrix products on both sides")
    parser.add_argument("--loss-rtol", type=float, default=1e-4)
    parser.add_argument("--param-atol", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/mtl_net_step.json"), help="output JSON file")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (``None``: ``sys.argv[1:]``), checked; exits with a usage message when they are not valid."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = [args.rows, args.tasks, args.features]
    count = max(map(len, sizes))
    if any(len(values) not in (1, count) for values in sizes):
        parser.error("--rows, --tasks and --features take one value, or one per case")
    if not 0.0 <= args.binary <= 1.0:
        parser.error("--binary is a fraction in [0, 1]")
    if args.repeats < 1 or args.warmup < 0 or args.scan_steps < 0:
        parser.error("--repeats must be positive, --warmup and --scan-steps non-negative")
    for rows, tasks, features in cases_of(args):
        if min(rows, tasks, features) < 1 or rows < tasks:
            parser.error(f"need rows >= tasks >= 1 and features >= 1, got {rows} rows, {tasks} tasks")
    if args.torch_threads is not None and min(args.torch_threads) < 1:
        parser.error("--torch-threads must be positive")
    if args.device == "gpu" and not jax_gpus():
        parser.error("JAX sees no GPU")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``), run the benchmark, write ``--out``; return the results."""
    args = parse_args(argv)
    output = measure(args)
    table = format_table(output)
    print(table)
    output["table"] = table
    write_results(output, args.out)
    return output


def cases_of(args) -> list[tuple[int, int, int]]:
    """``(rows, tasks, features)`` of each case: one per value of the longest of those flags."""
    sizes = [args.rows, args.tasks, args.features]
    return [tuple(values[i] if len(values) > 1 else values[0] for values in sizes) for i in range(max(map(len, sizes)))]


def measure(args) -> dict:
    """Check and time every case of ``args`` (from :func:`parse_args`) on each device; the results without the table."""
    torch, torch_missing = import_torch()
    threads = cpu_threads()
    torch_threads = args.torch_threads or list(dict.fromkeys([threads, 1]))
    devices = {"cpu": jax.devices("cpu")[0]}
    gpu_note = None
    if args.device in ("auto", "gpu"):
        gpus = jax_gpus()
        if gpus:
            devices["gpu"] = gpus[0]
        else:
            gpu_note = "JAX sees no GPU"
        if args.device == "gpu":
            devices.pop("cpu")

    output = {
        "config": {**vars(args), "out": str(args.out)},
        "dtype": "float32",
        "goal_torch_over_ours": GOAL,
        "environment": {
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "cpu_threads": threads,
            "torch": None if torch is None else torch.__version__,
            "torch_threads": None if torch is None else torch_threads,
            "torch_cuda": bool(torch is not None and torch.cuda.is_available()),
            "gpu": str(devices["gpu"]) if "gpu" in devices else gpu_note,
            "torch_missing": torch_missing,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "load_average_start": load_average(),
        },
        "cases": [],
    }
    for index, (rows, tasks, features) in enumerate(cases_of(args)):
        rng = np.random.default_rng([args.seed, index])
        data = synthetic_data(rng, rows, features, tasks, args.binary)
        case = {"name": f"{rows:,} x {features}, K={tasks:,}, hidden {'-'.join(map(str, args.hidden))}",
                "data": {"rows": rows, "features": features, "tasks": tasks, "hidden": list(args.hidden),
                         "binary_tasks": int(np.sum(data.task_binary))},
                "devices": {}}
        for name, device in devices.items():
            case["devices"][name] = run_case(args, data, jax.random.key(args.seed + index), name, device, torch,
                                             torch_missing, torch_threads)
        output["cases"].append(case)
    output["environment"]["load_average_end"] = load_average()
    return output


# ------------------------------------------------------------------------- setup
def import_torch():
    """``(torch, None)``, or ``(None, message)`` when it cannot be imported."""
    try:
        import torch
    except ImportError as error:
        return None, f"torch is not installed ({error}; pip install torch, or the [bench] extra)"
    return torch, None


def jax_gpus() -> list:
    """JAX's GPU devices (empty without one)."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def synthetic_data(rng: np.random.Generator, rows: int, features: int, tasks: int, binary: float) -> PersonData:
    """A per-person data set (users as tasks), float32, every row a training row with an observed label.

    Labels come from a random teacher: a shared ``tanh`` layer plus a per-task intercept
    and slope; binary tasks draw 0/1 labels from the logistic of it, Gaussian tasks add
    ``N(0, 0.5^2)`` noise.
    """
    task = np.sort(np.concatenate([np.arange(tasks), rng.integers(0, tasks, rows - tasks)])).astype(np.int32)
    X = rng.standard_normal((rows, features))
    teacher = np.tanh(X @ rng.standard_normal((features, 8)) / np.sqrt(features)) @ rng.standard_normal(8)
    eta = teacher + rng.normal(0.0, 0.5, tasks)[task] + rng.normal(0.0, 0.5, tasks)[task] * X[:, 0]
    task_binary = np.zeros(tasks, bool)
    task_binary[rng.permutation(tasks)[: int(round(binary * tasks))]] = True
    y = np.where(task_binary[task], rng.random(rows) < 1.0 / (1.0 + np.exp(-eta)), eta + rng.normal(0, 0.5, rows))
    columns = tuple(f"x{j}" for j in range(features))
    schema = PersonSchema(person="person", labels=("y",), features=columns, normalise="none", columns=columns,
                          mean=(0.0,) * features, sd=(1.0,) * features, fill=(0.0,) * features,
                          binary=(bool(task_binary.all()),), label_levels=(None,))
    return PersonData(
        X=jnp.asarray(X, DTYPE), y=jnp.asarray(y, DTYPE), weight=jnp.ones(rows, DTYPE),
        task=jnp.asarray(task), split=jnp.zeros(rows, jnp.int32), task_binary=jnp.asarray(task_binary),
        task_names=tuple(f"p{k}" for k in range(tasks)), num_labels=1, schema=schema,
    )


def initial_params(model: MTLNet, data: PersonData, key):
    """``model.init`` with the head deviations and noise scales drawn ``N(0, 0.1^2)`` (not zero)."""
    key_init, key_w, key_b, key_s = jax.random.split(key, 4)
    params = model.init(key_init, data)
    K, H = params.head_weight.shape
    return eqx.tree_at(lambda p: (p.head_weight, p.head_bias, p.log_noise_sd), params,
                       (0.1 * jax.random.normal(key_w, (K, H), DTYPE), 0.1 * jax.random.normal(key_b, (K,), DTYPE),
                        0.1 * jax.random.normal(key_s, (K,), DTYPE)))


# --------------------------------------------------------------------------- ours
class Ours:
    """Our jitted training step on one device: ``step(state) -> (state, objective)``."""

    def __init__(self, args, model: MTLNet, data: PersonData, params, device):
        optimizer = optax.adam(args.learning_rate)
        step = make_step(model, optimizer, optax.adam(args.learning_rate), weighting="equal", sampling="all",
                         alpha=1.5)
        K = data.num_tasks
        ones = jnp.ones((K,), DTYPE)
        state = TrainState(params, ones, optimizer.init((params, ones)), optax.adam(args.learning_rate).init(ones),
                           ones, jnp.asarray(0), params, jnp.asarray(jnp.inf, DTYPE), jnp.asarray(0))
        self.model = model
        self.inputs = jax.device_put(dict(key=jax.random.key(0), design=data, train_weight=jnp.ones(data.y.shape,
                                                                                                     DTYPE)), device)
        self.initial_state = jax.device_put(state, device)
        run = compile_and_run(jax.jit(step), state=self.initial_state, **self.inputs)
        self.compile_seconds = run.compile_seconds
        self.compiled = run.compiled
        self.scan_steps = args.scan_steps
        if self.scan_steps:
            def steps(state, key, design, train_weight):
                keys = jax.random.split(key, self.scan_steps)
                return jax.lax.scan(lambda s, k: step(s, k, design, train_weight), state, keys)

            self.scanned = compile_and_run(jax.jit(steps), state=self.initial_state, **self.inputs).compiled
        self.objective = jax.jit(lambda p, design, weight: jnp.sum(model.task_losses(p, design, weight))
                                 + model.penalty(p, design, weight))

    def step(self, state):
        state, value = self.compiled(state=state, **self.inputs)
        return jax.block_until_ready(state), value

    def steps(self, state):
        """``--scan-steps`` steps in one call (``lax.scan``)."""
        return jax.block_until_ready(self.scanned(state=state, **self.inputs)[0])

    def loss(self, params) -> float:
        return float(self.objective(params, self.inputs["design"], self.inputs["train_weight"]))


# ------------------------------------------------------------------------- torch
def torch_net(torch, params, activation: str, device: str):
    """The net as a ``torch.nn.Module`` holding a copy of our ``params``."""
    nn = torch.nn

    def tensor(value):
        return torch.tensor(np.array(value, dtype=np.float32), device=device)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.ModuleList()
            for layer in params.trunk:
                out_features, in_features = layer.weight.shape
                linear = nn.Linear(in_features, out_features, device=device)
                with torch.no_grad():
                    linear.weight.copy_(tensor(layer.weight))
                    linear.bias.copy_(tensor(layer.bias))
                self.trunk.append(linear)
            self.head_weight = nn.Parameter(tensor(params.head_weight))
            self.head_bias = nn.Parameter(tensor(params.head_bias))
            self.population_weight = nn.Parameter(tensor(params.population_weight))
            self.population_bias = nn.Parameter(tensor(params.population_bias))
            self.log_noise_sd = nn.Parameter(tensor(params.log_noise_sd))
            self.population_log_noise_sd = nn.Parameter(tensor(params.population_log_noise_sd))
            self.act = {"relu": torch.relu, "tanh": torch.tanh,
                        "gelu": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[activation]

        def forward(self, X, task):
            h = X
            for layer in self.trunk:
                h = self.act(layer(h))
            w = self.population_weight + self.head_weight[task]
            eta = (h * w).sum(1) + self.population_bias + self.head_bias[task]
            return eta, self.log_noise_sd[task]

    return Net()


class Torch:
    """The same training step in PyTorch on one device."""

    def __init__(self, torch, args, model: MTLNet, data: PersonData, params, device: str):
        self.torch, self.model, self.device = torch, model, device
        self.net = torch_net(torch, params, model.activation, device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=args.learning_rate)
        as_tensor = lambda value, dtype: torch.tensor(np.asarray(value), dtype=dtype, device=device)  # noqa: E731
        self.X, self.y = as_tensor(data.X, torch.float32), as_tensor(data.y, torch.float32)
        self.weight = as_tensor(data.weight, torch.float32)
        self.task = as_tensor(data.task, torch.int64)
        self.binary_row = as_tensor(np.asarray(data.task_binary)[np.asarray(data.task)], torch.bool)
        self.K = data.num_tasks

    def objective(self):
        torch, net = self.torch, self.net
        eta, log_sd = net(self.X, self.task)
        bernoulli = self.y * eta - torch.nn.functional.softplus(eta)
        gaussian = -0.5 * math.log(2.0 * math.pi) - log_sd - 0.5 * torch.square((self.y - eta) * torch.exp(-log_sd))
        nll = -self.weight * torch.where(self.binary_row, bernoulli, gaussian)
        zeros = torch.zeros(self.K, dtype=eta.dtype, device=eta.device)
        total = zeros.index_add(0, self.task, nll)
        count = zeros.index_add(0, self.task, self.weight)
        positive = count > 0
        losses = torch.where(positive, total / torch.where(positive, count, torch.ones_like(count)), zeros)
        shared = sum(torch.sum(layer.weight ** 2) for layer in net.trunk) + torch.sum(net.population_weight ** 2)
        task = torch.sum(net.head_weight ** 2) + torch.sum(net.head_bias ** 2)
        return losses.sum() + self.model.l2_shared * shared + self.model.l2_task * task

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        value = self.objective()
        value.backward()
        self.optimizer.step()
        self.synchronize()
        return value.detach()

    def synchronize(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def loss(self) -> float:
        with self.torch.no_grad():
            return float(self.objective())

    def params(self) -> dict[str, np.ndarray]:
        """Named parameters as NumPy arrays, named as :func:`our_params` names ours."""
        net = self.net
        named = {f"trunk[{i}].{part}": getattr(layer, part) for i, layer in enumerate(net.trunk)
                 for part in ("weight", "bias")}
        named.update({name: getattr(net, name) for name in ("head_weight", "head_bias", "population_weight",
                                                            "population_bias", "log_noise_sd")})
        return {name: value.detach().cpu().numpy() for name, value in named.items()}


def our_params(params) -> dict[str, np.ndarray]:
    """Our parameters by the names of :meth:`Torch.params`."""
    named = {f"trunk[{i}].{part}": getattr(layer, part) for i, layer in enumerate(params.trunk)
             for part in ("weight", "bias")}
    named.update({name: getattr(params, name) for name in ("head_weight", "head_bias", "population_weight",
                                                           "population_bias", "log_noise_sd")})
    return {name: np.asarray(value) for name, value in named.items()}


# ------------------------------------------------------------------------ timing
def time_interleaved(steps: dict, warmup: int, repeats: int, blocks: int = 5) -> dict:
    """``{name: (median, min)}`` seconds of ``repeats`` calls of each ``steps[name]()`` (each blocking).

    After ``warmup`` untimed calls of each, the entries take turns in ``blocks`` rounds of
    consecutive calls, so that every side sees the same load of a shared machine (whole
    rounds, not single calls: one side's idle threads spinning must not slow the other).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    per_block = -(-repeats // blocks)
    while min(map(len, times.values())) < repeats:
        for name, step in steps.items():
            for _ in range(min(per_block, repeats - len(times[name]))):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(values)), float(np.min(values))) for name, values in times.items()}


def run_case(args, data: PersonData, key, name: str, device, torch, torch_missing, torch_threads) -> dict:
    """Check and time both sides on one device (``name``: ``"cpu"`` or ``"gpu"``)."""
    model = MTLNet(hidden=tuple(args.hidden), activation=args.activation, l2_shared=args.l2_shared,
                   l2_task=args.l2_task)
    params = initial_params(model, data, key)
    precision = "default" if name == "cpu" or args.tf32 else "highest"
    result = {"device": str(device), "matmul_precision": precision}
    with jax.default_matmul_precision(precision) if precision != "default" else nullcontext():
        ours = Ours(args, model, data, params, device)
        start_loss = ours.loss(ours.initial_state.params)
        state, value = ours.step(ours.initial_state)
        after = {"objective": float(value), "objective_after": ours.loss(state.params),
                 "params": our_params(state.params)}
    result["ours"] = {"compile_seconds": ours.compile_seconds, "objective_start": start_loss}
    box = {"state": state}

    def our_step():
        box["state"] = ours.step(box["state"])[0]

    steps = {"ours": our_step}
    if ours.scan_steps:
        box["scan"] = state

        def our_steps():
            box["scan"] = ours.steps(box["scan"])

        steps["ours scan"] = our_steps
    torch_device = "cpu" if name == "cpu" else "cuda"
    peer = None
    if torch is None:
        result["torch"] = {"skipped": torch_missing}
    elif torch_device == "cuda" and not torch.cuda.is_available():
        result["torch"] = {"skipped": "torch sees no GPU (torch.cuda.is_available() is False)"}
    else:
        if torch_device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
            torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        peer = Torch(torch, args, model, data, params, torch_device)
        result["check"] = agreement(args, peer, after)
        for threads in torch_threads if torch_device == "cpu" else [None]:
            def torch_step(threads=threads):
                if threads is not None:
                    torch.set_num_threads(threads)
                peer.step()
            steps[f"torch {threads}"] = torch_step
    with jax.default_matmul_precision(precision) if precision != "default" else nullcontext():
        timings = time_interleaved(steps, args.warmup, args.repeats)
    result["ours"].update(seconds_per_step=timings["ours"][0], min_seconds_per_step=timings["ours"][1])
    if ours.scan_steps:
        result["ours"]["scan"] = {"steps_per_call": ours.scan_steps,
                                  "seconds_per_step": timings.pop("ours scan")[0] / ours.scan_steps}
    if peer is not None:
        runs = [{"threads": None if key == "torch None" else int(key.split()[1]), "seconds_per_step": median,
                 "min_seconds_per_step": least} for key, (median, least) in timings.items() if key != "ours"]
        best = min(runs, key=lambda run: run["seconds_per_step"])
        ratio = best["seconds_per_step"] / result["ours"]["seconds_per_step"]
        result["torch"] = {**best, "by_threads": runs, "over_ours_time": ratio, "meets_goal": ratio >= GOAL}
        if ours.scan_steps:
            scan = result["ours"]["scan"]["seconds_per_step"]
            result["torch"]["over_ours_scan_time"] = best["seconds_per_step"] / scan
    return result


def agreement(args, peer: Torch, after: dict) -> dict:
    """One torch step from the shared start against ours (``after``): losses and updated parameters."""
    value = float(peer.step())
    theirs = peer.params()
    loss_after = peer.loss()
    check = {
        "objective_ours": after["objective"], "objective_torch": value,
        "objective_after_ours": after["objective_after"], "objective_after_torch": loss_after,
        "loss_relative_difference": abs(value - after["objective"]) / max(abs(value), 1e-30),
        "loss_after_relative_difference": abs(loss_after - after["objective_after"]) / max(abs(loss_after), 1e-30),
        "param_abs_difference": {k: float(np.max(np.abs(theirs[k] - v))) for k, v in after["params"].items()},
    }
    check["max_abs_param_difference"] = max(check["param_abs_difference"].values())
    check["loss_agrees"] = bool(max(check["loss_relative_difference"], check["loss_after_relative_difference"])
                                <= args.loss_rtol)
    check["params_agree"] = bool(check["max_abs_param_difference"] <= args.param_atol)
    check["agree"] = check["loss_agrees"] and check["params_agree"]
    return check


# ------------------------------------------------------------------------- table
def format_table(output: dict) -> str:
    """The measurements as a text table: ms per step on both sides, their ratio and the agreement check."""
    rows = []
    for case in output["cases"]:
        for device, result in case["devices"].items():
            peer = result["torch"]
            row = {"torch threads: ms": "", "case": case["name"], "device": device,
                   "ours ms/step": f"{1e3 * result['ours']['seconds_per_step']:.3f}",
                   "compile s": f"{result['ours']['compile_seconds']:.2f}", "ours scan ms/step": "",
                   "torch/ours scan": ""}
            if "scan" in result["ours"]:
                row["ours scan ms/step"] = f"{1e3 * result['ours']['scan']['seconds_per_step']:.3f}"
            if "skipped" in peer:
                row.update({"torch ms/step": "", "torch/ours": "", "check": f"torch skipped: {peer['skipped']}"})
            else:
                check = result["check"]
                ratio = peer["over_ours_time"]
                loss = max(check["loss_relative_difference"], check["loss_after_relative_difference"])
                row.update({
                    "torch ms/step": f"{1e3 * peer['seconds_per_step']:.3f}",
                    "torch threads: ms": ", ".join(
                        f"{run['threads']}: {1e3 * run['seconds_per_step']:.3g}" for run in peer["by_threads"]
                    ) if device == "cpu" else "",
                    "torch/ours": f"{ratio:.2f}" + ("" if ratio >= GOAL else " (< goal)"),
                    "torch/ours scan": f"{peer['over_ours_scan_time']:.2f}" if "over_ours_scan_time" in peer else "",
                    "check": ("ok" if check["agree"] else "FAILED")
                    + f" (loss rel {loss:.1e}, max |dparam| {check['max_abs_param_difference']:.1e})",
                })
            rows.append(row)
    env, config = output["environment"], output["config"]
    header = (f"one full-batch Adam step of MTLNet ({config['activation']}, {config['binary']:g} of tasks binary), "
              f"float32, median of {config['repeats']} (in alternating rounds); {env['cpu_threads']} CPU cores; torch: "
              f"{'fastest of ' + str(env['torch_threads']) + ' threads' if env['torch'] else 'absent'}; "
              f"goal torch/ours >= {GOAL:g}\nload average (1 min) {_load(env, 'start')} at start, "
              f"{_load(env, 'end')} at end; GLIBC_TUNABLES={env['glibc_tunables'] or 'unset'}")
    if env.get("gpu") and "gpu" not in output["cases"][0]["devices"]:
        header += f"; GPU: {env['gpu']}"
    columns = ["case", "device", "ours ms/step", "torch ms/step", "torch threads: ms", "torch/ours",
               "ours scan ms/step", "torch/ours scan", "compile s", "check"]
    return header + "\n" + pd.DataFrame(rows, columns=columns).to_string(index=False)


def _load(env: dict, when: str) -> str:
    value = env.get(f"load_average_{when}")
    return "?" if not value else f"{value[0]:.2f}"


if __name__ == "__main__":
    main()
