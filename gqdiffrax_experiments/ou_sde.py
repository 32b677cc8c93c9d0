r"""Fig. 7 and Table 6: neural SDE on an Ornstein-Uhlenbeck process; GQ on the
Wong-Zakai ODE against SDE direct/backsolve.

Ornstein–Uhlenbeck neural SDE (Section 5.6, Appendix F, Figure 7 and Table 6).

Data: $dx = (\mu t - \theta x)\,dt + (\sigma + \phi t) \circ dW$ with $\mu = 0.2$,
$\theta = 0.1$, $\sigma = 0.6$, $\phi = 0.15$, $x_0 \sim U(-3, 3)$, observed every 0.1
on $[0, 10]$, many paths per initial condition. The transitions of this linear SDE are
Gaussian, so the data are sampled exactly (no discretisation error).

Model: drift and diffusion are separate time-dependent MLPs (two hidden layers,
softplus) acting on the observation itself, with diagonal noise (one Wiener process per
path). Loss and metric: at each observation time, fit a Gaussian to the model's paths
and to the data's paths from the same initial condition; average
$\mathrm{KL}(\text{data} \,\|\, \text{model})$ over times and initial conditions.

Methods: `gq` (and the other ODE methods) train the Wong–Zakai ODE driven by a
Karhunen–Loève Wiener surrogate with `--num-cosines` terms (zero: the drift alone),
solved by Dopri5; `sde-direct`, `sde-adjoint`, `reversible` and `reversible-heun` train
the SDE itself with a fixed step `--dt`. Every method is evaluated on the SDE, with
reversible Heun at step `--dt`.
"""

import functools as ft

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np

import gqdiffrax

from . import _figures
from ._methods import adjoint_for, counted, METHODS, ode_solve, Solve
from ._task import (
    add_options,
    positive_float,
    presets,
    Result,
    Task,
    training_summary,
    UsageError,
)
from ._train import Data, lr_from_table, Run, run_grid


MU, THETA, SIGMA, PHI = 0.2, 0.1, 0.6, 0.15
OBSERVATION_STEP = 0.1
# Appendix F, Table 5.
LEARNING_RATES = {5: 1e-3, 20: 5e-4, 50: 1e-4, 100: 1e-4}
OU_METHODS = (
    "gq",
    "sde-direct",
    "sde-adjoint",
    "reversible",
    "reversible-heun",
    "direct",
    "adjoint",
    "seminorm",
)
PRESETS = presets(
    dict(methods=["sde-direct", "sde-adjoint", "gq", "reversible"], widths=[20])
    | dict(seeds=1, epochs=4, batch_size=8, num_train=16, num_test=8, num_paths=16)
    | dict(t_end=10.0, num_cosines=[10]),
    smoke=dict(methods=["gq", "sde-adjoint"], widths=[8], epochs=1, batch_size=2)
    | dict(num_train=2, num_test=2, num_paths=8, t_end=1.0),
    full=dict(methods=["sde-direct", "sde-adjoint", "gq"], widths=[5, 20, 50, 100])
    | dict(seeds=5, epochs=100, batch_size=40, num_train=200, num_test=20)
    | dict(num_paths=45),
)


def simulate(rng, num_ics, num_paths, t_end):
    """Initial conditions (num_ics,) and exact samples (num_ics, num_paths, times) at
    0.1, 0.2, ..., t_end."""
    h = OBSERVATION_STEP
    ts = h * np.arange(1, round(t_end / h) + 1)
    nodes, weights = np.polynomial.legendre.leggauss(32)
    decay = np.exp(-THETA * h)
    x0 = rng.uniform(-3, 3, num_ics)
    x = np.repeat(x0[:, None], num_paths, axis=1)
    out = []
    for t in ts - h:
        # x(t + h) = e^{-θh} x(t) + ∫ e^{-θ(t+h-s)} μ s ds
        #            + ∫ e^{-θ(t+h-s)} (σ + φ s) dW_s, integrals over s in [t, t + h].
        s = t + h * (nodes + 1) / 2
        kernel = np.exp(-THETA * (t + h - s))
        mean = h / 2 * np.sum(weights * kernel * MU * s)
        var = h / 2 * np.sum(weights * (kernel * (SIGMA + PHI * s)) ** 2)
        x = decay * x + mean + np.sqrt(var) * rng.standard_normal(x.shape)
        out.append(x)
    return x0.astype(np.float32), np.stack(out, axis=-1).astype(np.float32), ts


class NeuralSDE(eqx.Module):
    drift_mlp: eqx.nn.MLP
    diffusion_mlp: eqx.nn.MLP
    num_paths: int = eqx.field(static=True)
    num_cosines: int = eqx.field(static=True)
    t_end: float = eqx.field(static=True)

    def __init__(self, width, *, num_paths, num_cosines, t_end, key):
        dkey, gkey = jr.split(key)
        mlp = ft.partial(eqx.nn.MLP, 2, "scalar", width, 2, activation=jax.nn.softplus)
        self.drift_mlp, self.diffusion_mlp = mlp(key=dkey), mlp(key=gkey)
        self.num_paths, self.num_cosines, self.t_end = num_paths, num_cosines, t_end

    def _inputs(self, t, y):
        return jnp.stack([y, jnp.broadcast_to(jnp.asarray(t, y.dtype), y.shape)], -1)

    def drift(self, t, y, args):
        del args
        return jax.vmap(self.drift_mlp)(self._inputs(t, y))

    def diffusion(self, t, y, args):
        del args
        return lx.DiagonalLinearOperator(
            jax.vmap(self.diffusion_mlp)(self._inputs(t, y))
        )

    def __call__(self, x0, ts, key, solve):
        """Paths from each initial condition, shape (num_ics, num_paths, times)."""
        y0 = jnp.repeat(x0, self.num_paths)
        shape = y0.shape
        if METHODS[solve.method].kind == "ode":
            if self.num_cosines == 0:
                vf = self.drift
            else:
                surrogate = gqdiffrax.WienerSurrogate(
                    0.0, self.t_end, shape, key, num_terms=self.num_cosines
                )
                vf = gqdiffrax.wong_zakai_term(
                    self.drift, self.diffusion, surrogate
                ).vector_field
            ys = ode_solve(solve, vf, 0.0, self.t_end, y0, ts=ts).ys
        else:
            ys = sde_solve(self, solve, y0, ts, key).ys
        return ys.T.reshape(x0.shape[0], self.num_paths, ts.shape[0])


def sde_solve(model, solve, y0, ts, key):
    bm = dfx.VirtualBrownianTree(
        0.0, model.t_end, tol=solve.dt / 2, shape=y0.shape, key=key
    )
    terms = gqdiffrax.sde_terms(counted(model.drift, solve), model.diffusion, bm)
    solver = gqdiffrax.EES25() if solve.method == "reversible" else dfx.ReversibleHeun()
    return dfx.diffeqsolve(
        terms,
        solver,
        0.0,
        model.t_end,
        solve.dt,
        y0,
        saveat=dfx.SaveAt(ts=ts),
        adjoint=adjoint_for(solve),
        max_steps=int(np.ceil(model.t_end / solve.dt)) + 16,
    )


def gaussian_kl(data, pred, eps=1e-6):
    """KL(N(data) || N(pred)) between Gaussian fits over the paths axis (-2), per
    initial condition and time."""
    m1, v1 = jnp.mean(data, -2), jnp.var(data, -2) + eps
    m2, v2 = jnp.mean(pred, -2), jnp.var(pred, -2) + eps
    return 0.5 * (jnp.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def _per_ic_kl(model, samples, shared, key, solve):
    x0, data = samples
    (ts,) = shared
    return jnp.mean(gaussian_kl(data, model(x0, ts, key, solve)), axis=-1)


def loss(model, state, samples, shared, key, solve):
    return jnp.mean(_per_ic_kl(model, samples, shared, key, solve)), state


def evaluate(model, state, samples, weights, shared, key, solve):
    del state
    kl = jnp.sum(weights * _per_ic_kl(model, samples, shared, key, solve))
    return dict(loss=kl, metric=kl)


def make_run(*, width, seed, method, num_cosines, args):
    del method
    rng = np.random.default_rng(seed)
    x0, paths, ts = simulate(
        rng, args.num_train + args.num_test, args.num_paths, args.t_end
    )
    train = Data(
        (x0[: args.num_train], paths[: args.num_train]), shared=(ts.astype(np.float32),)
    )
    test = Data(
        (x0[args.num_train :], paths[args.num_train :]), shared=(ts.astype(np.float32),)
    )
    model = NeuralSDE(
        width,
        num_paths=args.num_paths,
        num_cosines=num_cosines or 0,
        t_end=float(ts[-1]),
        key=jr.key(seed),
    )
    lr = lr_from_table(LEARNING_RATES, width)
    return Run(model, loss, evaluate, train, test, args.batch_size, lr)


def add_arguments(parser):
    add_options(
        parser,
        int,
        metavar="M",
        nargs="+",
        num_cosines="terms of the Wiener surrogate for ODE methods (Table 6: 0 1 5 "
        "10 25 50)",
    )
    parser.add_argument(
        "--dt",
        type=positive_float,
        default=0.01,
        help="step of the SDE solvers, in training and evaluation (default: 0.01)",
    )
    add_options(
        parser,
        num_train="training initial conditions",
        num_test="test initial conditions",
        num_paths="paths per initial condition, in the data and the model",
    )
    add_options(parser, positive_float, metavar="T", t_end="final observation time")


def run(args) -> Result:
    if min(args.num_cosines) < 0:
        raise UsageError("--num-cosines must be non-negative")
    if args.t_end < OBSERVATION_STEP:
        raise UsageError(f"--t-end must be at least {OBSERVATION_STEP}")
    if args.num_paths < 2:
        raise UsageError("--num-paths must be at least 2 to fit a Gaussian")

    def extra(method):
        if METHODS[method].kind == "sde":
            return [dict(num_cosines=None)]
        return [dict(num_cosines=m) for m in args.num_cosines]

    evaluation = Solve("sde-direct", dt=args.dt)
    rows = run_grid(
        args,
        ft.partial(make_run, args=args),
        extra=extra,
        solve_kwargs=lambda config: dict(C=args.C, dt=args.dt),
        eval_solve=lambda solve, config: evaluation,
    )
    keys = ("num_cosines", "method", "width")
    summary = training_summary(rows, keys, "test KL")
    series = ("method",) if len(args.num_cosines) == 1 else ("method", "num_cosines")
    kl = "Test KL Divergence"
    figures = _figures.training_figures(
        rows,
        "fig7_scaling.png",
        "fig14_loss_curves.png",
        metric=kl,
        loss=kl,
        series_keys=series,
    )
    return Result(rows, summary, figures)


TASK = Task(
    "ou-sde", __doc__, PRESETS, run, OU_METHODS, training=True, arguments=add_arguments
)
