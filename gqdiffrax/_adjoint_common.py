"""Free helpers shared by the adjoints of this package, as diffrax's adjoints share
`_is_subsaveat`, `_nondiff_solver_controller_state` and `_only_transpose_ys`.

Both [`gqdiffrax.GQAdjoint`][] and [`gqdiffrax.ReversibleAdjoint`][] run diffrax's
solve loop inside a custom VJP, save only `y` at `t0`, `t1` and `SaveAt(ts=...)`, and
hand the parameters of the vector fields to that VJP as explicit inputs.
"""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractSolver, ControlTerm, ODETerm, SaveAt, SubSaveAt
from jaxtyping import Array, PyTree

from ._diffrax_internals import (
    ControlToODE,
    lax_while_loop,
    nondifferentiable,
    save_y,
)


def check_saveat(saveat: SaveAt, name: str) -> None:
    """Raise at trace time, with the fix, for every `SaveAt` option other than saving
    `y` at `t0`, `t1` and `ts`.

    **Arguments:**

    - `saveat`: the `SaveAt` the adjoint's `loop` receives.
    - `name`: how the messages name the adjoint, e.g. `"gqdiffrax.GQAdjoint()"`.
    """
    name = f"`adjoint={name}`"
    dense_or_steps = (
        f"{name} does not support `SaveAt(steps=True)` or `SaveAt(dense=True)`: "
        "their outputs depend on every internal step, which the adjoint does not "
        "store. Save at fixed times with `SaveAt(ts=...)`."
    )
    # `dense` first: `SaveAt(dense=True)` alone has no `subs` at all.
    if saveat.dense:
        raise NotImplementedError(dense_or_steps)
    if not isinstance(saveat.subs, SubSaveAt):
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
    extras = [
        f"`SaveAt({field}=True)`"
        for field in ("solver_state", "controller_state", "made_jump")
        if getattr(saveat, field)
    ]
    if extras:
        raise NotImplementedError(
            f"{name} does not support {' or '.join(extras)}: it saves and "
            "differentiates only `y`. Drop the option, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


def closure_convert_terms(terms: PyTree, t: Any, y: PyTree, args: PyTree) -> PyTree:
    """Closure-convert the vector field of every `ODETerm` and `ControlTerm` in `terms`
    (for the `ODETerm` of `ControlTerm.to_ode()`, the control term's field).

    `filter_custom_vjp` only differentiates its explicit inputs. Closure conversion
    hoists what a vector field closes over (the arrays captured by a lambda or a plain
    function, as well as the fields of an `eqx.Module`) into array leaves of `terms`,
    so that they are inputs of the custom VJP and get gradients.

    **Arguments:**

    - `terms`: the terms, possibly wrapped (`WrapTerm`, `MultiTerm`).
    - `t`, `y`, `args`: example inputs of the vector fields, in the time of `terms`.
    """
    is_term = lambda x: isinstance(x, (ODETerm, ControlTerm))

    def convert(term):
        if not is_term(term):
            return term
        if isinstance(term.vector_field, ControlToODE):
            # `ControlTerm.to_ode()`: convert the control term inside, so that the
            # control stays a `diffrax.AbstractPath` whose knots the adjoint can read.
            where = lambda x: x.vector_field.control_term
            return eqx.tree_at(where, term, convert(where(term)))
        vector_field = eqx.filter_closure_convert(term.vector_field, t, y, args)
        return eqx.tree_at(lambda x: x.vector_field, term, vector_field)

    return jtu.tree_map(convert, terms, is_leaf=is_term)


def lax_loop(loop, **kwargs):
    """diffrax's solve loop with plain `lax.while_loop`s, for solves that run inside a
    custom VJP and are never differentiated by JAX (no checkpointing, no per-step
    storage).

    **Arguments:**

    - `loop`: the adjoint's `self._loop`.
    - `**kwargs`: the arguments of the loop other than the two while loops.
    """
    return loop(
        **kwargs, inner_while_loop=lax_while_loop, outer_while_loop=lax_while_loop
    )


def fill_cotangents(primal: PyTree[Array], cotangent: PyTree[Array | None]):
    """`cotangent` with every symbolic-zero (`None`) leaf replaced by zeros shaped like
    the matching leaf of `primal`."""
    return jtu.tree_map(
        lambda x, g: jnp.zeros_like(x) if g is None else g, primal, cotangent
    )


def tree_dot(a: PyTree[Array], b: PyTree[Array]) -> Array:
    r"""$\sum_i \langle a_i, b_i \rangle$ over the leaves of two pytrees of the same
    structure, in the leaves' own dtype."""
    terms = [jnp.sum(x * y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))]
    # Start from a zero of the terms' own dtype: a float64 zero would promote float32
    # terms, which strict dtype promotion refuses.
    return sum(terms, start=jnp.zeros((), jnp.result_type(*terms)))


def t0_cotangent(saveat: SaveAt, grad_ys: PyTree[Array], y0: PyTree[Array]):
    """The cotangent that goes straight to `y0`: a `SaveAt(t0=True)` output is `y0`
    itself, so its cotangent `grad_ys[0]` is; zeros without `SaveAt(t0=True)`."""
    if saveat.subs.t0:
        return jtu.tree_map(lambda g: g[0], grad_ys)
    return jtu.tree_map(jnp.zeros_like, y0)


def nondiff(tree: PyTree, *, name: str | None = None) -> PyTree:
    """Cut the arrays of `tree` out of autodiff before they enter a custom VJP as
    non-differentiable data, as diffrax's `_nondiff_solver_controller_state` does.

    With `name=None` their gradient is stopped (`lax.stop_gradient`): for copies of
    values whose gradient the VJP computes through another input. With a `name`,
    differentiating them raises an error that begins with it: for values the adjoint
    cannot differentiate.
    """
    if name is None:
        stop = lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x
        return jtu.tree_map(stop, tree)
    return nondifferentiable(tree, name=name)


class AbstractWrappedSolver(AbstractSolver):
    """A solver that runs `solver` and carries something more in the solver state:
    everything but `init` and `step` is `solver`'s. diffrax keeps a step's solver state
    only when it accepts the step, so what a wrapper accumulates there sees accepted
    steps only."""

    solver: eqx.AbstractVar[AbstractSolver]

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)
