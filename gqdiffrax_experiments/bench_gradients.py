r"""Time and accuracy of one gradient for every adjoint, in one process.

Milliseconds per gradient of `GQAdjoint` against Diffrax's adjoints.

Three ways of computing $dL/d\theta$ through the same `diffrax.diffeqsolve` are timed:

- `"direct"`: `diffrax.RecursiveCheckpointAdjoint()`, backpropagation through the
  solver's operations;
- `"seminorm"`: `diffrax.BacksolveAdjoint` with the adjoint seminorm
  (`PIDController(rtol, atol, norm=diffrax.adjoint_rms_seminorm)`), the continuous
  adjoint that carries $a_\theta$ through every backward stage;
- `"gq"`: `gqdiffrax.GQAdjoint()`, which solves only $[z, a_z]$ backwards and gets
  $dL/d\theta$ by a Gauss–Legendre rule on every backward step
  (`gqdiffrax.StepGauss`), stepping across save times; with `--C`, the paper's rule
  per interval, `GQAdjoint(gqdiffrax.IntervalGauss(C=...))`.
- `"gq-interval"` (only when asked for): `GQAdjoint(gqdiffrax.IntervalGauss())`, the
  paper's method, whose backward solve stops at every save time and puts one Gauss
  rule of $\lceil C \cdot \mathrm{NFE} \cdot \ell / s \rceil$ nodes on each
  interval; in regime (b) it is the "before" of stepping across save times, in (a)
  and (c) of a rule on every step.

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

Threads. Every method runs on the CPU threads the process is given; the table's header,
`results.json` and every row of `runs.csv` report their number and the machine's load
average (1, 5 and 15 minutes; a load above the thread count means other processes
competed for them). `--threads N` pins the process to N cores before JAX starts (Linux),
and `--threads 1` also turns off XLA's multi-threaded Eigen, so that every method runs
on one core.

Memory. XLA's `temp_size_in_bytes` of every compiled gradient is recorded: a
deterministic number, unlike a measured peak. At one width (1024 by default) each
method is also compiled at `max_steps` 256 and 16384: the adjoint methods should need
memory independent of `max_steps` ("flat": at most 10% growth), while recursive
checkpointing keeps $O(\sqrt{\texttt{max\_steps}})$ checkpoints.

Targets, checked at width 1024 and printed as PASS/FAIL lines: GQ at most 0.6x direct
and 0.3x seminorm in (a), 1.5x direct and 0.15x seminorm in (b), 0.6x direct in (c), and
GQ's compiled memory flat from `max_steps` 256 to 16384.

The default widths are 64 to 1024 (about 20 minutes on 2 CPU cores); `--full` adds
2048. `--smoke` is a check of the code path, not a benchmark: width 8, 2 repeats,
`max_steps` 256 (so that the memory comparison reuses the timed compiles), the memory
comparison for regime (a) only, and cheaper XLA optimisation.
"""

import dataclasses
import functools as ft
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax

from . import _cpu
from ._figures import pyplot
from ._methods import (
    compile_aot,
    memory_analysis,
    METHODS as METHOD_INFO,
    ode_solve,
    relative_error,
    Solve,
)
from ._task import add_options, positive_float, presets, Result, say, Task, UsageError


METHODS = ("direct", "seminorm", "gq")
CHOICES = METHODS + ("gq-interval",)
# Compared for memory: GQ, and recursive checkpointing for contrast.
MEMORY_METHODS = ("direct", "gq")
WIDTHS = [64, 128, 256, 512, 1024]
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
PRESETS = presets(
    dict(methods=list(METHODS), widths=WIDTHS, regimes=["a", "b", "c"], repeats=5)
    | dict(rtol=1e-5, atol=1e-5, max_steps=4096, memory_width=TARGET_WIDTH, seed=0),
    # `memory_width` None: the largest width; `memory_regimes` None: `regimes`.
    smoke=dict(widths=[8], repeats=2, max_steps=256, memory_width=None)
    | dict(memory_regimes=["a"]),
    full=dict(widths=WIDTHS + [2048]),
)

# Targets at width 1024, rtol = atol = 1e-5: `(regime, other method, largest allowed
# ratio of GQ's median time to the other method's)`.
TIME_TARGETS = (
    ("a", "direct", 0.6),
    ("a", "seminorm", 0.3),
    ("b", "direct", 1.5),
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
        sol = ode_solve(solve, model.vf, 0.0, regime.t1, y0, ts=ts)
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


def _grad_fn(regime: Regime, solve: Solve):
    loss = ft.partial(loss_fn, regime=regime, solve=solve)
    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))


def _temp_bytes(compiled) -> int:
    return int(memory_analysis(compiled).temp_size_in_bytes)


def bench_one(
    regime: Regime,
    width: int,
    solves: dict[str, Solve],
    *,
    repeats: int,
    key,
    compiler_options: dict | None = None,
) -> dict:
    """Time every method's gradient at one regime and width, interleaved.

    **Returns:**

    A row with the raw timings (ms), medians, GQ's ratios to the other methods,
    trace and compile seconds, the compiled temporary memory, the forward NFE and
    each method's gradient error relative to `"direct"` (when it runs).
    """
    model, data = make_problem(regime, width, key)
    calls, trace_s, compile_s, memory, nfe, grads = {}, {}, {}, {}, {}, {}
    for method, solve in solves.items():
        say(f"({regime.key}) width {width}: compiling {method} ...")
        compiled, trace_s[method], compile_s[method] = compile_aot(
            _grad_fn(regime, solve), model, data, compiler_options=compiler_options
        )
        memory[method] = _temp_bytes(compiled)
        calls[method] = ft.partial(compiled, model, data)
        # The untimed first run; its outputs give the NFE and check the methods agree.
        (_, nfe[method]), grads[method] = jax.block_until_ready(calls[method]())
    say(f"({regime.key}) width {width}: timing {repeats} interleaved calls ...")
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
        ratios={f"gq/{m}": median["gq"] / median[m] for m in solves if m != "gq"},
        trace_s=trace_s,
        compile_s=compile_s,
        max_steps=solves["gq"].max_steps,
        temp_bytes=memory,
        grad_rel_err_vs_direct={
            m: relative_error(grads[m], grads["direct"])
            for m in solves
            if "direct" in grads
        },
    )


def memory_one(
    regime: Regime,
    width: int,
    solves: dict[str, Solve],
    *,
    max_steps_list: Sequence[int],
    key,
    known: dict[tuple[str, int], int],
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
    model, data = make_problem(regime, width, key)
    table = {m: {} for m in solves}
    for method, solve in solves.items():
        for max_steps in sorted(max_steps_list):
            if (method, max_steps) not in known:
                say(f"({regime.key}) memory: compiling {method}, max_steps {max_steps}")
                fn = _grad_fn(regime, dataclasses.replace(solve, max_steps=max_steps))
                compiled, _, _ = compile_aot(
                    fn, model, data, compiler_options=compiler_options
                )
                known[method, max_steps] = _temp_bytes(compiled)
            table[method][str(max_steps)] = known[method, max_steps]
    lo, hi = str(min(max_steps_list)), str(max(max_steps_list))
    growth = {m: table[m][hi] / max(table[m][lo], 1) - 1 for m in solves}
    return dict(
        regime=regime.key,
        width=width,
        temp_bytes=table,
        growth=growth,
        flat={m: abs(growth[m]) <= FLAT_TOLERANCE for m in solves},
    )


def _memory_rows(rows, args, solves, *, key, compiler_options):
    """`memory_one` for each regime of the comparison, reusing the timed compiles at
    the comparison's width."""
    width = args.memory_width or max(args.widths)
    regimes = args.memory_regimes or args.regimes
    solves = {m: s for m, s in solves.items() if m in MEMORY_METHODS}
    out = []
    for name in regimes:
        steps, known = set(MEMORY_MAX_STEPS), {}
        timed = next(
            (r for r in rows if r["regime"] == name and r["width"] == width), None
        )
        # The timed `max_steps` joins the table, for free, when it lies inside the
        # compared range.
        if timed is not None and min(steps) <= timed["max_steps"] <= max(steps):
            steps.add(timed["max_steps"])
            known = {(m, timed["max_steps"]): timed["temp_bytes"][m] for m in solves}
        out.append(
            memory_one(
                REGIMES[name],
                width,
                solves,
                max_steps_list=sorted(steps),
                key=key,
                known=known,
                compiler_options=compiler_options,
            )
        )
    return out


def check_targets(results: list[dict], memory: list[dict]) -> list[dict]:
    """The PASS/FAIL checks at width 1024; a check without its data is skipped."""
    checks = []
    for regime, other, bound in TIME_TARGETS:
        rows = [r for r in results if r["regime"] == regime]
        row = next((r for r in rows if r["width"] == TARGET_WIDTH), None)
        value = None if row is None else row["ratios"].get(f"gq/{other}")
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


def format_tables(rows: list[dict], memory: list[dict], targets: list[dict]) -> str:
    """The timing table, the memory table and the target lines, as markdown."""
    methods = list(rows[0]["median_ms"])
    others = [m for m in methods if m != "gq"]
    lines = [
        "| regime | width | params | NFE | "
        + " | ".join(f"{m} ms" for m in methods)
        + " | "
        + " | ".join(f"gq/{m}" for m in others)
        + f" | compile s ({'/'.join(methods)}) | temp MiB ({'/'.join(methods)}) |",
        "|---|---:|---:|---:|" + "---:|" * (len(methods) + len(others)) + "---|---|",
    ]
    for r in rows:
        compile_s = "/".join(
            f"{r['trace_s'][m] + r['compile_s'][m]:.1f}" for m in methods
        )
        mib = "/".join(f"{r['temp_bytes'][m] / 2**20:.2f}" for m in methods)
        cells = [f"{r['median_ms'][m]:.1f}" for m in methods]
        cells += [f"{r['ratios'][f'gq/{m}']:.3f}" for m in others]
        lines.append(
            f"| {r['regime']} | {r['width']} | {r['num_params']} | {r['nfe_forward']} "
            f"| {' | '.join(cells)} | {compile_s} | {mib} |"
        )
    for row in memory:
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
    for c in targets:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"- {c['status']}: {c['name']} (measured {value})")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """One panel per regime: median ms per gradient of each method, grouped by width
    (bars, so that a run of one width is a comparison rather than a dot)."""
    plt = pyplot()
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    methods = list(rows[0]["median_ms"])
    fig, axes = plt.subplots(
        1, len(regimes), figsize=(4.5 * len(regimes), 3.8), squeeze=False
    )
    for ax, name in zip(axes[0], regimes):
        mine = [r for r in rows if r["regime"] == name]
        bar = 0.8 / len(methods)
        for k, method in enumerate(methods):
            info = METHOD_INFO[method]
            ax.bar(
                [i + (k - (len(methods) - 1) / 2) * bar for i in range(len(mine))],
                [r["median_ms"][method] for r in mine],
                bar,
                label=info.label,
                color=info.color,
            )
        ax.set_xticks(range(len(mine)), [str(r["width"]) for r in mine])
        ax.set_yscale("log")
        ax.set(
            xlabel="hidden width",
            ylabel="ms per gradient (median)",
            title=f"({name}) {REGIMES[name].title}",
        )
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    for flag, text in (
        ("--regimes", "a: classification, b: time series, c: per-sample vmap"),
        ("--memory-regimes", "regimes of the memory comparison (--smoke: a)"),
    ):
        parser.add_argument(flag, nargs="+", choices=tuple(REGIMES), help=text)
    add_options(parser, metavar="W", nargs="+", widths="MLP widths to time")
    add_options(
        parser,
        repeats="timed calls per method",
        max_steps="max_steps of the timed solves",
    )
    add_options(parser, positive_float, metavar="TOL", rtol="rtol", atol="atol")
    add_options(
        parser,
        metavar="W",
        memory_width="width of the memory comparison over max_steps (--smoke: the "
        "largest)",
    )
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the memory comparison over max_steps",
    )
    parser.add_argument("--seed", type=int, help="PRNG seed of models and data")


def run(args) -> Result:
    if "gq" not in args.methods:
        raise UsageError("bench-gradients compares GQ with the others: include gq")
    compiler_options = SMOKE_COMPILER_OPTIONS if args.size == "smoke" else None
    solves = {
        m: Solve(m, rtol=args.rtol, atol=args.atol, C=args.C, max_steps=args.max_steps)
        for m in args.methods
    }
    key = jr.key(args.seed)
    cpu = _cpu.describe(args.threads)
    start = time.perf_counter()
    rows = []
    for name in args.regimes:
        for width in args.widths:
            load = _cpu.load_average()
            row = bench_one(
                REGIMES[name],
                width,
                solves,
                repeats=args.repeats,
                key=key,
                compiler_options=compiler_options,
            )
            rows.append(dict(row, threads=cpu["threads"], load_average=load))
            say(
                f"[{time.perf_counter() - start:6.0f}s] ({name}) width {width}: "
                + ", ".join(f"{m} {row['median_ms'][m]:.1f} ms" for m in solves)
                + f", NFE {row['nfe_forward']}"
            )
    memory = []
    if args.memory:
        memory = _memory_rows(
            rows, args, solves, key=key, compiler_options=compiler_options
        )
    targets = check_targets(rows, memory)
    cpu["load_average_end"] = _cpu.load_average()
    summary = (
        f"rtol={args.rtol}, atol={args.atol}, Dopri5, float32, "
        f"max_steps={args.max_steps}, median of {args.repeats} interleaved repeats, "
        f"ms per gradient.\n{_cpu.header(cpu, cpu['load_average_end'])}\n\n"
        + format_tables(rows, memory, targets)
    )
    return Result(
        rows,
        summary,
        {"bench_gradients.png": ft.partial(plot, rows)},
        extra=dict(
            memory=memory,
            targets=targets,
            cpu=cpu,
            wall_s=time.perf_counter() - start,
        ),
    )


TASK = Task(
    "bench-gradients",
    __doc__,
    PRESETS,
    run,
    CHOICES,
    threads=True,
    arguments=add_arguments,
)
