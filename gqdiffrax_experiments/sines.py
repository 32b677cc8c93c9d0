r"""Fig. 5 and Table 4: second-order neural ODE on sine curves, 10/50 regular or
irregular times.

Sines (Section 5.4, Appendix E.3, Figure 5 and Table 4): a second-order neural ODE
learns the acceleration of $\ddot x = -x$ from 15 sine curves.

Every series starts from its given position and velocity $x_0, v_0 \sim U(-1, 1)$ and
is observed at 50 (or 10) times in $[0, 2\pi]$: the same regular grid for all, or
irregular times of its own. A batch is solved as one ODE; with irregular times it is
saved at the union of the batch's times and a mask selects each series' own, which is
what makes irregular times expensive (Table 4).
"""

import functools as ft
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import _figures
from ._methods import ODE_CHOICES, ODE_METHODS, ode_solve
from ._task import add_options, presets, Result, Task, training_summary, UsageError
from ._train import Data, lr_from_table, Run, run_grid


# Appendix E.3, Table 3.
LEARNING_RATES = {5: 2e-2, 20: 8e-3, 200: 5e-4, 1000: 3e-5, 2000: 1e-5}
PRESETS = presets(
    dict(methods=list(ODE_METHODS), widths=[20, 200], seeds=1, epochs=30)
    | dict(batch_size=15, num_train=15, num_test=5, num_times=[50])
    | dict(regularity=["regular"]),
    smoke=dict(methods=["gq"], widths=[8], epochs=1, batch_size=3, num_train=3)
    | dict(num_test=2, num_times=[10]),
    full=dict(widths=[5, 20, 200, 1000, 2000], seeds=5, epochs=250),
)


class SecondOrderODE(eqx.Module):
    r"""$\frac{d}{dt}[x, v] = [v, \mathrm{MLP}(x, v)]$: only the acceleration is
    learnt, by a time-independent MLP with two hidden layers and softplus."""

    acceleration: eqx.nn.MLP

    def __init__(self, width, *, key):
        self.acceleration = eqx.nn.MLP(
            2, 1, width, 2, activation=jax.nn.softplus, key=key
        )

    def field(self, t, y, args):
        del t, args
        return jnp.concatenate([y[:, 1:], jax.vmap(self.acceleration)(y)], axis=-1)

    def __call__(self, y0, ts, solve):
        """Positions of the batch `y0 = [x0, v0]` at the times `ts`, shape (batch,
        times)."""
        ys = ode_solve(solve, self.field, 0.0, ts[-1], y0, ts=ts).ys
        return ys[..., 0].T


def sample(rng, num_series, num_times, regularity):
    """Initial states, the union of all observation times, and per series the targets
    at the union times and the mask of its own times."""
    y0 = rng.uniform(-1, 1, (num_series, 2))
    if regularity == "regular":
        own = np.broadcast_to(
            np.linspace(0, 2 * np.pi, num_times), (num_series, num_times)
        )
    else:
        own = np.sort(rng.uniform(0, 2 * np.pi, (num_series, num_times)), axis=-1)
    ts = np.unique(own)
    mask = (own[:, :, None] == ts[None, None, :]).any(axis=1)
    target = y0[:, :1] * np.cos(ts) + y0[:, 1:] * np.sin(ts)
    f32 = lambda x: x.astype(np.float32)
    return Data((f32(y0), f32(target), f32(mask)), shared=(f32(ts),))


def _per_series_mse(model, samples, shared, solve):
    y0, target, mask = samples
    (ts,) = shared
    err = (model(y0, ts, solve) - target) ** 2
    return jnp.sum(mask * err, axis=-1) / jnp.sum(mask, axis=-1)


def loss(model, state, samples, shared, key, solve):
    del key
    return jnp.mean(_per_series_mse(model, samples, shared, solve)), state


def evaluate(model, state, samples, weights, shared, key, solve):
    del state, key
    mse = jnp.sum(weights * _per_series_mse(model, samples, shared, solve))
    return dict(loss=mse, metric=mse)


def make_run(*, width, seed, method, num_times, regularity, args):
    del method
    rng = np.random.default_rng(seed)
    train = sample(rng, args.num_train, num_times, regularity)
    test = sample(rng, args.num_test, num_times, regularity)
    model = SecondOrderODE(width, key=jr.key(seed))
    lr = lr_from_table(LEARNING_RATES, width)
    return Run(model, loss, evaluate, train, test, args.batch_size, lr)


def add_arguments(parser):
    add_options(
        parser, nargs="+", num_times="observation times per series (Table 4: 10 50)"
    )
    parser.add_argument(
        "--regularity",
        nargs="+",
        choices=("regular", "irregular"),
        help="regular grid and/or irregular times (Table 4: both)",
    )
    add_options(parser, num_train="training series", num_test="test series")


def run(args) -> Result:
    if min(args.num_times) < 2:
        raise UsageError("--num-times must be at least 2")
    extra = [
        dict(num_times=n, regularity=r)
        for n, r in itertools.product(args.num_times, args.regularity)
    ]
    rows = run_grid(args, ft.partial(make_run, args=args), extra=extra)
    keys = ("num_times", "regularity", "method", "width")
    summary = training_summary(rows, keys, "test MSE")
    series = ("method",) if len(extra) == 1 else ("method", "num_times", "regularity")
    figures = _figures.training_figures(
        rows,
        "fig5_scaling.png",
        "fig9_loss_curves.png",
        metric="Test MSE",
        loss="Test MSE",
        series_keys=series,
    )
    return Result(rows, summary, figures)


TASK = Task(
    "sines", __doc__, PRESETS, run, ODE_CHOICES, training=True, arguments=add_arguments
)
