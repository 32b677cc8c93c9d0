r"""`GQAdjoint`: the adjoint method with Gauss–Legendre quadrature for the parameters.

How the pieces fit (the docs pages "How it works" and "Accuracy" have the derivation
and the measurements):

- **`GQAdjoint.loop`** checks the configuration (`_gq_support.check_supported`: what is
  not verified is refused when traced), closure-converts the vector field so that its
  parameters are inputs of the custom VJP, and hands the differentiated inputs and a
  `Solve` (everything else) to `_gq_loop`.
- **Forward** (`_forward`). The ordinary solve, through diffrax's own loop
  (`self._loop`) with plain `lax.while_loop`s. It saves what `SaveAt` asks for, plus the
  state at the *split times*: the controller's `jump_ts`, a control's knots and, with
  `checkpoints=N`, $N$ evenly spaced times. The user sees only their outputs; the rest
  are the residuals.
- **Backward** (`_gq_loop_bwd`). The cotangents of the saved outputs become *rows*
  (`_backward.Rows`: time, forward state, cotangent); an event changes the last one
  (`_events`). `_backward.Backward` solves $[z, a_z]$ backwards piece by piece, and the
  quadrature rule (`_quadrature.StepGauss`, the default, or `IntervalGauss`) decides
  where pieces end and how $\int a_z^\top \partial f/\partial\theta\,dt$ is summed;
  `_step` holds the per-step rule's solver, which also crosses save times.
- **Time gradients.** $dL/dt_k = (\partial L/\partial y(t_k))^\top f(t_k, y(t_k))$ for
  every saved time and $dL/dt_0 = -a_z(t_0)^\top f(t_0, y_0)$.

Every use of diffrax's private names and layouts goes through `_diffrax_internals`.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._adjoint_common import (
    closure_convert_terms,
    fill_cotangents,
    nondiff,
    t0_cotangent,
    tree_dot,
)
from ._backward import Backward, BackwardController, max_steps_error, Rows
from ._diffrax_internals import (
    only_transpose_ys,
    replace_fields,
    set_save_times,
)
from ._events import event_conditions, event_cotangents
from ._forward import forward, keeps_states, save_times, Solve, user_rows
from ._gq_support import check_supported, knotted_paths
from ._quadrature import AbstractQuadrature, StepGauss
from ._step import ParamField, wrapped_vf


class GQAdjoint(dfx.AbstractAdjoint):
    r"""Backpropagate through [`diffrax.diffeqsolve`][] with the continuous adjoint
    method, computing the parameter gradient by Gauss–Legendre quadrature.

    The backward pass solves only the state and its adjoint,

    $$\frac{d}{dt}\begin{bmatrix} z \\ a_z \end{bmatrix} =
    \begin{bmatrix} f(t, z, \theta) \\ -a_z^\top \partial f / \partial z
    \end{bmatrix}, \qquad a_z(t_K) = \frac{\partial L}{\partial z(t_K)},$$

    backwards in time, and evaluates

    $$\frac{dL}{d\theta} = \int_{t_0}^{t_K} a_z(t)^\top
    \frac{\partial f}{\partial \theta}(t, z(t), \theta)\, dt
    \approx \sum_{k} \sum_{j=1}^{n_k} w_{kj}\, a_z(\tau_{kj})^\top
    \frac{\partial f}{\partial \theta}(\tau_{kj}, z(\tau_{kj}), \theta)$$

    with Gauss–Legendre rules on pieces of $[t_0, t_K]$. The `quadrature` rule
    chooses the pieces: by default ([`gqdiffrax.StepGauss`][]) every step of the
    backward solve, so that its step-size control also controls the quadrature, and
    save times are crossed rather than stopped at; the paper's method
    ([`gqdiffrax.IntervalGauss`][]) puts one rule on each interval between save times.
    Memory is that of the adjoint method plus, by default, the forward state at every
    step (see below); with a large state, constant in the number of steps. The backward
    pass never carries the parameter-sized $a_\theta$ through the solver's stages, which
    is what makes it faster than [`diffrax.BacksolveAdjoint`][] for models with many
    parameters.

    Gradients are computed with respect to `y0`, the inexact arrays in `args`, the
    parameters of the vector field (an `eqx.Module`'s fields, or arrays closed over by a
    plain function), and the times `t0`, `t1` and `SaveAt(ts=...)`.

    Supports a single [`diffrax.ODETerm`][] (any pytree state), `SaveAt(t0=..., t1=...,
    ts=...)` in any combination, reverse-time solves, `diffrax.ConstantStepSize` and
    adaptive step-size controllers (with `jump_ts`), every explicit Runge–Kutta solver
    (`Euler`, `Heun`, `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, `Dopri5`, `Dopri8`, ...),
    `jax.jit`, `jax.vmap` and float32/float64. Everything else is refused when traced,
    with an error that names an alternative.

    Neural controlled differential equations: `diffrax.ControlTerm(f, X).to_ode()`
    with `X` a [`diffrax.LinearInterpolation`][] or [`diffrax.CubicInterpolation`][]
    (or such an interpolation passed in `args` and read by the vector field), and
    `diffrax.ControlTerm(f, X)` itself for a linear `X` with `jump_ts=X.ts`. The
    control's knots are split times (the forward pass saves the state there and no
    Gauss rule spans one), and the interpolated data get gradients like any other
    parameter; the knot times themselves do not (refused when differentiated).

    Terminating events: a [`diffrax.Event`][] whose condition returns a real number
    and has a `root_finder`, with `SaveAt(t1=True)` (and `t0=True`). The event time
    $t_e$ is differentiable (`sol.ts[-1]`), and moves with the parameters as
    $dt_e/d\theta = -(\partial_\theta g + \partial_y g \cdot \partial_\theta
    y) / (\partial_t g + \partial_y g \cdot f)$ at $t_e$; the backward pass starts
    from $t_e$ with the adjoint that accounts for it. A boolean condition (such as
    `diffrax.steady_state_event()`) stops the solve at the end of a step and needs no
    root finder: its event time is held fixed (zero gradient), as
    [`diffrax.RecursiveCheckpointAdjoint`][] differentiates it.

    !!! warning

        Like every optimise-then-discretise method, the gradients are those of the
        continuous problem, accurate to the solver tolerance; they are not the exact
        derivative of the discrete forward solve (use
        [`diffrax.RecursiveCheckpointAdjoint`][] for that).

    **Where the backward pass gets $z$.** Solved backwards from the final state, $z$
    leaves the forward trajectory on dynamics that forget their start (that settle
    near an attracting state): the backward flow expands, and errors grow like
    $e^{\lambda t}$ for a contraction rate $\lambda$. So by default the forward
    keeps the state at the end of every accepted step. A backward step compares its
    $z$ with the kept state at a forward step's end inside it; where they differ by
    more than the forward's tolerance (its controller's `rtol`, `atol` and norm), it
    resets $z$ at its own end to the forward solution there: one step of the forward
    solver from the kept start of the forward step that holds that time, to that
    time. So $z$ stays within the tolerance of the forward solution whatever the
    dynamics, and a reset costs one forward step only where $z$ drifted (with
    constant step sizes, which have no tolerance, on every step). This keeps
    `max_steps` states in memory, so it is chosen when traced: with
    [`gqdiffrax.StepGauss`][], a finite `max_steps`, and `max_steps` times the
    state's bytes within `state_budget`. Otherwise (a large state,
    `max_steps=None`, `state_budget=0`, or [`gqdiffrax.IntervalGauss`][]) $z$ is
    re-solved backwards as in the paper, with memory constant in `max_steps`; then
    keep forward `checkpoints` on contracting dynamics.

    !!! info

        The backward solve uses the forward `solver` and step-size controller. If it
        exhausts `max_steps` it raises, saying how many steps it needs (with
        `throw=True`, the default), or returns NaN gradients (with `throw=False`), never
        a silently wrong gradient.

        Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) is not
        supported, as for every adjoint built on a custom VJP: JAX raises its own
        `TypeError` (`can't apply forward-mode autodiff (jvp) to a custom_vjp
        function`). Use `diffrax.ForwardMode` for forward mode, or
        `diffrax.DirectAdjoint` for both modes.

    ??? cite "References"

        ```bibtex
        @article{norcliffe2023faster,
            title={Faster Training of Neural {ODE}s Using Gau{\ss}--{L}egendre
                   Quadrature},
            author={Norcliffe, Alexander and Deisenroth, Marc Peter},
            journal={Transactions on Machine Learning Research},
            year={2023},
        }
        ```
    """

    quadrature: AbstractQuadrature = StepGauss()
    checkpoints: int = eqx.field(default=0, static=True, kw_only=True)
    state_budget: int = eqx.field(default=2**26, static=True, kw_only=True)

    def __check_init__(self):
        if not isinstance(self.quadrature, AbstractQuadrature):
            raise ValueError(
                "`GQAdjoint(quadrature=...)` takes a quadrature rule: "
                "`gqdiffrax.StepGauss()` (the default, a Gauss rule on every backward "
                "step) or `gqdiffrax.IntervalGauss(C=0.1)` (the paper's one rule per "
                f"interval between save times); got {self.quadrature!r}."
            )
        budget = self.state_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(
                "`GQAdjoint(state_budget=...)` must be a non-negative int (bytes the "
                f"forward may spend keeping states); got {budget!r}."
            )
        if (
            isinstance(self.checkpoints, bool)
            or not isinstance(self.checkpoints, int)
            or self.checkpoints < 0
        ):
            raise ValueError(
                "`GQAdjoint(checkpoints=...)` must be a non-negative int (how many "
                f"forward states to keep); got {self.checkpoints!r}."
            )

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        check_supported(terms, solver, stepsize_controller, event, saveat, args)
        del passed_solver_state, passed_controller_state
        direction = terms.direction
        y0 = init_state.y

        # Turn parameters closed over by the vector field (a lambda's captured arrays,
        # an eqx.Module's fields) into explicit leaves, so that they are inputs of the
        # custom VJP rather than closed-over tracers it cannot differentiate.
        t = (t0 * direction).astype(t0.dtype)
        term = closure_convert_terms(terms.term, t, y0, args)
        if isinstance(term, dfx.ControlTerm):
            knots = term.control.ts * direction
            y0 = _knots_are_jumps(y0, knots, stepsize_controller, t0, t1)
        ts = saveat.subs.ts
        conds = None
        if event is not None:
            if self.checkpoints:
                raise NotImplementedError(
                    "`GQAdjoint(checkpoints=...)` does not support events yet: "
                    "checkpoints are placed before the event time is known. Drop "
                    "`checkpoints`, or use `diffrax.RecursiveCheckpointAdjoint()`."
                )
            conds, located = event_conditions(
                event,
                y0,
                args,
                terms=terms,
                solver=solver,
                t0=t0,
                t1=t1,
                dt0=dt0,
                saveat=saveat,
                stepsize_controller=stepsize_controller,
                max_steps=max_steps,
            )
            event = (event.root_finder, event.direction, located)

        # `eqx.filter_custom_vjp` differentiates only `diff`; an array in `spec` that
        # carries a JVP tracer is an error. Some of these do depend on differentiated
        # inputs: `init_state` holds the first step size and the solver's cached
        # f(t0, y0), and `dt0` may be computed from `t1`. Their derivatives are not
        # wanted: the continuous adjoint gives the gradient of the exact solution,
        # which depends on neither.
        arrays = nondiff(
            dict(
                init_state=replace_fields(init_state, y=object()),
                saveat=saveat,
                stepsize_controller=stepsize_controller,
                dt0=dt0,
                direction=direction,
                event=event,
            )
        )
        spec = Solve(
            adjoint=self,
            solver=solver,
            order=solver.order(terms),
            max_steps=max_steps,
            throw=throw,
            progress_meter=progress_meter,
            **arrays,
        )
        diff = (y0, args, term, t0, t1, ts, conds)
        final_state, aux_stats = _gq_loop(diff, spec)
        out = only_transpose_ys(final_state)
        out = set_save_times(out, _saved_times(final_state, saveat, t0, t1, ts, conds))
        return out, aux_stats


GQAdjoint.__init__.__doc__ = r"""**Arguments:**

- `quadrature`: the quadrature rule, [`gqdiffrax.StepGauss`][]`()` (the default: a
    Gauss rule on every backward step, crossing save times) or
    [`gqdiffrax.IntervalGauss`][]`(C=0.1)` (the paper's: one rule per interval between
    save times). Their docstrings say what each assumes.
- `checkpoints`: how many forward states to keep, at evenly spaced times. The backward
    solve stops at each and resets $z$ there, so errors of a backward re-solve of $z$
    grow only between checkpoints. Memory grows by `checkpoints` states. Default 0:
    with the default `state_budget` the state is kept at every step already.
- `state_budget`: the bytes the forward may spend keeping the state at every
    accepted step (`max_steps` rows) for the backward pass to reset $z$ to; above it,
    $z$ is re-solved backwards. Per solve: under `jax.vmap` each sample keeps its own.
    Default `2**26` (64 MiB); `0` never keeps them.
"""


def _saved_times(final_state, saveat, t0, t1, ts, conds):
    """The saved times `sol.ts` as the forward produced them, differentiable: a saved
    `t0`, `ts` or `t1` is that input (so `sol.ts` moves with it, as with
    `RecursiveCheckpointAdjoint`), and an event time is the custom VJP's output, whose
    gradient the backward pass computes."""
    saved = final_state.save_state.ts
    subs = saveat.subs
    event = conds is not None
    parts = [t0[None]] if subs.t0 else []
    parts += [] if ts is None else [ts]
    parts += [jnp.zeros_like(t1)[None] if event else t1[None]] if subs.t1 else []
    times = jnp.concatenate([p.astype(saved.dtype) for p in parts])
    base = saved if event else lax.stop_gradient(saved)
    if event:
        # Only the event's row comes from the custom VJP; the others from the inputs.
        base = base.at[:-1].set(lax.stop_gradient(base[:-1]))
    return base + (times - lax.stop_gradient(times))


def _knots_are_jumps(y0, knots, stepsize_controller, t0, t1):
    """Raise at run time unless every knot of a `ControlTerm`'s control inside the
    solve is one of the controller's `jump_ts`, so that no step crosses one. All in
    diffrax's normalised time (`t0 < t1`), as the controller's `jump_ts` are."""
    jump_ts = stepsize_controller.jump_ts
    knots = knots.astype(jump_ts.dtype)
    missing = (knots > t0) & (knots < t1) & ~jnp.isin(knots, jump_ts)
    return eqx.error_if(
        y0,
        jnp.any(missing),
        "`adjoint=gqdiffrax.GQAdjoint()` with a `diffrax.ControlTerm` needs every "
        "knot of the control inside the solve among the controller's `jump_ts`: "
        "pass `jump_ts=control.ts`, or use `diffrax.ControlTerm(f, control).to_ode()`.",
    )


@eqx.filter_custom_vjp
def _gq_loop(diff, spec):
    final_state, aux_stats, _, _ = forward(diff, spec)
    return final_state, aux_stats


@_gq_loop.def_fwd
def _gq_loop_fwd(perturbed, diff, spec):
    _check_perturbed(perturbed)
    keep = keeps_states(spec, diff)
    final_state, aux_stats, save_state, kept = forward(diff, spec, keep)
    residuals = (
        save_state.ys,
        save_state.ts,
        final_state.event_mask,
        aux_stats["num_fevals"],
        final_state.num_steps,
        kept,
    )
    return (final_state, aux_stats), residuals


def _check_perturbed(perturbed):
    """Refuse, when the gradient is traced, the derivatives GQAdjoint does not compute:
    with respect to an interpolation's knot times, and (with knots) to the solve's
    times, whose outputs have kinks there."""
    _, p_args, p_term, p_t0, p_t1, p_ts, _ = perturbed
    paths = knotted_paths(p_term, p_args)
    if any(any(jtu.tree_leaves(p.ts)) for p in paths):
        raise ValueError(
            "`adjoint=gqdiffrax.GQAdjoint()` does not differentiate with respect to "
            "an interpolation's knot times `ts` (the quadrature is split at them). "
            "Build the interpolation from `jax.lax.stop_gradient(ts)`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for that gradient."
        )
    if paths and any(jtu.tree_leaves((p_t0, p_t1, p_ts))):
        raise ValueError(
            "`adjoint=gqdiffrax.GQAdjoint()` does not differentiate a controlled "
            "differential equation with respect to `t0`, `t1` or `SaveAt(ts=...)`: "
            "the solution has kinks at the control's knots. Pass the times through "
            "`jax.lax.stop_gradient`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for those gradients."
        )


def _rows(residuals, grad_out, diff, spec: Solve):
    """The rows of the backward pass (`_backward.Rows`), the cotangent that goes
    straight to `y0`, and the end time of the solve."""
    ys, saved_ts, _, _, _, _ = residuals
    y0, _, _, t0, t1, ts, conds = diff
    subs = spec.saveat.subs
    _, extra, fwd_ts, user_pos = save_times(diff, spec)
    num_ts = 0 if ts is None else ts.shape[0]
    num_fwd_ts = 0 if fwd_ts is None else fwd_ts.shape[0]
    user = user_rows(subs, num_ts, num_fwd_ts, user_pos)
    grad_user = fill_cotangents(
        jtu.tree_map(lambda y: y[user], ys), grad_out.save_state.ys
    )
    grad_ys = jtu.tree_map(
        lambda y, g: jnp.zeros_like(y).at[user].set(g), ys, grad_user
    )
    # With an event, the solve (and its `t1` row) ends at the event time.
    t_end = t1 if conds is None else saved_ts[-1]
    row_ts = jnp.concatenate(
        ([] if fwd_ts is None else [fwd_ts]) + ([t_end[None]] if subs.t1 else [])
        or [jnp.zeros((0,), t0.dtype)]
    )
    after = lambda x: x[int(subs.t0) :]
    rows = Rows(row_ts, jtu.tree_map(after, ys), jtu.tree_map(after, grad_ys))
    splits = None if extra is None else jnp.sort(extra)
    return rows, splits, t0_cotangent(spec.saveat, grad_ys, y0), t_end, user_pos


@_gq_loop.def_bwd
def _gq_loop_bwd(residuals, grad_out, perturbed, diff, spec):
    _, _, event_mask, nfe, num_steps, kept = residuals
    y0, args, term, t0, t1, ts, conds = diff
    _, p_args, p_term, p_t0, p_t1, p_ts, p_conds = perturbed
    grad_out = grad_out[0]
    f = wrapped_vf(term, spec.direction)
    rows, splits, grad_y0_saved, t_end, user_pos = _rows(
        residuals, grad_out, diff, spec
    )
    grad_conds = None
    if conds is not None:
        # The event time's dependence on the parameters: a different terminal
        # adjoint, and direct terms (`_events`).
        g_ts = grad_out.save_state.ts
        g_t = jnp.zeros((), t0.dtype) if g_ts is None else g_ts[-1]
        g_y = jtu.tree_map(lambda x: x[-1], rows.gs)
        y_e = jtu.tree_map(lambda x: x[-1], rows.ys)
        a_e, event_args, grad_conds, triggered = event_cotangents(
            conds,
            p_conds,
            args,
            p_args,
            event_mask,
            f,
            t_end,
            y_e,
            g_y,
            g_t,
            spec.event[2],
        )
        gs = jtu.tree_map(lambda g, a: g.at[-1].set(a), rows.gs, a_e)
        rows = Rows(rows.ts, rows.ys, gs)

    # theta: the inputs whose gradient is the quadrature integral.
    theta, theta_static = eqx.partition((args, term), (p_args, p_term))
    theta_arrays, theta_rest = eqx.partition(theta_static, eqx.is_array)
    field = ParamField(theta_arrays, theta_rest, spec.direction)
    rule = spec.adjoint.quadrature
    cross = rule.crosses_saves and ts is not None and ts.shape[0] > 0
    controller = spec.stepsize_controller
    adaptive = isinstance(controller, dfx.AbstractAdaptiveStepSizeController)
    if adaptive:
        first_dt = (t_end - t0) / jnp.maximum(num_steps, 1).astype(t0.dtype)
        if kept is not None:
            # The backward solve starts where the forward ended: with the step size
            # the forward reached there, not the mean over its start-up steps.
            final = kept.final_step().astype(t0.dtype)
            first_dt = jnp.where(final > 0, final, first_dt)
    else:
        first_dt = jnp.asarray(spec.dt0, t0.dtype)
    backward = Backward(
        rule,
        field,
        theta,
        spec.solver,
        spec.order,
        BackwardController(controller, rows.ts if cross else None),
        spec.max_steps,
        cross,
        kept,
    )
    if rows.ts.shape[0] > 0:
        a_t0, total, failed, need = backward(t0, rows, splits, nfe, first_dt)
    else:
        a_t0, total = jtu.tree_map(jnp.zeros_like, (y0, theta))
        failed, need = jnp.array(False), jnp.zeros((), t0.dtype)
    grad_y0 = jtu.tree_map(jnp.add, a_t0, grad_y0_saved)
    # With nothing to integrate, `total` is the (args, term) tree of `None`s.
    grad_args, grad_term = total
    if conds is not None:
        grad_args = jtu.tree_map(jnp.add, grad_args, event_args)

    # Time gradients: moving a save time moves its output along the trajectory;
    # moving t0 shifts the whole solution.
    grad_t0 = grad_t1 = grad_ts = None
    subs = spec.saveat.subs
    if p_t0:
        grad_t0 = -tree_dot(a_t0, f(t0, y0, args)).astype(t0.dtype)
    if (p_ts is not None and p_ts) or p_t1:
        if jtu.tree_leaves(rows.ys):
            f_rows = jax.vmap(lambda t, y: f(t, y, args))(rows.ts, rows.ys)
            per_time = jax.vmap(tree_dot)(rows.gs, f_rows).astype(t0.dtype)
        else:
            per_time = jnp.zeros_like(rows.ts)
        if ts is not None and p_ts:
            pos = jnp.arange(ts.shape[0]) if user_pos is None else user_pos
            grad_ts = per_time[pos]
        if subs.t1 and p_t1 and conds is not None:
            # An event time does not move with t1; a solve that reached t1 does.
            moved = tree_dot(g_y, f(t_end, y_e, args)) + g_t
            grad_t1 = jnp.where(triggered, 0, moved).astype(t0.dtype)
        elif subs.t1 and p_t1:
            grad_t1 = per_time[-1]
        elif p_t1:
            grad_t1 = jnp.zeros_like(t1)

    grads = (grad_y0, grad_args, grad_term, grad_t0, grad_t1, grad_ts, grad_conds)
    if spec.throw:
        return max_steps_error(grads, failed, need, spec.max_steps)
    # With `throw=False` a failed backward solve cannot raise; make its gradient
    # unmistakably invalid instead of silently wrong.
    nan_if_failed = lambda x: jnp.where(failed, jnp.nan, x) if eqx.is_array(x) else x
    return jtu.tree_map(nan_if_failed, grads)
