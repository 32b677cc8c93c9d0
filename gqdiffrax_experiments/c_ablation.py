"""Table 2: nested spheres with GQ for several values of C.

Effect of C (Appendix E.2, Table 2): nested spheres trained with the paper's method,
`GQAdjoint(gqdiffrax.IntervalGauss(C=...))`, for several values of the constant C,
which scales the number of quadrature nodes of each interval with the forward NFE
(capped at 64 nodes per interval)."""

import functools as ft

from . import _figures, nested_spheres
from ._task import add_options, positive_float, Result, Task, training_summary


_C = [1e-3, 0.1, 1e2, 1e5]
_CHANGES = {
    "smoke": dict(C=[1e-3, 1e5]),
    "default": dict(widths=[100], C=_C),
    "full": dict(widths=[1500], seeds=5, C=_C),
}
PRESETS = {
    size: {**preset, "methods": ["gq"], **_CHANGES[size]}
    for size, preset in nested_spheres.PRESETS.items()
}


def add_arguments(parser):
    nested_spheres.add_arguments(parser)
    add_options(
        parser, positive_float, metavar="C", nargs="+", C="values of IntervalGauss's C"
    )


def run(args) -> Result:
    rows = nested_spheres.run_method_grid(args, extra=[dict(C=c) for c in args.C])
    summary = training_summary(rows, ("C", "width"), "test accuracy (%)")
    table2 = ft.partial(
        _figures.plot_scaling,
        rows,
        x="C",
        xlabel="C",
        log_x=True,
        metric_label="Test Accuracy (%)",
        series_keys=("width",),
    )
    return Result(rows, summary, {"table2_c_ablation.png": table2})


TASK = Task(
    "c-ablation",
    __doc__,
    PRESETS,
    run,
    ("gq",),
    gq_constant=False,
    training=True,
    arguments=add_arguments,
)
