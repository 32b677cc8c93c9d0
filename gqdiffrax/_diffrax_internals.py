"""Every use of diffrax's private API, and of the `equinox.internal` tools its solve
loop is built on, in one place.

Targets diffrax 0.7.2 and equinox 0.13 (the pin in pyproject.toml is
`diffrax>=0.7.2,<0.8`). The adjoints in this package drive diffrax's own solve loop
(through `AbstractAdjoint._loop`, which diffrax provides for its adjoints), so that the
forward pass is exactly the solve a user would get from `diffrax.diffeqsolve`; the
names and functions below are what that needs: every private name, and every read or
write of the loop state's layout (`diffrax._integrate.State` and `SaveState`) beyond
reading its public-looking fields, is one of them. `tests/test_diffrax_contract.py`
checks each assumption they make, so that a diffrax release that changes one fails
there with a message naming it. When moving to a new diffrax minor version, this is the
only module to revisit.
"""

import functools as ft

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
import jax.tree_util as jtu

# `_only_transpose_ys`: marks every part of the final solver state except the saved
# `ys` as non-differentiable, exactly as `diffrax.BacksolveAdjoint` does.
from diffrax._adjoint import _only_transpose_ys
from diffrax._heuristics import is_sde as is_sde

# `SaveState`: the layout of one `SubSaveAt`'s output buffers in the loop state.
from diffrax._integrate import SaveState

# `save_y`: the default `SubSaveAt(fn=...)`; an adjoint that saves only `y` compares
# against it.
from diffrax._saveat import save_y as save_y

# `ControlToODE`: the vector field of the `ODETerm` that `ControlTerm.to_ode()` returns,
# so that a term can be recognised as built by `to_ode()`. `WrapTerm`: how
# `diffeqsolve` normalises reverse-time solves (t0 > t1) to forward time before calling
# `adjoint.loop`.
from diffrax._term import _ControlToODE as ControlToODE, WrapTerm as WrapTerm


__all__ = [
    "constant_step_count",
    "ControlToODE",
    "doc_remove_args",
    "is_sde",
    "lax_while_loop",
    "nondifferentiable",
    "only_transpose_ys",
    "resize_save_rows",
    "save_y",
    "select_save_rows",
    "add_step_rows",
    "take_step_rows",
    "set_save_times",
    "t1_clip_floor",
    "unvmap_all",
    "unvmap_any",
    "replace_fields",
    "STATE_FIELDS",
    "WrapTerm",
]

# The forward and backward solves run inside a custom VJP and are never differentiated
# by JAX, so plain `lax.while_loop`s suffice: no checkpointing, no per-step storage.
lax_while_loop = ft.partial(eqxi.while_loop, kind="lax")

# An identity that raises a named error when differentiated (as diffrax does for a
# passed `solver_state`), and the helper that hides an inherited `__init__` argument
# from the documentation (as diffrax's solvers do for `scan_kind`).
nondifferentiable = eqxi.nondifferentiable
doc_remove_args = eqxi.doc_remove_args

# Whether all (any) of a boolean's values are true, over the `vmap`s around it too: an
# unbatched predicate, so that a `lax.cond` on it stays a branch under `vmap` instead
# of becoming a `select` that runs both sides.
unvmap_all = eqxi.unvmap_all
unvmap_any = eqxi.unvmap_any


def constant_step_count(controller_state):
    """The number of steps that `diffrax.ConstantStepSize` set up for the solve, read
    from its initial state `(steps_completed, num_steps, t0, t1_or_dt0)`."""
    _, num_steps, _, _ = controller_state
    return num_steps


def t1_clip_floor(t1):
    """The threshold above which diffrax's solve loop snaps a step's end onto `t1`:
    `t1` less 100 ULP (`diffrax._integrate.loop`)."""
    floor = t1
    for _ in range(100):
        floor = eqxi.prevbefore(floor)
    return floor


def only_transpose_ys(final_state):
    """diffrax's `_only_transpose_ys`; for a solve without a state (`y0=None`, whose
    saved `ys` are `None`), which it cannot address, the whole final state is
    non-differentiable instead: there is nothing else it would keep."""
    if final_state.save_state.ys is None:
        return eqxi.nondifferentiable_backward(final_state, symbolic=False)
    return _only_transpose_ys(final_state)


# The fields of the loop state (`diffrax._integrate.State`) that the adjoints replace
# before and after running the loop.
STATE_FIELDS = ("y", "solver_state", "controller_state", "save_state")


def replace_fields(state, **values):
    """The loop state `state` with the fields named in `values` (among
    `STATE_FIELDS`) replaced; a field or value may be `None` (an ODE without a state,
    a solver without a state)."""
    names = tuple(values)
    if not set(names) <= set(STATE_FIELDS):
        raise ValueError(f"Only {STATE_FIELDS} are replaced; got {names}.")
    where = lambda s: tuple(getattr(s, name) for name in names)
    return eqx.tree_at(
        where, state, tuple(values.values()), is_leaf=lambda x: x is None
    )


def add_step_rows(state, y_struct, max_steps: int):
    """The initial loop state with a second `SaveState` after its (single) one, with
    the buffers `diffeqsolve` would allocate for `SubSaveAt(steps=True)`: `max_steps`
    rows shaped like `y_struct`, filled with `inf`. The loop then needs
    `SaveAt(subs=[the first, that SubSaveAt])`."""
    dtype = state.tprev.dtype
    full = lambda x: jnp.full((max_steps,) + x.shape, jnp.inf, dtype=x.dtype)
    steps = SaveState(
        saveat_ts_index=0,
        ts=jnp.full(max_steps, jnp.inf, dtype=dtype),
        ys=jtu.tree_map(full, y_struct),
        save_index=0,
    )
    return replace_fields(state, save_state=[state.save_state, steps])


def take_step_rows(state):
    """The final loop state with only its first `SaveState`, and the second one's
    `(ts, ys, count)`: the rows `add_step_rows` made room for, one per accepted step
    (at the step's end), then `inf`."""
    first, steps = state.save_state
    rows = (steps.ts, steps.ys, steps.save_index)
    return replace_fields(state, save_state=first), rows


def resize_save_rows(state, num_rows: int):
    """The initial loop state with the save buffers of its (single) `SaveState` grown
    to `num_rows` rows. `diffeqsolve` fills them with `inf` before the loop runs;
    every new row takes the first row's fill."""
    grow = lambda x: jnp.broadcast_to(x[:1], (num_rows,) + x.shape[1:])
    buffers = (state.save_state.ts, state.save_state.ys)
    return eqx.tree_at(
        lambda s: (s.save_state.ts, s.save_state.ys),
        state,
        jtu.tree_map(grow, buffers),
    )


def select_save_rows(state, rows, num_ts: int):
    """The final loop state with only the save rows `rows` kept, as if the solve had
    saved just those: `num_ts` of them at `SaveAt(ts=...)` (the counters that
    `diffeqsolve` reads back when it builds the `Solution`)."""
    save_state = state.save_state
    new = eqx.tree_at(
        lambda s: (s.ts, s.ys, s.saveat_ts_index, s.save_index),
        save_state,
        (
            save_state.ts[rows],
            jtu.tree_map(lambda y: y[rows], save_state.ys),
            jnp.asarray(num_ts, jnp.int32),
            jnp.asarray(rows.shape[0], jnp.int32),
        ),
    )
    return replace_fields(state, save_state=new)


def set_save_times(state, ts):
    """The final loop state with its (single) `SaveState`'s times replaced:
    `diffeqsolve` builds `Solution.ts` from them."""
    return eqx.tree_at(lambda s: s.save_state.ts, state, ts)
