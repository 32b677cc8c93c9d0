"""The README's main job: train the nested-spheres classifier at one width with the
direct method, the seminorm adjoint and GQ, and compare seconds per epoch at equal
test accuracy (about a minute on an idle 2-core CPU)."""

import functools as ft

import numpy as np

from . import _common, nested_spheres


TASK = "demo"
DESCRIPTION = __doc__
METHODS = ("direct", "seminorm", "gq")
_SPHERES = nested_spheres.PRESETS
# At the paper's lr (1e-3) a width-500 model needed about 500 Adam steps of batch 100
# to leave this task's initial plateau (seed 0), more than a demo of minutes can afford
# on a CPU; width 100 at lr 5e-3 and batch 50 left it after about 250 steps, so the
# demo takes 400. Larger widths (`--widths 500`) show more of GQ's advantage per epoch.
PRESETS = {
    "smoke": {**_SPHERES["smoke"], "methods": list(METHODS)},
    "default": {
        **_SPHERES["default"],
        "methods": list(METHODS),
        "widths": [100],
        "train_per_class": 500,
        "batch_size": 50,
        "lr": 5e-3,
        "epochs": 20,
    },
    "full": {
        **_SPHERES["full"],
        "methods": list(METHODS),
        "widths": [1500],
        "seeds": 1,
    },
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
    return _common.markdown_table(COLUMNS, body)


def main(argv=None):
    args = _common.parse_args(
        TASK,
        DESCRIPTION,
        PRESETS,
        argv,
        methods=METHODS,
        add_arguments=nested_spheres.add_arguments,
    )
    if len(args.widths) != 1:
        raise _common.UsageError("the demo trains one width; pass a single --widths W")
    rows = nested_spheres.run_method_grid(args)
    summary = (
        f"Nested spheres, width {args.widths[0]}, {args.epochs} epochs of "
        f"{2 * args.train_per_class} samples (batch {args.batch_size}, lr "
        f"{rows[0]['lr']:g}), {args.seeds} seed(s). Seconds per epoch exclude "
        "compilation.\n\n" + table(rows)
    )
    _common.write_outputs(
        args,
        rows,
        summary,
        figures={"demo_loss_curves.png": ft.partial(_common.plot_curves, rows)},
    )
    return rows
