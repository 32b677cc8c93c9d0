"""Crossing trajectories (Appendix G, Figure 16): map x = +1 to -1 and x = -1 to +1,
impossible for a one-dimensional ODE, with a neural ODE augmented by three zero
dimensions whose first coordinate is read out."""

import functools as ft

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import _common


TASK = "crossing-trajectories"
DESCRIPTION = __doc__
# Appendix G, Table 7.
LEARNING_RATES = {
    5: 1e-2,
    20: 1e-2,
    100: 1e-3,
    500: 1e-3,
    1000: 7e-4,
    1500: 1e-4,
    2000: 1e-4,
    2500: 1e-4,
    3000: 1e-4,
}
PRESETS = {
    "smoke": dict(methods=["gq"], widths=[8], seeds=1, epochs=2, batch_size=2),
    "default": dict(
        methods=list(_common.ODE_METHODS),
        widths=[20, 500],
        seeds=1,
        epochs=50,
        batch_size=2,
    ),
    "full": dict(
        methods=list(_common.ODE_METHODS),
        widths=[5, 20, 100, 500, 1000, 1500, 2000, 2500, 3000],
        seeds=10,
        epochs=200,
        batch_size=2,
    ),
}


def data() -> _common.Data:
    x = np.array([[1.0], [-1.0]], np.float32)
    return _common.Data((x, -x))


def _squared_errors(model, samples, solve):
    x, y = samples
    return jnp.sum((model(x, solve) - y) ** 2, axis=-1)


def loss(model, state, samples, shared, key, solve):
    del shared, key
    return jnp.mean(_squared_errors(model, samples, solve)), state


def evaluate(model, state, samples, weights, shared, key, solve):
    del state, shared, key
    mse = jnp.sum(weights * _squared_errors(model, samples, solve))
    return dict(loss=mse, metric=mse)


def make_run(*, width, seed, method, batch_size):
    del method
    model = _common.AugmentedODE(
        1, 3, width, out_size=None, time_dependent=False, key=jr.key(seed)
    )
    return _common.Run(
        model=model,
        loss=loss,
        evaluate=evaluate,
        train=data(),
        test=data(),
        batch_size=batch_size,
        lr=_common.lr_from_table(LEARNING_RATES, width),
    )


def main(argv=None):
    args = _common.parse_args(
        TASK,
        DESCRIPTION,
        PRESETS,
        argv,
        methods=_common.ODE_METHODS,
    )
    rows = _common.run_grid(args, ft.partial(make_run, batch_size=args.batch_size))
    summary = _common.summarise(
        rows, ("method", "width"), {**_common.TRAINING_COLUMNS, "final_metric": "MSE"}
    )
    _common.write_outputs(
        args,
        rows,
        summary,
        figures={
            "fig16_scaling.png": ft.partial(
                _common.plot_scaling, rows, metric_label="MSE"
            ),
            "fig16_loss_curves.png": ft.partial(
                _common.plot_curves, rows, loss_label="MSE"
            ),
        },
    )
    return rows
