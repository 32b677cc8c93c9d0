r"""Fig. 1: relative errors of L, dL/dz0, dL/da, dL/dT on z' = az against the closed
form.

Accuracy of gradients (Section 5.1, Figure 1): $\dot z = az$, $L = z(T)^2$.

With $a = 0.2$ and $z_0 = 10$, $L = z_0^2 e^{2aT}$ and its gradients
$\partial L/\partial z_0 = 2 z_0 e^{2aT}$, $\partial L/\partial a = 2T z_0^2 e^{2aT}$,
$\partial L/\partial T = 2a z_0^2 e^{2aT}$ are known in closed form. Each method solves
with Dopri5 at rtol 1e-6, atol 1e-7 (in float64) for $T \in [19, 29]$; the relative
errors show GQ's gradients agree with the adjoint's, while the direct method
differentiates the discrete solve instead.

`diffrax.BacksolveAdjoint` (methods `adjoint`, `seminorm`) has no gradient with respect
to the final time; for those two $\partial L/\partial T$ is the adjoint method's own
formula $\partial L/\partial z(T) \cdot f(T, z(T))$, which is also what `torchdiffeq`
returns.
"""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np

from ._figures import pyplot
from ._methods import count_nfe, METHODS, ODE_METHODS, ode_solve, Solve
from ._task import add_options, presets, Result, summarise, Task


A, Z0 = 0.2, 10.0
RTOL, ATOL = 1e-6, 1e-7
QUANTITIES = ("L", "dL/dz0", "dL/da", "dL/dT")
PRESETS = presets(
    dict(methods=["direct", "adjoint", "gq"], num_times=21),
    smoke=dict(num_times=3),
    full=dict(methods=list(ODE_METHODS), num_times=101),
)


def exact(T: np.ndarray) -> np.ndarray:
    """Closed-form L, dL/dz0, dL/da, dL/dT, shape (4, len(T))."""
    L = Z0**2 * np.exp(2 * A * T)
    return np.stack([L, 2 * L / Z0, 2 * T * L, 2 * A * L])


def _vector_field(t, z, a):
    del t
    return a * z


def loss(params, solve):
    z0, a, T = params
    if solve.method in ("adjoint", "seminorm"):
        # Move the end time to first order: d z(T) / dT = f(T, z(T)).
        T_fixed = jax.lax.stop_gradient(T)
        zT = ode_solve(solve, _vector_field, 0.0, T_fixed, z0, args=a).ys[-1]
        zT = zT + (T - T_fixed) * _vector_field(T, jax.lax.stop_gradient(zT), a)
    else:
        zT = ode_solve(solve, _vector_field, 0.0, T, z0, args=a).ys[-1]
    return zT**2


def add_arguments(parser):
    add_options(parser, num_times="integration times T, evenly spaced in [19, 29]")


def run(args) -> Result:
    with jax.enable_x64(True):
        rows, errors = _run(args)
    summary = summarise(
        rows,
        ("method",),
        {
            **{f"err {q}": f"rel. error {q}" for q in QUANTITIES},
            "nfe_forward": "NFE fwd (T=29)",
            "nfe_backward": "NFE bwd (T=29)",
        },
        count_label="times T",
    )
    summary += (
        "\n\nRelative errors |true - predicted| / |true|, mean ± std over "
        f"{args.num_times} times T in [19, 29]; rtol {RTOL}, atol {ATOL}, float64."
    )
    figure = ft.partial(_plot, errors)
    return Result(rows, summary, {"fig1_relative_errors.png": figure})


def _run(args):
    Ts = np.linspace(19.0, 29.0, args.num_times)
    truth = exact(Ts)
    rows, errors = [], {}
    for method in args.methods:
        solve = Solve(method, rtol=RTOL, atol=ATOL, C=args.C)
        value_and_grad = jax.jit(jax.value_and_grad(ft.partial(loss, solve=solve)))
        got = []
        for T in Ts:
            value, grads = value_and_grad((jnp.array(Z0), jnp.array(A), jnp.array(T)))
            got.append([float(value), *map(float, grads)])
        err = np.abs(truth - np.array(got).T) / np.abs(truth)
        errors[method] = err
        nfe = count_nfe(
            lambda p, s: loss(p, s),
            solve,
            (jnp.array(Z0), jnp.array(A), jnp.array(Ts[-1])),
        )
        for i, T in enumerate(Ts):
            rows.append(
                dict(
                    method=method,
                    T=float(T),
                    **{q: got[i][k] for k, q in enumerate(QUANTITIES)},
                    **{
                        f"exact {q}": float(truth[k, i])
                        for k, q in enumerate(QUANTITIES)
                    },
                    **{f"err {q}": float(err[k, i]) for k, q in enumerate(QUANTITIES)},
                    nfe_forward=nfe[0],
                    nfe_backward=nfe[1],
                )
            )
    return rows, (Ts, errors)


def _plot(errors, path):
    plt = pyplot()
    Ts, errs = errors
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for method, err in errs.items():
        info = METHODS[method]
        for k, ax in enumerate(axes):
            ax.plot(Ts, err[k], label=info.label, color=info.color, marker=".")
    for k, ax in enumerate(axes):
        ax.set(
            xlabel="Integration Time",
            ylabel="Relative Error",
            title=f"Relative Error in {QUANTITIES[k]}",
        )
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TASK = Task("exponential", __doc__, PRESETS, run, ODE_METHODS, arguments=add_arguments)
