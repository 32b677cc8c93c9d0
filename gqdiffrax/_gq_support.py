"""What `GQAdjoint` supports: every configuration whose gradient is not verified is
refused when traced, with an error that names an alternative."""

from typing import Any

import diffrax as dfx
import jax.numpy as jnp
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


# Paths whose derivative is smooth between knots `path.ts`, which GQAdjoint finds and
# splits its quadrature at.
_KNOTTED = (dfx.LinearInterpolation, dfx.CubicInterpolation)


def control_of(term) -> dfx.AbstractPath | None:
    """The control of a controlled differential equation's term: of
    `ControlTerm(f, control)` or of its `to_ode()`; `None` for any other term."""
    term = _from_to_ode(term)
    return term.control if isinstance(term, dfx.ControlTerm) else None


def _from_to_ode(term):
    """The `ControlTerm` that `term` was built from by `to_ode()`; else `term`."""
    if isinstance(term, dfx.ODETerm) and isinstance(term.vector_field, ControlToODE):
        return term.vector_field.control_term
    return term


def knotted_paths(term, args) -> list:
    """The interpolations whose knots split GQAdjoint's quadrature: the control of a
    CDE term, and those that are leaves of `args`. Works on a tree of `perturbed`
    flags of the same structure too."""
    paths = [control_of(term)]
    paths += [x for x in jtu.tree_leaves(args, is_leaf=_is_path) if _is_path(x)]
    return [p for p in paths if isinstance(p, _KNOTTED)]


def knot_times(term, args) -> Any:
    """Every knot of `knotted_paths(term, args)`, or `None` when there are none."""
    paths = knotted_paths(term, args)
    return jnp.concatenate([jnp.ravel(p.ts) for p in paths]) if paths else None


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


def _check_control_term(control, stepsize_controller) -> None:
    """A `ControlTerm` (not its `to_ode()`): an ODE solver steps it with one control
    increment per step, a discretisation the step-size controller cannot see.
    GQAdjoint's gradient is that of the exact CDE, so it accepts only the case where
    that discretisation is exact: a linear interpolation, stepped between its knots."""
    to_ode = (
        "Use `diffrax.ControlTerm(f, control).to_ode()`, which an ODE solver "
        "evaluates at each stage's time, as diffrax's neural CDE example does."
    )
    if not isinstance(control, dfx.LinearInterpolation):
        raise ValueError(
            f"{_NAME} supports a `diffrax.ControlTerm` only with a "
            "`diffrax.LinearInterpolation` control; got a "
            f"`{type(control).__name__}`. An ODE solver steps a `ControlTerm` with "
            "one increment of the control per step, which for a curved control is "
            "a first-order method whatever the tolerance, while GQAdjoint gives the "
            f"gradient of the exact equation. {to_ode}"
        )
    if jump_times(stepsize_controller) is None:
        raise ValueError(
            f"{_NAME} with a `diffrax.ControlTerm` needs the control's knots as "
            "jump times: `stepsize_controller=diffrax.PIDController(rtol=..., "
            "atol=..., jump_ts=control.ts)`. A step across a knot uses one "
            "increment of the control for both of its slopes, an error the "
            f"step-size controller cannot see. {to_ode}"
        )


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
    # A plain `ODETerm`, a plain `ControlTerm`, or the `to_ode()` of a plain one: a
    # subclass may change how the vector field is evaluated.
    core = _from_to_ode(inner) if type(inner) is dfx.ODETerm else inner
    if type(core) not in (dfx.ODETerm, dfx.ControlTerm):
        base = next(
            (b for b in (dfx.ODETerm, dfx.ControlTerm) if isinstance(core, b)), None
        )
        kind = (
            f"`{type(core).__name__}`"
            if base is None
            else f"a subclass of `diffrax.{base.__name__}` (`{type(core).__name__}`), "
            "which may change how the vector field is evaluated"
        )
        raise ValueError(
            f"{_NAME} supports a single `diffrax.ODETerm`, or a `diffrax.ControlTerm` "
            f"(or its `to_ode()`) with a differentiable control; got {kind}. Pass "
            "`diffrax.ODETerm(f)` with your vector field `f(t, y, args)`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for other terms."
        )
    control = control_of(inner)
    if isinstance(inner, dfx.ControlTerm):
        _check_control_term(inner.control, stepsize_controller)
    knotted = knotted_paths(inner, args)
    rough = [
        p
        for p in _paths_in((_from_to_ode(inner).vector_field, args)) + [control]
        if p is not None and not _is_smooth_path(p) and not any(p is q for q in knotted)
    ]
    if rough and jump_times(stepsize_controller) is None:
        where = "control" if rough[0] is control else "vector field"
        raise ValueError(
            f"{_NAME}: the {where} uses a `{type(rough[0]).__name__}`, whose "
            "derivative may not be smooth, and a Gauss–Legendre rule that spans a "
            "kink gives a wrong gradient. GQAdjoint finds the knots of a "
            "`diffrax.LinearInterpolation` or `CubicInterpolation` that is the "
            "control of a `ControlTerm` (or its `to_ode()`) or a leaf of `args`; "
            "pass the control that way, or tell diffrax where the kinks are: "
            "`stepsize_controller=diffrax.PIDController(rtol=..., atol=..., "
            "jump_ts=control.ts)`; GQAdjoint then splits its quadrature there."
        )
    if event is not None:
        subs = saveat.subs
        split = jump_times(stepsize_controller) is not None or knotted
        if getattr(subs, "ts", None) is not None or not getattr(subs, "t1", True):
            raise NotImplementedError(
                f"{_NAME} with an event supports `SaveAt(t1=True)` (the state at the "
                "event), with or without `t0=True`; save times `ts` past an event "
                "are not supported. Save the trajectory with a second solve up to "
                "the event time, or use `diffrax.RecursiveCheckpointAdjoint()`."
            )
        if split:
            raise NotImplementedError(
                f"{_NAME} does not support an event together with `jump_ts` or an "
                "interpolated control yet. Use "
                "`diffrax.RecursiveCheckpointAdjoint()` for that combination."
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
