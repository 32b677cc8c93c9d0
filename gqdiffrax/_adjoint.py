r"""`GQAdjoint`: the adjoint method with Gauss–Legendre quadrature for the parameters.

Design (see the docs page "How it works" for the derivation):

- **Forward.** The ordinary solve, run through diffrax's own loop with plain
  `lax.while_loop`s inside a custom VJP: only what `SaveAt` asks for is kept. The number
  of vector-field evaluations (NFE) is read off the solve's step count and the solver's
  Butcher tableau.
- **Backward.** Between consecutive save times $t_{k-1} < t_k$ (and $t_0$), solve only
  the $[z, a_z]$ system backwards,
  $\dot z = f(t, z)$, $\dot a_z = -a_z^\top \partial f / \partial z$, with step-size
  control on $(z, a_z)$ alone. At each save time $z$ is reset to its forward value and
  $\partial L / \partial y(t_k)$ is added to $a_z$. The $n_k$ Gauss–Legendre nodes of
  the interval are reached with `SaveAt(ts=...)` of that backward solve (dense output,
  no restart at the nodes) and the step size is carried from one interval into the
  next. The parameter gradient
  $\int_{t_{k-1}}^{t_k} a_z^\top \partial f/\partial\theta\, dt$ is then one VJP of the
  vector field `vmap`-ed over the nodes, with cotangents $w_j a_z(\tau_j)$, evaluated in
  chunks of at most `node_chunk` nodes so memory does not grow with $n_k$.
- **Parameters.** The vector field is closure-converted before entering the custom VJP,
  so parameters of an `eqx.Module`, arrays closed over by a plain function and the
  inexact leaves of `args` are all explicit inputs of the VJP and get gradients.
- **Times.** $dL/dt_k = (\partial L/\partial y(t_k))^\top f(t_k, y(t_k))$ for every
  saved time and $dL/dt_0 = -a_z(t_0)^\top f(t_0, y_0)$.
"""

import math
import typing
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._diffrax_internals import (
    is_sde,
    lax_while_loop,
    only_transpose_ys,
    save_y,
    WrapTerm,
)
from ._quadrature import interval_rule, MAX_NODES, num_nodes


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
    \approx \sum_{k=1}^{K} \sum_{j=1}^{n_k} w_{kj}\, a_z(\tau_{kj})^\top
    \frac{\partial f}{\partial \theta}(\tau_{kj}, z(\tau_{kj}), \theta)$$

    with an $n_k$-point Gauss–Legendre rule on each interval between save times, where

    $$n_k = \min\left(\left\lceil C \cdot \mathrm{NFE} \cdot
    \frac{t_k - t_{k-1}}{t_1 - t_0}\right\rceil, \texttt{max\_nodes}\right)$$

    and NFE counts the vector-field evaluations of the forward solve over
    $[t_0, t_1]$ (so $t_K \le t_1$ is the last save time). Memory is that of
    the adjoint method (constant in the number of steps); the cost of the backward pass
    no longer carries the parameter-sized $a_\theta$ through every solver stage, which
    makes it much faster than [`diffrax.BacksolveAdjoint`][] for models with many
    parameters.

    Gradients are computed with respect to `y0`, the inexact arrays in `args`, the
    parameters of the vector field (an `eqx.Module`'s fields, or arrays closed over by a
    plain function), and the times `t0`, `t1` and `SaveAt(ts=...)`.

    Supports `SaveAt(t0=..., t1=..., ts=...)` in any combination, reverse-time solves,
    `diffrax.ConstantStepSize` and adaptive step-size controllers, every explicit
    Runge–Kutta solver (`Euler`, `Heun`, `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`,
    `Dopri5`, `Dopri8`, ...), `jax.jit`, `jax.vmap` and float32/float64.

    !!! warning

        Like every optimise-then-discretise method, the gradients are those of the
        continuous problem, accurate to the solver tolerance; they are not the exact
        derivative of the discrete forward solve (use
        [`diffrax.RecursiveCheckpointAdjoint`][] for that). Use a tolerance that makes
        the backward solve accurate.

    !!! info

        The backward solve uses the forward `solver` and step-size controller. If the
        backward solve exhausts `max_steps` it raises (with `throw=True`, the default)
        or returns NaN gradients (with `throw=False`), never a silently wrong gradient.

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

    C: float = 0.1
    max_nodes: int = eqx.field(default=64, static=True)
    node_chunk: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        if isinstance(self.C, (int, float)) and not (
            math.isfinite(self.C) and self.C > 0
        ):
            raise ValueError(
                f"`GQAdjoint(C=...)` must be a finite positive number; got C={self.C}. "
                "C scales the number of quadrature nodes with the forward NFE; the "
                "paper's default is C=0.1."
            )
        if not isinstance(self.max_nodes, int) or not 1 <= self.max_nodes <= MAX_NODES:
            raise ValueError(
                f"`GQAdjoint(max_nodes=...)` must be an int in [1, {MAX_NODES}]; got "
                f"max_nodes={self.max_nodes!r}. Gauss–Legendre rules are tabulated up "
                f"to {MAX_NODES} nodes (exact for polynomials of degree 127)."
            )
        if not isinstance(self.node_chunk, int) or self.node_chunk < 1:
            raise ValueError(
                "`GQAdjoint(node_chunk=...)` must be a positive int (how many "
                f"quadrature nodes share one vmapped VJP); got {self.node_chunk!r}."
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
        _check_supported(terms, solver, stepsize_controller, event, saveat)
        del passed_solver_state, passed_controller_state
        direction = terms.direction
        ode_term = terms.term
        y0 = init_state.y

        # Turn parameters closed over by the vector field (a lambda's captured arrays,
        # an eqx.Module's fields) into explicit leaves, so that they are inputs of the
        # custom VJP rather than closed-over tracers it cannot differentiate.
        vf = eqx.filter_closure_convert(
            ode_term.vector_field, (t0 * direction).astype(t0.dtype), y0, args
        )
        ts = saveat.subs.ts

        # Everything outside `diff` is data the gradient must not flow through. It is
        # stopped explicitly, so that no differentiable value reaches the custom VJP by
        # a side door and silently gets a zero gradient.
        nondiff = _stop_gradient(
            dict(
                init_state=eqx.tree_at(lambda s: s.y, init_state, object()),
                saveat=saveat,
                stepsize_controller=stepsize_controller,
                dt0=dt0,
                direction=direction,
            )
        )
        diff = (y0, args, vf, t0, t1, ts)
        final_state, aux_stats = _gq_loop(
            diff,
            self=self,
            solver=solver,
            max_steps=max_steps,
            throw=throw,
            progress_meter=progress_meter,
            **nondiff,
        )
        return only_transpose_ys(final_state), aux_stats


GQAdjoint.__init__.__doc__ = r"""**Arguments:**

- `C`: how the number of quadrature nodes scales with the forward NFE: interval $k$
    gets $\lceil C \cdot \mathrm{NFE} \cdot (t_k - t_{k-1}) / (t_1 - t_0) \rceil$
    nodes. Larger is more accurate and slower. The paper's default is `0.1`; its
    ablation found `1e-3` to `1e2` train equally well on nested spheres.
- `max_nodes`: the cap on nodes per interval, $1 \le$ `max_nodes` $\le 64$. A
    64-node rule is exact for polynomials of degree 127.
- `node_chunk`: how many nodes share one `vmap`-ed VJP of the vector field. Memory of
    the quadrature grows with it. An interval's $n_k$ nodes are evaluated as
    $\lfloor n_k / \texttt{node\_chunk} \rfloor$ full chunks and the remainder in
    power-of-two pieces, so no work is spent on padding. Under `jax.vmap` the pieces
    follow the largest $n_k$ in the batch (the other samples' extra nodes have weight
    zero), so per-sample solves share one schedule instead of running every piece.
"""


def _stop_gradient(tree):
    return jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


def _is_explicit_rk(solver) -> bool:
    return isinstance(solver, dfx.AbstractRungeKutta) and (
        isinstance(solver.tableau, dfx.ButcherTableau) and not solver.tableau.implicit
    )


def _check_supported(terms, solver, stepsize_controller, event, saveat) -> None:
    """Raise at trace time, with the fix, for everything GQAdjoint cannot do."""
    name = "`adjoint=gqdiffrax.GQAdjoint()`"
    if jtu.tree_structure(solver.term_structure) != jtu.tree_structure(0):
        raise NotImplementedError(
            f"{name} supports solvers that take a single term; "
            f"`{type(solver).__name__}` takes several. Use an explicit Runge–Kutta "
            "solver such as `diffrax.Dopri5()` on a single `diffrax.ODETerm`."
        )
    inner = terms.term if isinstance(terms, WrapTerm) else terms
    if not isinstance(inner, dfx.ODETerm):
        if is_sde(terms):
            raise ValueError(
                f"{name} differentiates ODEs, but `terms` contains Brownian motion (an "
                "SDE). Train the SDE as an ODE driven by a smooth Wiener surrogate "
                "(Wong–Zakai): `terms = gqdiffrax.wong_zakai_term(drift, diffusion, "
                "gqdiffrax.WienerSurrogate(t0, t1, shape, key))`, then evaluate the "
                "trained drift and diffusion with an SDE solver (see "
                "`gqdiffrax.sde_terms`)."
            )
        raise ValueError(
            f"{name} supports a single `diffrax.ODETerm`; got "
            f"{type(inner).__name__}. For a controlled differential equation (CDE) "
            "write it as an ODE, e.g. `diffrax.ODETerm(lambda t, y, args: "
            "vf(t, y, args) @ control.derivative(t))`; for an SDE use "
            "`gqdiffrax.wong_zakai_term`."
        )
    if event is not None:
        raise NotImplementedError(
            f"{name} does not support events. Solve up to a fixed `t1`, or use "
            "`diffrax.RecursiveCheckpointAdjoint()` to differentiate through an event."
        )
    dense_or_steps = (
        f"{name} does not support `SaveAt(steps=True)` or `SaveAt(dense=True)`: "
        "their outputs depend on the solver's internal steps, which the adjoint "
        "method does not store. Save at fixed times with `SaveAt(ts=...)`."
    )
    if saveat.dense:
        raise NotImplementedError(dense_or_steps)
    if jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat) != jtu.tree_structure(0):
        raise NotImplementedError(
            f"{name} does not support `SaveAt(subs=...)`. Use a single "
            "`SaveAt(t0=..., t1=..., ts=...)`."
        )
    if saveat.subs.steps:
        raise NotImplementedError(dense_or_steps)
    if saveat.subs.fn is not save_y:
        raise NotImplementedError(
            f"{name} does not support `SaveAt(fn=...)`. Save the state with "
            "`SaveAt(ts=...)` and apply the function to `sol.ys` afterwards."
        )
    if not (_is_explicit_rk(solver) or isinstance(solver, dfx.Euler)):
        raise NotImplementedError(
            f"{name} supports explicit Runge–Kutta solvers (e.g. `diffrax.Dopri5()`, "
            f"`Tsit5()`, `Heun()`, `Euler()`); got `{type(solver).__name__}`. "
            "Implicit, multi-term and stochastic solvers are not supported."
        )
    if isinstance(stepsize_controller, dfx.StepTo):
        raise NotImplementedError(
            f"{name} does not support `diffrax.StepTo`: the backward solve cannot "
            "reuse the forward grid. Use `diffrax.ConstantStepSize()` with `dt0`, or "
            "`diffrax.PIDController(rtol=..., atol=...)`."
        )


def _is_subsaveat(x: Any) -> bool:
    return isinstance(x, dfx.SubSaveAt)


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


class _ForwardOnly(dfx.AbstractAdjoint):
    """The backward pass's own solves are never differentiated: run them with plain
    while loops, like the forward pass."""

    def loop(self, *, throw, passed_solver_state, passed_controller_state, **kwargs):
        del throw, passed_solver_state, passed_controller_state
        return self._loop(
            **kwargs, inner_while_loop=lax_while_loop, outer_while_loop=lax_while_loop
        )


class _CarryStepSize(dfx.AbstractStepSizeController):
    """Wraps an adaptive controller and remembers the step it last proposed, so that the
    backward solve of the next interval starts with it instead of restarting the step
    size selection at every save time.

    The final step of an interval is clipped to land on the save time, and the proposal
    made after it is scaled from that clipped step; so the larger of the last two
    proposals is kept."""

    controller: dfx.AbstractStepSizeController

    def wrap(self, direction):
        return _CarryStepSize(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.controller.init(
            terms, t0, t1, y0, dt0, args, func, error_order
        )
        dt = tnext - t0
        return tnext, (state, dt, dt)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        state, last, _ = controller_state
        keep, tprev, tnext, made_jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state
        )
        return keep, tprev, tnext, made_jump, (state, tnext - tprev, last), result


def _wrapped_vf(vf, direction):
    """The vector field in diffrax's normalised time $s = \\mathrm{direction} \\cdot t$,
    in which every solve runs forwards: $dy/ds = \\mathrm{direction} \\cdot
    f(\\mathrm{direction} \\cdot s, y)$."""
    term = WrapTerm(dfx.ODETerm(vf), direction)

    def f(t, y, args):
        out = term.vf(t, y, args)
        return jtu.tree_map(lambda x: x * direction.astype(x.dtype), out)

    return f


@eqx.filter_custom_vjp
def _gq_loop(
    diff,
    *,
    self,
    solver,
    stepsize_controller,
    saveat,
    dt0,
    max_steps,
    throw,
    init_state,
    direction,
    progress_meter,
):
    del self, throw
    y0, args, vf, t0, t1, ts = diff
    if ts is not None:
        saveat = eqx.tree_at(lambda s: s.subs.ts, saveat, ts)
    init_state = eqx.tree_at(lambda s: s.y, init_state, y0)
    final_state, aux_stats = dfx.RecursiveCheckpointAdjoint()._loop(
        args=args,
        terms=WrapTerm(dfx.ODETerm(vf), direction),
        solver=solver,
        stepsize_controller=stepsize_controller,
        event=None,
        saveat=saveat,
        t0=t0,
        t1=t1,
        dt0=dt0,
        max_steps=max_steps,
        init_state=init_state,
        inner_while_loop=lax_while_loop,
        outer_while_loop=lax_while_loop,
        progress_meter=progress_meter,
    )
    nfe = _forward_nfe(solver, final_state.num_steps)
    return final_state, {**aux_stats, "num_fevals": nfe}


@_gq_loop.def_fwd
def _gq_loop_fwd(perturbed, diff, **kwargs):
    del perturbed
    final_state, aux_stats = _gq_loop(diff, **kwargs)
    residuals = (
        final_state.save_state.ys,
        aux_stats["num_fevals"],
        final_state.num_accepted_steps,
    )
    return (final_state, aux_stats), residuals


def _materialise(x, g):
    return jnp.zeros_like(x) if g is None else g


def _tree_dot(a, b):
    return sum(
        (jnp.sum(x * y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))),
        start=jnp.zeros(()),
    )


def _scale_rows(tree, w):
    """Multiply each leaf's leading axis by the weights `w`."""
    return jtu.tree_map(
        lambda x: x * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype), tree
    )


def _node_pieces(f_nodes, chunk, num, theta, arrays, direction, acc, ts, ws, zs, as_):
    r"""`acc` plus $\sum_{j < \mathrm{num}} w_j\, a_j^\top \partial f/\partial\theta
    (\tau_j, z_j)$: `num // chunk` full chunks of one `vmap`-ed VJP each, then the
    remainder in power-of-two pieces (the binary digits of `num mod chunk`), so exactly
    `num` nodes are evaluated and no work goes into padding."""

    def vjp_rows(acc, start, size):
        take = lambda x: lax.dynamic_slice_in_dim(x, start, size)
        t_c, w_c, z_c, a_c = jtu.tree_map(take, (ts, ws, zs, as_))
        _, vjp_theta = jax.vjp(
            lambda th: jax.vmap(lambda t, z: f_nodes(th, arrays, direction, t, z))(
                t_c, z_c
            ),
            theta,
        )
        (g,) = vjp_theta(_scale_rows(a_c, w_c))
        return jtu.tree_map(jnp.add, acc, g)

    num_full = num // chunk
    acc = lax.fori_loop(
        0, num_full, lambda i, acc: vjp_rows(acc, i * chunk, chunk), acc
    )
    start = num_full * chunk
    size = 1 << ((chunk - 1).bit_length() - 1) if chunk > 1 else 0
    while size >= 1:
        acc, start = lax.cond(
            num - start >= size,
            lambda acc, start, size=size: (vjp_rows(acc, start, size), start + size),
            lambda acc, start: (acc, start),
            acc,
            start,
        )
        size //= 2
    return acc


def _make_node_sum(f_nodes, chunk):
    """The quadrature sum of one interval, with a batching rule of its own.

    Unbatched, the piece schedule follows the interval's own node count `n`. Under
    `jax.vmap` (per-sample solves) `n` differs between samples, and a data-dependent
    `lax.cond` would be batched into a `select` that runs every piece; instead the
    schedule follows the largest `n` in the batch, which is not batched, and the extra
    rows of the other samples carry weight zero (see `interval_rule`).
    """

    @jax.custom_batching.custom_vmap
    def node_sum(theta, arrays, direction, acc, ts, ws, zs, as_, n):
        return _node_pieces(
            f_nodes, chunk, n, theta, arrays, direction, acc, ts, ws, zs, as_
        )

    @node_sum.def_vmap
    def _(axis_size, in_batched, theta, arrays, direction, acc, ts, ws, zs, as_, n):
        *batched, n_batched = in_batched
        num = jnp.max(n) if n_batched else n
        in_axes = jtu.tree_map(lambda b: 0 if b else None, tuple(batched))
        out = jax.vmap(
            lambda *xs: _node_pieces(f_nodes, chunk, num, *xs),
            in_axes=in_axes,
            axis_size=axis_size,
        )(theta, arrays, direction, acc, ts, ws, zs, as_)
        return out, jtu.tree_map(lambda _: True, out)

    return node_sum


@_gq_loop.def_bwd
def _gq_loop_bwd(
    residuals,
    grad_out,
    perturbed,
    diff,
    *,
    self,
    solver,
    stepsize_controller,
    saveat,
    dt0,
    max_steps,
    throw,
    init_state,
    direction,
    progress_meter,
):
    del init_state, progress_meter
    self = typing.cast(GQAdjoint, self)
    ys, nfe, num_accepted = residuals
    grad_final_state, _ = grad_out
    grad_ys = jtu.tree_map(_materialise, ys, grad_final_state.save_state.ys)
    y0, args, vf, t0, t1, ts = diff
    p_y0, p_args, p_vf, p_t0, p_t1, p_ts = perturbed
    del p_y0
    f = _wrapped_vf(vf, direction)
    subs = saveat.subs

    # The save times after t0, in order, with their forward states and cotangents. A
    # `SaveAt(t0=True)` output is y0 itself: its cotangent goes straight to y0.
    offset = 1 if subs.t0 else 0
    points = [t0[None]]
    if ts is not None:
        points.append(ts)
    if subs.t1:
        points.append(t1[None])
    times = jnp.concatenate(points)
    num_intervals = times.shape[0] - 1
    y_after = jtu.tree_map(lambda x: x[offset:], ys)
    g_after = jtu.tree_map(lambda x: x[offset:], grad_ys)
    grad_y0_saved = jtu.tree_map(
        lambda x, y: x[0] if subs.t0 else jnp.zeros_like(y), grad_ys, y0
    )

    # theta: the inputs whose gradient is the quadrature integral.
    theta, theta_static = eqx.partition((args, vf), (p_args, p_vf))
    want_theta = len(jtu.tree_leaves(theta)) > 0

    def aug_vf(t, state, _):
        z, a = state
        fz, vjp_z = jax.vjp(lambda z_: f(t, z_, args), z)
        (a_dot,) = vjp_z(a)
        return fz, jtu.tree_map(jnp.negative, a_dot)

    adaptive = isinstance(stepsize_controller, dfx.AbstractAdaptiveStepSizeController)
    if adaptive:
        controller = _CarryStepSize(stepsize_controller)
        first_dt = (t1 - t0) / jnp.maximum(num_accepted, 1).astype(t0.dtype)
    else:
        controller = stepsize_controller
        first_dt = dt0
    chunk = min(self.node_chunk, self.max_nodes)
    counts = num_nodes(self.C, nfe, times[1:] - times[:-1], t1 - t0, self.max_nodes)

    theta_arrays, theta_rest = eqx.partition(theta_static, eqx.is_array)

    def f_nodes(theta_, arrays, direction_, t, z):
        args_, vf_ = eqx.combine(theta_, arrays, theta_rest)
        return _wrapped_vf(vf_, direction_)(t, z, args_)

    # Every piece ends at or before row n <= max_nodes: the rows need no padding.
    node_sum = _make_node_sum(f_nodes, chunk)

    def interval(carry, xs):
        a, dt, theta_sum, ok = carry
        t_start, t_end, y_end, g_end, n = xs
        a = jtu.tree_map(jnp.add, a, g_end)
        node_ts, node_ws = interval_rule(n, t_start, t_end, self.max_nodes)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(aug_vf),
            solver,
            t_end,
            t_start,
            -dt,
            (y_end, a),
            saveat=dfx.SaveAt(
                ts=node_ts if want_theta else None,
                t1=True,
                controller_state=adaptive,
            ),
            stepsize_controller=controller,
            adjoint=_ForwardOnly(),
            max_steps=max_steps,
            throw=throw,
        )
        zs, as_ = sol.ys
        a = jtu.tree_map(lambda x: x[-1], as_)
        if adaptive:
            _, last, prev = sol.controller_state
            dt = jnp.where(t_end > t_start, jnp.maximum(last, prev), dt)
        if want_theta:
            nodes = lambda x: x[:-1]
            theta_sum = node_sum(
                theta,
                theta_arrays,
                direction,
                theta_sum,
                node_ts,
                node_ws,
                jtu.tree_map(nodes, zs),
                jtu.tree_map(nodes, as_),
                n,
            )
        ok = ok & dfx.is_okay(sol.result)
        return (a, dt, theta_sum, ok), None

    a0 = jtu.tree_map(jnp.zeros_like, y0)
    theta0 = jtu.tree_map(jnp.zeros_like, theta)
    carry = (a0, jnp.asarray(first_dt, t0.dtype), theta0, jnp.array(True))
    if num_intervals > 0:
        xs = (times[:-1], times[1:], y_after, g_after, counts)
        carry, _ = lax.scan(interval, carry, xs, reverse=True)
    a_t0, _, theta_sum, ok = carry

    grad_y0 = jtu.tree_map(jnp.add, a_t0, grad_y0_saved)
    # With nothing to integrate, `theta_sum` is the (args, vf) tree of `None`s.
    grad_args, grad_vf = theta_sum

    # Time gradients: moving a save time moves its output along the trajectory;
    # moving t0 shifts the whole solution.
    grad_t0 = grad_t1 = grad_ts = None
    if p_t0:
        grad_t0 = -_tree_dot(a_t0, f(t0, y0, args)).astype(t0.dtype)
    if (p_ts is not None and p_ts) or p_t1:
        f_after = jax.vmap(lambda t, y: f(t, y, args))(times[1:], y_after)
        per_time = jax.vmap(_tree_dot)(g_after, f_after)
        grad_times = per_time.astype(t0.dtype)
        if ts is not None and p_ts:
            grad_ts = grad_times[: ts.shape[0]]
        if subs.t1 and p_t1:
            grad_t1 = grad_times[-1]
        elif p_t1:
            grad_t1 = jnp.zeros_like(t1)

    grads = (grad_y0, grad_args, grad_vf, grad_t0, grad_t1, grad_ts)
    # With `throw=False` a failed backward solve cannot raise; make its gradient
    # unmistakably invalid instead of silently wrong.
    nan_if_failed = lambda x: jnp.where(ok, x, jnp.nan) if eqx.is_array(x) else x
    return jtu.tree_map(nan_if_failed, grads)
