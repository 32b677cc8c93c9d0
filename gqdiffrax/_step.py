r"""One step of `GQAdjoint`'s backward solve under the per-step rule
([`gqdiffrax.StepGauss`][]): the step of $[z, a_z]$, a Gauss rule on it, and the save
times it spans.

**The Gauss rule.** Over a backward step from $e$ down to $s$, the step's dense output
gives $z(\tau_j)$ and $a_z(\tau_j)$ at the nodes $\tau_j$ of a Gauss–Legendre rule on
$[s, e]$, and one VJP of the vector field, `vmap`-ed over the nodes, adds
$\sum_j w_j\, a_z(\tau_j)^\top \partial f/\partial\theta(\tau_j, z(\tau_j))$ to a sum
carried in the solver state. diffrax keeps a step's solver state only when it accepts
the step, so the sum holds accepted steps only.

**Crossing save times.** At a save time $t_k$ the adjoint jumps by the cotangent
$g_k = \partial L/\partial y(t_k)$. Stopping the backward solve there costs at least one
step per save time; instead a step spans them. Over a step that spans the save times
$s \le t_k < e$ the adjoint equation is linear, so the adjoint splits into the part
carried from $e$, $a_c(t) = \Phi(e, t)^\top a(e)$ with $\Phi(e, t) = \partial y(e) /
\partial y(t)$, smooth on the step, and the parts started at each $t_k$:

$$a(s) = a_c(s) + \sum_k \Phi(t_k, s)^\top g_k,$$
$$\frac{dL}{d\theta}\Big|_{[s, e]} = \int_s^e a_c^\top \frac{\partial f}{\partial
\theta}\, dt + \sum_k \int_s^{t_k} \big(\Phi(t_k, t)^\top g_k\big)^\top \frac{\partial
f}{\partial \theta}\, dt.$$

The first terms are the backward step and its Gauss rule. The sums are the gradient of
$\sum_k g_k^\top y(t_k)$ with respect to $y(s)$ and $\theta$, where $y(t_k)$ follows
from $z(s)$ by one step of the forward solver over $[s, e]$ and its dense output, the
way the forward pass produced $y(t_k)$: one VJP of that step gives both, however many
save times the step spans (`SaveRows.inject`).

That interpolant is less accurate between the step's ends than at them. At the spanned
save times the forward step's interpolant and the backward step's approximate the same
$z(t_k)$; their difference joins the step's error estimate for $z$, so the step-size
control shortens steps whose interpolants disagree. The backward controller
(`_backward.BackwardController`) shortens a step that would span save times to end on
the last of them it reaches, and the step resets $z$ there to the forward state. After
an injection or a reset the state has jumped, so an FSAL solver's stored last stage is
stale: the next step evaluates its first stage afresh.

**Where $z$ comes from.** Re-solved backwards, $z$ leaves the forward trajectory on
dynamics that forget their start. When the forward kept its state at every accepted
step (`ForwardPath`), a backward step whose $z$ differs from the kept state at the
first forward step's end inside it by more than the forward's tolerance
(`ForwardPath.drifted`) resets $z$ at its end to the forward solution there: one
forward step from the kept start of the step that holds that time. Where $z$ follows
the forward solution, as it does unless the dynamics forget their start, no step pays
for a reset. A reset is a jump like an injection: the next step evaluates its first
stage afresh.
"""

import functools as ft
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree, Real

from ._adjoint_common import AbstractWrappedSolver, tree_dot
from ._diffrax_internals import unvmap_all, unvmap_any, WrapTerm


def wrapped_vf(term, direction):
    r"""The vector field of `term` as an ODE (a `ControlTerm` through `to_ode()`), in
    diffrax's normalised time $s = \mathrm{direction} \cdot t$, in which every solve
    runs forwards: $dy/ds = \mathrm{direction} \cdot f(\mathrm{direction} \cdot s, y)$.
    """
    if isinstance(term, dfx.ControlTerm):
        term = term.to_ode()
    term = WrapTerm(term, direction)

    def f(t, y, args):
        out = term.vf(t, y, args)
        return jtu.tree_map(lambda x: x * direction.astype(x.dtype), out)

    return f


class ParamField(eqx.Module):
    r"""The vector field as a function of the differentiated inputs $\theta$ (the
    inexact leaves of `args` and of the term that the gradient asks for), in
    normalised time. `arrays` holds the other arrays of `(args, term)` and `static`
    the rest, so that every array is a field."""

    arrays: PyTree[Array]
    static: PyTree = eqx.field(static=True)
    direction: Real[Array, ""]

    def __call__(self, theta, t, z):
        args, term = eqx.combine(theta, self.arrays, self.static)
        return wrapped_vf(term, self.direction)(t, z, args)

    def vjp(self, theta, ts, zs, cotangents):
        r"""$\sum_j c_j^\top \partial f/\partial\theta(t_j, z_j)$: one VJP of the
        field `vmap`-ed over the rows of `ts`, `zs` and `cotangents`."""
        _, vjp = jax.vjp(
            lambda th: jax.vmap(lambda t, z: self(th, t, z))(ts, zs), theta
        )
        (g,) = vjp(cotangents)
        return g


class AugmentedField(eqx.Module):
    r"""The backward system $\dot z = f(t, z)$, $\dot a_z = -a_z^\top \partial f /
    \partial z$, as the vector field of a `diffrax.ODETerm`."""

    field: ParamField
    theta: PyTree[Array]

    def __call__(self, t, state, args):
        del args
        z, a = state
        fz, vjp_z = jax.vjp(lambda z_: self.field(self.theta, t, z_), z)
        (a_dot,) = vjp_z(a)
        return fz, jtu.tree_map(jnp.negative, a_dot)


def scale_rows(tree, w):
    """Multiply each leaf's leading axis by the weights `w`."""
    return jtu.tree_map(
        lambda x: x * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype), tree
    )


class ForwardPath(eqx.Module):
    r"""The forward solution, from its state at $t_0$ and at the end of every accepted
    step (rows, then `inf`): at a time $t$, one step of the forward solver from the
    start $t_n \le t$ of the accepted step that holds $t$, to $t$. That is a shorter
    step than the forward took from the same state, so $z(t)$ is as accurate as the
    forward's own states (more than its dense output between them)."""

    t0: Real[Array, ""]
    y0: PyTree[Array]
    ts: Real[Array, " steps"]
    ys: PyTree[Array]
    # The forward's step-size controller, for `drifted`; `None` for constant steps.
    controller: dfx.AbstractAdaptiveStepSizeController | None = None

    def drifted(self, s, e, backward_z):
        r"""Whether $z$ of a backward step over $[s, e]$ (its interpolant
        `backward_z(t)`) has left the forward solution by more than the forward's
        tolerance, measured at the first kept time inside the step, in the forward
        controller's norm. `False` when no kept time is inside; always `True` for
        constant step sizes, which have no tolerance."""
        if self.controller is None:
            return jnp.array(True)
        rtol, atol = self.controller.rtol, self.controller.atol
        i = jnp.searchsorted(self.ts, s, side="right")
        i = jnp.minimum(i, self.ts.shape[0] - 1)
        t = self.ts[i]
        inside = (t > s) & (t < e)
        zb = backward_z(jnp.where(inside, t, e))

        def scaled(b, r):
            y = r[i]
            return jnp.abs(b - y) / (atol + rtol * jnp.maximum(jnp.abs(b), jnp.abs(y)))

        return inside & (self.controller.norm(jtu.tree_map(scaled, zb, self.ys)) > 1)

    def final_step(self):
        """The larger of the forward's last two accepted steps (the last may have been
        cut short to land on the end); zero without steps."""
        n = jnp.sum(jnp.isfinite(self.ts))
        ends = jnp.concatenate([self.t0[None], self.ts])
        at = lambda k: ends[jnp.maximum(n - k, 0)]
        return jnp.maximum(at(0) - at(1), at(1) - at(2))

    def evaluate(self, t, solver, vf):
        """$z(t)$, with `solver` the forward solver and `vf(t, y)` the vector field in
        the loop's normalised time."""
        i = jnp.searchsorted(self.ts, t, side="right") - 1
        first = i < 0
        i = jnp.maximum(i, 0)
        ta = jnp.where(first, self.t0, self.ts[i])
        ya = jtu.tree_map(lambda a, r: jnp.where(first, a, r[i]), self.y0, self.ys)
        term = dfx.ODETerm(lambda t_, y, _: vf(t_, y))
        state = solver.init(term, ta, t, ya, None)
        z, _, _, _, _ = solver.step(term, ta, t, ya, None, state, False)
        return z


def _where_rows(mask, x, other):
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, other)


class SaveRows(eqx.Module):
    """What a piece of the backward solve meets on its way: the save times it crosses
    (the forward states and the cotangents there) and the forward states it resets
    $z$ to (`resets`, kept at every accepted forward step; may have no rows), with the
    forward solver that made them.

    Rows are sorted, in forward time; those outside $(lo, hi)$, the piece this serves,
    are ignored. A step $[s, e]$ takes the save times in $[s, e)$, and where $s$ is a
    save time or a kept step it resets $z(s)$ to the forward state there."""

    solver: dfx.AbstractSolver
    field: ParamField
    theta: PyTree[Array]
    ts: Real[Array, " rows"]
    ys: PyTree[Array]
    gs: PyTree[Array]
    lo: Real[Array, ""]
    hi: Real[Array, ""]
    forward_z: ForwardPath | None = None

    def _cotangents(self, s, e, z, backward_z):
        ts = self.ts
        hit = (ts > self.lo) & (ts >= s) & (ts < e) & (ts < self.hi)
        at = jnp.clip(ts, s, e)

        def spanned(z_, theta_):
            term = dfx.ODETerm(lambda t, y, _: self.field(theta_, t, y))
            state = self.solver.init(term, s, e, z_, None)
            _, _, dense, _, _ = self.solver.step(term, s, e, z_, None, state, False)
            path = self.solver.interpolation_cls(t0=s, t1=e, **dense)
            ys = jax.vmap(path.evaluate)(at)
            gs = jtu.tree_map(lambda g: _where_rows(hit, g, 0), self.gs)
            return tree_dot(gs, ys), ys

        def run():
            out, vjp, ys = jax.vjp(spanned, z, self.theta, has_aux=True)
            dz, dtheta = vjp(jnp.ones_like(out))
            zb = jax.vmap(backward_z)(at)
            gap = jtu.tree_map(
                lambda y, b: jnp.max(_where_rows(hit, jnp.abs(y - b), 0), axis=0),
                ys,
                zb,
            )
            return dz, dtheta, gap

        def skip():
            # The gap is a magnitude: real even for a complex state.
            gap = jtu.tree_map(lambda x: jnp.zeros(x.shape, jnp.abs(x).dtype), z)
            zeros = jtu.tree_map(jnp.zeros_like, (z, self.theta))
            return *zeros, gap

        any_hit = jnp.any(hit)
        # `run` gives zeros where nothing is hit: under `vmap` it runs for every
        # sample as soon as one needs it, and a batched `lax.cond` would run both.
        return (*lax.cond(unvmap_any(any_hit), run, skip), any_hit)

    def _reset(self, s, z, ts, ys):
        on = (ts == s) & (ts > self.lo) & (ts < self.hi)
        saved = jtu.tree_map(lambda y: y[jnp.argmax(on)], ys)
        return jtu.tree_map(lambda y, x: jnp.where(jnp.any(on), y, x), saved, z)

    def inject(self, s, e, z, backward_z):
        """The state and parameter cotangents of the save times in $[s, e)$, the
        largest gap between the forward and the backward step's interpolants there,
        $z(s)$ reset to the forward's, and whether the state jumped (the step spanned
        a save time, or reset a drifted $z$)."""
        if self.ts.shape[0] == 0:
            dz = jtu.tree_map(jnp.zeros_like, z)
            dtheta = jtu.tree_map(jnp.zeros_like, self.theta)
            gap = jtu.tree_map(lambda x: jnp.zeros(x.shape, jnp.abs(x).dtype), z)
            any_hit = jnp.array(False)
        else:
            dz, dtheta, gap, any_hit = self._cotangents(s, e, z, backward_z)
            z = self._reset(s, z, self.ts, self.ys)
        if self.forward_z is not None:
            vf = lambda t, y: self.field(self.theta, t, y)
            # The piece's last step ends at its start, whose z nothing reads: the
            # piece before starts from the forward state at its own end.
            last = s <= jnp.nextafter(self.lo, self.hi)
            keep = last | ~self.forward_z.drifted(s, e, backward_z)
            forward = lambda: self.forward_z.evaluate(s, self.solver, vf)
            reset = lambda: jtu.tree_map(ft.partial(jnp.where, keep), z, forward())
            # Skip the step only where every sample of a `vmap` can: a batched
            # `lax.cond` would run both branches, and costs more than the step.
            z = lax.cond(unvmap_all(keep), lambda: z, reset)
            any_hit = any_hit | ~keep
        return z, dz, dtheta, any_hit, gap


class GaussStepState(eqx.Module):
    """The solver state of `GaussStep`: the wrapped solver's, the parameter sum so
    far, and whether the last step injected cotangents or reset $z$."""

    inner: Any
    total: PyTree[Array]
    jumped: Bool[Array, ""]


class GaussStep(AbstractWrappedSolver):
    r"""Wraps the solver of a backward solve of $[z, a_z]$: every step also adds a
    Gauss rule over itself to the parameter sum (when there are parameters,
    `nodes`), and the cotangents of the save times it spans (when there are save times
    to cross, `rows`). The backward solve runs in diffrax's normalised time $-t$."""

    solver: dfx.AbstractSolver
    field: ParamField
    theta: PyTree[Array]
    nodes: tuple[float, ...] = eqx.field(static=True)
    weights: tuple[float, ...] = eqx.field(static=True)
    rows: SaveRows | None

    def init(self, terms, t0, t1, y0, args):
        inner = self.solver.init(terms, t0, t1, y0, args)
        total = jtu.tree_map(jnp.zeros_like, self.theta)
        return GaussStepState(inner, total, jnp.array(False))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        made_jump = jnp.logical_or(made_jump, solver_state.jumped)
        y1, y_error, dense_info, inner, result = self.solver.step(
            terms, t0, t1, y0, args, solver_state.inner, made_jump
        )
        path = self.solver.interpolation_cls(t0=t0, t1=t1, **dense_info)
        total = solver_state.total
        if self.nodes:
            x = jnp.asarray(self.nodes, t0.dtype)
            half = 0.5 * (t1 - t0)
            s = 0.5 * (t0 + t1) + half * x
            z, a = jax.vmap(path.evaluate)(s)
            w = half * jnp.asarray(self.weights, t0.dtype)
            g = self.field.vjp(self.theta, -s, z, scale_rows(a, w))
            total = jtu.tree_map(jnp.add, total, g)
        jumped = jnp.array(False)
        if self.rows is not None:
            z1, a1 = y1
            z1, dz, dtheta, jumped, gap = self.rows.inject(
                -t1, -t0, z1, lambda t: path.evaluate(-t)[0]
            )
            y1 = z1, jtu.tree_map(jnp.add, a1, dz)
            total = jtu.tree_map(jnp.add, total, dtheta)
            if y_error is not None:
                # The interpolant the injection differentiates is as accurate as its
                # values: control the step size by their error estimate too.
                error_z, error_a = y_error
                # In the estimate's own dtype (complex for a complex state).
                larger = lambda e, g: jnp.where(jnp.abs(e) >= g, e, g.astype(e.dtype))
                error_z = jtu.tree_map(larger, error_z, gap)
                y_error = error_z, error_a
        state = GaussStepState(inner, total, jumped)
        return y1, y_error, dense_info, state, result
