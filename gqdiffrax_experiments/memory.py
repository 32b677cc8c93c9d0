r"""Fig. 2: compiled memory of the gradient against solver tolerance.

Memory efficiency (Section 5.2, Figure 2): compiled memory of one gradient of
$L = z(15)^2$, $\dot z = az$, against the solver tolerance.

For each tolerance (rtol = atol) the forward solve's number of steps $n$ is measured
first and every method gets `max_steps` $= 2n$, so that memory that scales with the
step budget shows up (the backward solves of the adjoint methods get the same budget).
The measure is XLA's temporary buffer size of the compiled gradient,
`jax.jit(grad).lower(x).compile().memory_analysis().temp_size_in_bytes`.

`direct` stores every step (`RecursiveCheckpointAdjoint(checkpoints=max_steps)`): that
is backpropagation through the solver as the paper measures it, growing with the number
of steps. `--checkpoints binomial` uses diffrax's default online checkpointing instead,
whose memory grows only logarithmically. The adjoint methods need memory independent
of the number of steps; GQ's default keeps the state at every step of the budget
(within `GQAdjoint(state_budget=...)`), one row per step, and
`GQAdjoint(state_budget=0)` or the paper's `IntervalGauss` need none.
"""

import functools as ft

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

from ._figures import pyplot
from ._methods import memory_analysis, METHODS, ODE_METHODS, ode_solve, Solve
from ._task import add_options, markdown_table, positive_float, presets, Result, Task


A, Z0, T = 0.2, 10.0, 15.0
PRESETS = presets(
    dict(methods=["direct", "adjoint", "gq"], tols=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7]),
    smoke=dict(methods=["direct", "gq"], tols=[1e-3, 1e-5]),
    full=dict(methods=list(ODE_METHODS)),
)


def _vector_field(t, z, a):
    del t
    return a * z


@jax.jit
def num_steps(tol):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_vector_field),
        dfx.Dopri5(),
        0.0,
        T,
        None,
        jnp.array(Z0),
        args=jnp.array(A),
        stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
        max_steps=100_000,
    )
    return sol.stats["num_steps"]


def loss(params, solve, checkpoints):
    z0, a = params
    if solve.method == "direct" and checkpoints == "all":
        adjoint = dfx.RecursiveCheckpointAdjoint(checkpoints=solve.max_steps)
        zT = dfx.diffeqsolve(
            dfx.ODETerm(_vector_field),
            dfx.Dopri5(),
            0.0,
            T,
            None,
            z0,
            args=a,
            stepsize_controller=dfx.PIDController(rtol=solve.rtol, atol=solve.atol),
            adjoint=adjoint,
            max_steps=solve.max_steps,
        ).ys[-1]
    else:
        zT = ode_solve(solve, _vector_field, 0.0, T, z0, args=a).ys[-1]
    return zT**2


def add_arguments(parser):
    add_options(
        parser, positive_float, metavar="TOL", nargs="+", tols="rtol = atol values"
    )
    parser.add_argument(
        "--checkpoints",
        choices=("all", "binomial"),
        default="all",
        help="what the direct method stores: every step, or diffrax's "
        "default binomial checkpoints",
    )


def run(args) -> Result:
    with jax.enable_x64(True):
        rows = _run(args)
    by_tol = {}
    for row in rows:
        by_tol.setdefault(row["tol"], {"steps": row["num_steps"]})[row["method"]] = row[
            "temp_bytes"
        ]
    summary = markdown_table(
        ["tol", "forward steps", *(f"{m} (bytes)" for m in args.methods)],
        [
            [f"{tol:g}", v["steps"], *(v[m] for m in args.methods)]
            for tol, v in by_tol.items()
        ],
    )
    summary += (
        "\n\nTemporary memory of the compiled gradient (XLA `memory_analysis`), "
        f"max_steps = 2 x forward steps; direct stores {args.checkpoints} steps."
    )
    return Result(rows, summary, {"fig2_memory.png": ft.partial(_plot, rows)})


def _run(args):
    params = (jnp.array(Z0), jnp.array(A))
    exact = np.array([2 * Z0 * np.exp(2 * A * T), 2 * T * Z0**2 * np.exp(2 * A * T)])
    rows = []
    for tol in args.tols:
        steps = int(num_steps(tol))
        for method in args.methods:
            solve = Solve(method, rtol=tol, atol=tol, C=args.C, max_steps=2 * steps)
            grad = jax.jit(
                jax.grad(ft.partial(loss, solve=solve, checkpoints=args.checkpoints))
            )
            compiled = grad.lower(params).compile()
            memory = memory_analysis(compiled)
            # Run it too: the memory of a gradient that fails would mean nothing.
            g = np.array([float(x) for x in compiled(params)])
            rows.append(
                dict(
                    method=method,
                    tol=tol,
                    num_steps=steps,
                    max_steps=2 * steps,
                    temp_bytes=int(memory.temp_size_in_bytes),
                    argument_bytes=int(memory.argument_size_in_bytes),
                    output_bytes=int(memory.output_size_in_bytes),
                    grad_rel_error=float(np.max(np.abs(g - exact) / exact)),
                )
            )
    return rows


def _plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        info = METHODS[method]
        ax.plot(
            [-np.log10(r["tol"]) for r in mine],
            [np.log10(max(r["temp_bytes"], 1)) for r in mine],
            marker="o",
            label=info.label,
            color=info.color,
        )
    ax.set(
        xlabel="-log10(tol)",
        ylabel="log10(Memory Usage / bytes)",
        title="Memory of one gradient",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TASK = Task("memory", __doc__, PRESETS, run, ODE_METHODS, arguments=add_arguments)
