"""`GQAdjoint`'s forward pass: the solve as the user asked for it, plus what the
backward pass needs (the residuals).

The forward saves the state at the user's save times and at the *split times* (the
controller's `jump_ts`, a control's knots, evenly spaced `checkpoints`), and hands
back only the user's rows. With a rule that crosses save times and a dense output
small enough (`GQAdjoint(state_budget=...)`), it also keeps the state at the end of
every accepted step (`SubSaveAt(steps=True)`), for the backward pass to read $z$ from
(`_step.ForwardPath`).
"""

import typing

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._adjoint_common import lax_loop
from ._diffrax_internals import (
    add_step_rows,
    replace_fields,
    resize_save_rows,
    select_save_rows,
    take_step_rows,
    WrapTerm,
)
from ._events import as_event
from ._gq_support import jump_times, knot_times
from ._step import ForwardPath


def _forward_nfe(solver, num_steps):
    """Vector-field evaluations of the forward solve, from its step count and the
    solver's tableau (rejected steps included: they cost evaluations too)."""
    if isinstance(solver, dfx.Euler):
        return num_steps
    tableau = solver.tableau
    if tableau.fsal:
        # One evaluation at t0, then the first stage of each step is the last of the
        # previous one.
        return 1 + num_steps * (tableau.num_stages - 1)
    return num_steps * tableau.num_stages


def _split_times(t0, t1, ts, subs, stepsize_controller, checkpoints, knots):
    """The split times: the controller's `jump_ts`, the control's `knots` and
    `checkpoints` evenly spaced times, inside the span the backward pass covers (up to
    the last save time)."""
    if subs.t1:
        t_end = t1
    elif ts is not None and ts.shape[0] > 0:
        t_end = ts[-1]
    else:
        return None
    pieces = []
    for jumps in (jump_times(stepsize_controller), knots):
        if jumps is not None:
            pieces.append(jnp.clip(jumps.astype(t0.dtype), t0, t_end))
    if checkpoints > 0:
        frac = jnp.arange(1, checkpoints + 1, dtype=t0.dtype) / (checkpoints + 1)
        pieces.append(t0 + (t_end - t0) * frac)
    return jnp.concatenate(pieces) if pieces else None


def _merge(ts, extra):
    """The sorted forward save times, and where the user's `ts` are among them."""
    if extra is None:
        return ts, None
    if ts is None:
        return jnp.sort(extra), None
    times = jnp.concatenate([ts, extra])
    order = jnp.argsort(times, stable=True)
    return times[order], jnp.argsort(order)[: ts.shape[0]]


def user_rows(subs, num_ts, num_fwd_ts, user_pos):
    """Row indices of the user's outputs among the forward's saved rows."""
    offset = 1 if subs.t0 else 0
    rows = [jnp.zeros((1,), jnp.int32)] if subs.t0 else []
    if num_ts:
        pos = jnp.arange(num_ts) if user_pos is None else user_pos
        rows.append(offset + pos.astype(jnp.int32))
    if subs.t1:
        rows.append(jnp.full((1,), offset + num_fwd_ts, jnp.int32))
    return jnp.concatenate(rows)


class Solve(eqx.Module):
    """What the forward solve and its backward pass share besides the differentiated
    inputs: the solve as `diffeqsolve` set it up. Its arrays are cut out of autodiff
    (`GQAdjoint.loop`)."""

    adjoint: dfx.AbstractAdjoint  # the GQAdjoint
    solver: dfx.AbstractSolver
    order: int
    stepsize_controller: dfx.AbstractStepSizeController
    saveat: dfx.SaveAt
    dt0: typing.Any
    max_steps: int | None
    throw: bool
    init_state: typing.Any
    direction: typing.Any
    event: typing.Any
    progress_meter: typing.Any


def save_times(diff, spec: Solve):
    """The control's knots, the split times, the forward's save times (the user's
    and the split times, sorted) and where the user's are among them."""
    _, args, term, t0, t1, ts, _ = diff
    knots = knot_times(term, args)
    subs = spec.saveat.subs
    checkpoints = spec.adjoint.checkpoints
    extra = _split_times(t0, t1, ts, subs, spec.stepsize_controller, checkpoints, knots)
    fwd_ts, user_pos = _merge(ts, extra)
    return knots, extra, fwd_ts, user_pos


def keeps_states(spec: Solve, diff) -> bool:
    """Whether the forward keeps the state at every accepted step, for the backward
    pass to read $z$ from: with a rule that crosses save times, a cap on the steps,
    and `max_steps` states within `GQAdjoint(state_budget=...)` bytes."""
    if not spec.adjoint.quadrature.crosses_saves or spec.max_steps is None:
        return False
    y0 = diff[0]
    row = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(y0)) + 8
    return spec.max_steps * row <= spec.adjoint.state_budget


def forward(diff, spec: Solve, keep: bool = False):
    """The forward solve: the final state as the user sees it, its statistics, the
    save state at every save and split time, and (with `keep`) the forward path (the
    residuals of the backward pass)."""
    y0, args, term, t0, t1, ts, conds = diff
    saveat = spec.saveat
    subs = saveat.subs
    _, extra, fwd_ts, user_pos = save_times(diff, spec)
    init_state = replace_fields(spec.init_state, y=y0)
    if extra is not None:
        saveat = eqx.tree_at(
            lambda s: s.subs.ts, saveat, fwd_ts, is_leaf=lambda x: x is None
        )
        # `diffeqsolve` sized the output buffers for the user's SaveAt; make room for
        # the split times.
        num_rows = int(subs.t0) + fwd_ts.shape[0] + int(subs.t1)
        init_state = resize_save_rows(init_state, num_rows)
    if keep:
        saveat = dfx.SaveAt(subs=[saveat.subs, dfx.SubSaveAt(steps=True)])
        init_state = add_step_rows(init_state, y0, spec.max_steps)
    final_state, aux_stats = lax_loop(
        spec.adjoint._loop,
        args=args,
        terms=WrapTerm(term, spec.direction),
        solver=spec.solver,
        stepsize_controller=spec.stepsize_controller,
        event=None if conds is None else as_event(conds, *spec.event[:2]),
        saveat=saveat,
        t0=t0,
        t1=t1,
        dt0=spec.dt0,
        max_steps=spec.max_steps,
        init_state=init_state,
        progress_meter=spec.progress_meter,
    )
    nfe = _forward_nfe(spec.solver, final_state.num_steps)
    aux_stats = {**aux_stats, "num_fevals": nfe}
    kept = None
    if keep:
        final_state, (step_ts, step_ys, _) = take_step_rows(final_state)
        controller = spec.stepsize_controller
        if not isinstance(controller, dfx.AbstractAdaptiveStepSizeController):
            controller = None
        kept = ForwardPath(t0, y0, step_ts, step_ys, controller)
    if extra is None:
        return final_state, aux_stats, final_state.save_state, kept
    # Hand back only the outputs the user asked for; the split times' states stay in
    # the residuals.
    save_state = final_state.save_state
    num_ts = 0 if ts is None else ts.shape[0]
    rows = user_rows(subs, num_ts, fwd_ts.shape[0], user_pos)
    final_state = select_save_rows(final_state, rows, num_ts)
    return final_state, aux_stats, save_state, kept
