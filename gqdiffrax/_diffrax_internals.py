"""Every use of diffrax's private API, in one place.

Targets diffrax 0.7.2 (the pin in pyproject.toml is `>=0.7.2,<0.8`). The adjoints in
this package drive diffrax's own solve loop, so that the forward pass is exactly the
solve a user would get from `diffrax.diffeqsolve`; the names below are what that needs.
When moving to a new diffrax minor version, this is the only module to revisit.
"""

import functools as ft

import equinox.internal as eqxi

# `_only_transpose_ys`: marks every part of the final solver state except the saved
# `ys` as non-differentiable, exactly as `diffrax.BacksolveAdjoint` does.
from diffrax._adjoint import _only_transpose_ys as only_transpose_ys  # noqa: F401
from diffrax._heuristics import is_sde as is_sde

# `loop`: diffrax's solve loop, so that a forward pass (saving, statistics, `max_steps`,
# progress meters) is the one `diffeqsolve` makes with any adjoint.
from diffrax._integrate import loop as diffrax_loop  # noqa: F401
from diffrax._saveat import save_y as save_y

# `ControlToODE`: the vector field of the `ODETerm` that `ControlTerm.to_ode()` returns,
# so that a term can be recognised as built by `to_ode()`.
from diffrax._term import _ControlToODE as ControlToODE

# `WrapTerm`: how `diffeqsolve` normalises reverse-time solves (t0 > t1) to forward
# time before calling `adjoint.loop`.
from diffrax._term import WrapTerm as WrapTerm


# The forward and backward solves run inside a custom VJP and are never differentiated
# by JAX, so plain `lax.while_loop`s suffice: no checkpointing, no per-step storage.
lax_while_loop = ft.partial(eqxi.while_loop, kind="lax")
