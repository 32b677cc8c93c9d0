"""The README's main job (about 1 min on a 2-core CPU): nested spheres at one width
with direct, seminorm and gq; prints s/epoch, speedup and accuracy.

Trains the nested-spheres classifier at one width with the direct method, the seminorm
adjoint and GQ, and compares seconds per epoch at equal test accuracy."""

import datetime
import functools as ft

import jax
import numpy as np

from . import _cpu, _figures, nested_spheres
from ._task import markdown_table, Result, Task, UsageError


METHODS = ("direct", "seminorm", "gq")
# At the paper's lr (1e-3) a width-500 model needed about 500 Adam steps of batch 100
# to leave this task's initial plateau (seed 0), more than a demo of minutes can afford
# on a CPU; width 100 at lr 5e-3 and batch 50 left it after about 250 steps, so the
# demo takes 400. Larger widths (`--widths 500`) show more of GQ's advantage per epoch.
_CHANGES = {"smoke": {}, "default": dict(widths=[100]), "full": dict(widths=[1500])}
PRESETS = {
    size: {**preset, "methods": list(METHODS), "seeds": 1, **_CHANGES[size]}
    for size, preset in nested_spheres.PRESETS.items()
}
COLUMNS = [
    "method",
    "s/epoch",
    "speedup vs seminorm",
    "test accuracy (%)",
    "compile (s)",
    "NFE fwd",
    "NFE bwd",
]


def table(rows) -> str:
    """One line per method, means over seeds; speedup is seminorm's s/epoch over the
    method's. NFE are "–" when not counted (`--no-nfe`)."""

    def mean(method, key):
        values = [r[key] for r in rows if r["method"] == method and r[key] is not None]
        return float(np.mean(values)) if values else None

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = mean("seminorm", "s_per_epoch") if "seminorm" in methods else None
    body = []
    for m in methods:
        s = mean(m, "s_per_epoch")
        body.append(
            [
                m,
                fmt(s, ".3f"),
                f"{base / s:.2f}x" if base else "–",
                fmt(mean(m, "final_metric"), ".1f"),
                fmt(mean(m, "compile_s"), ".1f"),
                fmt(mean(m, "nfe_forward"), ".0f"),
                fmt(mean(m, "nfe_backward"), ".0f"),
            ]
        )
    return markdown_table(COLUMNS, body)


def _machine(load_start, load_end) -> str:
    """How many CPU threads the run had and how busy the machine was."""
    text = f"{_cpu.cpu_threads()} CPU thread(s) available to the process"
    if load_start is None or load_end is None:
        return text + "."
    fmt = lambda load: "/".join(f"{load[k]:.2f}" for k in ("1m", "5m", "15m"))
    return (
        f"{text}; load average (1/5/15 min) {fmt(load_start)} at the start, "
        f"{fmt(load_end)} at the end."
    )


def run(args) -> Result:
    if len(args.widths) != 1:
        raise UsageError("the demo trains one width; pass a single --widths W")
    # The README shows this summary: it says where and when it was measured, and how
    # busy the machine was, since seconds per epoch depend on both.
    load_start = _cpu.load_average()
    rows = nested_spheres.run_method_grid(args)
    device = jax.devices()[0]
    kind = "the CPU" if device.platform == "cpu" else device.device_kind
    summary = (
        f"Nested spheres, width {args.widths[0]}, {args.epochs} epochs of "
        f"{2 * args.train_per_class} samples (batch {args.batch_size}, lr "
        f"{rows[0]['lr']:g}), {args.seeds} seed(s). Seconds per epoch exclude "
        f"compilation. Measured on {datetime.date.today().isoformat()} with jax "
        f"{jax.__version__} on {kind}, {_machine(load_start, _cpu.load_average())}"
        "\n\n" + table(rows)
    )
    figures = {"demo_loss_curves.png": ft.partial(_figures.plot_curves, rows)}
    return Result(rows, summary, figures)


TASK = Task(
    "demo",
    __doc__,
    PRESETS,
    run,
    METHODS,
    training=True,
    arguments=nested_spheres.add_arguments,
)
