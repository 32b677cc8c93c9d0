"""Every use of diffrax's private API, and of the `equinox.internal` tools its solve
loop is built on, in one place.

Targets diffrax 0.7.2 and equinox 0.13 (the pin in pyproject.toml is
`diffrax>=0.7.2,<0.8`). The adjoints in this package drive diffrax's own solve loop
(through `AbstractAdjoint._loop`, which diffrax provides for its adjoints), so that the
forward pass is exactly the solve a user would get from `diffrax.diffeqsolve`; the
names below are what that needs. Besides these names, the adjoints read and replace
fields of the loop state that `AbstractAdjoint.loop` is handed (`y`, `tprev`, `tnext`,
`solver_state`, `controller_state`, `made_jump`, `save_state.ys`, `num_steps`,
`num_accepted_steps`), as diffrax's own adjoints do. When moving to a new diffrax minor
version, this is the only module to revisit, together with that list of fields.
"""

import functools as ft

import equinox.internal as eqxi

# `_only_transpose_ys`: marks every part of the final solver state except the saved
# `ys` as non-differentiable, exactly as `diffrax.BacksolveAdjoint` does.
from diffrax._adjoint import _only_transpose_ys as only_transpose_ys
from diffrax._heuristics import is_sde as is_sde

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
    "save_y",
    "t1_clip_floor",
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
