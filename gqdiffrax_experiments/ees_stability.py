r"""Stability of the near-reversible EES25/EES27 solvers, and the gradient error of
ReversibleAdjoint.

EES25 and EES27 against ReversibleHeun and Heun at growing step sizes, and the
gradient error of `ReversibleAdjoint`.

Two Stratonovich SDEs, solved with constant steps $h$:

- `linear`: the test equation $dy = \lambda y\,dt + \mu y \circ dW$, $y_0 = 1$;
- `neural`: a dissipative neural SDE $dy = (-a y + f_\theta(y))\,dt +
  \mathrm{diag}(\sigma \tanh g_\theta(y)) \circ dW$ in $\mathbb{R}^4$, with small
  MLPs $f_\theta$, $g_\theta$ at their random initialisation.

Stability: each solver makes `PROBE_STEPS` steps of size $h$ (on
$[0, \mathrm{PROBE\_STEPS} \cdot h]$); it "blows up" when some path ends with
$|y| > $ `BLOW_UP` $\cdot \max(1, |y_0|)$ or not finite. A fixed number of steps, rather
than a fixed horizon, is what exposes an amplification factor above one at every $h$.

Gradient error: on the fixed horizon $[0, T]$, the loss
$L = \mathrm{mean}_{\text{paths}, t} |y(t)|^2$ over `NUM_SAVES` save times is
differentiated through the same solver twice, with `gqdiffrax.ReversibleAdjoint` and
with `diffrax.RecursiveCheckpointAdjoint` (exact for the discrete solve), for every
stable $h$; the relative $L^2$ error over all parameters is reported. Heun is not
reversible and is there for its stability only.

Here `--smoke` is the linear problem with EES25 and Heun at two step sizes, and `--full`
the default grid with more Brownian paths.
"""

import functools as ft
import math
import pathlib

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx

import gqdiffrax

from ._figures import pyplot
from ._methods import adjoint_for, relative_error, Solve
from ._task import add_options, positive_float, presets, Result, Task


SOLVERS = {
    "EES25": gqdiffrax.EES25(),
    "EES27": gqdiffrax.EES27(),
    "ReversibleHeun": dfx.ReversibleHeun(),
    "Heun": dfx.Heun(),
}
REVERSIBLE = ("EES25", "EES27", "ReversibleHeun")
COLORS = {"EES25": "tab:blue", "EES27": "tab:purple", "ReversibleHeun": "tab:brown"}
COLORS["Heun"] = "k"
# Step sizes h of the default grid: 1/32 to 1/2 in powers of two, then to 2.25.
STEP_SIZES = [2.0**-k for k in (5, 4, 3, 2, 1)] + [
    0.75,
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.25,
]
PRESETS = presets(
    dict(problems=["linear", "neural"], solvers=list(SOLVERS), num_paths=8, width=16)
    | dict(step_sizes=STEP_SIZES, seed=0),
    smoke=dict(problems=["linear"], solvers=["EES25", "Heun"], step_sizes=[0.25, 2.0])
    | dict(num_paths=2, width=8),
    full=dict(num_paths=64),
)
PROBE_STEPS = 64
BLOW_UP = 1e3
T = 4.0  # Horizon of the gradient comparison.
NUM_SAVES = 11
# Linear test equation. Deterministic real stability limits: h = 1 (Heun), 1.54
# (EES25), 1.96 (EES27); Reversible Heun has a parasitic root of modulus above one at
# every real negative λh.
LAMBDA, MU = -2.0, 0.5
# Neural SDE.
DIM, DECAY, SIGMA = 4, 2.0, 0.3


class _NeuralDrift(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return -DECAY * y + self.mlp(y)


class _NeuralDiffusion(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return lx.DiagonalLinearOperator(SIGMA * jnp.tanh(self.mlp(y)))


def _params(problem, width, key):
    if problem == "linear":
        return jnp.array(1.0), jnp.array(LAMBDA), jnp.array(MU)
    k1, k2 = jr.split(key)
    drift = eqx.nn.MLP(DIM, DIM, width, 2, activation=jnp.tanh, key=k1)
    diffusion = eqx.nn.MLP(DIM, DIM, width, 1, activation=jnp.tanh, key=k2)
    y0 = jnp.linspace(-1.0, 1.0, DIM)
    return y0, _NeuralDrift(drift), _NeuralDiffusion(diffusion)


def _solve(params, problem, solver, adjoint, key, t1, dt, saveat, max_steps):
    if problem == "linear":
        y0, lam, mu = params
        shape, drift = (), lambda t, y, args: lam * y
        diffusion = lambda t, y, args: mu * y
    else:
        y0, drift, diffusion = params
        shape = (DIM,)
    # Resolve the Brownian motion well below the step size.
    bm = dfx.VirtualBrownianTree(0.0, t1, tol=dt / 16, shape=shape, key=key)
    terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
    return dfx.diffeqsolve(
        terms,
        solver,
        0.0,
        t1,
        dt,
        y0,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=max_steps,
        throw=False,
    ).ys


@eqx.filter_jit
def _probe(params, problem, solver, keys, dt):
    """max over paths of |y| after `PROBE_STEPS` steps of size `dt`."""
    # Not differentiated: `ForwardMode` runs the plainest loop, the quickest to compile.
    solve = lambda key: _solve(
        params,
        problem,
        solver,
        dfx.ForwardMode(),
        key,
        PROBE_STEPS * dt,
        dt,
        dfx.SaveAt(t1=True),
        PROBE_STEPS + 1,
    )
    return jnp.max(jnp.abs(jax.vmap(solve)(keys)))


def _loss(params, problem, solver, adjoint, keys, dt, max_steps):
    saveat = dfx.SaveAt(ts=jnp.linspace(0.0, T, NUM_SAVES))
    solve = lambda key: _solve(
        params, problem, solver, adjoint, key, T, dt, saveat, max_steps
    )
    ys = jax.vmap(solve)(keys).reshape(len(keys), NUM_SAVES, -1)
    return jnp.mean(jnp.sum(ys**2, axis=-1))


_grad = eqx.filter_jit(eqx.filter_grad(_loss))
# The exact gradient of the discrete solve, and the one under test.
EXACT, REVERSIBLE_ADJOINT = (
    adjoint_for(Solve("sde-direct")),
    adjoint_for(Solve("reversible")),
)


def _run(args) -> tuple[list[dict], dict]:
    """One row per (problem, solver, step size), and the largest stable step size per
    problem and solver."""
    step_sizes = sorted(args.step_sizes)
    max_steps = math.ceil(T / step_sizes[0]) + 1
    keys = jr.split(jr.key(args.seed), args.num_paths)
    rows = []
    with jax.enable_x64(True):
        for problem in args.problems:
            params = _params(problem, args.width, jr.key(args.seed + 1))
            scale = max(1.0, float(jnp.max(jnp.abs(params[0]))))
            for name in args.solvers:
                solver = SOLVERS[name]
                for h in step_sizes:
                    dt = jnp.asarray(h)
                    y_max = float(_probe(params, problem, solver, keys, dt))
                    stable = math.isfinite(y_max) and y_max <= BLOW_UP * scale
                    error = None
                    if name in REVERSIBLE and stable:
                        grads = [
                            _grad(params, problem, solver, adj, keys, dt, max_steps)
                            for adj in (REVERSIBLE_ADJOINT, EXACT)
                        ]
                        error = relative_error(*grads)
                    rows.append(
                        dict(
                            problem=problem,
                            solver=name,
                            h=h,
                            stable=stable,
                            probe_max_abs_y=y_max if math.isfinite(y_max) else None,
                            grad_rel_error=error,
                        )
                    )
    largest = {
        problem: {
            name: max(
                (
                    r["h"]
                    for r in rows
                    if r["problem"] == problem and r["solver"] == name and r["stable"]
                ),
                default=None,
            )
            for name in args.solvers
        }
        for problem in args.problems
    }
    return rows, largest


def markdown(results: dict) -> str:
    """One table per problem: step sizes down, solvers across. A cell is the relative
    gradient error of `ReversibleAdjoint` (reversible solvers), `stable` (Heun) or
    `blow-up`."""
    out = []
    for problem in results["config"]["problems"]:
        rows = [r for r in results["rows"] if r["problem"] == problem]
        solvers = results["config"]["solvers"]
        header = f"| h | {' | '.join(solvers)} |"
        lines = [f"**{problem}**", "", header, "|---" * (len(solvers) + 1) + "|"]
        for h in results["config"]["step_sizes"]:
            cells = []
            for name in solvers:
                (row,) = [r for r in rows if r["solver"] == name and r["h"] == h]
                if not row["stable"]:
                    cells.append("blow-up")
                elif row["grad_rel_error"] is None:
                    cells.append("stable")
                else:
                    cells.append(f"{row['grad_rel_error']:.1e}")
            lines.append(f"| {h:g} | {' | '.join(cells)} |")
        largest = results["largest_stable_h"][problem]
        cells = ["none" if largest[n] is None else f"{largest[n]:g}" for n in solvers]
        lines.append(f"| largest stable h | {' | '.join(cells)} |")
        out.append("\n".join(lines))
    note = (
        "Cells: relative error of the ReversibleAdjoint gradient against "
        "RecursiveCheckpointAdjoint through the same solver (relative L2 norm over "
        f"all parameters; horizon T = {T:g}, loss = mean |y(t)|^2 over {NUM_SAVES} "
        "save times), or `stable` (Heun, not reversible). `blow-up`: after "
        f"{PROBE_STEPS} steps of size h some path has |y| > {BLOW_UP:g} max(1, |y0|) "
        f"or is not finite. {results['config']['num_paths']} Brownian paths, float64."
    )
    return "\n\n".join(out + [note])


def plot(results: dict, path: pathlib.Path) -> None:
    """Top row: max |y| after the probe's steps against h (non-finite values drawn at
    the top edge).
    Bottom row: the relative gradient error of the reversible solvers."""
    plt = pyplot()
    import matplotlib.ticker

    config = results["config"]
    problems = config["problems"]
    fig, axes = plt.subplots(
        2, len(problems), figsize=(5 * len(problems), 7), squeeze=False
    )
    for column, problem in enumerate(problems):
        top, bottom = axes[0, column], axes[1, column]
        rows = [r for r in results["rows"] if r["problem"] == problem]
        finite = [r["probe_max_abs_y"] for r in rows if r["probe_max_abs_y"]]
        ceiling = 10 * max(finite, default=1.0)
        for name in config["solvers"]:
            mine = [r for r in rows if r["solver"] == name]
            hs = [r["h"] for r in mine]
            y_max = [r["probe_max_abs_y"] or ceiling for r in mine]
            top.semilogy(hs, y_max, "o-", color=COLORS[name], label=name)
            ok = [r for r in mine if r["grad_rel_error"] is not None]
            if ok:
                bottom.semilogy(
                    [r["h"] for r in ok],
                    [r["grad_rel_error"] for r in ok],
                    "o-",
                    color=COLORS[name],
                    label=name,
                )
        top.axhline(config["blow_up"], color="grey", ls="--", lw=0.8)
        top.set_ylim(top=ceiling * 10)
        top.set_title(f"{problem}: stability")
        top.set_ylabel(f"max |y| after {PROBE_STEPS} steps")
        bottom.set_title(f"{problem}: ReversibleAdjoint vs exact gradient")
        bottom.set_ylabel("relative gradient error")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("step size h")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    for flag, choices in (("--problems", ("linear", "neural")), ("--solvers", SOLVERS)):
        parser.add_argument(flag, nargs="+", choices=tuple(choices))
    add_options(parser, positive_float, metavar="H", nargs="+", step_sizes="steps h")
    add_options(
        parser, num_paths="Brownian paths", width="width of the neural SDE's MLPs"
    )
    parser.add_argument("--seed", type=int, help="PRNG seed of paths and parameters")


def run(args) -> Result:
    rows, largest = _run(args)
    results = dict(
        config=dict(
            problems=args.problems,
            solvers=args.solvers,
            step_sizes=sorted(args.step_sizes),
            num_paths=args.num_paths,
            blow_up=BLOW_UP,
        ),
        rows=rows,
        largest_stable_h=largest,
    )
    settings = dict(
        probe_steps=PROBE_STEPS,
        blow_up=BLOW_UP,
        T=T,
        num_saves=NUM_SAVES,
        linear=dict(lam=LAMBDA, mu=MU),
        neural=dict(dim=DIM, decay=DECAY, sigma=SIGMA),
    )
    return Result(
        rows,
        markdown(results),
        {"ees_stability.png": ft.partial(plot, results)},
        extra=dict(largest_stable_h=largest, settings=settings),
    )


TASK = Task("ees-stability", __doc__, PRESETS, run, arguments=add_arguments)
