"""The methods under comparison and the one way every task solves and differentiates:
a `Solve` names the method and the solver settings, `adjoint_for` turns it into a
Diffrax adjoint, and `ode_solve` runs Dopri5 with it. Also the measurements every task
shares: vector-field evaluations, ahead-of-time compilation and compiled memory."""

import collections
import dataclasses
import functools as ft
import time
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import gqdiffrax


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    label: str
    kind: str  # "ode": adaptive Dopri5 on an ODE; "sde": fixed steps on an SDE.
    color: str
    help: str


METHODS = {
    "direct": MethodInfo(
        "Direct",
        "ode",
        "tab:green",
        "backpropagate through the solver (diffrax.RecursiveCheckpointAdjoint)",
    ),
    "adjoint": MethodInfo(
        "Adjoint", "ode", "tab:pink", "continuous adjoint (diffrax.BacksolveAdjoint)"
    ),
    "seminorm": MethodInfo(
        "Seminorm",
        "ode",
        "tab:orange",
        "BacksolveAdjoint whose backward step control uses "
        "diffrax.adjoint_rms_seminorm",
    ),
    "gq": MethodInfo(
        "GQ",
        "ode",
        "tab:blue",
        "gqdiffrax.GQAdjoint(): adjoint of [z, a_z], a Gauss-Legendre rule on every "
        "backward step for the parameters (gqdiffrax.StepGauss); with --C, the paper's "
        "rule per interval, GQAdjoint(gqdiffrax.IntervalGauss(C=C))",
    ),
    "gq-interval": MethodInfo(
        "GQ (rule per interval)",
        "ode",
        "tab:cyan",
        "gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=0.1)), or the C of --C: the "
        "paper's method, the backward solve stops at every save time and puts one "
        "Gauss rule on each interval; for comparison with 'gq'",
    ),
    "sde-direct": MethodInfo(
        "SDE Direct",
        "sde",
        "tab:green",
        "backpropagate through ReversibleHeun (RecursiveCheckpointAdjoint)",
    ),
    "sde-adjoint": MethodInfo(
        "SDE Adjoint", "sde", "tab:pink", "BacksolveAdjoint on the SDE, ReversibleHeun"
    ),
    "reversible": MethodInfo(
        "Reversible EES25",
        "sde",
        "tab:purple",
        "gqdiffrax.ReversibleAdjoint with gqdiffrax.EES25",
    ),
    "reversible-heun": MethodInfo(
        "Reversible Heun",
        "sde",
        "tab:brown",
        "gqdiffrax.ReversibleAdjoint with diffrax.ReversibleHeun",
    ),
}
# The ODE methods every training task runs by default; "gq-interval" only on request.
ODE_METHODS = tuple(
    m for m, info in METHODS.items() if info.kind == "ode" and m != "gq-interval"
)
ODE_CHOICES = ODE_METHODS + ("gq-interval",)


@dataclasses.dataclass(frozen=True)
class Solve:
    """How a model solves its differential equation and how it is differentiated.

    Hashable, so that it can be closed over by jitted functions. `"gq"` is
    `GQAdjoint()`, a Gauss rule on every backward step, and `"gq-interval"` the
    paper's rule per interval, `GQAdjoint(IntervalGauss())`; a number `C` makes both
    `GQAdjoint(IntervalGauss(C=C))`. `count` tags every evaluation of the vector
    field (or drift) for `count_nfe`; it is `None` in timed code.
    """

    method: str
    rtol: float = 1e-3
    atol: float = 1e-3
    C: float | None = None
    dt: float = 0.01
    max_steps: int = 4096
    count: str | None = None


def adjoint_for(solve: Solve) -> dfx.AbstractAdjoint:
    match solve.method:
        case "direct" | "sde-direct":
            return dfx.RecursiveCheckpointAdjoint()
        case "adjoint" | "sde-adjoint":
            return dfx.BacksolveAdjoint()
        case "seminorm":
            controller = dfx.PIDController(
                rtol=solve.rtol, atol=solve.atol, norm=dfx.adjoint_rms_seminorm
            )
            return dfx.BacksolveAdjoint(stepsize_controller=controller)
        case "gq" if solve.C is None:
            return gqdiffrax.GQAdjoint()
        case "gq-interval" if solve.C is None:
            return gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss())
        case "gq" | "gq-interval":
            return gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=solve.C))
        case "reversible" | "reversible-heun":
            return gqdiffrax.ReversibleAdjoint()
    raise ValueError(f"unknown method {solve.method!r}")


_COUNTS: collections.Counter = collections.Counter()


def _tick(tag: str, t) -> None:
    del t
    _COUNTS[tag] += 1


class Counted(eqx.Module):
    """A vector field that counts its evaluations on the host.

    The time is passed to the callback so that under `jax.vmap` (GQ's quadrature
    evaluates the vector field at a batch of nodes) every batch element is counted.
    """

    fn: Callable
    tag: str = eqx.field(static=True)

    def __call__(self, t, y, args):
        jax.debug.callback(ft.partial(_tick, self.tag), t)
        return self.fn(t, y, args)


def counted(fn: Callable, solve: Solve) -> Callable:
    return fn if solve.count is None else Counted(fn, solve.count)


def ode_solve(solve: Solve, vf: Callable, t0, t1, y0, *, ts=None, args=None):
    """Dormand–Prince 5(4) with PID step control, differentiated by `solve.method`;
    saved at `ts`, or at `t1` only."""
    saveat = dfx.SaveAt(t1=True) if ts is None else dfx.SaveAt(ts=ts)
    return dfx.diffeqsolve(
        dfx.ODETerm(counted(vf, solve)),
        dfx.Dopri5(),
        t0,
        t1,
        None,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=solve.rtol, atol=solve.atol),
        adjoint=adjoint_for(solve),
        max_steps=solve.max_steps,
    )


def count_nfe(loss: Callable, solve: Solve, params, *args) -> tuple[int, int]:
    """Vector-field evaluations of one forward pass and of one backward pass of the
    scalar `loss(params, *args, solve)`, counted by `Counted`.

    The backward count is what the gradient evaluates beyond its forward pass: for
    `direct`, recomputation from checkpoints; for the adjoints, the backward solve (each
    evaluation inside a VJP); for `gq` also one per quadrature node. Compiled
    separately from the timed code."""
    fwd = dataclasses.replace(solve, count="forward")
    grad = dataclasses.replace(solve, count="gradient")

    @eqx.filter_jit
    def both(params, *args):
        value = loss(params, *args, fwd)
        return value, eqx.filter_grad(lambda p: loss(p, *args, grad))(params)

    _COUNTS.clear()
    jax.block_until_ready(both(params, *args))
    jax.effects_barrier()
    forward, total = _COUNTS["forward"], _COUNTS["gradient"]
    return forward, total - forward


def compile_aot(
    fn, *args, compiler_options: dict | None = None
) -> tuple[Callable, float, float]:
    """Lower and compile a jitted `fn` (`jax.jit` or `eqx.filter_jit`) for `args`.

    **Returns:**

    The compiled function (called like `fn`), the trace-and-lower seconds and the
    XLA compile seconds.
    """
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, traced - start, time.perf_counter() - traced


def memory_analysis(compiled):
    """XLA's memory analysis of a compiled `jax.jit` or `eqx.filter_jit` function."""
    return getattr(compiled, "compiled", compiled).memory_analysis()


def relative_error(tree, reference) -> float:
    """`|tree - reference| / |reference|` over all inexact array leaves (L2 norms)."""
    flat = lambda t: jnp.concatenate(
        [jnp.ravel(x) for x in jtu.tree_leaves(eqx.filter(t, eqx.is_inexact_array))]
    )
    a, b = flat(tree), flat(reference)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
