r"""Training a stiff neural SDE with ReversibleAdjoint: EES25/EES27 against Reversible
Heun at a fixed number of steps.

The EES paper's claim in training: EES schemes train where Reversible Heun diverges.

Data: a mean-reverting geometric Brownian motion in $\mathbb{R}^4$, the Stratonovich
SDE $dx = -\kappa (x - m)\,dt + s\,x \circ dW$ (diagonal noise) with a strong
dissipation $\kappa = 5$, $s = 0.3$, $m = (1, 0.5, -0.5, -1)$, $x_0 = (2, -1, 0.5,
1.5)$, observed at `NUM_OBS` times on $[0, T]$, $T = 2$; sampled by Euler–Maruyama
(Itô form) with 2048 steps.

Model: $dy = (-\kappa y + f_\theta(y))\,dt + \mathrm{diag}(g_\theta(y)) \circ dW$: the
known stiff linear part and MLPs $f_\theta$, $g_\theta$ for the rest. Loss: the KL
divergence between per-time, per-coordinate Gaussian fits of data and model paths, as
in `ou-sde`. Every solver trains with `gqdiffrax.ReversibleAdjoint` and a constant
step $h = T / N$ for each `--num-steps` $N$, with Adam, from the same initialisation
and the same Brownian keys. A run diverges when its loss or gradient is not finite (its
curve stops there) or its loss exceeds `DIVERGED` times its first loss.

Also, at the initial parameters and at the parameters after training (while finite),
the relative error of the `ReversibleAdjoint` gradient against
`diffrax.RecursiveCheckpointAdjoint` through the same solver and steps. The final test
KL is evaluated with held-out data and a fine Heun solve (256 steps), so that it judges
the learnt SDE rather than its coarse discretisation.
"""

import functools as ft
import math
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax

import gqdiffrax

from ._figures import pyplot
from ._methods import relative_error
from ._task import add_options, markdown_table, positive_float, presets, Result, Task
from .ou_sde import gaussian_kl


SOLVERS = {
    "EES25": gqdiffrax.EES25(),
    "EES27": gqdiffrax.EES27(),
    "ReversibleHeun": dfx.ReversibleHeun(),
}
COLORS = {"EES25": "tab:blue", "EES27": "tab:purple", "ReversibleHeun": "tab:brown"}
KAPPA, S, T, NUM_OBS = 5.0, 0.3, 2.0, 8
M = np.array([1.0, 0.5, -0.5, -1.0])
X0 = np.array([2.0, -1.0, 0.5, 1.5])
DIM = len(X0)
DATA_STEPS, EVAL_STEPS = 2048, 256
DIVERGED = 1e3
PRESETS = presets(
    dict(solvers=list(SOLVERS), num_steps=[10, 40, 160], train_steps=200)
    | dict(num_paths=128, width=32, lr=3e-3, seed=0),
    smoke=dict(solvers=["EES25", "ReversibleHeun"], num_steps=[4], train_steps=3)
    | dict(num_paths=8, width=8),
    full=dict(num_steps=[5, 10, 20, 40, 80, 160, 320], train_steps=1000)
    | dict(num_paths=512),
)


def simulate(seed: int, num_paths: int) -> np.ndarray:
    """Data paths at the observation times, shape (paths, NUM_OBS, DIM)."""
    rng = np.random.default_rng(seed)
    h = T / DATA_STEPS
    every = DATA_STEPS // NUM_OBS
    x = np.broadcast_to(X0, (num_paths, DIM)).copy()
    out = []
    for n in range(1, DATA_STEPS + 1):
        # The Itô form: Stratonovich drift plus s²x/2.
        drift = -KAPPA * (x - M) + 0.5 * S**2 * x
        x = x + drift * h + S * x * np.sqrt(h) * rng.standard_normal(x.shape)
        if n % every == 0:
            out.append(x)
    return np.stack(out, axis=1).astype(np.float32)


class StiffSDE(eqx.Module):
    drift_mlp: eqx.nn.MLP
    diffusion_mlp: eqx.nn.MLP

    def __init__(self, width, *, key):
        k1, k2 = jr.split(key)
        mlp = ft.partial(eqx.nn.MLP, DIM, DIM, width, 2, activation=jnp.tanh)
        self.drift_mlp, self.diffusion_mlp = mlp(key=k1), mlp(key=k2)

    def drift(self, t, y, args):
        del t, args
        return -KAPPA * y + self.drift_mlp(y)

    def diffusion(self, t, y, args):
        del t, args
        return lx.DiagonalLinearOperator(self.diffusion_mlp(y))


def paths(model, solver, adjoint, num_steps, keys):
    """Model paths at the observation times, shape (paths, NUM_OBS, DIM)."""
    obs = jnp.linspace(T / NUM_OBS, T, NUM_OBS)
    dt = T / num_steps

    def one(key):
        bm = dfx.VirtualBrownianTree(0.0, T, tol=dt / 4, shape=(DIM,), key=key)
        terms = gqdiffrax.sde_terms(model.drift, model.diffusion, bm)
        return dfx.diffeqsolve(
            terms,
            solver,
            0.0,
            T,
            dt,
            jnp.asarray(X0, jnp.float32),
            saveat=dfx.SaveAt(ts=obs),
            adjoint=adjoint,
            max_steps=num_steps + 1,
            throw=False,
        ).ys

    return jax.vmap(one)(keys)


def kl(model, data, solver, adjoint, num_steps, keys):
    return jnp.mean(gaussian_kl(data, paths(model, solver, adjoint, num_steps, keys)))


_grad = eqx.filter_jit(eqx.filter_value_and_grad(kl))
_kl = eqx.filter_jit(kl)


def _finite(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def grad_error(model, data, solver, num_steps, keys) -> float | None:
    """Relative L2 error of ReversibleAdjoint's gradient against the exact gradient of
    the same discrete solve (RecursiveCheckpointAdjoint); None if either is not
    finite."""
    grads = [
        _grad(model, data, solver, adjoint, num_steps, keys)[1]
        for adjoint in (gqdiffrax.ReversibleAdjoint(), dfx.RecursiveCheckpointAdjoint())
    ]
    if not all(map(_finite, grads)):
        return None
    error = relative_error(*grads)
    return error if math.isfinite(error) else None


def train_one(args, name, num_steps, data, test, model):
    solver, adjoint = SOLVERS[name], gqdiffrax.ReversibleAdjoint()
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, keys):
        loss, grads = eqx.filter_value_and_grad(kl)(
            model, data, solver, adjoint, num_steps, keys
        )
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss, grads

    base = jr.key(args.seed + 1)
    error_keys = jr.split(jr.fold_in(base, 10**6), args.num_paths)
    error_init = grad_error(model, data, solver, num_steps, error_keys)
    start = time.perf_counter()
    curve, diverged_at, trained = [], None, model
    for i in range(args.train_steps):
        keys = jr.split(jr.fold_in(base, i), args.num_paths)
        new, new_state, loss, grads = step(trained, opt_state, keys)
        loss = float(loss)
        bad = not (math.isfinite(loss) and _finite(grads))
        if bad or (curve and loss > DIVERGED * curve[0]["loss"]):
            diverged_at = i + 1
            if math.isfinite(loss):
                curve.append(dict(step=i + 1, loss=loss))
            break
        curve.append(dict(step=i + 1, loss=loss))
        trained, opt_state = new, new_state
    wall_s = time.perf_counter() - start
    error_final = grad_error(trained, data, solver, num_steps, error_keys)
    eval_keys = jr.split(jr.fold_in(base, 2 * 10**6), args.num_paths)
    fine = dfx.Heun(), dfx.RecursiveCheckpointAdjoint(), EVAL_STEPS
    test_kl = float(_kl(trained, test, *fine, eval_keys))
    return dict(
        solver=name,
        num_steps=num_steps,
        kappa_h=KAPPA * T / num_steps,
        diverged_at=diverged_at,
        first_loss=curve[0]["loss"] if curve else None,
        final_loss=curve[-1]["loss"] if curve else None,
        test_kl=test_kl if math.isfinite(test_kl) else None,
        grad_error_init=error_init,
        grad_error_final=error_final,
        wall_s=wall_s,
        curve=curve,
    )


def _cell(value, spec):
    return "–" if value is None else format(value, spec)


def markdown(rows, args) -> str:
    body = [
        [
            r["num_steps"],
            f"{r['kappa_h']:.3g}",
            r["solver"],
            "no" if r["diverged_at"] is None else f"at step {r['diverged_at']}",
            _cell(r["first_loss"], ".3g"),
            _cell(r["final_loss"], ".3g"),
            _cell(r["test_kl"], ".3g"),
            _cell(r["grad_error_init"], ".1e"),
            _cell(r["grad_error_final"], ".1e"),
            f"{r['wall_s']:.1f}",
        ]
        for r in rows
    ]
    headers = [
        "N steps",
        "κh",
        "solver",
        "diverged",
        "first loss",
        "last loss",
        "test KL (fine Heun)",
        "grad error (init)",
        "grad error (trained)",
        "train (s)",
    ]
    note = (
        f"{args.train_steps} Adam steps (lr {args.lr:g}), {args.num_paths} paths per "
        f"step, MLP width {args.width}, float32. Loss: mean Gaussian KL over "
        f"{NUM_OBS} observation times and {DIM} coordinates. Grad error: relative L2 "
        "error of ReversibleAdjoint against RecursiveCheckpointAdjoint through the "
        "same solver and steps (– where a gradient is not finite). Diverged: the "
        "loss or gradient was not finite, or the loss exceeded "
        f"{DIVERGED:g} times its first value."
    )
    return markdown_table(headers, body) + "\n\n" + note


def plot(rows, num_steps, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(num_steps), figsize=(4.5 * len(num_steps), 3.8), squeeze=False
    )
    for ax, n in zip(axes[0], num_steps):
        for r in (r for r in rows if r["num_steps"] == n):
            curve = r["curve"]
            label = r["solver"]
            if r["diverged_at"] is not None:
                label += f" (diverged at step {r['diverged_at']})"
            ax.semilogy(
                [p["step"] for p in curve],
                [p["loss"] for p in curve],
                color=COLORS[r["solver"]],
                label=label,
                marker="o" if len(curve) < 5 else None,
            )
        ax.set(
            xlabel="Adam step",
            ylabel="Training loss (Gaussian KL)",
            title=f"N = {n} steps (κh = {KAPPA * T / n:.3g})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--solvers", nargs="+", choices=tuple(SOLVERS))
    add_options(parser, metavar="N", nargs="+", num_steps="solver steps on [0, T]")
    add_options(
        parser,
        train_steps="Adam steps",
        num_paths="data and model paths per step",
        width="width of the MLPs",
    )
    add_options(parser, positive_float, metavar="LR", lr="Adam's learning rate")
    parser.add_argument("--seed", type=int, help="seed of data, model and paths")


def run(args) -> Result:
    data = jnp.asarray(simulate(args.seed, args.num_paths))
    test = jnp.asarray(simulate(args.seed + 100, args.num_paths))
    model = StiffSDE(args.width, key=jr.key(args.seed))
    rows = []
    for n in args.num_steps:
        for name in args.solvers:
            print(f"{name}, N = {n}: training ...", flush=True)
            rows.append(train_one(args, name, n, data, test, model))
    settings = dict(kappa=KAPPA, s=S, T=T, m=M.tolist(), x0=X0.tolist())
    return Result(
        rows,
        markdown(rows, args),
        {"ees_training.png": ft.partial(plot, rows, args.num_steps)},
        extra=dict(settings=settings | dict(num_obs=NUM_OBS, diverged=DIVERGED)),
    )


TASK = Task("ees-training", __doc__, PRESETS, run, arguments=add_arguments)
