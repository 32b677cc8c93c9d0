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


def event_conditions(event: dfx.Event, y0, args, **kwargs) -> tuple[Any, bool]:
    """The event's condition functions, closure-converted so that what they close
    over (a learned condition's parameters) are inputs of the custom VJP, with the
    keyword arguments diffrax passes them (`terms`, `solver`, `t0`, ...) bound; and
    whether the event time is *located* (real-valued conditions and a root finder:
    $t_e$ moves with the parameters) or *held* (boolean conditions: the solve stops
    at the end of the step on which one becomes true, and $t_e$ moves in jumps, so its
    gradient is zero, as `diffrax.RecursiveCheckpointAdjoint` has it).

    Raises at trace time, with the fix, for an event whose time has no gradient."""
    t0 = kwargs["t0"]
    bound = lambda cond_fn: lambda t, y, args: cond_fn(t, y, args, **kwargs)
    leaves = jtu.tree_leaves(event.cond_fn, is_leaf=callable)
    dtypes = [jax.eval_shape(bound(c), t0, y0, args).dtype for c in leaves]
    boolean = [jnp.issubdtype(d, jnp.bool_) for d in dtypes]
    real = [jnp.issubdtype(d, jnp.floating) for d in dtypes]
    if not all(b or r for b, r in zip(boolean, real)):
        raise ValueError(
            f"{_NAME} supports event conditions that return a real number (which "
            "changes sign at the event) or a boolean; got "
            f"{[str(d) for d in dtypes]}."
        )
    if any(boolean) and any(real):
        raise ValueError(
            f"{_NAME} does not support an event that mixes boolean and real-valued "
            "conditions: a real one's time moves with the parameters, a boolean "
            "one's does not. Use one kind, or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    located = all(real)
    if located and event.root_finder is None:
        raise ValueError(
            f"{_NAME} differentiates an event's time, which needs it located exactly: "
            "pass a root finder, e.g. `diffrax.Event(cond_fn, "
            "root_finder=optimistix.Newton(rtol=1e-8, atol=1e-8))` in float64 (about "
            "1e-5 in float32, whose rounding a tighter tolerance cannot get under). "
            "Without one the solve stops at the end of a step, and the event time has "
            "no gradient. (A boolean condition needs no root finder: its event time "
            "is held fixed.)"
        )
    convert = lambda c: eqx.filter_closure_convert(bound(c), t0, y0, args)
    return jtu.tree_map(convert, event.cond_fn, is_leaf=callable), located


def as_event(conditions, root_finder, direction) -> dfx.Event:
    """The `diffrax.Event` that the forward solve runs with."""
    cond_fn = jtu.tree_map(_Condition, conditions, is_leaf=callable)
    return dfx.Event(cond_fn, root_finder=root_finder, direction=direction)


def _scale(tree, factor):
    return jtu.tree_map(lambda x: -factor.astype(x.dtype) * x, tree)


def event_cotangents(
    conditions, p_conditions, args, p_args, event_mask, f, t_e, y_e, g_y, g_t, located
):
    """The event's part of the backward pass (see the module docstring).

    **Arguments:**

    - `conditions`, `p_conditions`: the converted conditions and which of their
        leaves are differentiated; `args`, `p_args` likewise.
    - `event_mask`: which condition triggered (diffrax's `Solution.event_mask`).
    - `f`: the vector field $f(t, y, \\mathrm{args})$; `t_e`, `y_e`: the final time
        and state; `g_y`, `g_t`: the loss's cotangents of them.
    - `located`: whether the event time moves with the parameters (see
        `event_conditions`); if not, the cotangents are those of a solve to a fixed
        time: `a_e = g_y`, and zero direct terms.

    **Returns:**

    `(a_e, grad_args, grad_conditions, triggered)`: the terminal adjoint, the direct
    gradients (with `None` where not differentiated) and whether an event triggered.
    """
    masks = jtu.tree_leaves(event_mask)
    triggered = jnp.any(jnp.stack([jnp.asarray(m) for m in masks]))
    diff_args, static_args = eqx.partition(args, p_args)
    if not located:
        diff_c, _ = eqx.partition(conditions, p_conditions)
        zeros = lambda tree: jtu.tree_map(jnp.zeros_like, tree)
        return g_y, zeros(diff_args), zeros(diff_c), triggered
    f_e = f(t_e, y_e, args)
    c = tree_dot(g_y, f_e) + g_t.astype(t_e.dtype)
    leaves, treedef = jtu.tree_flatten(conditions, is_leaf=callable)
    p_leaves = jtu.tree_leaves(p_conditions, is_leaf=callable)
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
    grad_conditions = jtu.tree_unflatten(treedef, grad_conditions)
    return a_e, grad_args, grad_conditions, triggered
