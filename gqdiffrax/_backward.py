r"""`GQAdjoint`'s backward pass: one loop over pieces of the solve.

The save times after $t_0$ (the user's `ts` and `t1`, and the split times: the
controller's `jump_ts`, a control's knots, checkpoints) are the *rows*: the forward
pass kept the state there, and the loss's cotangent $\partial L/\partial y$ is known
there (zero at a split time). The quadrature rule (`_quadrature.AbstractQuadrature`)
chooses which rows end a piece: every row for [`gqdiffrax.IntervalGauss`][], only the
split times and the last row for [`gqdiffrax.StepGauss`][], whose steps cross the
other rows instead.

Each piece, from the last backwards, adds the cotangents of the rows at its right end
to $a_z$, resets $z$ to the forward state there, and solves $[z, a_z]$ backwards to its
left end with the forward solver and step-size controller; the rule's solver and nodes
add the piece's part of $\int a_z^\top \partial f/\partial\theta\,dt$. The step size
carries over from one piece to the next. The first piece starts where the forward
ended, with the forward's step size there when the forward kept its steps
(`_step.ForwardPath.final_step`), else with the forward's mean step, which its small
start-up steps make too short. Rows at $t_0$ go straight to $a_z(t_0)$.
"""

from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree, Real

from ._adjoint_common import lax_loop
from ._quadrature import AbstractQuadrature
from ._step import AugmentedField, ForwardPath, ParamField, SaveRows


class ForwardOnly(dfx.AbstractAdjoint):
    """The backward pass's own solves are never differentiated: run them with plain
    while loops, like the forward pass."""

    def loop(self, *, throw, passed_solver_state, passed_controller_state, **kwargs):
        del throw, passed_solver_state, passed_controller_state
        return lax_loop(self._loop, **kwargs)


class ControllerState(eqx.Module):
    """The state of `BackwardController`: the wrapped controller's, its last two
    proposed steps, and where the accepted steps reached."""

    inner: Any
    last: Real[Array, ""]
    prev: Real[Array, ""]
    reached: Real[Array, ""]


class BackwardController(dfx.AbstractStepSizeController):
    """Wraps the step-size controller of a backward solve, and remembers

    - the step it last proposed, so that the next piece starts with it instead of
      restarting the step-size selection. A piece's final step is clipped to land on
      its end, and the proposal made after it is scaled from that clipped step; so the
      larger of the last two proposals is kept;
    - how far the solve got, to say how many steps it needs when it runs out of
      `max_steps`.

    With `stops` (forward times), a proposed step that would span some of them is
    shortened to end on the last of them it reaches: the step then resets $z$ there
    (`_step.SaveRows`)."""

    controller: dfx.AbstractStepSizeController
    stops: Real[Array, " rows"] | None = None

    def wrap(self, direction):
        stops = None if self.stops is None else self.stops * direction
        return BackwardController(self.controller.wrap(direction), stops)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.controller.init(
            terms, t0, t1, y0, dt0, args, func, error_order
        )
        dt = tnext - t0
        return tnext, ControllerState(state, dt, dt, t0)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        keep, tprev, tnext, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state.inner
        )
        if self.stops is not None:
            inside = (self.stops > tprev) & (self.stops < tnext)
            last_inside = jnp.max(jnp.where(inside, self.stops, -jnp.inf))
            tnext = jnp.where(jnp.any(inside), last_inside, tnext).astype(tnext.dtype)
        state = ControllerState(inner, tnext - tprev, controller_state.last, tprev)
        return keep, tprev, tnext, made_jump, state, result


class Rows(eqx.Module):
    """The rows: the save and split times after $t_0$ (sorted), the forward states and
    the cotangents there."""

    ts: Real[Array, " rows"]
    ys: PyTree[Array]
    gs: PyTree[Array]


class _Piece(eqx.Module):
    t_start: Real[Array, ""]
    t_end: Real[Array, ""]
    y_end: PyTree[Array]
    g_end: PyTree[Array]
    n: Int[Array, ""]


class _Carry(eqx.Module):
    a: PyTree[Array]
    dt: Real[Array, ""]
    total: PyTree[Array]
    failed: Bool[Array, ""]
    need: Real[Array, ""]


class Backward(eqx.Module):
    """The backward pass of one solve: what stays the same on every piece."""

    rule: AbstractQuadrature
    field: ParamField
    theta: PyTree[Array]
    solver: dfx.AbstractSolver
    order: int = eqx.field(static=True)
    controller: dfx.AbstractStepSizeController
    max_steps: int | None = eqx.field(static=True)
    cross: bool = eqx.field(static=True)
    forward_z: ForwardPath | None

    def _rows_sum(self, mask, tree):
        """The sum of the rows of every leaf of `tree` where `mask` holds."""
        dot = lambda x: jnp.tensordot(mask.astype(x.dtype), x, axes=1)
        return jtu.tree_map(dot, tree)

    def _pieces(self, t0, rows: Rows, splits, nfe) -> _Piece:
        """The pieces the rule asks for, with the cotangents of the rows at each right
        end (several rows may share a time) and the forward state there."""
        ends = self.rule.bounds(rows.ts, splits)
        starts = jnp.concatenate([t0[None], ends[:-1]])
        at_end = (rows.ts[None, :] == ends[:, None]) & (
            rows.ts[None, :] > starts[:, None]
        )
        g_end = jax.vmap(self._rows_sum, in_axes=(0, None))(at_end, rows.gs)
        y_end = jtu.tree_map(lambda y: y[jnp.searchsorted(rows.ts, ends)], rows.ys)
        n = self.rule.node_counts(nfe, ends - starts, rows.ts[-1] - t0)
        return _Piece(starts, ends, y_end, g_end, n)

    def _piece(self, rows: Rows, carry: _Carry, piece: _Piece):
        a = jtu.tree_map(jnp.add, carry.a, piece.g_end)
        save_rows = None
        if self.cross or self.forward_z is not None:
            save_rows = SaveRows(
                self.solver,
                self.field,
                self.theta,
                *jtu.tree_map(
                    lambda x: x if self.cross else x[:0], (rows.ts, rows.ys, rows.gs)
                ),
                piece.t_start,
                piece.t_end,
                self.forward_z,
            )
        solver = self.rule.step_solver(
            self.solver, self.order, self.field, self.theta, save_rows
        )
        # Solve from one ULP inside each end. A split time may be a jump of the
        # field (`jump_ts`), where its value depends on the side it is evaluated
        # from; the forward solve steps to either side of a jump, and so does this.
        lo = jnp.nextafter(piece.t_start, piece.t_end)
        hi = jnp.nextafter(piece.t_end, piece.t_start)
        inside = lo < hi
        lo = jnp.where(inside, lo, piece.t_start)
        hi = jnp.where(inside, hi, piece.t_end)
        node_ts = weights = None
        if jtu.tree_leaves(self.theta):
            node_ts, weights = self.rule.node_times(piece.n, piece.t_start, piece.t_end)
        if node_ts is not None:
            node_ts = jnp.clip(node_ts, lo, hi)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(AugmentedField(self.field, self.theta)),
            solver,
            hi,
            lo,
            -carry.dt,
            (piece.y_end, a),
            saveat=dfx.SaveAt(
                ts=node_ts, t1=True, controller_state=True, solver_state=True
            ),
            stepsize_controller=self.controller,
            adjoint=ForwardOnly(),
            max_steps=self.max_steps,
            throw=False,
        )
        total = self.rule.integrate(
            carry.total, sol, self.field, self.theta, weights, piece.n
        )
        a = jtu.tree_map(lambda x: x[-1], sol.ys[1])
        state = sol.controller_state
        dt = carry.dt
        if isinstance(
            self.controller.controller, dfx.AbstractAdaptiveStepSizeController
        ):
            longer = jnp.maximum(state.last, state.prev)
            dt = jnp.where(piece.t_end > piece.t_start, longer, dt)
        # The backward solve runs in diffrax's normalised time -t, from -t_end.
        bad = ~dfx.is_okay(sol.result)
        covered = jnp.maximum(state.reached + hi, jnp.finfo(hi.dtype).tiny)
        length = piece.t_end - piece.t_start
        need = jnp.where(bad, jnp.maximum(carry.need, length / covered), carry.need)
        return _Carry(a, dt, total, carry.failed | bad, need)

    def __call__(self, t0, rows: Rows, splits, nfe, first_dt):
        """The adjoint at $t_0$, the parameter gradient, whether a backward solve ran
        out of `max_steps` and by how much."""
        a0 = jtu.tree_map(lambda y: jnp.zeros_like(y[0]), rows.ys)
        total = jtu.tree_map(jnp.zeros_like, self.theta)
        carry = _Carry(a0, first_dt, total, jnp.array(False), jnp.zeros((), t0.dtype))
        pieces = self._pieces(t0, rows, splits, nfe)
        carry, _ = lax.scan(
            lambda c, p: (self._piece(rows, c, p), None),
            carry,
            pieces,
            reverse=True,
        )
        a_t0 = jtu.tree_map(jnp.add, carry.a, self._rows_sum(rows.ts == t0, rows.gs))
        return a_t0, carry.total, carry.failed, carry.need


def max_steps_error(x, failed, need, max_steps):
    """Raise, if a backward solve failed, how many steps it needs; `need` is the
    failed piece's length over the part of it the solve covered."""
    if max_steps is None:
        # Without a cap a backward solve cannot run out of steps.
        return x
    factors = (2, 4, 8, 16, 64)
    hints = [f"about {k}x as many: pass `max_steps={k * max_steps}`" for k in factors]
    hints.append(f"over {factors[-1]}x as many; raise `max_steps`")
    msgs = [
        "GQAdjoint's backward pass reached the maximum number of solver steps "
        f"(max_steps={max_steps}) on one piece of the solve. The backward solve of "
        f"[z, a_z] needs {hint} to `diffeqsolve`. It can need more steps than the "
        "forward solve: the adjoint may vary faster than the state. On contracting "
        "dynamics `GQAdjoint(checkpoints=N)` also helps."
        for hint in hints
    ]
    index = jnp.searchsorted(jnp.asarray(factors, need.dtype), need)
    return eqx.branched_error_if(x, failed, index, msgs)
