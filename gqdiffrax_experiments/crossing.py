"""Fig. 16: map x in {+1, -1} to -x with an augmented neural ODE.

Crossing trajectories (Appendix G, Figure 16): map x = +1 to -1 and x = -1 to +1,
impossible for a one-dimensional ODE, with a neural ODE augmented by three zero
dimensions whose first coordinate is read out."""

import functools as ft

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import _figures
from ._methods import ODE_METHODS
from ._models import AugmentedODE
from ._task import presets, Result, Task, training_summary
from ._train import Data, lr_from_table, Run, run_grid


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
PRESETS = presets(
    dict(methods=list(ODE_METHODS), widths=[20, 500], seeds=1, epochs=50, batch_size=2),
    smoke=dict(methods=["gq"], widths=[8], epochs=2),
    full=dict(widths=[5, 20, 100, 500, 1000, 1500, 2000, 2500, 3000])
    | dict(seeds=10, epochs=200),
)


def data() -> Data:
    x = np.array([[1.0], [-1.0]], np.float32)
    return Data((x, -x))


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
    model = AugmentedODE(
        1, 3, width, out_size=None, time_dependent=False, key=jr.key(seed)
    )
    lr = lr_from_table(LEARNING_RATES, width)
    return Run(model, loss, evaluate, data(), data(), batch_size, lr)


def run(args) -> Result:
    rows = run_grid(args, ft.partial(make_run, batch_size=args.batch_size))
    summary = training_summary(rows, ("method", "width"), "MSE")
    figures = _figures.training_figures(
        rows, "fig16_scaling.png", "fig16_loss_curves.png", metric="MSE", loss="MSE"
    )
    return Result(rows, summary, figures)


TASK = Task("crossing-trajectories", __doc__, PRESETS, run, ODE_METHODS, training=True)
