"""The GPU suite: bench-gradients' regimes at widths 1024 and 4096, and the images
task's batch-size crossover, float32, sized for 8 minutes on one H100/H200.

Two parts, both on the first device JAX sees (run it where that is a GPU):

- **Gradients.** The regimes (a) classification, (b) time series and (c) per-sample
  `vmap` of `bench-gradients` (its `--help` has the problems and the protocol) at each
  width: every method's gradient is compiled ahead of time, run once, then timed
  `--repeats` times interleaved with the other methods; the median is reported, with
  GQ's ratios to the others and its gradient's relative error against direct.
- **Batch-size crossover.** One training step (gradient and Adam update) of the images
  task's convolutional neural ODE (`--image-width` channels, on the bundled 8x8 digits
  upsampled to 16x16), for direct and GQ at each of `--batch-sizes`: the median
  milliseconds of `--steps` steps on distinct batches, interleaved, compile excluded.
  A line under the table says at which batch sizes GQ's step was the faster.

A method whose compiled program needs more temporary memory than the device allows is
left out of its row (shown as "–", and listed) instead of running out of memory. An
item (one regime and width, or one batch size) starts only while the run is within
`--budget-s` seconds; the items the budget left out are listed, so that the suite ends
near its time on a slower device.

Writes `gradients.csv` and `crossover.csv`, both tables in `summary.md`, and every row
in `results.json` and `runs.csv`. `--smoke` is a check of the code path, not a
benchmark: regime (a) at width 8, direct and GQ, a 4-channel image model at batch size
4, with cheaper XLA optimisation; under a minute on a CPU.
"""

import argparse
import functools as ft
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

from . import _cpu, bench_gradients as bench, images
from ._methods import compile_aot, memory_analysis, relative_error, Solve
from ._task import (
    add_options,
    environment,
    markdown_table,
    positive_float,
    presets,
    Result,
    say,
    Task,
    UsageError,
)
from ._train import Devices, Run, training_step


METHODS = ("direct", "seminorm", "gq")
PRESETS = presets(
    dict(methods=list(METHODS), widths=[1024, 4096], regimes=["a", "b", "c"])
    | dict(repeats=5, rtol=1e-5, atol=1e-5, max_steps=4096, seed=0)
    | dict(image_width=256, batch_sizes=[16, 64, 256], image_methods=["direct", "gq"])
    | dict(steps=5, budget_s=420.0),
    # Each compilation takes seconds of a CPU: two methods, one regime and one batch
    # size (the others take the same code path; `bench-gradients --smoke` runs every
    # regime).
    smoke=dict(methods=["direct", "gq"], widths=[8], regimes=["a"], repeats=2)
    | dict(max_steps=256, image_width=4, batch_sizes=[4], steps=2),
    full=dict(widths=[1024, 2048, 4096], batch_sizes=[16, 32, 64, 128, 256])
    | dict(repeats=10, budget_s=1200.0),
)


def _device_limit() -> int | None:
    """The bytes the first device's allocator may hand out (`None` on a CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def _too_big(temp_bytes: int, limit: int | None) -> str | None:
    if limit is None or temp_bytes <= limit:
        return None
    return f"needs {temp_bytes / 2**30:.1f} GiB, the device allows {limit / 2**30:.1f}"


def _compile(limit, fn, *args, compiler_options):
    """Compile `fn` for `args`: the executable, its compile time in seconds, its
    temporary memory in MiB, and why it is left out (`None` if it fits)."""
    compiled, trace_s, xla_s = compile_aot(fn, *args, compiler_options=compiler_options)
    temp_bytes = memory_analysis(compiled).temp_size_in_bytes
    return (
        compiled,
        round(trace_s + xla_s, 2),
        _mib(temp_bytes),
        _too_big(temp_bytes, limit),
    )


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


def gradients_row(regime, width, args, *, key, limit, compiler_options) -> dict:
    """Time every method's gradient at one regime and width, interleaved."""
    model, data = bench.make_problem(regime, width, key)
    calls, compile_s, temp, nfe, grads, left_out = {}, {}, {}, {}, {}, {}
    for method in args.methods:
        say(f"({regime.key}) width {width}: compiling {method} ...")
        solve = Solve(
            method, rtol=args.rtol, atol=args.atol, C=args.C, max_steps=args.max_steps
        )
        compiled, compile_s[method], temp[method], reason = _compile(
            limit,
            bench._grad_fn(regime, solve),
            model,
            data,
            compiler_options=compiler_options,
        )
        if reason is not None:
            left_out[method] = reason
            continue
        calls[method] = ft.partial(compiled, model, data)
        (_, nfe[method]), grads[method] = jax.block_until_ready(calls[method]())
    say(f"({regime.key}) width {width}: timing {args.repeats} interleaved calls ...")
    median = {
        m: round(statistics.median(t), 3)
        for m, t in bench.time_interleaved(calls, args.repeats).items()
    }
    num_params = sum(
        x.size for x in jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    return dict(
        part="gradients",
        regime=regime.key,
        width=width,
        num_params=int(num_params),
        nfe_forward=int(jnp.max(nfe["gq"])) if "gq" in nfe else None,
        median_ms=median,
        ratio={
            f"gq/{m}": round(median["gq"] / median[m], 4)
            for m in median
            if m != "gq" and "gq" in median
        },
        grad_rel_err_vs_direct={
            m: relative_error(grads[m], grads["direct"])
            for m in grads
            if m != "direct" and "direct" in grads
        },
        compile_s=compile_s,
        temp_mib=temp,
        left_out=left_out,
    )


def image_run(args) -> Run:
    """The images task's model and data, built once: building the model takes seconds
    of small compilations, and neither depends on the batch size or the method."""
    data = argparse.Namespace(data_dir=None, train_size=None, test_size=1)
    data.batch_size = min(args.batch_sizes)
    return images.make_run(
        width=args.image_width, seed=args.seed, method="gq", args=data
    )


def crossover_row(batch_size, run: Run, args, *, limit, compiler_options) -> dict:
    """Median milliseconds of one training step of the images task's `run`, for each
    of `args.image_methods`, at one batch size."""
    steps = min(args.steps, len(run.train) // batch_size)
    if steps < 1:
        raise UsageError(
            f"--batch-sizes {batch_size} is more than the {len(run.train)} training "
            "images"
        )
    devices = Devices(1)
    batches = [
        devices.batch(
            tuple(x[i * batch_size : (i + 1) * batch_size] for x in run.train.samples)
        )
        for i in range(steps)
    ]
    model, state, shared, key = devices.replicate(
        (run.model, run.state, (), jr.key(args.seed))
    )
    calls, compile_s, temp, left_out = {}, {}, {}, {}
    for method in args.image_methods:
        optimizer = optax.adam(run.lr)
        # The images task's own solver settings.
        solve = Solve(method, C=args.C)
        opt_state = devices.replicate(
            optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        )
        say(f"batch {batch_size}: compiling the {method} training step ...")
        compiled, compile_s[method], temp[method], reason = _compile(
            limit,
            training_step(run, solve, devices, optimizer),
            model,
            state,
            opt_state,
            batches[0],
            shared,
            key,
            compiler_options=compiler_options,
        )
        if reason is not None:
            left_out[method] = reason
            continue
        # The first execution pays one-time costs; then each call trains one more step
        # on the next batch.
        carry = compiled(model, state, opt_state, batches[0], shared, key)[:3]
        jax.block_until_ready(carry)
        calls[method] = _stepper(compiled, carry, batches, shared, key)
    say(f"batch {batch_size}: timing {args.steps} interleaved steps ...")
    median = {
        m: round(statistics.median(t), 3)
        for m, t in bench.time_interleaved(calls, args.steps).items()
    }
    return dict(
        part="crossover",
        batch_size=batch_size,
        width=args.image_width,
        rtol=Solve.rtol,
        atol=Solve.atol,
        median_ms=median,
        ratio={"gq/direct": round(median["gq"] / median["direct"], 4)}
        if {"gq", "direct"} <= set(median)
        else {},
        compile_s=compile_s,
        temp_mib=temp,
        left_out=left_out,
    )


def _stepper(compiled, carry, batches, shared, key):
    """A function that trains one step on the next batch and returns its loss."""
    count = 0

    def call():
        nonlocal carry, count
        batch = batches[count % len(batches)]
        *carry, loss = compiled(*carry, batch, shared, key)
        count += 1
        return loss

    return call


def _ms(row, method) -> str:
    value = row["median_ms"].get(method)
    return "–" if value is None else f"{value:.2f}"


def _ratio(row, name) -> str:
    value = row["ratio"].get(name)
    return "–" if value is None else f"{value:.3f}"


def _per_method(row, column, methods) -> str:
    return "/".join(str(row[column].get(m, "–")) for m in methods)


def gradients_table(rows: list[dict], methods: list[str]) -> str:
    """Milliseconds per gradient, GQ's ratios and gradient error, compile seconds and
    compiled temporary memory: one line per regime and width."""
    others = [m for m in methods if m != "gq"]
    joined = "/".join(methods)
    headers = ["regime", "width", "params", "NFE"]
    headers += [f"{m} ms" for m in methods] + [f"gq/{m}" for m in others]
    headers += ["gq grad rel err", f"compile s ({joined})", f"temp MiB ({joined})"]
    body = []
    for r in rows:
        err = r["grad_rel_err_vs_direct"].get("gq")
        body.append(
            [r["regime"], r["width"], r["num_params"], r["nfe_forward"] or "–"]
            + [_ms(r, m) for m in methods]
            + [_ratio(r, f"gq/{m}") for m in others]
            + ["–" if err is None else f"{err:.1e}"]
            + [_per_method(r, "compile_s", methods)]
            + [_per_method(r, "temp_mib", methods)]
        )
    return markdown_table(headers, body)


def crossover_table(rows: list[dict], methods: list[str]) -> str:
    """Milliseconds per training step by batch size, and GQ's ratio to direct."""
    joined = "/".join(methods)
    headers = ["batch", "width"] + [f"{m} ms/step" for m in methods]
    headers += ["gq/direct"] if {"gq", "direct"} <= set(methods) else []
    headers += [f"compile s ({joined})", f"temp MiB ({joined})"]
    body = []
    for r in rows:
        ratio = [_ratio(r, "gq/direct")] if {"gq", "direct"} <= set(methods) else []
        body.append(
            [r["batch_size"], r["width"]]
            + [_ms(r, m) for m in methods]
            + ratio
            + [_per_method(r, "compile_s", methods)]
            + [_per_method(r, "temp_mib", methods)]
        )
    return markdown_table(headers, body)


def crossover_line(rows: list[dict]) -> str:
    """The batch sizes at which GQ's training step was the faster."""
    ratios = {r["batch_size"]: r["ratio"].get("gq/direct") for r in rows}
    timed = [b for b, x in ratios.items() if x is not None]
    faster = [b for b in timed if ratios[b] < 1]
    if not timed:
        return "No batch size has both gq and direct timed."
    if not faster:
        return "GQ's step was slower than direct's at every batch size."
    if faster == timed:
        return "GQ's step was faster than direct's at every batch size."
    return f"GQ's step was faster than direct's at batch sizes {faster} of {timed}."


def _left_out_lines(rows: list[dict], not_run: list[str], budget_s: float) -> str:
    lines = [
        f"- {_what(r)}: {m} left out, {reason}"
        for r in rows
        for m, reason in r["left_out"].items()
    ]
    if not_run:
        lines.append(
            f"- not run (the run was past --budget-s {budget_s:g}): "
            + ", ".join(not_run)
        )
    return "\n".join(lines)


def _what(row: dict) -> str:
    if row["part"] == "gradients":
        return f"({row['regime']}) width {row['width']}"
    return f"batch {row['batch_size']}"


def add_arguments(parser):
    add_options(parser, metavar="W", nargs="+", widths="widths of the gradients part")
    parser.add_argument(
        "--regimes",
        nargs="+",
        choices=tuple(bench.REGIMES),
        help="a: classification, b: time series, c: per-sample vmap",
    )
    add_options(
        parser,
        repeats="timed calls per method and regime",
        max_steps="max_steps of the gradients' solves",
        image_width="hidden channels of the images model",
        steps="timed training steps per method and batch size",
    )
    add_options(parser, metavar="B", nargs="+", batch_sizes="batch sizes, images")
    parser.add_argument(
        "--image-methods",
        nargs="+",
        choices=("direct", "adjoint", "seminorm", "gq"),
        help="methods of the crossover",
    )
    add_options(
        parser,
        positive_float,
        metavar="TOL",
        rtol="rtol of the gradients' solves",
        atol="atol of the gradients' solves",
    )
    add_options(
        parser,
        positive_float,
        metavar="S",
        budget_s="start no new item after S seconds",
    )
    parser.add_argument("--seed", type=int, help="PRNG seed of models and data")


def run(args) -> Result:
    if "gq" not in args.methods:
        raise UsageError("gpu-suite compares GQ with the others: include gq")
    env = environment()
    if env["backend"] == "cpu" and args.size != "smoke":
        say("note: JAX sees no GPU; the suite runs on the CPU and will take long")
    smoke = args.size == "smoke"
    compiler_options = bench.SMOKE_COMPILER_OPTIONS if smoke else None
    limit = _device_limit()
    cpu = _cpu.describe(None)
    key = jr.key(args.seed)
    items = [
        ("gradients", regime, width) for width in args.widths for regime in args.regimes
    ]
    items += [("crossover", batch, None) for batch in args.batch_sizes]
    run_images = None
    start = time.perf_counter()
    gradients, crossover, not_run = [], [], []
    for part, first, width in items:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            not_run.append(
                f"({first}) width {width}" if part == "gradients" else f"batch {first}"
            )
            continue
        if part == "gradients":
            row = gradients_row(
                bench.REGIMES[first],
                width,
                args,
                key=key,
                limit=limit,
                compiler_options=compiler_options,
            )
            gradients.append(row)
        else:
            if run_images is None:
                say("building the images model ...")
                run_images = image_run(args)
            row = crossover_row(
                first,
                run_images,
                args,
                limit=limit,
                compiler_options=compiler_options,
            )
            crossover.append(row)
        row["elapsed_s"] = round(time.perf_counter() - start, 1)
        say(
            f"[{row['elapsed_s']:6.0f}s] {_what(row)}: "
            + ", ".join(f"{m} {t:.2f} ms" for m, t in row["median_ms"].items())
        )
    wall_s = time.perf_counter() - start
    device = f"{env['num_devices']} x {env['device_kind']} ({env['backend']})"
    summary = [
        f"On {device}, jax {env['jax']}, float32, Dopri5; {wall_s:.0f} s in all.",
        _cpu.header(cpu, _cpu.load_average()),
        "",
        f"Gradients: rtol={args.rtol}, atol={args.atol}, max_steps={args.max_steps}; "
        f"ms per gradient, median of {args.repeats} interleaved calls; gq grad rel "
        "err is against direct.",
        "",
        gradients_table(gradients, args.methods) if gradients else "(none run)",
        "",
        f"Batch-size crossover: the images task's model, {args.image_width} channels, "
        f"and its solver (rtol={Solve.rtol}, atol={Solve.atol}); ms per training step "
        f"(gradient and Adam), median of {args.steps} interleaved steps.",
        "",
        crossover_table(crossover, args.image_methods) if crossover else "(none run)",
        "",
        crossover_line(crossover),
    ]
    left_out = _left_out_lines(gradients + crossover, not_run, args.budget_s)
    if left_out:
        summary += ["", left_out]
    return Result(
        gradients + crossover,
        "\n".join(summary),
        tables=dict(gradients=gradients, crossover=crossover),
        extra=dict(cpu=cpu, not_run=not_run, wall_s=wall_s),
    )


TASK = Task("gpu-suite", __doc__, PRESETS, run, METHODS, arguments=add_arguments)
