"""Accuracy of GQAdjoint's gradients: the docs page "Accuracy", regenerated.

Three tables, all float64, errors relative (the norm of the difference over the norm
of the reference, across every differentiated leaf): (1) the gradient against
`RecursiveCheckpointAdjoint` at the same tolerance, versus `rtol`, for the paper's
method (`GQAdjoint(IntervalGauss(C=0.1))`: one Gauss rule per interval between save
times), the default (`GQAdjoint()`, a rule on every backward step) and
`BacksolveAdjoint`; (2) a field that reads an interpolated control's derivative, with
and without the knots as `jump_ts`, against the direct method at rtol 1e-11; (3) a
contracting system, with the forward states kept (the default) or `z` re-solved
backwards (`state_budget=0`) with and without forward checkpoints, against the direct
method at rtol 1e-12."""

import argparse

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import gqdiffrax

from ._task import add_options, positive_float, presets, Result, say, Task


_PROBLEMS = ("lv", "mlp", "exponential", "relu")
PRESETS = presets(
    dict(
        problems=list(_PROBLEMS),
        tols=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
        knots=True,
        checkpoints=[10, 20, 50, 100],
    ),
    smoke=dict(
        problems=["exponential"], tols=[1e-4, 1e-6], knots=False, checkpoints=[]
    ),
    full={},
)


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


def _problem(name):
    """(vector field, y0, args, t1, SaveAt, loss of the solution, solver)."""
    if name == "lv":
        ts = jnp.linspace(0.1, 10.0, 100)
        data = jnp.sin(ts)[:, None] * jnp.ones(2)

        def lotka_volterra(t, y, p):
            a, b, c, d = p
            return jnp.stack([a * y[0] - b * y[0] * y[1], -c * y[1] + d * y[0] * y[1]])

        loss = lambda sol: jnp.mean((sol.ys - data) ** 2)
        return (
            lotka_volterra,
            jnp.array([1.0, 1.0]),
            jnp.array([1.5, 1.0, 3.0, 1.0]),
            10.0,
            dfx.SaveAt(ts=ts),
            loss,
            dfx.Tsit5(),
        )
    if name == "mlp":
        mlp = eqx.nn.MLP(2, 2, 64, 2, activation=jax.nn.softplus, key=jr.key(0))
        # Weights doubled so that the trajectory turns and the solver has work to do.
        mlp = jax.tree.map(lambda x: 2 * x if eqx.is_inexact_array(x) else x, mlp)
        return (
            _Field(mlp),
            jnp.array([0.6, -0.4]),
            None,
            5.0,
            dfx.SaveAt(ts=jnp.linspace(0.5, 5.0, 10)),
            lambda sol: jnp.sum(sol.ys**2),
            dfx.Dopri5(),
        )
    if name == "exponential":
        return (
            lambda t, y, a: a * y,
            jnp.array(10.0),
            jnp.array(0.2),
            24.0,
            dfx.SaveAt(t1=True),
            lambda sol: jnp.sum(sol.ys**2),
            dfx.Dopri5(),
        )
    if name == "relu":
        return (
            _Field(eqx.nn.MLP(1, 1, 8, 2, key=jr.key(0))),
            jnp.array([1.0]),
            None,
            1.0,
            dfx.SaveAt(t1=True),
            lambda sol: jnp.sum(sol.ys),
            dfx.Tsit5(),
        )
    raise ValueError(name)


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


def _relative(g, ref) -> float:
    return float(np.linalg.norm(g - ref) / np.linalg.norm(ref))


def _tolerance_grad(name, adjoint, tol) -> np.ndarray:
    vf, y0, args, t1, saveat, loss, solver = _problem(name)
    module = isinstance(vf, eqx.Module)

    def value(params):
        field, y0, args = params
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field if module else vf),
            solver,
            0.0,
            t1,
            None,
            y0,
            args,
            saveat=saveat,
            stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
            adjoint=adjoint,
            max_steps=100_000,
        )
        return loss(sol)

    params = (vf if module else None, y0, args)
    return _flat(eqx.filter_jit(eqx.filter_grad(value))(params))


_TOLERANCE_METHODS = {
    "gq, IntervalGauss(C=0.1)": lambda: gqdiffrax.GQAdjoint(
        gqdiffrax.IntervalGauss(C=0.1)
    ),
    "gq, default": gqdiffrax.GQAdjoint,
    "backsolve": dfx.BacksolveAdjoint,
}


def _knot_grads(kind, adjoint, rtol, jumps):
    k1, k2, k3 = jr.split(jr.key(0), 3)
    knots = jnp.sort(jr.uniform(k1, (20,), minval=0.0, maxval=3.0))
    knots = knots.at[0].set(0.0).at[-1].set(3.0)
    data = jr.normal(k2, (20, 2))
    mlp = eqx.nn.MLP(4, 8, 16, 1, activation=jnp.tanh, key=k3)

    def value(diff):
        mlp, data = diff
        if kind == "linear":
            control = dfx.LinearInterpolation(knots, data)
        else:
            coeffs = dfx.backward_hermite_coefficients(knots, data)
            control = dfx.CubicInterpolation(knots, coeffs)
        vf = lambda t, y, args: args[0](y).reshape(4, 2) @ args[1].derivative(t)
        controller = dfx.PIDController(
            rtol=rtol, atol=rtol, jump_ts=knots if jumps else None
        )
        sol = dfx.diffeqsolve(
            dfx.ODETerm(vf),
            dfx.Tsit5(),
            0.0,
            3.0,
            None,
            jnp.array([0.5, -0.3, 0.2, 0.1]),
            (mlp, control),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=100_000,
        )
        return jnp.sum(sol.ys**2)

    g_mlp, g_data = eqx.filter_jit(eqx.filter_grad(value))((mlp, data))
    return _flat(g_mlp), np.ravel(np.asarray(g_data))


def _interval(C):
    return lambda: gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=C))


def _knot_rows():
    methods = [
        # The control is a leaf of `args`: GQAdjoint finds its knots and splits its
        # quadrature there without `jump_ts`, but the forward solve steps across them.
        ("gq, no jump_ts", gqdiffrax.GQAdjoint, False),
        ("gq IntervalGauss(C=8), no jump_ts", _interval(8.0), False),
        ("gq IntervalGauss(C=0.1), jump_ts", _interval(0.1), True),
        ("gq default (StepGauss), jump_ts", gqdiffrax.GQAdjoint, True),
        ("backsolve, jump_ts", dfx.BacksolveAdjoint, True),
        ("direct, jump_ts", dfx.RecursiveCheckpointAdjoint, True),
    ]
    rows = []
    for kind in ("linear", "cubic"):
        exact = _knot_grads(kind, dfx.RecursiveCheckpointAdjoint(), 1e-11, True)
        for label, adjoint, jumps in methods:
            g_mlp, g_data = _knot_grads(kind, adjoint(), 1e-8, jumps)
            rows.append(
                dict(
                    table="knots",
                    interpolation=kind,
                    method=label,
                    error_parameters=_relative(g_mlp, exact[0]),
                    error_data=_relative(g_data, exact[1]),
                )
            )
            say(_row_line(rows[-1]))
    return rows


def _dissipative_grad(adjoint, k, rtol, atol):
    def value(p):
        y0, args = p
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a[0] * y + a[1] * jnp.sin(y)),
            dfx.Dopri5(),
            0.0,
            10.0,
            None,
            y0,
            args,
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
            adjoint=adjoint,
            max_steps=100_000,
        )
        return jnp.sum(sol.ys[-1])

    p = (jnp.array([1.0, -2.0, 3.0]), jnp.array([k, 0.5]))
    return _flat(jax.jit(jax.grad(value))(p))


def _checkpoint_rows(counts):
    rows = []
    for k, atol in [(2.0, 1e-9), (2.0, 1e-12), (5.0, 1e-20)]:
        exact = _dissipative_grad(dfx.RecursiveCheckpointAdjoint(), k, 1e-12, 1e-30)
        methods = [
            ("direct", dfx.RecursiveCheckpointAdjoint()),
            ("backsolve", dfx.BacksolveAdjoint()),
        ]
        # By default GQAdjoint keeps the forward state at every step and resets z
        # there; with `state_budget=0` it re-solves z backwards, as the paper does,
        # and checkpoints bound how far that drifts.
        methods += [("gq", gqdiffrax.GQAdjoint())]
        methods += [("gq, re-solved z", gqdiffrax.GQAdjoint(state_budget=0))]
        methods += [
            (
                f"gq, re-solved z, {n} checkpoints",
                gqdiffrax.GQAdjoint(state_budget=0, checkpoints=n),
            )
            for n in counts
        ]
        for label, adjoint in methods:
            g = _dissipative_grad(adjoint, k, 1e-6, atol)
            rows.append(
                dict(
                    table="checkpoints",
                    k=k,
                    atol=atol,
                    method=label,
                    error=_relative(g, exact),
                    gradient_norm=float(np.linalg.norm(exact)),
                )
            )
            say(_row_line(rows[-1]))
    return rows


def _row_line(row) -> str:
    return "  ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
    )


def _markdown(rows, args) -> str:
    out = []
    tol_rows = [r for r in rows if r["table"] == "tolerance"]
    if tol_rows:
        methods = list(_TOLERANCE_METHODS)
        out += [
            "Gradient error against RecursiveCheckpointAdjoint at the same tolerance:",
            "",
            "| problem | rtol = atol | " + " | ".join(methods) + " |",
            "|---|---:|" + "---:|" * len(methods),
        ]
        for problem in args.problems:
            for tol in args.tols:
                cells = {
                    r["method"]: r["error"]
                    for r in tol_rows
                    if r["problem"] == problem and r["tol"] == tol
                }
                out.append(
                    f"| {problem} | {tol:g} | "
                    + " | ".join(f"{cells[m]:.1e}" for m in methods)
                    + " |"
                )
        out.append("")
    knot_rows = [r for r in rows if r["table"] == "knots"]
    if knot_rows:
        out += [
            "A field reading an interpolated control's derivative (20 knots), "
            "rtol = atol = 1e-8, against the direct method at 1e-11:",
            "",
            "| interpolation | method | error, parameters | error, data |",
            "|---|---|---:|---:|",
        ]
        out += [
            f"| {r['interpolation']} | {r['method']} | {r['error_parameters']:.1e} | "
            f"{r['error_data']:.1e} |"
            for r in knot_rows
        ]
        out.append("")
    cp_rows = [r for r in rows if r["table"] == "checkpoints"]
    if cp_rows:
        methods = list(dict.fromkeys(r["method"] for r in cp_rows))
        out += [
            "dy/dt = -k y + 0.5 sin(y), rtol = 1e-6, error against the direct method "
            "at rtol = 1e-12:",
            "",
            "| k | atol | norm of dL/dp | " + " | ".join(methods) + " |",
            "|---:|---:|---:|" + "---:|" * len(methods),
        ]
        for k, atol in dict.fromkeys((r["k"], r["atol"]) for r in cp_rows):
            cells = {
                r["method"]: r for r in cp_rows if r["k"] == k and r["atol"] == atol
            }
            first = next(iter(cells.values()))
            out.append(
                f"| {k:g} | {atol:g} | {first['gradient_norm']:.1e} | "
                + " | ".join(f"{cells[m]['error']:.1e}" for m in methods)
                + " |"
            )
        out.append("")
    return "\n".join(out)


def add_arguments(parser):
    parser.add_argument(
        "--problems", nargs="+", choices=_PROBLEMS, help="problems of the first table"
    )
    add_options(parser, positive_float, metavar="TOL", nargs="+", tols="tolerances")
    parser.add_argument(
        "--knots",
        action=argparse.BooleanOptionalAction,
        help="measure the knot-splitting table",
    )
    add_options(
        parser, metavar="N", nargs="*", checkpoints="checkpoint counts (none: skip)"
    )


def run(args) -> Result:
    # Errors down to 1e-9 need float64, whatever the caller's setting.
    with jax.enable_x64(True):
        rows = _measure(args)
    return Result(rows, _markdown(rows, args))


def _measure(args) -> list[dict]:
    rows = []
    for problem in args.problems:
        for tol in args.tols:
            ref = _tolerance_grad(problem, dfx.RecursiveCheckpointAdjoint(), tol)
            for label, make in _TOLERANCE_METHODS.items():
                g = _tolerance_grad(problem, make(), tol)
                rows.append(
                    dict(
                        table="tolerance",
                        problem=problem,
                        tol=tol,
                        method=label,
                        error=_relative(g, ref),
                    )
                )
                say(_row_line(rows[-1]))
    if args.knots:
        rows += _knot_rows()
    if args.checkpoints:
        rows += _checkpoint_rows(args.checkpoints)
    return rows


TASK = Task(
    "accuracy", __doc__, PRESETS, run, gq_constant=False, arguments=add_arguments
)
