"""GQAdjoint on pytree states, pytree `args` and the ways a user writes a vector field
(issue 13, §1: the tuple-state pendulum and its family).

Every gradient is compared with `diffrax.RecursiveCheckpointAdjoint` through the same
`eqx.filter_grad` (or `jax.grad`), so that the *structure* of the gradient is checked
too: non-array leaves of `args` (Python floats, ints, strings, `None`) and integer
arrays get `None` exactly where the reference gives `None`.
"""

import functools as ft

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import gqdiffrax

from .helpers import assert_grads_close, grad_errors, make_mix_field, weighted_loss


RCA = dfx.RecursiveCheckpointAdjoint()
# The default, which every test runs first; then the paper's rule per interval, with
# ten times its node count.
GQ = gqdiffrax.GQAdjoint()
GQ_INTERVAL = gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=10.0))

# Adaptive Tsit5 at rtol = atol = TOL[dtype]; GQ and RCA then agree to BOUND[dtype]
# (measured, the largest over the tests below: 1.4e-7 in float64 and 1.2e-4 in float32,
# for either rule).
TOL = {jnp.float64: 1e-8, jnp.float32: 1e-5}
BOUND = {jnp.float64: 1e-6, jnp.float32: 1e-3}


#
# The pendulum of the issue
#


def _pendulum(t, y, args):
    return (y[1], -args[0] * jnp.sin(y[0]) - args[1] * y[1])


def _pendulum_loss(y0, args, adjoint):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_pendulum),
        dfx.Tsit5(),
        0.0,
        3.0,
        None,
        y0,
        args,
        saveat=dfx.SaveAt(ts=jnp.array([1.0, 2.0, 3.0])),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        adjoint=adjoint,
    )
    q, p = sol.ys
    return jnp.sum(q**2) + weighted_loss(p)


@ft.cache
def _pendulum_grad(adjoint):
    return jax.jit(
        jax.grad(lambda y0, args: _pendulum_loss(y0, args, adjoint), argnums=(0, 1))
    )


_Y0 = (jnp.array([0.5, -0.3]), jnp.array([0.1, 0.2]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint, args",
    [
        (GQ, (jnp.array(9.81), jnp.array(0.3))),
        # Python floats through `jax.grad` arrive as weak-typed scalars: the case the
        # issue reports as "called with weak-typed args".
        (GQ, (9.81, 0.3)),
        (GQ_INTERVAL, (jnp.array(9.81), jnp.array(0.3))),
    ],
    ids=["arrays", "python-floats", "arrays-interval"],
)
def test_pendulum_tuple_state_and_tuple_args(adjoint, args):
    # The reproduction of issue 13: this raised "Closure-converted function called
    # with different dynamic arguments" before 561cbb1.
    got = _pendulum_grad(adjoint)(_Y0, args)
    want = _pendulum_grad(RCA)(_Y0, args)
    assert_grads_close(got, want, 1e-6)
    # Both state components and both parameters get nonzero gradients.
    assert all(float(jnp.max(jnp.abs(g))) > 1e-2 for g in jtu.tree_leaves(got))


@pytest.mark.slow
def test_pendulum_gradient_wrt_y0_only():
    grad = lambda adjoint: jax.jit(
        jax.grad(lambda y0: _pendulum_loss(y0, (9.81, 0.3), adjoint))
    )
    assert_grads_close(grad(GQ)(_Y0), grad(RCA)(_Y0), 1e-6)


#
# The family: state structures x args structures x dtypes
#


def _states(dtype):
    return {
        "tuple": (jnp.array([0.5, -0.3], dtype), jnp.array([0.1, 0.2], dtype)),
        "dict": {"x": jnp.array([0.3, -0.1, 0.2], dtype), "v": jnp.asarray(0.4, dtype)},
        # A scalar, a vector and a 2-D leaf, nested in a dict of a tuple.
        "nested": {
            "a": (jnp.asarray(0.3, dtype), jnp.array([-0.2, 0.1], dtype)),
            "b": jnp.array([[0.1, -0.2, 0.3], [0.4, 0.0, -0.3]], dtype),
        },
        # A single-leaf tuple: the "one-element state tuple" of the traceback.
        "singleton": (jnp.array([0.2, -0.4], dtype),),
    }


def _args(dtype):
    """Each entry: args, and how the field reads `(scale, decay)` from them."""
    return {
        # Arrays mixed with a Python float, an int and a string.
        "tuple-mixed": (
            (jnp.asarray(0.8, dtype), 0.1, 3, "name"),
            lambda a: (a[0], a[1] * a[2] / 3),
        ),
        "dict-arrays": (
            {"scale": jnp.asarray(0.8, dtype), "decay": jnp.asarray(0.1, dtype)},
            lambda a: (a["scale"], a["decay"]),
        ),
        # No array at all: no args gradient, only `None`s.
        "python-floats": ((0.8, 0.1), lambda a: a),
        # Nested containers, an integer array, a NumPy array (a differentiable array
        # for `eqx.filter_grad`), `None` and a string.
        "nested-mixed": (
            {
                "p": (np.asarray(0.8, dtype), [jnp.asarray(0.1, dtype), "s"]),
                "n": jnp.array(2),
                "none": None,
            },
            lambda a: (a["p"][0] * a["n"] / 2, a["p"][1][0]),
        ),
    }


def _family_loss(inputs, adjoint, dtype, saveat):
    field, y0, args = inputs
    ts = jnp.array([0.0, 0.5, 0.5, 1.5], dtype)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5(),
        jnp.asarray(0.0, dtype),
        jnp.asarray(1.5, dtype),
        None,
        y0,
        args,
        saveat={
            "ts": dfx.SaveAt(ts=ts),
            "all": dfx.SaveAt(t0=True, ts=ts, t1=True),
        }[saveat],
        stepsize_controller=dfx.PIDController(rtol=TOL[dtype], atol=TOL[dtype]),
        adjoint=adjoint,
    )
    return weighted_loss(sol.ys)


def _check_family(state, args_kind, dtype, adjoint, saveat="ts"):
    y0 = _states(dtype)[state]
    args, read = _args(dtype)[args_kind]
    inputs = (make_mix_field(y0, read, dtype), y0, args)
    grad = lambda adjoint: eqx.filter_jit(
        eqx.filter_grad(
            ft.partial(_family_loss, adjoint=adjoint, dtype=dtype, saveat=saveat)
        )
    )(inputs)
    want = grad(RCA)
    got = grad(adjoint)
    assert_grads_close(got, want, BOUND[dtype], label=f"{state}/{args_kind}")
    # Everything differentiable got a gradient of its own dtype; the rest `None`.
    got_field, got_y0, got_args = got
    assert all(g.dtype == dtype for g in jtu.tree_leaves((got_field, got_y0)))
    return got_args


# Every state structure paired with one args structure, both dtypes appearing, with the
# default (the fast tier runs the first pair, see conftest.py); then the richest pair
# with the rule per interval. The property test draws the rest of the product.
_PAIRS = [
    ("tuple", "tuple-mixed", jnp.float64, "default"),
    ("dict", "dict-arrays", jnp.float32, "default"),
    ("nested", "nested-mixed", jnp.float64, "default"),
    ("singleton", "python-floats", jnp.float64, "default"),
    ("nested", "tuple-mixed", jnp.float32, "default"),
    ("nested", "nested-mixed", jnp.float64, "interval"),
]


@pytest.mark.parametrize(
    "state, args_kind, dtype, rule",
    _PAIRS,
    ids=[f"{s}-{a}-{d.__name__}-{r}" for s, a, d, r in _PAIRS],
)
def test_family(state, args_kind, dtype, rule):
    adjoint = {"default": GQ, "interval": GQ_INTERVAL}[rule]
    got_args = _check_family(state, args_kind, dtype, adjoint, saveat="all")
    if args_kind == "tuple-mixed":
        assert got_args[1:] == (None, None, None)
    if args_kind == "python-floats":
        assert got_args == (None, None)
    if args_kind == "nested-mixed":
        # The NumPy scalar is differentiated (as `eqx.filter_grad` does), the integer
        # array, `None` and the string are not.
        assert got_args["n"] is None and got_args["none"] is None
        assert got_args["p"][1][1] is None
        assert float(jnp.abs(got_args["p"][0])) > 1e-3


#
# Vector fields: modules, closures, partials
#


class _Module(eqx.Module):
    """An `eqx.Module` field with an MLP, a static string and an int field."""

    mlp: eqx.nn.MLP
    name: str = eqx.field(static=True)
    power: int

    def __call__(self, t, y, args):
        return args["scale"] * self.mlp(y) ** self.power - 0.1 * y


def _fn(t, y, args, *, weight, kind):
    pre = weight @ y
    return args["scale"] * (jnp.tanh(pre) if kind == "tanh" else jnp.sin(pre))


def _field_loss(weight, field_kind, adjoint, dtype):
    """The loss as a function of the field's parameter `weight`, however the field
    holds it."""
    if field_kind == "closure":
        field = lambda t, y, args: args["scale"] * jnp.tanh(weight @ y)
    elif field_kind == "functools.partial":
        field = ft.partial(_fn, weight=weight, kind="tanh")
    elif field_kind == "jtu.Partial":
        field = jtu.Partial(_fn, weight=weight, kind="tanh")
    elif field_kind == "bound-method":
        field = eqx.nn.Linear(2, 2, key=jax.random.key(1), dtype=dtype)
        field = eqx.tree_at(lambda l: l.weight, field, weight)
        field = ft.partial(
            lambda lin, t, y, args: jnp.tanh(lin(y)) * args["scale"], field
        )
    else:
        raise ValueError(field_kind)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Dopri5(),
        jnp.asarray(0.0, dtype),
        jnp.asarray(1.0, dtype),
        None,
        jnp.array([0.4, -0.3], dtype),
        {"scale": jnp.asarray(0.9, dtype), "tag": "x"},
        saveat=dfx.SaveAt(ts=jnp.array([0.25, 1.0], dtype), t1=True),
        stepsize_controller=dfx.PIDController(rtol=TOL[dtype], atol=TOL[dtype]),
        adjoint=adjoint,
    )
    return weighted_loss(sol.ys)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "field_kind", ["closure", "functools.partial", "jtu.Partial", "bound-method"]
)
def test_closed_over_parameters(field_kind, dtype):
    # The parameter reaches the field only by closure: GQ must find it by closure
    # conversion, as RecursiveCheckpointAdjoint finds it by tracing.
    if dtype == jnp.float32 and field_kind != "closure":
        pytest.skip("float32 is covered by the closure case")
    weight = jnp.array([[0.5, -1.0], [1.0, 0.3]], dtype)
    grad = lambda adjoint: jax.jit(
        jax.grad(lambda w: _field_loss(w, field_kind, adjoint, dtype))
    )(weight)
    got, want = grad(GQ), grad(RCA)
    assert got.dtype == dtype
    assert_grads_close(got, want, BOUND[dtype], label=field_kind)
    assert float(jnp.max(jnp.abs(got))) > 1e-2


@pytest.mark.slow
def test_module_field_with_static_and_int_fields():
    mlp = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(2))
    field = _Module(mlp, "cube", 3)
    y0 = jnp.array([0.4, -0.3])
    args = {"scale": jnp.array(0.9), "tag": "x", "count": 2}

    def loss(inputs, adjoint):
        field, y0, args = inputs
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            y0,
            args,
            saveat=dfx.SaveAt(t0=True, ts=jnp.array([0.0, 0.5, 1.0]), t1=True),
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
            adjoint=adjoint,
        )
        return weighted_loss(sol.ys)

    grad = lambda adjoint: eqx.filter_jit(eqx.filter_grad(loss))(
        (field, y0, args), adjoint
    )
    got, want = grad(GQ), grad(RCA)
    errors = grad_errors(got, want)
    assert max(errors) < 1e-6, errors
    got_field, _, got_args = got
    # The int field and the activation are not differentiated; the MLP's arrays are.
    assert got_field.power is None
    assert got_args["tag"] is None and got_args["count"] is None
    assert float(jnp.max(jnp.abs(got_field.mlp.layers[0].weight))) > 1e-3
