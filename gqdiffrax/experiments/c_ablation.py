"""Effect of C (Appendix E.2, Table 2): nested spheres trained with GQ for several
values of the constant C, which scales the number of quadrature nodes with the forward
NFE (capped at 64 nodes per interval)."""

import functools as ft

from . import _common, nested_spheres


TASK = "c-ablation"
DESCRIPTION = __doc__
_SPHERES = nested_spheres.PRESETS
PRESETS = {
    "smoke": {**_SPHERES["smoke"], "methods": ["gq"], "C": [1e-3, 1e5]},
    "default": {
        **_SPHERES["default"],
        "methods": ["gq"],
        "widths": [100],
        "C": [1e-3, 0.1, 1e2, 1e5],
    },
    "full": {
        **_SPHERES["full"],
        "methods": ["gq"],
        "widths": [1500],
        "seeds": 5,
        "C": [1e-3, 0.1, 1e2, 1e5],
    },
}


def add_arguments(parser):
    nested_spheres.add_arguments(parser)
    parser.add_argument(
        "--C",
        nargs="+",
        type=_common.positive_float,
        metavar="C",
        help="values of GQAdjoint's constant C",
    )


def main(argv=None):
    args = _common.parse_args(
        TASK,
        DESCRIPTION,
        PRESETS,
        argv,
        methods=("gq",),
        gq_constant=False,
        add_arguments=add_arguments,
    )
    rows = nested_spheres.run_method_grid(args, extra=[dict(C=c) for c in args.C])
    summary = _common.summarise(
        rows,
        ("C", "width"),
        {**_common.TRAINING_COLUMNS, "final_metric": "test accuracy (%)"},
    )
    _common.write_outputs(
        args,
        rows,
        summary,
        figures={
            "table2_c_ablation.png": ft.partial(
                _common.plot_scaling,
                rows,
                x="C",
                xlabel="C",
                log_x=True,
                metric_label="Test Accuracy (%)",
                series_keys=("width",),
            ),
        },
    )
    return rows
