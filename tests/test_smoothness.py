"""GQAdjoint on vector fields that are not smooth. The default's rule on every backward
step follows their kinks, as the backward solve's step-size control finds them; the
rule per interval is accurate when told where they are (`jump_ts`)."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import gqdiffrax

from .helpers import relative_error


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def _switching_grad(adjoint, jump_ts=None):
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
            stepsize_controller=dfx.PIDController(
                rtol=1e-8, atol=1e-8, jump_ts=jump_ts
            ),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1])

    return jax.jit(jax.grad(loss))(jnp.array(0.7))


@pytest.mark.parametrize(
    "adjoint, jump_ts",
    [
        # Nobody told the solver about the switch: the default integrates per backward
        # step, whose step-size control finds it (measured 1.4e-6, as
        # BacksolveAdjoint's 1.5e-6).
        pytest.param(gqdiffrax.GQAdjoint(), None, id="default"),
        # Told, both rules split their quadrature there.
        pytest.param(gqdiffrax.GQAdjoint(), jnp.array([0.5]), id="default-jump_ts"),
        pytest.param(
            gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss()),
            jnp.array([0.5]),
            id="interval-jump_ts",
        ),
    ],
)
def test_switch_in_time(adjoint, jump_ts):
    exact = -1.5 * 3.0 * jnp.exp(-1.5 * 0.7)
    got = _switching_grad(adjoint, jump_ts)
    assert abs(got - exact) / abs(exact) < 1e-5


@pytest.mark.slow
def test_default_on_a_relu_field():
    # diffrax's closure test: a ReLU MLP field, whose parameter integrand jumps
    # wherever a unit switches on or off. The default agrees with BacksolveAdjoint,
    # the other continuous adjoint (the direct method, a discrete gradient, differs
    # from both by about 2.5e-3 at the kinks).
    mlp = eqx.nn.MLP(1, 1, 8, 2, key=jr.key(0))

    def grad(adjoint):
        def loss(mlp):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_MLPField(mlp)),
                dfx.Tsit5(),
                0.0,
                1.0,
                None,
                jnp.array([1.0]),
                stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
                adjoint=adjoint,
            )
            return jnp.sum(sol.ys)

        return eqx.filter_jit(eqx.filter_grad(loss))(mlp)

    error = relative_error(grad(gqdiffrax.GQAdjoint()), grad(dfx.BacksolveAdjoint()))
    assert error < 1e-4


@pytest.mark.slow
def test_default_on_a_relu_mlp_under_vmap():
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
    error = relative_error(grad(gqdiffrax.GQAdjoint()), grad(dfx.BacksolveAdjoint()))
    assert error < 1e-5
