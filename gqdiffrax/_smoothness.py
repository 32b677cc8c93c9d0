r"""Does a vector field have kinks along a trajectory? Read off its jaxpr.

A Gauss–Legendre rule on $[t_{k-1}, t_k]$ converges fast only if the integrand
$a_z(t)^\top \partial f/\partial\theta(t, z(t))$ is smooth there. It is not where the
vector field *switches* with $t$ or $y$: a ReLU unit turning on, a `jnp.where(t < 1,
...)`, an `abs`, a clipped value, a rounded index into a table. There one rule spanning
the switch errs in proportion to the jump of the derivative, whatever the tolerance.

`has_kinks` traces the field once (no evaluation) and follows, equation by equation,
which values depend on $(t, y)$ ("moving") and which of those have passed through a
primitive whose derivative jumps ("kinked"):

- **Switches.** `max`, `min`, `abs`, `sign`, `clamp`, `floor`, `ceil`, `round`,
  `rem`, `reduce_max`, `reduce_min`, `argmax`, `argmin`, `sort`, `cummax`, `cummin`
  on a moving value; `select_n` (`jnp.where`) and `cond` with a moving predicate; a
  `while_loop` whose condition moves (its trip count changes with $t$); a moving bool
  or integer converted to a float, or a moving float to an integer.
- **Trusted rules.** A `jax.custom_jvp` function is smooth where its author's rule
  says so, and its body is not inspected (`jax.nn.softplus` takes a `max` inside
  `logaddexp` and is smooth), except the piecewise-linear activations whose rule is
  itself a switch: `jax.nn.relu` and `jax.nn.relu6` (and so `hard_sigmoid`,
  `hard_silu`).
- **`stop_gradient`** ends a kink: a value held constant for differentiation is a
  numerical shift (softmax subtracts its maximum) that leaves the function smooth.
- **Everything else** passes both properties from its inputs to its outputs; a
  primitive with sub-jaxprs that is not listed counts as a switch (when unsure, the
  answer that keeps the gradient right).

Kinks in values that do not move (a `jnp.where` on a parameter) are constant along the
trajectory and leave the integrand smooth in $t$. The test is conservative: a `where`
whose two branches agree, or an `abs` of a positive value, counts as a kink. `GQAdjoint`
uses it to choose its default `quadrature`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.extend.core as jex
import jax.numpy as jnp
import jax.tree_util as jtu


# Primitives whose derivative jumps where their (moving) input crosses a threshold.
_SWITCHES = frozenset(
    {
        "abs",
        "argmax",
        "argmin",
        "ceil",
        "clamp",
        "cummax",
        "cummin",
        "floor",
        "max",
        "min",
        "reduce_max",
        "reduce_min",
        "rem",
        "round",
        "sign",
        "sort",
    }
)
# `jax.custom_jvp` functions whose own derivative rule is a switch.
_KINKED_CUSTOM_JVP = frozenset({"relu", "relu6"})
# Calls whose body is one sub-jaxpr, run once on the inputs: the parameter naming it.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}

# A value's state: (moving, kinked); kinked implies moving.
_STILL = (False, False)


def has_kinks(fn: Callable, t: Any, y: Any, rest: Sequence[Any] = ()) -> bool:
    """Whether `fn(t, y, *rest)` may have a kink in $(t, y)$: see the module docstring.

    **Arguments:**

    - `fn`: the vector field.
    - `t`, `y`: example time and state (arrays or tracers; only shapes and dtypes are
        read). Every array leaf of them moves.
    - `rest`: the other inputs (`args`, the term, ...); they stay still.
    """

    t = jnp.asarray(t)
    n_moving = 1 + len(jtu.tree_leaves(eqx.filter(y, eqx.is_array)))
    # Only avals are read: tracers of an enclosing transformation are fine.
    closed, _, _ = eqx.filter_make_jaxpr(fn)(t, y, *rest)
    jaxpr = closed.jaxpr
    inputs = [(i < n_moving, False) for i in range(len(jaxpr.invars))]
    try:
        return any(kinked for _, kinked in _run(jaxpr, inputs))
    except Exception:  # A primitive whose parameters are not as expected: be safe.
        return True


def _run(jaxpr, inputs: list[tuple[bool, bool]]) -> list[tuple[bool, bool]]:
    """The (moving, kinked) state of each output of `jaxpr` (a `Jaxpr` or
    `ClosedJaxpr`) given its inputs' states."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    env = dict(zip(jaxpr.invars, inputs))

    def read(v):
        return _STILL if isinstance(v, jex.Literal) else env.get(v, _STILL)

    for eqn in jaxpr.eqns:
        states = [read(v) for v in eqn.invars]
        outs = _equation(eqn, states)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _equation(eqn, states):
    name = eqn.primitive.name
    params = eqn.params
    n_out = len(eqn.outvars)
    moving = any(m for m, _ in states)
    kinked = any(k for _, k in states)
    same = [(moving, kinked)] * n_out
    if name == "stop_gradient":
        return [(moving, False)]
    if name in _SWITCHES:
        return [(moving, kinked or moving)] * n_out
    if name == "select_n":
        return [(moving, kinked or states[0][0])]
    if name == "convert_element_type":
        old = eqn.invars[0].aval.dtype
        new = params["new_dtype"]
        jumps = jnp.issubdtype(old, jnp.floating) != jnp.issubdtype(new, jnp.floating)
        return [(moving, kinked or (moving and jumps))]
    if name == "custom_jvp_call":
        call = params["call_jaxpr"]
        info = getattr(call.jaxpr, "debug_info", None)
        if getattr(info, "func_name", None) in _KINKED_CUSTOM_JVP:
            return _run(call, states)
        return same
    if name in _CALLS and _CALLS[name] in params:
        return _run(params[_CALLS[name]], states)
    if name == "cond":
        index, operands = states[0], states[1:]
        if index[0]:
            return [(True, True)] * n_out
        outs = [_run(branch, operands) for branch in params["branches"]]
        return [
            (any(o[i][0] for o in outs), any(o[i][1] for o in outs))
            for i in range(n_out)
        ]
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, carry = (
            states[:nc],
            states[nc : nc + nb],
            states[nc + nb :],
        )
        carry = _fixed_point(
            lambda c: _run(params["body_jaxpr"], body_consts + c), carry
        )
        (trips,) = _run(params["cond_jaxpr"], cond_consts + carry)
        if trips[0]:
            return [(True, True)] * n_out
        return carry
    if name == "scan":
        nc, ncarry = params["num_consts"], params["num_carry"]
        consts, carry, xs = states[:nc], states[nc : nc + ncarry], states[nc + ncarry :]
        carry = _fixed_point(
            lambda c: _run(params["jaxpr"], consts + c + xs)[:ncarry], carry
        )
        return _run(params["jaxpr"], consts + carry + xs)
    if any(_has_jaxpr(v) for v in params.values()):
        # A higher-order primitive not listed above: assume it switches.
        return [(moving, kinked or moving)] * n_out
    return same


def _fixed_point(step, carry):
    """Iterate a loop body's (moving, kinked) states on its carry until they stop
    changing (each can only turn on, so at most twice the carry's length)."""
    for _ in range(2 * len(carry) + 1):
        new = [(m0 or m1, k0 or k1) for (m0, k0), (m1, k1) in zip(carry, step(carry))]
        if new == carry:
            break
        carry = new
    return carry


def _has_jaxpr(value) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(v, (jex.Jaxpr, jex.ClosedJaxpr)) for v in values)
