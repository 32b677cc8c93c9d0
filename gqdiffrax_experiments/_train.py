"""Training: the devices a batch is split over, the data and model of one run, the
jitted and sharded Adam loop with its timings, and the grid of runs a training task
makes (widths x methods x task options x seeds).

A task builds its data and model as a `Run`; `run_grid` trains one per grid point with
`train` and returns one row per run.
"""

import argparse
import collections
import dataclasses
import functools as ft
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._methods import compile_aot, count_nfe, Solve
from ._task import is_main_process, say, UsageError


def lr_from_table(table: dict[int, float], width: int) -> float:
    """The paper's learning rate for the largest tabulated width not above `width`."""
    below = [w for w in sorted(table) if w <= width]
    return table[below[-1] if below else min(table)]


class Devices:
    """A one-axis mesh over the first `n` devices: the batch axis is split over it, the
    parameters are replicated. After `jax.distributed.initialize()` (`--distributed`),
    `jax.devices()` lists the devices of every process and the same code runs in each:
    every process generates the same data from the seed and places only the shards of
    its own devices, and the jitted step's mean over the batch is one all-reduce.

    `n=None`: one device, or with several processes every device of every process."""

    def __init__(self, n: int | None = None):
        devices = jax.devices()
        if n is None:
            n = len(devices) if jax.process_count() > 1 else 1
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
    """`jax.device_put` for the arrays of a PyTree, leaving everything else alone.

    With several processes every process passes the same values (the same seed built
    them), and each places the shards of its own devices."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    if sharding.is_fully_addressable:
        arrays = jax.device_put(arrays, sharding)
    else:
        arrays = jtu.tree_map(ft.partial(_put_global, sharding=sharding), arrays)
    return eqx.combine(arrays, static)


def _put_global(x, sharding):
    # `jax.device_put` refuses an array already on a device of one process (a model's
    # parameters) for a sharding across processes; going through the host does not.
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jr.key_data(x), sharding)
        return jr.wrap_key_data(data, impl=jr.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


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


def _compile_and_warm_up(fn, *args) -> tuple[Callable, float]:
    """Compile `fn` for `args` and run it once, discarding the result: the first
    execution of an XLA program pays one-time costs that are not training. Returns
    the compiled function and the seconds of all that."""
    start = time.perf_counter()
    compiled, _, _ = compile_aot(fn, *args)
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - start


def sharded_loss_and_grad(run: Run, solve: Solve, devices: Devices) -> Callable:
    """`(model, state, samples, shared, key) -> ((loss, state), grads)` of the training
    step, with the batch split over `devices` and everything else replicated."""

    def loss_and_grad(model, state, samples, shared, key):
        samples = eqx.filter_shard(samples, devices.split)
        return eqx.filter_value_and_grad(run.loss, has_aux=True)(
            model, state, samples, shared, key, solve
        )

    return loss_and_grad


def training_step(
    run: Run, solve: Solve, devices: Devices, optimizer: optax.GradientTransformation
) -> Callable:
    """The jitted step `(model, state, opt_state, samples, shared, key) -> (model,
    state, opt_state, loss)`: one gradient of the batch split over `devices`, and one
    update by `optimizer`; the results are replicated."""
    loss_and_grad = sharded_loss_and_grad(run, solve, devices)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, state, opt_state, samples, shared, key):
        (loss, state), grads = loss_and_grad(model, state, samples, shared, key)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        out = eqx.filter_shard((model, state, opt_state), devices.replicated)
        return out + (loss,)

    return step


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
) -> tuple[dict, eqx.Module]:
    """Train with Adam, jit-compiled and sharded; return times, metrics, NFE (if
    `count`) and the loss curve, and the trained model (replicated over `devices`).

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
    split = devices.split

    step = training_step(run, solve, devices, optimizer)

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
    # Compilation takes most of a short run: say what is happening, not sit silent.
    say(f"{desc}: compiling the training step ...")
    train_step, compile_s = _compile_and_warm_up(
        step, model, state, opt_state, first, shared_train, step_key
    )
    say(f"{desc}: compiled in {compile_s:.1f} s; compiling the evaluation ...")
    samples0, weights0 = next(_eval_chunks(run.test, eval_batch))
    eval_step, _ = _compile_and_warm_up(
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
        say(f"{desc}: counting vector-field evaluations (one more compilation) ...")
        # Counted on one device of this host, for one host callback per evaluation.
        nfe_forward, nfe_backward = count_nfe(
            lambda *a: run.loss(*a)[0],
            solve,
            *local((model, state)),
            tuple(jnp.asarray(x[: run.batch_size]) for x in run.train.samples),
            local(shared_train),
            jr.fold_in(key, 0),
        )
    result = dict(
        train_s=train_s,
        s_per_epoch=train_s / epochs,
        compile_s=compile_s,
        final_test_loss=curve[-1]["test_loss"],
        final_metric=curve[-1]["test_metric"],
        nfe_forward=nfe_forward,
        nfe_backward=nfe_backward,
        curve=curve,
    )
    return result, model


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
    args.devices = devices.n  # As used, for results.json.
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
                    tag = [f"{k}={v}" for k, v in config.items()]
                    result, model = train(
                        run,
                        solve=solve,
                        devices=devices,
                        epochs=args.epochs,
                        seed=seed,
                        desc=" ".join([method, f"w={width}", *tag, f"seed={seed}"]),
                        eval_solve=eval_solve(solve, config),
                        count=args.nfe,
                    )
                    if args.save_models:
                        name = "-".join([method, f"w{width}", *tag, f"seed{seed}"])
                        save_model(args.out / "models" / f"{name}.eqx", model)
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


def save_model(path: pathlib.Path, model: eqx.Module) -> None:
    """`eqx.tree_serialise_leaves` of a replicated model, from process 0 only; read it
    back with `eqx.tree_deserialise_leaves(path, like)`, `like` a model of the same
    task, width and seed."""
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        eqx.tree_serialise_leaves(path, local(model))
