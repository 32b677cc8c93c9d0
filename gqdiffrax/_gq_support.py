"""What `GQAdjoint` supports: every configuration whose gradient is not verified is
refused when traced, with an error that names an alternative."""

from typing import Any

import diffrax as dfx
import jax.tree_util as jtu

from ._adjoint_common import check_saveat
from ._diffrax_internals import ControlToODE, is_sde, WrapTerm


_NAME = "`adjoint=gqdiffrax.GQAdjoint()`"


def jump_times(stepsize_controller) -> Any:
    """The controller's `jump_ts` (where the user has told diffrax the vector field is
    not smooth), or `None` when it has none."""
    jump_ts = getattr(stepsize_controller, "jump_ts", None)
    if jump_ts is None or jump_ts.shape[0] == 0:
        return None
    return jump_ts


def _is_explicit_rk(solver) -> bool:
    return isinstance(solver, dfx.AbstractRungeKutta) and (
        isinstance(solver.tableau, dfx.ButcherTableau) and not solver.tableau.implicit
    )


def _is_path(x: Any) -> bool:
    return isinstance(x, dfx.AbstractPath)


# Paths whose derivative is smooth in t: the quadrature needs no split times for them.
def _is_smooth_path(path: dfx.AbstractPath) -> bool:
    from ._wiener import WienerSurrogate

    return isinstance(path, WienerSurrogate)


def _paths_in(x: Any, depth: int = 2) -> list:
    """The `diffrax.AbstractPath`s in a pytree, and in the closures of the functions in
    it (`depth` levels deep): where a vector field can hide a control."""
    found = []
    for leaf in jtu.tree_leaves(x, is_leaf=_is_path):
        if _is_path(leaf):
            found.append(leaf)
        elif depth > 0 and callable(leaf):
            fn = getattr(leaf, "__func__", leaf)
            cells = getattr(fn, "__closure__", None) or ()
            for cell in cells:
                try:
                    found.extend(_paths_in(cell.cell_contents, depth - 1))
                except ValueError:  # An empty cell.
                    pass
            code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
            for name in getattr(code, "co_names", ()):
                if _is_path(scope.get(name)):
                    found.append(scope[name])
    return found


def check_supported(terms, solver, stepsize_controller, event, saveat, args) -> None:
    """Raise at trace time, with the fix, for everything GQAdjoint has not verified."""
    if jtu.tree_structure(solver.term_structure) != jtu.tree_structure(0):
        raise NotImplementedError(
            f"{_NAME} supports solvers that take a single term; "
            f"`{type(solver).__name__}` takes several. Use an explicit Runge–Kutta "
            "solver such as `diffrax.Dopri5()` on a single `diffrax.ODETerm`."
        )
    inner = terms.term if isinstance(terms, WrapTerm) else terms
    if is_sde(terms):
        raise ValueError(
            f"{_NAME} differentiates ODEs, but `terms` contains Brownian motion (an "
            "SDE). Train the SDE as an ODE driven by a smooth Wiener surrogate "
            "(Wong–Zakai): `terms = gqdiffrax.wong_zakai_term(drift, diffusion, "
            "gqdiffrax.WienerSurrogate(t0, t1, shape, key))`, then evaluate the "
            "trained drift and diffusion with an SDE solver (see "
            "`gqdiffrax.sde_terms`)."
        )
    cde = (
        f"{_NAME} does not support controlled differential equations yet: a "
        "control's knots make the quadrature's integrand non-smooth, and its gradient "
        "is not verified. Use `adjoint=diffrax.RecursiveCheckpointAdjoint()` (or "
        "`diffrax.BacksolveAdjoint()`) for a neural CDE."
    )
    if isinstance(inner, dfx.ControlTerm) or (
        type(inner) is dfx.ODETerm and isinstance(inner.vector_field, ControlToODE)
    ):
        raise ValueError(cde)
    if type(inner) is not dfx.ODETerm:
        kind = (
            f"a subclass of `diffrax.ODETerm` (`{type(inner).__name__}`), which may "
            "change how the vector field is evaluated"
            if isinstance(inner, dfx.ODETerm)
            else f"`{type(inner).__name__}`"
        )
        raise ValueError(
            f"{_NAME} supports a single `diffrax.ODETerm`; got {kind}. Pass "
            "`diffrax.ODETerm(f)` with your vector field `f(t, y, args)`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for other terms."
        )
    rough = [p for p in _paths_in((inner.vector_field, args)) if not _is_smooth_path(p)]
    if rough and jump_times(stepsize_controller) is None:
        raise ValueError(
            f"{_NAME}: the vector field uses a `{type(rough[0]).__name__}`, whose "
            "derivative is not smooth at its knots, and a Gauss–Legendre rule that "
            "spans a knot gives a wrong gradient. Tell diffrax where the knots are: "
            "`stepsize_controller=diffrax.PIDController(rtol=..., atol=..., "
            "jump_ts=control.ts)`; GQAdjoint then splits its quadrature there."
        )
    if event is not None:
        raise NotImplementedError(
            f"{_NAME} does not support events. Solve up to a fixed `t1`, or use "
            "`diffrax.RecursiveCheckpointAdjoint()` to differentiate through an event."
        )
    check_saveat(saveat, "gqdiffrax.GQAdjoint()")
    if not (_is_explicit_rk(solver) or isinstance(solver, dfx.Euler)):
        raise NotImplementedError(
            f"{_NAME} supports explicit Runge–Kutta solvers (e.g. `diffrax.Dopri5()`, "
            f"`Tsit5()`, `Heun()`, `Euler()`); got `{type(solver).__name__}`. "
            "Implicit, multi-term and stochastic solvers are not supported."
        )
    if isinstance(stepsize_controller, dfx.StepTo):
        raise NotImplementedError(
            f"{_NAME} does not support `diffrax.StepTo`: the backward solve cannot "
            "reuse the forward grid. Use `diffrax.ConstantStepSize()` with `dt0`, or "
            "`diffrax.PIDController(rtol=..., atol=...)`."
        )
