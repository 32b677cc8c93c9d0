"""GQAdjoint's default on vector fields that are not smooth: a rule on every backward
step follows their kinks, where one rule per interval cannot."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import gqdiffrax


class _MLPField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


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
    # Nobody told the solver about the switch: the default integrates per backward
    # step, whose step-size control finds it (error 1.4e-6, as BacksolveAdjoint's
    # 1.5e-6); one rule across the switch is off by 1.2e-2.
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
