r"""Stepping the backward solve across save times (`GQAdjoint(saves="cross")`).

At a save time $t_k$ the adjoint jumps by the cotangent $g_k = \partial L/\partial
y(t_k)$. Stopping the backward solve of $[z, a_z]$ there costs at least one solver step
per save time (and, with an FSAL tableau, one more evaluation to restart it), however
smooth the solution: a time series saved 50 times takes 50 or more backward steps where
the forward solve took a handful.

Instead the backward solve steps across save times. Over one backward step from $e$
down to $s$ that spans the save times $s \le t_k < e$, the adjoint equation is linear,
so the adjoint splits into the part carried from $e$,
$a_c(t) = \Phi(e, t)^\top a(e)$ with $\Phi(e, t) = \partial y(e)/\partial y(t)$, smooth
on the step, and the parts started at each $t_k$:

$$a(s) = a_c(s) + \sum_k \Phi(t_k, s)^\top g_k,$$
$$\frac{dL}{d\theta}\Big|_{[s, e]} = \int_s^e a_c^\top \frac{\partial f}{\partial
\theta}\, dt + \sum_k \int_s^{t_k} \big(\Phi(t_k, t)^\top g_k\big)^\top \frac{\partial
f}{\partial \theta}\, dt.$$

The first terms are the backward step itself and the Gauss rule on it
(`StepQuadrature`). The sums are the gradient of $\sum_k g_k^\top y(t_k)$ with respect
to $y(s)$ and $\theta$, where $y(t_k)$ follows from $z(s)$ by one step of the forward
solver over $[s, e]$ and its dense output at the $t_k$, the way the forward pass itself
produced $y(t_k)$. So one VJP of that step gives both, however many save times the step
spans. The backward step sizes are those the step-size control of $[z, a_c]$ chooses,
which on a smooth solution are about the forward's.

The interpolant the injection differentiates is less accurate between the step's ends
than at them. At the spanned save times the forward step's interpolant and the backward
step's (from the backward step's own $z(s)$ and $z(e)$) approximate the same $z(t_k)$;
their difference joins the step's error estimate for $z$, so the step-size control
shortens steps whose interpolants disagree.

The backward re-solve of $z$ drifts from the forward solution (exponentially, on
contracting dynamics). The backward step-size controller (`_adjoint._BackwardController`
with `stops`) shortens a step that would span save times to end on the last of them it
reaches, and the step resets $z$ there to the forward state.

After an injection (or a reset) the state has jumped at $s$, so an FSAL solver's stored
last stage is stale: the next step evaluates its first stage afresh (it is told it made
a jump).
"""

from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._adjoint_common import AbstractWrappedSolver, tree_dot


class CrossSaves(AbstractWrappedSolver):
    """Wraps the solver of a backward solve of $[z, a_z]$ so that every step adds the
    cotangents of the save times it spans to $a_z$, and their parameter cotangents to
    the parameter sum of `StepQuadrature` (which `solver` is, when there are parameters
    to differentiate) carried in the solver state: kept, like the step, only when the
    step is accepted.

    `inject(s, e, z)` takes a step's forward times $s < e$ and $z(s)$, and returns the
    state and parameter cotangents and whether the step spanned a save time.
    """

    solver: Any
    inject: Callable = eqx.field(static=True)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args), jnp.array(False)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner, injected = solver_state
        jumped = jnp.logical_or(made_jump, injected)
        y1, y_error, dense_info, inner, result = self.solver.step(
            terms, t0, t1, y0, args, inner, jumped
        )
        # The backward solve runs in diffrax's normalised time -t.
        path = self.solver.interpolation_cls(t0=t0, t1=t1, **dense_info)
        z1, a1 = y1
        z1, dz, dtheta, injected, gap = self.inject(
            -t1, -t0, z1, lambda t: path.evaluate(-t)[0]
        )
        a1 = jtu.tree_map(jnp.add, a1, dz)
        if y_error is not None:
            # The interpolant the injection differentiates is as accurate as its
            # values: control the step size by their error estimate too.
            error_z, error_a = y_error
            error_z = jtu.tree_map(
                lambda e, g: jnp.maximum(jnp.abs(e), g), error_z, gap
            )
            y_error = error_z, error_a
        if jtu.tree_leaves(dtheta):
            inner_state, total = inner
            inner = inner_state, jtu.tree_map(jnp.add, total, dtheta)
        return (z1, a1), y_error, dense_info, (inner, injected), result


def save_time_injector(solver, vf, theta, row_ts, row_ys, row_gs, lo, hi):
    """`CrossSaves`'s `inject` for the save times in $(lo, hi)$: a step $[s, e]$ takes
    those in $[s, e)$, and where $s$ is a save time it resets $z(s)$ to the forward
    state there (the step-size control lands steps on save times).

    **Arguments:**

    - `solver`: the forward solver, whose step and dense output make $y(t_k)$.
    - `vf`: `vf(theta, t, y)`, the vector field in forward time.
    - `theta`: the inputs that get the parameter cotangent.
    - `row_ts`, `row_ys`, `row_gs`: all save times (sorted), the forward states and
        the cotangents there (pytrees of arrays with a leading axis of save times);
        rows outside $(lo, hi)$ are ignored.
    - `lo`, `hi`: the piece of the backward solve (between split times) this serves.
    """

    def inject(s, e, z, backward_z):
        hit = (row_ts > lo) & (row_ts >= s) & (row_ts < e) & (row_ts < hi)
        where_hit = lambda x, other: jnp.where(
            hit.reshape(hit.shape + (1,) * (x.ndim - 1)), x, other
        )
        at = jnp.clip(row_ts, s, e)

        def spanned(z_, theta_):
            term = dfx.ODETerm(lambda t, y, _: vf(theta_, t, y))
            state = solver.init(term, s, e, z_, None)
            _, _, dense, _, _ = solver.step(term, s, e, z_, None, state, False)
            path = solver.interpolation_cls(t0=s, t1=e, **dense)
            ys = jax.vmap(path.evaluate)(at)
            gs = jtu.tree_map(lambda g: where_hit(g, 0), row_gs)
            return tree_dot(gs, ys), ys

        def run():
            out, vjp, ys = jax.vjp(spanned, z, theta, has_aux=True)
            dz, dtheta = vjp(jnp.ones_like(out))
            # How far the forward step's dense output is from the backward step's at
            # the spanned save times: an estimate of the error of the interpolant the
            # injection differentiates, for the step-size control.
            # Both start from the backward step's own z(s), so that they differ by
            # the two interpolants' errors only.
            zb = jax.vmap(backward_z)(at)
            gap = jtu.tree_map(
                lambda y, b: jnp.max(where_hit(jnp.abs(y - b), 0), axis=0), ys, zb
            )
            return dz, dtheta, gap

        def skip():
            return jtu.tree_map(jnp.zeros_like, (z, theta, z))

        any_hit = jnp.any(hit)
        dz, dtheta, gap = lax.cond(any_hit, run, skip)
        # The backward re-solve of z drifts from the forward solution (on contracting
        # dynamics, exponentially); reset it where the forward state is known.
        on_save = hit & (row_ts == s)
        saved = jtu.tree_map(lambda y: y[jnp.argmax(on_save)], row_ys)
        z = jtu.tree_map(lambda y, x: jnp.where(jnp.any(on_save), y, x), saved, z)
        return z, dz, dtheta, any_hit, gap

    return inject
