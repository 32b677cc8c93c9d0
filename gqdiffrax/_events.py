r"""Terminating events for `GQAdjoint`: a solve that ends where a condition function
$g(t, y, \theta)$ crosses zero, at a time $t_e$ found by diffrax's root find.

$t_e$ depends on the parameters through $g(t_e, y(t_e), \theta) = 0$. Differentiating
that identity,

$$\frac{dt_e}{d\theta} = -\frac{\partial_\theta g + \partial_y g \cdot
\partial_\theta y(t_e)}{\partial_t g + \partial_y g \cdot f(t_e, y(t_e))},$$

so for a loss $L(y(t_e), t_e)$, with $c = \partial_y L \cdot f(t_e, y(t_e)) +
\partial_t L$ and $D = \partial_t g + \partial_y g \cdot f(t_e, y(t_e))$,

$$\frac{dL}{d\theta} = \Big(\partial_y L - \frac{c}{D}\,\partial_y g\Big)
\cdot \partial_\theta y(t_e) - \frac{c}{D}\,\partial_\theta g.$$

The first term is the ordinary adjoint solve from $t_e$ with the terminal condition
$a(t_e) = \partial_y L - (c/D)\,\partial_y g$; the second is direct. Only the condition
that triggered contributes; if none did, the solve ended at $t_1$ and nothing changes.
"""

from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._adjoint_common import tree_dot


_NAME = "`adjoint=gqdiffrax.GQAdjoint()`"


class _Condition(eqx.Module):
    """A closure-converted condition function $g(t, y, \\mathrm{args})$, called the way
    diffrax calls `Event.cond_fn` (its other keyword arguments were bound when it was
    converted)."""

    fn: Callable

    def __call__(self, t, y, args, **kwargs):
        del kwargs
        return self.fn(t, y, args)


def event_conditions(event: dfx.Event, y0, args, **kwargs) -> Any:
    """The event's condition functions, closure-converted so that what they close
    over (a learned condition's parameters) are inputs of the custom VJP, with the
    keyword arguments diffrax passes them (`terms`, `solver`, `t0`, ...) bound.

    Raises at trace time, with the fix, for an event whose time has no gradient."""
    if event.root_finder is None:
        raise ValueError(
            f"{_NAME} differentiates an event's time, which needs it located exactly: "
            "pass a root finder, e.g. `diffrax.Event(cond_fn, "
            "root_finder=optimistix.Newton(rtol=1e-8, atol=1e-8))` in float64 (about "
            "1e-5 in float32, whose rounding a tighter tolerance cannot get under). "
            "Without one the solve stops at the end of a step, and the event time has "
            "no gradient."
        )
    t0 = kwargs["t0"]

    def convert(cond_fn):
        fn = lambda t, y, args: cond_fn(t, y, args, **kwargs)
        out = jax.eval_shape(fn, t0, y0, args)
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                f"{_NAME} supports events whose condition returns a real number that "
                f"changes sign at the event; got a condition returning {out.dtype}. A "
                "boolean condition stops the solve at the end of the step on which it "
                "becomes true, so its event time moves in jumps and has no gradient. "
                "Return a real-valued function of the state instead (e.g. the height "
                "of a falling ball rather than `height < 0`), or use "
                "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
            )
        return eqx.filter_closure_convert(fn, t0, y0, args)

    return jtu.tree_map(convert, event.cond_fn, is_leaf=callable)


def as_event(conditions, root_finder, direction) -> dfx.Event:
    """The `diffrax.Event` that the forward solve runs with."""
    cond_fn = jtu.tree_map(_Condition, conditions, is_leaf=callable)
    return dfx.Event(cond_fn, root_finder=root_finder, direction=direction)


def _scale(tree, factor):
    return jtu.tree_map(lambda x: -factor.astype(x.dtype) * x, tree)


def event_cotangents(
    conditions, p_conditions, args, p_args, event_mask, f, t_e, y_e, g_y, g_t
):
    """The event's part of the backward pass (see the module docstring).

    **Arguments:**

    - `conditions`, `p_conditions`: the converted conditions and which of their
        leaves are differentiated; `args`, `p_args` likewise.
    - `event_mask`: which condition triggered (diffrax's `Solution.event_mask`).
    - `f`: the vector field $f(t, y, \\mathrm{args})$; `t_e`, `y_e`: the final time
        and state; `g_y`, `g_t`: the loss's cotangents of them.

    **Returns:**

    `(a_e, grad_args, grad_conditions, triggered)`: the terminal adjoint, the direct
    gradients (with `None` where not differentiated) and whether an event triggered.
    """
    f_e = f(t_e, y_e, args)
    c = tree_dot(g_y, f_e) + g_t.astype(t_e.dtype)
    diff_args, static_args = eqx.partition(args, p_args)
    leaves, treedef = jtu.tree_flatten(conditions, is_leaf=callable)
    p_leaves = jtu.tree_leaves(p_conditions, is_leaf=callable)
    masks = jtu.tree_leaves(event_mask)
    a_e = g_y
    grad_args = jtu.tree_map(jnp.zeros_like, diff_args)
    grad_conditions = []
    for cond, p_cond, mask in zip(leaves, p_leaves, masks, strict=True):
        diff_c, static_c = eqx.partition(cond, p_cond)

        def value(t, y, d_args, d_c, static_c=static_c):
            g = eqx.combine(d_c, static_c)
            return g(t, y, eqx.combine(d_args, static_args))

        out, vjp = jax.vjp(value, t_e, y_e, diff_args, diff_c)
        dt, dy, d_args, d_c = vjp(jnp.ones_like(out))
        denom = (dt.astype(c.dtype) + tree_dot(dy, f_e)).astype(c.dtype)
        lam = jnp.where(mask, c / jnp.where(mask, denom, 1), 0)
        a_e = jtu.tree_map(jnp.add, a_e, _scale(dy, lam))
        grad_args = jtu.tree_map(jnp.add, grad_args, _scale(d_args, lam))
        grad_conditions.append(_scale(d_c, lam))
    triggered = jnp.any(jnp.stack([jnp.asarray(m) for m in masks]))
    grad_conditions = jtu.tree_unflatten(treedef, grad_conditions)
    return a_e, grad_args, grad_conditions, triggered
