"""Dynamics that forget their start: the backward re-solve of z leaves the forward
trajectory, and GQAdjoint's default reads z from the forward solution instead."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import gqdiffrax
from gqdiffrax import _forward


def _settling_loss(theta, adjoint, rtol, *, max_steps=16384, dtype=jnp.float64):
    # The Accuracy page's problem: a forcing that decays, and a state that settles
    # near an attracting point whatever its start.
    def field(t, y, th):
        decay = jnp.exp(-t).astype(y.dtype)
        th = th.astype(y.dtype)
        return -0.3 * y + th[0] * decay * jnp.cos(y) + th[1] * jnp.sin(y)

    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Dopri5(),
        jnp.asarray(0.0, dtype),
        jnp.asarray(10.0, dtype),
        None,
        jnp.array([1.0, -2.0, 3.0], dtype),
        theta,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=1e-3 * rtol),
        adjoint=adjoint,
        max_steps=max_steps,
    )
    return jnp.sum(sol.ys[-1] ** 2)


def _grad(adjoint, rtol, theta=None, **kwargs):
    theta = jnp.array([20.0, 0.5]) if theta is None else theta
    loss = lambda th: _settling_loss(th, adjoint, rtol, **kwargs)
    return eqx.filter_jit(jax.grad(loss))(theta)


@pytest.fixture(scope="module")
def exact():
    return _grad(dfx.RecursiveCheckpointAdjoint(), 1e-12)


@pytest.mark.parametrize("rtol", [1e-4, 1e-6])
def test_default_within_twice_direct(exact, rtol):
    # Re-solving z backwards was off by 1.7e2 (rtol 1e-4) and 3.3e-3 (1e-6) here, as
    # BacksolveAdjoint is; the direct method by 9.7e-3 and 3.2e-5.
    direct = jnp.max(jnp.abs(_grad(dfx.RecursiveCheckpointAdjoint(), rtol) - exact))
    default = jnp.max(jnp.abs(_grad(gqdiffrax.GQAdjoint(), rtol) - exact))
    assert float(default) <= 2 * float(direct)


@pytest.mark.slow
def test_default_within_twice_direct_tight(exact):
    direct = jnp.max(jnp.abs(_grad(dfx.RecursiveCheckpointAdjoint(), 1e-8) - exact))
    default = jnp.max(jnp.abs(_grad(gqdiffrax.GQAdjoint(), 1e-8) - exact))
    assert float(default) <= 2 * float(direct)


def test_under_vmap_in_float32():
    thetas = jnp.array([[20.0, 0.5], [10.0, 0.3]], jnp.float32)
    adjoint = gqdiffrax.GQAdjoint()
    loss = lambda th: _settling_loss(th, adjoint, 1e-4, dtype=jnp.float32)
    batched = eqx.filter_jit(jax.vmap(jax.grad(loss)))(thetas)
    one = [_grad(adjoint, 1e-4, th, dtype=jnp.float32) for th in thetas]
    assert batched.dtype == jnp.float32
    # A batched solve steps with its slowest sample: other steps, at rtol 1e-4.
    assert jnp.allclose(batched, jnp.stack(one), rtol=1e-3)
    direct = [
        _grad(dfx.RecursiveCheckpointAdjoint(), 1e-4, th, dtype=jnp.float32)
        for th in thetas
    ]
    # float32 at rtol 1e-4: within the direct method's own spread of the exact value.
    assert jnp.allclose(batched, jnp.stack(direct), rtol=2e-2)


def test_which_solves_keep_the_forward_states():
    # Chosen at trace time from the rule, max_steps and the state's bytes.
    solve = lambda adjoint, max_steps: _forward.Solve(
        adjoint=adjoint,
        solver=dfx.Dopri5(),
        order=5,
        stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
        saveat=dfx.SaveAt(t1=True),
        dt0=None,
        max_steps=max_steps,
        throw=True,
        init_state=None,
        direction=1,
        event=None,
        progress_meter=None,
    )
    small = (jnp.zeros(3),)
    large = (jnp.zeros((1024, 1024)),)
    keeps = lambda adjoint, diff, max_steps=4096: _forward.keeps_states(
        solve(adjoint, max_steps), diff
    )
    assert keeps(gqdiffrax.GQAdjoint(), small)
    assert not keeps(gqdiffrax.GQAdjoint(), large)
    assert not keeps(gqdiffrax.GQAdjoint(), small, max_steps=None)
    assert not keeps(gqdiffrax.GQAdjoint(state_budget=0), small)
    assert not keeps(gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss()), small)


@pytest.mark.parametrize(
    "adjoint",
    [gqdiffrax.GQAdjoint(), gqdiffrax.GQAdjoint(state_budget=0)],
    ids=["kept", "re-solved"],
)
def test_max_steps_none(adjoint):
    # `max_steps=None`: no buffer can be sized, so z is re-solved; the gradient still
    # matches the direct method on a problem that does not settle.
    theta = jnp.array([0.5, 0.2])
    got = _grad(adjoint, 1e-8, theta, max_steps=None)
    want = _grad(dfx.RecursiveCheckpointAdjoint(), 1e-8, theta)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-7)


def _growing_grad(adjoint, rtol):
    # The Accuracy page's exponential problem: dy/dt = a y on [0, 24], growing by
    # e^{4.8}, where the forward's own error grows too.
    def loss(p):
        y0, a = p
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: a * y),
            dfx.Dopri5(),
            0.0,
            24.0,
            None,
            y0,
            a,
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            adjoint=adjoint,
            max_steps=100_000,
        )
        return jnp.sum(sol.ys**2)

    return jnp.stack(eqx.filter_jit(jax.grad(loss))((jnp.array(10.0), jnp.array(0.2))))


@pytest.mark.parametrize("rtol", [1e-4, 1e-6])
def test_default_within_twice_direct_on_growth(rtol):
    exact = _growing_grad(dfx.RecursiveCheckpointAdjoint(), 1e-13)
    error = lambda g: float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
    direct = error(_growing_grad(dfx.RecursiveCheckpointAdjoint(), rtol))
    default = error(_growing_grad(gqdiffrax.GQAdjoint(), rtol))
    assert default <= 2 * direct


def test_reset_only_where_z_drifted():
    # The backward step [s, e] = [0.2, 0.9] holds the kept time 0.5, where the forward
    # state is 1.0; rtol = atol = 1e-3 in the forward controller's RMS norm.
    from gqdiffrax._step import ForwardPath

    ts = jnp.array([0.5, 1.0, jnp.inf])
    ys = jnp.array([[1.0, 1.0], [2.0, 2.0], [jnp.inf, jnp.inf]])
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    path = ForwardPath(jnp.array(0.0), jnp.zeros(2), ts, ys, pid)
    off_by = lambda d: lambda t: jnp.where(t == 0.5, 1.0 + d, jnp.nan) * jnp.ones(2)
    s, e = jnp.array(0.2), jnp.array(0.9)
    # Within the tolerance (2e-3 at 1.0): no reset; beyond it: reset.
    assert not bool(path.drifted(s, e, off_by(1e-3)))
    assert bool(path.drifted(s, e, off_by(3e-3)))
    # No kept time inside the step: nothing to compare with, no reset.
    assert not bool(path.drifted(jnp.array(0.6), e, off_by(1.0)))
    # Constant step sizes have no tolerance: always reset.
    constant = ForwardPath(jnp.array(0.0), jnp.zeros(2), ts, ys, None)
    assert bool(constant.drifted(s, e, off_by(0.0)))
