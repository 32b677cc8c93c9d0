"""The harness shared by every task: the command line, the methods under comparison,
the solves, sharding over devices, the training loop, and the files each run writes.

A task module builds its data and model as a `Run`; `run_grid` trains one per (width,
method, task option, seed) with `train`, and `write_outputs` writes the rows.
"""

import argparse
import collections
import dataclasses
import functools as ft
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import gqdiffrax


class UsageError(Exception):
    """Bad command-line input. `python -m gqdiffrax.experiments` reports it as one line
    and exits with status 2, without a traceback."""


#
# Methods
#


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    label: str
    kind: str  # "ode": adaptive Dopri5 on an ODE; "sde": fixed steps on an SDE.
    color: str
    help: str


METHODS = {
    "direct": MethodInfo(
        "Direct",
        "ode",
        "tab:green",
        "backpropagate through the solver (diffrax.RecursiveCheckpointAdjoint)",
    ),
    "adjoint": MethodInfo(
        "Adjoint", "ode", "tab:pink", "continuous adjoint (diffrax.BacksolveAdjoint)"
    ),
    "seminorm": MethodInfo(
        "Seminorm",
        "ode",
        "tab:orange",
        "BacksolveAdjoint whose backward step "
        "control uses diffrax.adjoint_rms_seminorm",
    ),
    "gq": MethodInfo(
        "GQ",
        "ode",
        "tab:blue",
        "gqdiffrax.GQAdjoint: adjoint of [z, a_z], "
        "Gauss-Legendre quadrature for the parameters",
    ),
    "sde-direct": MethodInfo(
        "SDE Direct",
        "sde",
        "tab:green",
        "backpropagate through ReversibleHeun (RecursiveCheckpointAdjoint)",
    ),
    "sde-adjoint": MethodInfo(
        "SDE Adjoint", "sde", "tab:pink", "BacksolveAdjoint on the SDE, ReversibleHeun"
    ),
    "reversible": MethodInfo(
        "Reversible EES25",
        "sde",
        "tab:purple",
        "gqdiffrax.ReversibleAdjoint with gqdiffrax.EES25",
    ),
    "reversible-heun": MethodInfo(
        "Reversible Heun",
        "sde",
        "tab:brown",
        "gqdiffrax.ReversibleAdjoint with diffrax.ReversibleHeun",
    ),
}
ODE_METHODS = tuple(m for m, info in METHODS.items() if info.kind == "ode")


def require(*names: str, task: str) -> None:
    """Fail with one line when a task needs a part of gqdiffrax this install lacks."""
    missing = [name for name in names if not hasattr(gqdiffrax, name)]
    if missing:
        raise UsageError(
            f"task {task!r} needs gqdiffrax.{', gqdiffrax.'.join(missing)}, which this "
            "install of gqdiffrax does not provide yet"
        )


@dataclasses.dataclass(frozen=True)
class Solve:
    """How a model solves its differential equation and how it is differentiated.

    Hashable, so that it can be closed over by jitted functions. `count` tags every
    evaluation of the vector field (or drift) for `count_nfe`; it is `None` in the
    timed training step.
    """

    method: str
    rtol: float = 1e-3
    atol: float = 1e-3
    C: float = 0.1
    dt: float = 0.01
    max_steps: int = 4096
    count: str | None = None


def adjoint_for(solve: Solve) -> dfx.AbstractAdjoint:
    match solve.method:
        case "direct" | "sde-direct":
            return dfx.RecursiveCheckpointAdjoint()
        case "adjoint" | "sde-adjoint":
            return dfx.BacksolveAdjoint()
        case "seminorm":
            controller = dfx.PIDController(
                rtol=solve.rtol, atol=solve.atol, norm=dfx.adjoint_rms_seminorm
            )
            return dfx.BacksolveAdjoint(stepsize_controller=controller)
        case "gq":
            return gqdiffrax.GQAdjoint(C=solve.C)
        case "reversible" | "reversible-heun":
            return gqdiffrax.ReversibleAdjoint()
    raise ValueError(f"unknown method {solve.method!r}")


_COUNTS: collections.Counter = collections.Counter()


def _tick(tag: str, t) -> None:
    del t
    _COUNTS[tag] += 1


class Counted(eqx.Module):
    """A vector field that counts its evaluations on the host.

    The time is passed to the callback so that under `jax.vmap` (GQ's quadrature
    evaluates the vector field at a batch of nodes) every batch element is counted.
    """

    fn: Callable
    tag: str = eqx.field(static=True)

    def __call__(self, t, y, args):
        jax.debug.callback(ft.partial(_tick, self.tag), t)
        return self.fn(t, y, args)


def counted(fn: Callable, solve: Solve) -> Callable:
    return fn if solve.count is None else Counted(fn, solve.count)


def ode_solve(solve: Solve, vf: Callable, t0, t1, y0, *, ts=None, args=None):
    """Dormand–Prince 5(4) with PID step control, differentiated by `solve.method`."""
    saveat = dfx.SaveAt(t1=True) if ts is None else dfx.SaveAt(ts=ts)
    return dfx.diffeqsolve(
        dfx.ODETerm(counted(vf, solve)),
        dfx.Dopri5(),
        t0,
        t1,
        None,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=solve.rtol, atol=solve.atol),
        adjoint=adjoint_for(solve),
        max_steps=solve.max_steps,
    )


#
# Models shared by several tasks
#


class MLPField(eqx.Module):
    r"""An MLP vector field on a batch of states, $f(t, z) = \mathrm{MLP}([z, t])$ (or
    $\mathrm{MLP}(z)$), two hidden layers of `width` with softplus activations."""

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(self, in_size, out_size, width, *, time_dependent, key):
        self.time_dependent = time_dependent
        self.mlp = eqx.nn.MLP(
            in_size + time_dependent,
            out_size,
            width,
            depth=2,
            activation=jax.nn.softplus,
            key=key,
        )

    def __call__(self, t, y, args):
        del args
        if self.time_dependent:
            t = jnp.broadcast_to(jnp.asarray(t, y.dtype), y.shape[:-1] + (1,))
            y = jnp.concatenate([y, t], axis=-1)
        return jax.vmap(self.mlp)(y)


class AugmentedODE(eqx.Module):
    """Augmented neural ODE: pad the input with zeros, flow it over [0, 1], and read
    out either a linear layer of the final state (`head`) or its first coordinate."""

    field: MLPField
    head: eqx.nn.Linear | None
    augment: int = eqx.field(static=True)

    def __init__(self, data_dim, augment, width, *, out_size, time_dependent, key):
        fkey, hkey = jr.split(key)
        dim = data_dim + augment
        self.field = MLPField(dim, dim, width, time_dependent=time_dependent, key=fkey)
        self.head = None if out_size is None else eqx.nn.Linear(dim, out_size, key=hkey)
        self.augment = augment

    def __call__(self, x, solve: Solve):
        z0 = jnp.concatenate(
            [x, jnp.zeros(x.shape[:-1] + (self.augment,), x.dtype)], -1
        )
        z1 = ode_solve(solve, self.field, 0.0, 1.0, z0).ys[-1]
        return z1[..., :1] if self.head is None else jax.vmap(self.head)(z1)


def lr_from_table(table: dict[int, float], width: int) -> float:
    """The paper's learning rate for the largest tabulated width not above `width`."""
    below = [w for w in sorted(table) if w <= width]
    return table[below[-1] if below else min(table)]


#
# Devices
#


class Devices:
    """A one-axis mesh over the first `n` devices: the batch axis is split over it, the
    parameters are replicated. After `jax.distributed.initialize()` (`--distributed`),
    `jax.devices()` lists the devices of every host and the same code runs across hosts:
    each host generates the same data from the seed and places only its own shards."""

    def __init__(self, n: int):
        devices = jax.devices()
        if not 1 <= n <= len(devices):
            raise UsageError(
                f"--devices must be between 1 and {len(devices)} (the devices jax sees "
                f"here: {devices[0].platform}); got {n}"
            )
        if jax.process_count() > 1 and n != len(devices):
            raise UsageError(
                f"with --distributed, use every device of every host: --devices "
                f"{len(devices)}"
            )
        self.n = n
        self.mesh = Mesh(np.array(devices[:n]), ("batch",))
        self.split = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def check_batch(self, size: int, what: str) -> None:
        if size % self.n:
            raise UsageError(
                f"the {what} ({size}) must be divisible by --devices ({self.n}); "
                "choose --batch-size or --devices accordingly"
            )

    def batch(self, tree):
        """Place numpy arrays with a leading batch axis, split over the devices."""

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.split, lambda i: x[i])

        return jtu.tree_map(put, tree)

    def replicate(self, tree):
        return place(tree, self.replicated)


def place(tree, sharding):
    """`jax.device_put` for the arrays of a PyTree, leaving everything else alone."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, sharding), static)


def is_main_process() -> bool:
    return jax.process_index() == 0


def fetch(x) -> np.ndarray:
    """A replicated array as numpy, also when it spans several hosts."""
    return np.asarray(x.addressable_data(0))


def local(tree):
    """The local copy of a replicated PyTree, on one device of this host."""
    return jtu.tree_map(lambda x: x.addressable_data(0) if eqx.is_array(x) else x, tree)


#
# Training
#


@dataclasses.dataclass(frozen=True)
class Data:
    """`samples`: arrays with a leading sample axis, batched and split over devices.
    `shared`: arrays every batch sees whole (e.g. observation times), replicated."""

    samples: tuple
    shared: tuple = ()

    def __len__(self):
        return len(self.samples[0])


@dataclasses.dataclass
class Run:
    """One training run, as a task hands it to `train`.

    - `loss(model, state, samples, shared, key, solve) -> (loss, state)`: the mean
        training loss of a batch; `state` is the model's mutable state (BatchNorm
        statistics) or `None`.
    - `evaluate(model, state, samples, weights, shared, key, solve) -> dict`: sums over
        the batch of per-sample values weighted by `weights` (zero on padding), with
        keys `"loss"` and `"metric"`.
    - `eval_batch`: evaluate the test set in chunks of this many samples (default: all
        at once).
    """

    model: eqx.Module
    loss: Callable
    evaluate: Callable
    train: Data
    test: Data
    batch_size: int
    lr: float
    state: Any = None
    eval_batch: int | None = None


def _eval_chunks(data: Data, size: int):
    """Chunks of the data of one fixed size (the last padded by repeating samples,
    with weight zero), so that evaluation compiles once."""
    n = len(data)
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        weights = (idx < n).astype(np.float32)
        yield tuple(x[idx % n] for x in data.samples), weights


def _timed_compile(fn, *args):
    """Compile `fn` for `args` and run it once, discarding the result: the first
    execution of an XLA program pays one-time costs that are not training."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - start


def count_nfe(loss: Callable, solve: Solve, params, *args) -> tuple[int, int]:
    """Vector-field evaluations of one forward pass and of one backward pass of the
    scalar `loss(params, *args, solve)`, counted by `Counted`.

    The backward count is what the gradient evaluates beyond its forward pass: for
    `direct`, recomputation from checkpoints; for the adjoints, the backward solve (each
    evaluation inside a VJP); for `gq` also one per quadrature node. Compiled
    separately from the timed step."""
    fwd = dataclasses.replace(solve, count="forward")
    grad = dataclasses.replace(solve, count="gradient")

    @eqx.filter_jit
    def both(params, *args):
        value = loss(params, *args, fwd)
        return value, eqx.filter_grad(lambda p: loss(p, *args, grad))(params)

    _COUNTS.clear()
    jax.block_until_ready(both(params, *args))
    jax.effects_barrier()
    forward, total = _COUNTS["forward"], _COUNTS["gradient"]
    return forward, total - forward


def sharded_loss_and_grad(run: Run, solve: Solve, devices: Devices) -> Callable:
    """`(model, state, samples, shared, key) -> ((loss, state), grads)` of the training
    step, with the batch split over `devices` and everything else replicated."""

    def loss_and_grad(model, state, samples, shared, key):
        samples = eqx.filter_shard(samples, devices.split)
        return eqx.filter_value_and_grad(run.loss, has_aux=True)(
            model, state, samples, shared, key, solve
        )

    return loss_and_grad


def train(
    run: Run,
    *,
    solve: Solve,
    devices: Devices,
    epochs: int,
    seed: int,
    desc: str,
    eval_solve: Solve | None = None,
    count: bool = True,
) -> dict:
    """Train with Adam, jit-compiled and sharded; return times, metrics, NFE (if
    `count`) and the loss curve.

    `train_s` is the wall-clock time of the training steps alone: it excludes
    compilation, the first (warm-up) execution of the compiled step, whose result is
    discarded, and the test evaluation after each epoch. `compile_s` is tracing, XLA
    compilation and that warm-up execution."""
    eval_solve = solve if eval_solve is None else eval_solve
    devices.check_batch(run.batch_size, "batch size")
    num_batches = len(run.train) // run.batch_size
    if num_batches == 0:
        raise UsageError(
            f"--batch-size {run.batch_size} is larger than the training set "
            f"({len(run.train)} samples)"
        )
    eval_batch = min(run.eval_batch or len(run.test), len(run.test))
    eval_batch = -(-eval_batch // devices.n) * devices.n
    optimizer = optax.adam(run.lr)
    split, replicated = devices.split, devices.replicated

    loss_and_grad = sharded_loss_and_grad(run, solve, devices)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, state, opt_state, samples, shared, key):
        (loss, state), grads = loss_and_grad(model, state, samples, shared, key)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        out = eqx.filter_shard((model, state, opt_state), replicated)
        return out + (loss,)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def evaluate(model, state, samples, weights, shared, key):
        samples, weights = eqx.filter_shard((samples, weights), split)
        return run.evaluate(model, state, samples, weights, shared, key, eval_solve)

    key = jr.key(seed)
    model, state = devices.replicate((run.model, run.state))
    opt_state = devices.replicate(
        optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    )
    shared_train = devices.replicate(jtu.tree_map(jnp.asarray, run.train.shared))
    shared_test = devices.replicate(jtu.tree_map(jnp.asarray, run.test.shared))
    rng = np.random.default_rng(seed)

    def batch(i, order):
        idx = order[i * run.batch_size : (i + 1) * run.batch_size]
        return devices.batch(tuple(x[idx] for x in run.train.samples))

    def test_eval(model, state):
        totals = collections.Counter()
        for i, (samples, weights) in enumerate(_eval_chunks(run.test, eval_batch)):
            ekey = devices.replicate(jr.fold_in(jr.fold_in(key, 1), i))
            out = eval_step(
                model, state, *devices.batch((samples, weights)), shared_test, ekey
            )
            totals.update({k: float(fetch(v)) for k, v in out.items()})
        return {k: totals[k] / float(len(run.test)) for k in ("loss", "metric")}

    first = batch(0, np.arange(len(run.train)))
    step_key = devices.replicate(jr.fold_in(key, 0))
    train_step, compile_s = _timed_compile(
        step, model, state, opt_state, first, shared_train, step_key
    )
    samples0, weights0 = next(_eval_chunks(run.test, eval_batch))
    eval_step, _ = _timed_compile(
        evaluate,
        model,
        state,
        *devices.batch((samples0, weights0)),
        shared_test,
        step_key,
    )
    curve, train_s = [], 0.0
    progress = _progress(range(epochs), desc)
    for epoch in progress:
        order = rng.permutation(len(run.train))
        keys = devices.replicate(jr.split(jr.fold_in(key, 2 + epoch), num_batches))
        start = time.perf_counter()
        losses = []
        for i in range(num_batches):
            model, state, opt_state, loss = train_step(
                model, state, opt_state, batch(i, order), shared_train, keys[i]
            )
            losses.append(loss)
        jax.block_until_ready((model, losses))
        train_s += time.perf_counter() - start
        test = test_eval(model, state)
        train_loss = float(np.mean([fetch(x) for x in losses]))
        curve.append(
            dict(
                epoch=epoch + 1,
                wall_s=train_s,
                train_loss=train_loss,
                test_loss=test["loss"],
                test_metric=test["metric"],
            )
        )
        progress.set_postfix(loss=f"{train_loss:.4g}", test=f"{test['metric']:.4g}")
    progress.close()
    nfe_forward = nfe_backward = None
    if count:
        # Counted on one device of this host, for one host callback per evaluation.
        nfe_forward, nfe_backward = count_nfe(
            lambda *a: run.loss(*a)[0],
            solve,
            *local((model, state)),
            tuple(jnp.asarray(x[: run.batch_size]) for x in run.train.samples),
            local(shared_train),
            jr.fold_in(key, 0),
        )
    return dict(
        train_s=train_s,
        s_per_epoch=train_s / epochs,
        compile_s=compile_s,
        final_test_loss=curve[-1]["test_loss"],
        final_metric=curve[-1]["test_metric"],
        nfe_forward=nfe_forward,
        nfe_backward=nfe_backward,
        curve=curve,
    )


def _progress(iterable, desc):
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        desc=desc,
        unit="epoch",
        leave=True,
        dynamic_ncols=True,
        disable=not is_main_process(),
    )


#
# Command line
#


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


SIZES = ("smoke", "default", "full")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(
    task: str,
    description: str,
    presets: dict[str, dict[str, Any]],
    argv: Sequence[str] | None,
    *,
    methods: Sequence[str],
    training: bool = True,
    gq_constant: bool = True,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse a task's command line. Options left out take the values of the preset of
    the chosen size (`presets["smoke" | "default" | "full"]`)."""
    default = presets["default"]
    parser = _Parser(
        prog=f"python -m gqdiffrax.experiments {task}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n"
        + "\n".join(f"  {m:<16} {METHODS[m].help}" for m in methods),
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"any of: {', '.join(methods)}",
    )
    if training:
        parser.add_argument(
            "--widths",
            nargs="+",
            type=positive_int,
            metavar="W",
            help="hidden widths",
        )
        parser.add_argument(
            "--seeds",
            type=positive_int,
            metavar="N",
            help="run seeds 0..N-1",
        )
        parser.add_argument(
            "--epochs",
            type=positive_int,
            metavar="N",
            help="training epochs",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            metavar="B",
            help="training batch size",
        )
        parser.add_argument(
            "--lr",
            type=positive_float,
            help="learning rate (default: the paper's, by width)",
        )
        parser.add_argument(
            "--devices",
            type=positive_int,
            default=1,
            metavar="N",
            help="split each batch over the first N devices (default: 1)",
        )
        parser.add_argument(
            "--distributed",
            action="store_true",
            help="call jax.distributed.initialize() first, to run over several hosts",
        )
        parser.add_argument(
            "--no-nfe",
            dest="nfe",
            action="store_false",
            help="skip counting vector-field evaluations (saves one compilation per "
            "run)",
        )
    if gq_constant:
        parser.add_argument(
            "--C",
            type=positive_float,
            default=0.1,
            help="GQAdjoint's constant C (default: 0.1)",
        )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--smoke", action="store_true", help="a run of seconds, for tests"
    )
    size.add_argument("--full", action="store_true", help="the paper's protocol")
    parser.add_argument(
        "--out", type=pathlib.Path, metavar="DIR", help=f"(default: results/{task})"
    )
    if add_arguments is not None:
        add_arguments(parser)
    for action in parser._actions:
        if action.dest in default and action.help and "default" not in action.help:
            value = default[action.dest]
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help += f" (default: {shown})"
    args = parser.parse_args(argv)
    args.size = "smoke" if args.smoke else "full" if args.full else "default"
    for name, value in presets[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        raise UsageError(
            f"unknown method {unknown[0]!r} for task {task!r}; choose from "
            f"{', '.join(methods)}"
        )
    args.methods = list(dict.fromkeys(args.methods))
    if args.out is None:
        args.out = pathlib.Path("results") / task
    args.task = task
    if training and args.distributed:
        jax.distributed.initialize()
    return args


#
# Output
#


def _environment() -> dict:
    devices = jax.devices()
    return dict(
        jax=jax.__version__,
        diffrax=importlib.metadata.version("diffrax"),
        gqdiffrax=gqdiffrax.__version__,
        backend=devices[0].platform,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
    )


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, pathlib.Path):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    import csv

    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = float(np.mean(values))
    text = f"{mean:.4g}"
    if len(values) > 1 and np.std(values) > 0:
        text += f" ± {float(np.std(values)):.2g}"
    return text


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summarise(
    rows: list[dict],
    keys: Sequence[str],
    columns: dict[str, str],
    *,
    count_label: str = "runs",
) -> str:
    """A markdown table: one line per distinct value of `keys`, mean ± std over seeds
    of each of `columns` (row key -> header)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    body = [
        ["–" if g is None else g for g in group]
        + [len(members)]
        + [_fmt([m[c] for m in members]) for c in columns]
        for group, members in groups.items()
    ]
    return markdown_table(list(keys) + [count_label] + list(columns.values()), body)


TRAINING_COLUMNS = {
    "train_s": "train time (s)",
    "s_per_epoch": "s/epoch",
    "compile_s": "compile (s)",
    "final_metric": "test metric",
    "nfe_forward": "NFE fwd",
    "nfe_backward": "NFE bwd",
}


def write_outputs(
    args: argparse.Namespace,
    rows: list[dict],
    summary: str,
    *,
    figures: dict[str, Callable[[pathlib.Path], None]],
    extra: dict | None = None,
) -> pathlib.Path:
    """Write results.json (everything), runs.csv (one line per run), curves.csv (one
    line per epoch of each run), summary.md and the figures; print the summary."""
    out = pathlib.Path(args.out)
    if not is_main_process():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("smoke", "full")}
    payload = dict(
        task=args.task,
        config=config,
        environment=_environment(),
        runs=rows,
        **(extra or {}),
    )
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
    flat = [{k: v for k, v in row.items() if k != "curve"} for row in rows]
    _write_csv(out / "runs.csv", flat)
    # One line per epoch of every run, labelled by what identifies the run.
    results = {*TRAINING_COLUMNS, "curve", "final_test_loss"}
    curves = [
        {**{k: v for k, v in row.items() if k not in results}, **point}
        for row in rows
        for point in row.get("curve", ())
    ]
    if curves:
        _write_csv(out / "curves.csv", curves)
    title = f"# {args.task} ({args.size} size)\n\n"
    (out / "summary.md").write_text(title + summary + "\n")
    for name, draw in figures.items():
        draw(out / name)
    print(title + summary)
    print(f"\nWrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return out


#
# Figures
#


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, series_keys):
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in series_keys), []).append(row)
    return groups


def _label(rows, series_keys, key):
    method = key[series_keys.index("method")] if "method" in series_keys else None
    parts = [METHODS[method].label] if method else []
    parts += [f"{k}={v}" for k, v in zip(series_keys, key) if k != "method"]
    color = METHODS[method].color if method and len(series_keys) == 1 else None
    return ", ".join(parts), color


def plot_scaling(
    rows: list[dict],
    path: pathlib.Path,
    *,
    x: str = "width",
    xlabel: str = "Hidden Width",
    metric_label: str,
    series_keys: Sequence[str] = ("method",),
    log_x: bool = False,
) -> None:
    """Training time and final test metric against `x` (mean ± std over seeds), as in
    the paper's Figures 4–7."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series_keys = list(series_keys)
    for key, members in _series(rows, series_keys).items():
        label, color = _label(rows, series_keys, key)
        xs = sorted({m[x] for m in members})
        for ax, column in zip(axes, ("train_s", "final_metric")):
            vals = [[m[column] for m in members if m[x] == v] for v in xs]
            ax.errorbar(
                xs,
                [np.mean(v) for v in vals],
                yerr=[np.std(v) for v in vals],
                marker="o",
                capsize=3,
                label=label,
                color=color,
            )
    axes[0].set(xlabel=xlabel, ylabel="Training Time (/s)", title="(a) Training times")
    axes[1].set(xlabel=xlabel, ylabel=metric_label, title=f"(b) {metric_label}")
    for ax in axes:
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(
    rows: list[dict],
    path: pathlib.Path,
    *,
    loss_label: str = "Test Loss",
    series_keys: Sequence[str] = ("method",),
) -> None:
    """Test loss against epoch and against training wall-clock time for the largest
    width, seed 0 (the paper's Figures 8–10)."""
    plt = pyplot()
    width = max(row["width"] for row in rows)
    chosen = [
        r
        for r in rows
        if r["width"] == width and r["seed"] == min(q["seed"] for q in rows)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series_keys = list(series_keys)
    for key, members in _series(chosen, series_keys).items():
        label, color = _label(chosen, series_keys, key)
        curve = members[0]["curve"]
        for ax, xkey in zip(axes, ("epoch", "wall_s")):
            ax.plot(
                [p[xkey] for p in curve],
                [p["test_loss"] for p in curve],
                label=label,
                color=color,
            )
    axes[0].set(xlabel="Epoch", ylabel=loss_label, title="(a) Test loss vs epoch")
    axes[1].set(
        xlabel="Wall Clock Time (/s)",
        ylabel=loss_label,
        title="(b) Test loss vs wall clock time",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(title=f"width {width}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_grid(
    args: argparse.Namespace,
    make_run: Callable[..., Run],
    *,
    extra: Sequence[dict] | Callable[[str], Sequence[dict]] = ({},),
    solve_kwargs: Callable[[dict], dict] | None = None,
    eval_solve: Callable[[Solve, dict], Solve | None] = lambda solve, config: None,
) -> list[dict]:
    """Train every (width, method, extra config, seed) and return one row per run.

    `make_run(width=..., seed=..., method=..., **config)` builds the run; `config`
    ranges over `extra` (task options such as the number of observation times), or
    over `extra(method)`. The same seed gives every method the same data and
    initialisation."""
    devices = Devices(args.devices)
    configs = extra if callable(extra) else lambda method: extra
    if solve_kwargs is None:
        solve_kwargs = lambda config: dict(C=config.get("C", args.C))
    rows = []
    for width in args.widths:
        for method in args.methods:
            for config in configs(method):
                for seed in range(args.seeds):
                    run = make_run(width=width, seed=seed, method=method, **config)
                    if args.lr is not None:
                        run.lr = args.lr
                    solve = Solve(method, **solve_kwargs(config))
                    tag = " ".join(f"{k}={v}" for k, v in config.items())
                    result = train(
                        run,
                        solve=solve,
                        devices=devices,
                        epochs=args.epochs,
                        seed=seed,
                        desc=f"{method} w={width} {tag} seed={seed}",
                        eval_solve=eval_solve(solve, config),
                        count=args.nfe,
                    )
                    rows.append(
                        dict(
                            method=method,
                            width=width,
                            **config,
                            seed=seed,
                            lr=run.lr,
                            batch_size=run.batch_size,
                            **result,
                        )
                    )
    return rows
