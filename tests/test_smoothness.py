"""The kink test that chooses `GQAdjoint`'s default quadrature, and what it buys."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import gqdiffrax
from gqdiffrax._smoothness import has_kinks


def _mlp_field(activation):
    mlp = eqx.nn.MLP(3, 3, 8, 2, activation=activation, key=jr.key(0))
    return lambda t, y, args: mlp(y)


def _loop_of(body):
    return lambda t, y, args: jax.lax.fori_loop(0, 3, lambda i, c: body(c) + y, 0 * y)


# (field, kinked) with y in R^3 and args = (a scalar, a length-5 table).
_FIELDS = {
    # Smooth activations, including those built on a custom JVP around a `max`
    # (softplus, mish) or on a `stop_gradient`-ed maximum (softmax).
    "tanh": (_mlp_field(jnp.tanh), False),
    "softplus": (_mlp_field(jax.nn.softplus), False),
    "gelu": (_mlp_field(jax.nn.gelu), False),
    "silu": (_mlp_field(jax.nn.silu), False),
    "mish": (_mlp_field(jax.nn.mish), False),
    "softmax": (lambda t, y, args: jax.nn.softmax(y), False),
    "norm": (lambda t, y, args: y * jnp.linalg.norm(y), False),
    "tanh loop": (_loop_of(jnp.tanh), False),
    "checkpointed tanh": (lambda t, y, args: jax.checkpoint(jnp.tanh)(y), False),
    # Switches on a value that does not move along the trajectory.
    "where on args": (lambda t, y, args: jnp.where(args[0] < 1, y, args[0] * y), False),
    "clip of args": (lambda t, y, args: jnp.clip(args[0], 0, 1) * y, False),
    # Kinks in t or y.
    "relu (eqx.nn.MLP's default)": (_mlp_field(jax.nn.relu), True),
    "relu6": (_mlp_field(jax.nn.relu6), True),
    "leaky relu": (_mlp_field(jax.nn.leaky_relu), True),
    "elu": (_mlp_field(jax.nn.elu), True),
    "hard tanh": (_mlp_field(jax.nn.hard_tanh), True),
    "abs": (lambda t, y, args: -jnp.abs(y), True),
    "clip of y": (lambda t, y, args: jnp.clip(y, -1, 1), True),
    "where on t": (lambda t, y, args: jnp.where(t < 1, y, args[0] * y), True),
    "cond on t": (
        lambda t, y, args: jax.lax.cond(t < 1, lambda: y, lambda: -y),
        True,
    ),
    "table indexed by t": (
        lambda t, y, args: args[1][(3 * t).astype(jnp.int32)] * y,
        True,
    ),
    "relu in a loop": (_loop_of(jax.nn.relu), True),
    "checkpointed relu": (lambda t, y, args: jax.checkpoint(jax.nn.relu)(y), True),
    "while on t": (
        lambda t, y, args: jax.lax.while_loop(lambda c: c[0] < t, lambda c: c + 1, y),
        True,
    ),
}


def test_has_kinks():
    args = (jnp.array(2.0), jnp.arange(5.0))
    found = {
        name: has_kinks(field, jnp.array(0.5), jnp.ones(3), (args,))
        for name, (field, _) in _FIELDS.items()
    }
    assert found == {name: kinked for name, (_, kinked) in _FIELDS.items()}


def test_has_kinks_pytree_state():
    # Every leaf of y moves; args with non-array leaves stay still.
    field = lambda t, y, args: {"q": y["p"], "p": -jnp.maximum(y["q"], args["floor"])}
    y = {"q": jnp.ones(2), "p": jnp.zeros(2)}
    assert has_kinks(field, 0.0, y, ({"floor": 0.0, "name": "spring"},))
    smooth = lambda t, y, args: {"q": y["p"], "p": -jnp.sin(y["q"])}
    assert not has_kinks(smooth, 0.0, y, ({"floor": 0.0, "name": "spring"},))


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def test_wong_zakai_terms_are_smooth():
    # Both forms of the Karhunen-Loeve surrogate (stored draws, and draws redone in a
    # checkpointed loop) are sums of cosines in t.
    for running_sum in (False, True):
        w = gqdiffrax.WienerSurrogate(
            0.0, 1.0, (2,), jr.key(0), num_terms=8, running_sum=running_sum
        )
        term = gqdiffrax.wong_zakai_term(
            lambda t, y, args: -y, lambda t, y, args: 0.5 * jnp.eye(2), w
        )
        field = lambda t, y, args, term: term.vf(t, y, args)
        assert not has_kinks(field, jnp.array(0.5), jnp.ones(2), (None, term))


def _switching_grad(adjoint):
    # dy/dt = -a y before t = 0.5 and -2 a y after: y(1) = y0 exp(-1.5 a).
    def loss(a):
        field = lambda t, y, a: jnp.where(t < 0.5, -a * y, -2.0 * a * y)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, 2.0]),
            args=a,
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1])

    return jax.jit(jax.grad(loss))(jnp.array(0.7))


def test_default_quadrature_on_a_switch_in_time():
    # Nobody told the solver about the switch: the default finds it in the jaxpr and
    # integrates per backward step (error 1.4e-6, as BacksolveAdjoint's 1.5e-6); one
    # rule across the switch is off by 1.2e-2.
    exact = -1.5 * 3.0 * jnp.exp(-1.5 * 0.7)
    default = _switching_grad(gqdiffrax.GQAdjoint())
    interval = _switching_grad(gqdiffrax.GQAdjoint(quadrature="interval"))
    assert abs(default - exact) / abs(exact) < 1e-5
    assert abs(interval - exact) / abs(exact) > 1e-3


@pytest.mark.slow
def test_default_quadrature_on_a_relu_mlp_under_vmap():
    # eqx.nn.MLP's default activation is ReLU: per-sample solves under vmap, against
    # BacksolveAdjoint (a continuous adjoint, as GQ's).
    dtype = jnp.float64
    mlp = eqx.nn.MLP(2, 2, 8, 2, dtype=dtype, key=jr.key(1))
    y0s = jr.normal(jr.key(2), (3, 2), dtype)
    tol = 1e-7

    def loss(mlp, adjoint):
        def one(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_MLPField(mlp)),
                dfx.Tsit5(),
                0.0,
                1.0,
                0.1,
                y0,
                saveat=dfx.SaveAt(ts=jnp.linspace(0.25, 1.0, 4, dtype=dtype)),
                stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
                adjoint=adjoint,
            )
            return jnp.sum(sol.ys**2)

        return jnp.sum(jax.vmap(one)(y0s))

    grad = lambda adjoint: eqx.filter_jit(eqx.filter_grad(loss))(mlp, adjoint)
    leaves = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    gq = leaves(grad(gqdiffrax.GQAdjoint()))
    backsolve = leaves(grad(dfx.BacksolveAdjoint()))
    error = jnp.linalg.norm(gq - backsolve) / jnp.linalg.norm(backsolve)
    assert error < 1e-5
