r"""Benchmark: milliseconds per gradient of `GQAdjoint` against Diffrax's adjoints.

Three ways of computing $dL/d\theta$ through the same `diffrax.diffeqsolve` are timed:

- `"direct"`: `diffrax.RecursiveCheckpointAdjoint()`, backpropagation through the
  solver's operations;
- `"seminorm"`: `diffrax.BacksolveAdjoint` with the adjoint seminorm
  (`PIDController(rtol, atol, norm=diffrax.adjoint_rms_seminorm)`), the continuous
  adjoint that carries $a_\theta$ through every backward stage;
- `"gq"`: `gqdiffrax.GQAdjoint()`, which solves only $[z, a_z]$ backwards and gets
  $dL/d\theta$ by Gauss–Legendre quadrature.

The model is a neural ODE $\dot y = f_\theta(t, y)$, $f_\theta$ a 2-hidden-layer
softplus MLP of the given width applied to $[t, y]$, solved with `diffrax.Dopri5()` in
float32 under `PIDController(rtol, atol)` (by default `rtol = atol = 1e-5`) and
`max_steps=4096` (Diffrax's default). Three regimes:

- **(a) classification**: a batch of 64 points in $\mathbb{R}^4$ is one state of shape
  `(64, 4)` (the MLP is vmapped over rows inside the vector field), saved at $t_1 = 1$,
  with a cross-entropy loss on a linear readout;
- **(b) time series**: 15 series of dimension 2 (state `(15, 2)`), 50 save times on
  $[0, 2\pi]$, mean squared error against sine/cosine targets;
- **(c) per-sample**: the data of (a), but one `diffeqsolve` per sample (state `(4,)`)
  under `jax.vmap`.

Protocol. For every regime and width, each method's gradient function is
`eqx.filter_jit(eqx.filter_value_and_grad(loss))`. It is lowered and compiled ahead of
time (the trace and compile seconds are reported separately from the run time), run
once untimed, and then timed `repeats` times with `jax.block_until_ready`. The methods
are interleaved in one process: repeat $r$ times every method once, in an order rotated
by $r$, so that the load of a shared machine falls on all methods alike. The reported
figure is the median, and the ratios are ratios of medians. The forward NFE is
`sol.stats["num_fevals"]` of the GQ solve (the maximum over samples in regime (c),
where a vmapped solve steps until its slowest sample is done).

Memory. XLA's `temp_size_in_bytes` of every compiled gradient is recorded: a
deterministic number, unlike a measured peak. At one width (1024 by default) each
method is also compiled at `max_steps` 256 and 16384: the adjoint methods should need
memory independent of `max_steps` ("flat": at most 10% growth), while recursive
checkpointing keeps $O(\sqrt{\texttt{max\_steps}})$ checkpoints.

Targets, checked at width 1024 and printed as PASS/FAIL lines: GQ at most 0.6x direct
and 0.3x seminorm in (a), 4x direct and 0.15x seminorm in (b), 0.6x direct in (c), and
GQ's compiled memory flat from `max_steps` 256 to 16384.

Run as `python -m gqdiffrax.experiments.bench_gradients [--widths 64 128 ...]
[--regimes a b c] [--repeats N] [--smoke] [--out DIR]`. The default widths are 64 to
1024 (add 2048 with `--widths`); the default run takes about 20 minutes on 2 CPU cores.
It prints a table and the PASS/FAIL lines, and writes `results.json` (every raw timing)
and `results.md` under `--out` (default `results/bench-gradients`).
"""

import argparse
import dataclasses
import functools as ft
import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

import gqdiffrax


METHODS = ("direct", "seminorm", "gq")
# Compared for memory: GQ, and recursive checkpointing for contrast.
MEMORY_METHODS = ("direct", "gq")
# Width 2048 is left out of the default run, to keep it within 20 minutes on a 2-core
# CPU: there the seminorm baseline of regime (b) took 22 s per gradient at width 1024,
# 3.8x its time at 512. Add 2048 with `--widths`.
DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)
SMOKE_WIDTHS = (8,)
MEMORY_MAX_STEPS = (256, 16384)
TARGET_WIDTH = 1024
# A smoke run is dominated by its XLA compiles (about 5 s of CPU each for a Dopri5
# gradient); these options make them about a quarter cheaper, at the price of slower
# code, which at width 8 does not matter.
SMOKE_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
DTYPE = jnp.float32

# Targets at width 1024, rtol = atol = 1e-5: `(regime, other method, largest allowed
# ratio of GQ's median time to the other method's)`.
TIME_TARGETS = (
    ("a", "direct", 0.6),
    ("a", "seminorm", 0.3),
    ("b", "direct", 4.0),
    ("b", "seminorm", 0.15),
    ("c", "direct", 0.6),
)
# "Flat" memory: at most this relative change from the smallest to the largest
# `max_steps`.
FLAT_TOLERANCE = 0.10


@dataclasses.dataclass(frozen=True)
class Regime:
    """One benchmark setting: the shape of the data and how it is solved.

    **Arguments:**

    - `key`: the short name used on the command line, `"a"`, `"b"` or `"c"`.
    - `title`: a human-readable name.
    - `batch`: the number of samples.
    - `dim`: the state dimension of one sample.
    - `t1`: the end of the time interval $[0, t_1]$.
    - `num_saves`: the number of save times spread over $[0, t_1]$ (including $0$),
        or `None` to save only at $t_1$.
    - `per_sample`: whether each sample is its own `diffeqsolve` under `jax.vmap`
        (otherwise the batch is one state of shape `(batch, dim)`).
    - `classify`: a cross-entropy loss on a linear readout of the final state if
        true, a mean squared error against sine targets at the save times if false.
    """

    key: str
    title: str
    batch: int
    dim: int
    t1: float
    num_saves: int | None
    per_sample: bool
    classify: bool


REGIMES = {
    "a": Regime("a", "classification", 64, 4, 1.0, None, False, True),
    "b": Regime("b", "time series", 15, 2, 2 * math.pi, 50, False, False),
    "c": Regime("c", "per-sample vmap", 64, 4, 1.0, None, True, True),
}


class VectorField(eqx.Module):
    """$f_\\theta(t, y)$: an MLP on $[t, y]$, applied row-wise to a batch of states."""

    mlp: eqx.nn.MLP

    def __init__(self, dim: int, width: int, *, key):
        self.mlp = eqx.nn.MLP(
            dim + 1,
            dim,
            width,
            depth=2,
            activation=jax.nn.softplus,
            dtype=DTYPE,
            key=key,
        )

    def __call__(self, t, y, args):
        del args
        t = jnp.reshape(t, (1,)).astype(y.dtype)
        row = lambda y_row: self.mlp(jnp.concatenate([t, y_row]))
        return row(y) if y.ndim == 1 else jax.vmap(row)(y)


class Model(eqx.Module):
    """The trainable parameters: the vector field and a linear readout of the state."""

    vf: VectorField
    readout: eqx.nn.Linear | eqx.nn.Identity


class Solve(eqx.Module):
    """How a `diffeqsolve` is run: the adjoint under test and the solver settings."""

    adjoint: dfx.AbstractAdjoint
    rtol: float
    atol: float
    max_steps: int

    def __call__(self, vf, y0, t1, ts) -> dfx.Solution:
        t0 = jnp.zeros((), DTYPE)
        saveat = dfx.SaveAt(t1=True) if ts is None else dfx.SaveAt(ts=ts)
        return dfx.diffeqsolve(
            dfx.ODETerm(vf),
            dfx.Dopri5(),
            t0,
            jnp.asarray(t1, DTYPE),
            None,
            y0,
            saveat=saveat,
            stepsize_controller=dfx.PIDController(rtol=self.rtol, atol=self.atol),
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )


def make_adjoint(method: str, rtol: float, atol: float) -> dfx.AbstractAdjoint:
    """The adjoint of a method name in `METHODS`."""
    if method == "direct":
        return dfx.RecursiveCheckpointAdjoint()
    if method == "seminorm":
        controller = dfx.PIDController(
            rtol=rtol, atol=atol, norm=dfx.adjoint_rms_seminorm
        )
        return dfx.BacksolveAdjoint(stepsize_controller=controller)
    if method == "gq":
        return gqdiffrax.GQAdjoint()
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def make_problem(regime: Regime, width: int, key) -> tuple[Model, dict]:
    """A freshly initialised model and the regime's data, both float32.

    Classification data are standard normal points labelled by whether their norm
    exceeds 2; time-series targets are $(\\sin(\\omega t + \\phi), \\cos(\\omega t +
    \\phi))$ with random phase and frequency per series, started at their $t = 0$
    value.
    """
    vf_key, readout_key, data_key, phase_key = jr.split(key, 4)
    vf = VectorField(regime.dim, width, key=vf_key)
    if regime.classify:
        readout = eqx.nn.Linear(regime.dim, 2, dtype=DTYPE, key=readout_key)
        x = jr.normal(data_key, (regime.batch, regime.dim), DTYPE)
        labels = (jnp.sum(x**2, axis=1) > 4).astype(jnp.int32)
        return Model(vf, readout), dict(y0=x, labels=labels)
    ts = jnp.linspace(0, regime.t1, regime.num_saves, dtype=DTYPE)
    phase = jr.uniform(phase_key, (regime.batch,), DTYPE, 0, 2 * math.pi)
    freq = jr.uniform(data_key, (regime.batch,), DTYPE, 0.5, 1.5)
    angle = freq[None, :] * ts[:, None] + phase[None, :]
    targets = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    return Model(vf, eqx.nn.Identity()), dict(y0=targets[0], ts=ts, targets=targets)


def predict(model: Model, data: dict, regime: Regime, solve: Solve):
    """The readout of the solution and the forward NFE of the solve(s)."""
    ts = data.get("ts")

    def one(y0):
        sol = solve(model.vf, y0, regime.t1, ts)
        nfe = sol.stats.get("num_fevals", jnp.asarray(-1))
        return (sol.ys if ts is not None else sol.ys[-1]), nfe

    ys, nfe = jax.vmap(one)(data["y0"]) if regime.per_sample else one(data["y0"])
    readout = model.readout if ts is not None else jax.vmap(model.readout)
    return readout(ys), nfe


def loss_fn(model: Model, data: dict, regime: Regime, solve: Solve):
    """Cross-entropy of the readout (classification) or MSE against the targets.

    **Returns:**

    The loss and, as auxiliary output, the forward NFE of the solve(s) (`-1` where
    the adjoint does not report it).
    """
    out, nfe = predict(model, data, regime, solve)
    if regime.classify:
        per_sample = optax.softmax_cross_entropy_with_integer_labels(
            out, data["labels"]
        )
        return jnp.mean(per_sample), nfe
    return jnp.mean((out - data["targets"]) ** 2), nfe


def compile_aot(
    fn: Callable, *args, compiler_options: dict | None = None
) -> tuple[Callable, float, float]:
    """Lower and compile `fn` (an `eqx.filter_jit` function) for `args`, with XLA
    `compiler_options` if given.

    **Returns:**

    The compiled function (called like `fn`), the trace-and-lower seconds and the
    compile seconds.
    """
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    done = time.perf_counter()
    return compiled, traced - start, done - traced


def temp_bytes(compiled) -> int:
    """XLA's temporary-buffer size of an `eqx.filter_jit(...).lower(...).compile()`."""
    return int(compiled.compiled.memory_analysis().temp_size_in_bytes)


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, list[float]]:
    """Milliseconds of `repeats` calls of each function, round-robin.

    Repeat `r` calls every function once, starting with the `r`-th (modulo their
    number) so that no method is always first or last after another one.
    """
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def _grad_fn(regime: Regime, method: str, rtol: float, atol: float, max_steps: int):
    solve = Solve(make_adjoint(method, rtol, atol), rtol, atol, max_steps)
    loss = ft.partial(loss_fn, regime=regime, solve=solve)
    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))


def _relative_error(grad, reference) -> float:
    leaves = lambda g: jnp.concatenate(
        [jnp.ravel(x) for x in jtu.tree_leaves(eqx.filter(g, eqx.is_inexact_array))]
    )
    diff = jnp.linalg.norm(leaves(grad) - leaves(reference))
    return float(diff / jnp.linalg.norm(leaves(reference)))


def bench_one(
    regime: Regime,
    width: int,
    *,
    repeats: int,
    rtol: float,
    atol: float,
    max_steps: int,
    key,
    compiler_options: dict | None = None,
) -> dict:
    """Time every method's gradient at one regime and width, interleaved.

    **Returns:**

    A dict with the raw timings (ms), medians, ratios, trace and compile seconds, the
    compiled temporary memory at `max_steps`, the forward NFE and each method's
    gradient error relative to `"direct"`.
    """
    model, data = make_problem(regime, width, key)
    calls, trace_s, compile_s, memory, nfe, grads = {}, {}, {}, {}, {}, {}
    for method in METHODS:
        fn = _grad_fn(regime, method, rtol, atol, max_steps)
        compiled, trace_s[method], compile_s[method] = compile_aot(
            fn, model, data, compiler_options=compiler_options
        )
        memory[method] = temp_bytes(compiled)
        calls[method] = ft.partial(compiled, model, data)
        # The untimed first run; its outputs give the NFE and check the methods agree.
        (_, nfe[method]), grads[method] = jax.block_until_ready(calls[method]())
    times = time_interleaved(calls, repeats)
    median = {m: statistics.median(t) for m, t in times.items()}
    num_params = sum(
        x.size for x in jtu.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    return dict(
        regime=regime.key,
        width=width,
        num_params=int(num_params),
        nfe_forward=int(jnp.max(nfe["gq"])),
        nfe_forward_mean=float(jnp.mean(nfe["gq"])),
        times_ms=times,
        median_ms=median,
        ratios={
            "gq/direct": median["gq"] / median["direct"],
            "gq/seminorm": median["gq"] / median["seminorm"],
        },
        trace_s=trace_s,
        compile_s=compile_s,
        max_steps=max_steps,
        temp_bytes=memory,
        grad_rel_err_vs_direct={
            m: _relative_error(grads[m], grads["direct"]) for m in METHODS
        },
    )


def memory_one(
    regime: Regime,
    width: int,
    *,
    max_steps_list: Sequence[int],
    rtol: float,
    atol: float,
    key,
    methods: Sequence[str] = MEMORY_METHODS,
    known: dict[tuple[str, int], int] | None = None,
    compiler_options: dict | None = None,
) -> dict:
    """Compiled temporary memory of every method's gradient at several `max_steps`.

    `known` maps `(method, max_steps)` to bytes already measured (by `bench_one` at
    this width), which are reused rather than compiled again.

    **Returns:**

    A dict with `temp_bytes[method][str(max_steps)]` and, per method, whether the
    memory is flat (changes by at most 10%) from the smallest to the largest
    `max_steps`.
    """
    known = dict(known or {})
    model, data = make_problem(regime, width, key)
    table = {m: {} for m in methods}
    for method in methods:
        for max_steps in sorted(max_steps_list):
            if (method, max_steps) not in known:
                fn = _grad_fn(regime, method, rtol, atol, max_steps)
                compiled, _, _ = compile_aot(
                    fn, model, data, compiler_options=compiler_options
                )
                known[method, max_steps] = temp_bytes(compiled)
            table[method][str(max_steps)] = known[method, max_steps]
    lo, hi = str(min(max_steps_list)), str(max(max_steps_list))
    growth = {m: table[m][hi] / max(table[m][lo], 1) - 1 for m in methods}
    return dict(
        regime=regime.key,
        width=width,
        temp_bytes=table,
        growth=growth,
        flat={m: abs(growth[m]) <= FLAT_TOLERANCE for m in methods},
    )


def check_targets(results: list[dict], memory: list[dict]) -> list[dict]:
    """The PASS/FAIL checks at width 1024; a check without its data is skipped."""
    checks = []
    for regime, other, bound in TIME_TARGETS:
        rows = [r for r in results if r["regime"] == regime]
        row = next((r for r in rows if r["width"] == TARGET_WIDTH), None)
        value = None if row is None else row["ratios"][f"gq/{other}"]
        checks.append(
            dict(
                name=f"({regime}) gq <= {bound}x {other} at width {TARGET_WIDTH}",
                value=value,
                bound=bound,
                status="SKIP" if value is None else _pass(value <= bound),
            )
        )
    for row in memory:
        checks.append(
            dict(
                name=f"({row['regime']}) gq compiled memory flat (within "
                f"{FLAT_TOLERANCE:.0%}) over max_steps at width {row['width']}",
                value=row["growth"]["gq"],
                bound=FLAT_TOLERANCE,
                status=_pass(row["flat"]["gq"]),
            )
        )
    return checks


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_tables(report: dict) -> str:
    """The timing table, the memory table and the target lines, as markdown."""
    lines = [
        "| regime | width | params | NFE | direct ms | seminorm ms | gq ms "
        "| gq/direct | gq/seminorm | compile s (direct/seminorm/gq) "
        "| temp MiB (direct/seminorm/gq) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        med, rat = r["median_ms"], r["ratios"]
        compile_s = "/".join(
            f"{r['trace_s'][m] + r['compile_s'][m]:.1f}" for m in METHODS
        )
        mib = "/".join(f"{r['temp_bytes'][m] / 2**20:.2f}" for m in METHODS)
        lines.append(
            f"| {r['regime']} | {r['width']} | {r['num_params']} | {r['nfe_forward']} "
            f"| {med['direct']:.1f} | {med['seminorm']:.1f} | {med['gq']:.1f} "
            f"| {rat['gq/direct']:.2f} | {rat['gq/seminorm']:.3f} | {compile_s} "
            f"| {mib} |"
        )
    for row in report["memory"]:
        steps = list(row["temp_bytes"]["gq"])
        lines += [
            "",
            f"Compiled temporary memory (MiB) of the gradient, ({row['regime']}) "
            f"width {row['width']}; growth from max_steps {steps[0]} to {steps[-1]}:",
            "",
            "| method | "
            + " | ".join(f"max_steps {n}" for n in steps)
            + " | growth | flat |",
            "|---|" + "---:|" * len(steps) + "---:|---|",
        ]
        for m in row["temp_bytes"]:
            mib = " | ".join(f"{row['temp_bytes'][m][n] / 2**20:.2f}" for n in steps)
            flat = "yes" if row["flat"][m] else "no"
            lines.append(f"| {m} | {mib} | {row['growth'][m]:+.1%} | {flat} |")
    lines.append("")
    for c in report["targets"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"- {c['status']}: {c['name']} (measured {value})")
    return "\n".join(lines) + "\n"


def _environment() -> dict:
    return dict(
        jax=jax.__version__,
        diffrax=dfx.__version__ if hasattr(dfx, "__version__") else "unknown",
        equinox=eqx.__version__ if hasattr(eqx, "__version__") else "unknown",
        gqdiffrax=gqdiffrax.__version__,
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
    )


def _memory_rows(results, regimes, *, width, max_steps_list, say, **kwargs):
    """`memory_one` for each regime, reusing the timed compiles at `width`."""
    rows = []
    for name in regimes:
        steps = set(max_steps_list)
        known = {}
        timed = next(
            (r for r in results if r["regime"] == name and r["width"] == width), None
        )
        # The timed `max_steps` joins the table, for free, when it lies inside the
        # compared range.
        if timed is not None and min(steps) <= timed["max_steps"] <= max(steps):
            steps.add(timed["max_steps"])
            known = {(m, timed["max_steps"]): b for m, b in timed["temp_bytes"].items()}
        rows.append(
            memory_one(
                REGIMES[name],
                width,
                max_steps_list=sorted(steps),
                known=known,
                **kwargs,
            )
        )
        say(f"({name}) memory at width {width} done", flush=True)
    return rows


def run(
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    regimes: Sequence[str] = tuple(REGIMES),
    repeats: int = 5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    memory_width: int | None = TARGET_WIDTH,
    memory_regimes: Sequence[str] | None = None,
    memory_max_steps: Sequence[int] = MEMORY_MAX_STEPS,
    seed: int = 0,
    compiler_options: dict | None = None,
    out: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict:
    """Run the benchmark and return (and, with `out`, write) its report.

    **Arguments:**

    - `widths`: the MLP hidden widths.
    - `regimes`: which of `"a"`, `"b"`, `"c"` to run.
    - `repeats`: timed calls per method, width and regime.
    - `rtol`, `atol`: the tolerances of every solve.
    - `max_steps`: `max_steps` of the timed solves.
    - `memory_width`: the width at which memory is compared over `max_steps`; `None`
        skips the comparison.
    - `memory_regimes`: the regimes of the memory comparison; `None` for `regimes`.
    - `memory_max_steps`: the `max_steps` values compared for memory.
    - `seed`: the PRNG seed of models and data.
    - `compiler_options`: XLA options for every compile, e.g. `SMOKE_COMPILER_OPTIONS`.
    - `out`: a directory for `results.json` and `results.md`, or `None`.
    - `verbose`: print progress and the tables.

    **Returns:**

    A dict with keys `config`, `environment`, `results` (one entry per regime and
    width), `memory` (one per regime of the memory comparison), `targets` and
    `wall_s`.
    """
    memory_regimes = regimes if memory_regimes is None else memory_regimes
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1; got {repeats}.")
    unknown = (set(regimes) | set(memory_regimes)) - set(REGIMES)
    if unknown:
        raise ValueError(f"Unknown regimes {sorted(unknown)}; use a subset of a b c.")
    say = print if verbose else (lambda *a, **k: None)
    config = dict(
        widths=list(widths),
        regimes=list(regimes),
        repeats=repeats,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        memory_width=memory_width,
        memory_regimes=list(memory_regimes),
        memory_max_steps=list(memory_max_steps),
        seed=seed,
        compiler_options=compiler_options,
        solver="Dopri5",
        dtype="float32",
    )
    key = jr.key(seed)
    start = time.perf_counter()
    results = []
    for name in regimes:
        for width in widths:
            row = bench_one(
                REGIMES[name],
                width,
                repeats=repeats,
                rtol=rtol,
                atol=atol,
                max_steps=max_steps,
                key=key,
                compiler_options=compiler_options,
            )
            results.append(row)
            med = row["median_ms"]
            say(
                f"[{time.perf_counter() - start:6.0f}s] ({name}) width {width}: "
                + ", ".join(f"{m} {med[m]:.1f} ms" for m in METHODS)
                + f", NFE {row['nfe_forward']}",
                flush=True,
            )
    memory = []
    if memory_width is not None:
        memory = _memory_rows(
            results,
            memory_regimes,
            width=memory_width,
            max_steps_list=memory_max_steps,
            rtol=rtol,
            atol=atol,
            key=key,
            compiler_options=compiler_options,
            say=say,
        )
    report = dict(
        config=config,
        environment=_environment(),
        results=results,
        memory=memory,
        targets=check_targets(results, memory),
        wall_s=time.perf_counter() - start,
    )
    table = format_tables(report)
    say("\n" + table)
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2))
        (out / "results.md").write_text(
            "# Gradient benchmark\n\n"
            f"rtol={rtol}, atol={atol}, Dopri5, float32, max_steps={max_steps}, "
            f"median of {repeats} interleaved repeats, ms per gradient; "
            f"{report['environment']['platform']}, "
            f"{report['environment']['cpu_count']} CPUs.\n\n" + table
        )
        say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: `python -m gqdiffrax.experiments.bench_gradients --help`.

    `--smoke` is the quick check the test suite runs: width 8, 2 repeats,
    `max_steps=256`, the memory comparison for regime (a) only, and
    `SMOKE_COMPILER_OPTIONS`. Its timings are not benchmark numbers.
    """
    parser = argparse.ArgumentParser(
        prog="python -m gqdiffrax.experiments.bench_gradients",
        description="Median ms per gradient: GQAdjoint vs RecursiveCheckpointAdjoint "
        "and BacksolveAdjoint with the adjoint seminorm.",
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="MLP widths (default 64 128 256 512 1024; 8 with --smoke)",
    )
    parser.add_argument(
        "--regimes",
        nargs="+",
        choices=sorted(REGIMES),
        default=sorted(REGIMES),
        help="a: classification, b: time series, c: per-sample vmap (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per method and width (default 5; 2 with --smoke)",
    )
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="max_steps of the timed solves (default 4096; 256 with --smoke, so that "
        "the memory comparison reuses the timed compiles)",
    )
    parser.add_argument(
        "--memory-width",
        type=int,
        default=None,
        help="width of the memory comparison over max_steps (default 1024; the "
        "largest width with --smoke); 0 skips it",
    )
    parser.add_argument(
        "--memory-regimes",
        nargs="+",
        choices=sorted(REGIMES),
        default=None,
        help="regimes of the memory comparison (default: --regimes; a with --smoke)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="a quick check: width 8, 2 repeats"
    )
    parser.add_argument("--out", default="results/bench-gradients")
    ns = parser.parse_args(argv)
    widths = ns.widths or (SMOKE_WIDTHS if ns.smoke else DEFAULT_WIDTHS)
    memory_width = ns.memory_width
    if memory_width is None:
        memory_width = max(widths) if ns.smoke else TARGET_WIDTH
    memory_regimes = ns.memory_regimes
    if memory_regimes is None and ns.smoke:
        memory_regimes = ns.regimes[:1]
    return run(
        widths=widths,
        regimes=ns.regimes,
        repeats=ns.repeats or (2 if ns.smoke else 5),
        rtol=ns.rtol,
        atol=ns.atol,
        max_steps=ns.max_steps or (256 if ns.smoke else 4096),
        memory_width=memory_width or None,
        memory_regimes=memory_regimes,
        seed=ns.seed,
        compiler_options=SMOKE_COMPILER_OPTIONS if ns.smoke else None,
        out=ns.out,
    )


if __name__ == "__main__":
    main()
