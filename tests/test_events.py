"""`GQAdjoint` through solves that end at an event.

The solve stops where a real-valued condition $g(t, y, \\theta)$ crosses zero, at a
time $t_e$ root-found by diffrax. The gradient of a loss of $y(t_e)$ and $t_e$ includes
the event time's own sensitivity; it is compared with `RecursiveCheckpointAdjoint`
(which differentiates through the root find) and with finite differences. A boolean
condition (`diffrax.steady_state_event()`) stops the solve at the end of a step, with
no root find: its event time is held fixed, as `RecursiveCheckpointAdjoint` has it.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optimistix as optx
import pytest

import gqdiffrax

from .helpers import assert_grads_close, assert_tree_allclose, finite_difference_grad


def _ball(t, y, args):
    # A ball falling with linear drag: height, velocity.
    height, velocity = y
    gravity, drag = args
    return velocity, -gravity - drag * velocity


def _ground(t, y, args, **kwargs):
    return y[0]


def _ball_solve(
    p, adjoint, *, rtol=1e-10, t1=10.0, saveat=None, condition=_ground, **kwargs
):
    y0, args = p
    event = dfx.Event(condition, root_finder=optx.Newton(1e-12, 1e-12))
    return dfx.diffeqsolve(
        dfx.ODETerm(_ball),
        dfx.Tsit5(),
        0.0,
        t1,
        None,
        y0,
        args,
        event=event,
        saveat=saveat or dfx.SaveAt(t1=True),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
        adjoint=adjoint,
        **kwargs,
    )


_BALL = ((jnp.asarray(5.0), jnp.asarray(0.5)), jnp.array([9.81, 0.3]))


@pytest.mark.parametrize(
    "loss, quadrature",
    [
        ("time", gqdiffrax.StepGauss()),
        ("both", gqdiffrax.StepGauss()),
        # The paper's rule on the one interval [0, t_e].
        ("both", gqdiffrax.IntervalGauss(C=10.0)),
    ],
    ids=["time", "both", "both-interval"],
)
def test_falling_ball(loss, quadrature):
    def f(p, adjoint):
        sol = _ball_solve(p, adjoint)
        t_e, v_e = sol.ts[-1], sol.ys[1][-1]
        return {"time": t_e, "velocity": v_e, "both": v_e**2 + 3 * t_e}[loss]

    gq = gqdiffrax.GQAdjoint(quadrature)
    grad = lambda adjoint: jax.jit(jax.grad(lambda p: f(p, adjoint)))(_BALL)
    g_gq = grad(gq)
    assert_grads_close(g_gq, grad(dfx.RecursiveCheckpointAdjoint()), 1e-7)
    fd = finite_difference_grad(jax.jit(lambda p: f(p, gq)), _BALL)
    assert_grads_close(g_gq, fd, 1e-5)


def test_event_time_against_closed_form():
    # Without drag, h(t) = h0 + v0 t - g t^2 / 2 hits zero at
    # t_e = (v0 + sqrt(v0^2 + 2 g h0)) / g.
    def t_e(p):
        return _ball_solve(p, gqdiffrax.GQAdjoint()).ts[-1]

    def exact(p):
        (h0, v0), (g, _) = p
        return (v0 + jnp.sqrt(v0**2 + 2 * g * h0)) / g

    p = ((jnp.asarray(5.0), jnp.asarray(0.5)), jnp.array([9.81, 0.0]))
    (dh, dv), dargs = jax.grad(t_e)(p)
    (eh, ev), eargs = jax.grad(exact)(p)
    # (The closed form has no drag: its drag derivative is not comparable.)
    assert_grads_close((dh, dv, dargs[0]), (eh, ev, eargs[0]), 1e-8)


class _EventNet(eqx.Module):
    field: eqx.nn.MLP
    condition: eqx.nn.MLP

    def __init__(self, key, dtype):
        k1, k2 = jr.split(key)
        self.field = eqx.nn.MLP(2, 2, 16, 2, jax.nn.softplus, dtype=dtype, key=k1)
        self.condition = eqx.nn.MLP(2, "scalar", 8, 1, jnp.tanh, dtype=dtype, key=k2)


def _neural_solve(model, y0, adjoint, rtol):
    # A neural ODE that stops when time reaches 1 plus a learned function of the
    # state (in (-0.5, 0.5)); the condition's parameters are closed over.
    def condition(t, y, args, **kw):
        value = t - 1 - 0.5 * jnp.tanh(model.condition(y))
        # diffrax's root find pairs the value with a Python float's dtype (float64
        # here, where x64 is on for the float64 tests).
        return value.astype(jnp.result_type(0.0))

    event = dfx.Event(condition, root_finder=optx.Newton(rtol * 1e-2, rtol * 1e-2))
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: model.field(y) - 0.1 * y),
        dfx.Tsit5(),
        jnp.asarray(0.0, y0.dtype),
        jnp.asarray(20.0, y0.dtype),
        None,
        y0,
        event=event,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
        adjoint=adjoint,
        max_steps=4096,
    )


@pytest.mark.slow
# float32 (the falling ball is float64).
@pytest.mark.parametrize("dtype", [jnp.float32])
def test_learned_event_under_vmap(getkey, dtype):
    model = _EventNet(getkey(), dtype)
    y0s = jr.normal(getkey(), (4, 2), dtype)
    rtol = 1e-8 if dtype == jnp.float64 else 1e-5

    def grad(adjoint):
        def loss(model):
            def one(y0):
                sol = _neural_solve(model, y0, adjoint, rtol)
                return jnp.sum(sol.ys[-1] ** 2) + sol.ts[-1]

            return jnp.mean(jax.vmap(one)(y0s))

        return eqx.filter_jit(eqx.filter_grad(loss))(model)

    g_gq = grad(gqdiffrax.GQAdjoint())
    g_direct = grad(dfx.RecursiveCheckpointAdjoint())
    bound = 1e-5 if dtype == jnp.float64 else 2e-3
    assert_grads_close(g_gq, g_direct, bound, label=str(dtype))
    # Every sample stopped at its event (so the event terms were exercised).
    sol = jax.vmap(lambda y0: _neural_solve(model, y0, gqdiffrax.GQAdjoint(), rtol))(
        y0s
    )
    assert jnp.all(sol.ts[:, -1] < 20.0)


@pytest.mark.slow
def test_event_that_does_not_trigger():
    # The ball is stopped at t1 = 0.5 before it lands: the ordinary gradient, with t1's.
    def f(p, t1, adjoint):
        sol = _ball_solve(p, adjoint, t1=t1)
        return sol.ys[0][-1] + sol.ts[-1]

    grad = lambda adjoint: jax.grad(f, argnums=(0, 1))(_BALL, 0.5, adjoint)
    assert_grads_close(
        grad(gqdiffrax.GQAdjoint()), grad(dfx.RecursiveCheckpointAdjoint()), 1e-7
    )


@pytest.mark.slow
def test_several_conditions_with_t0():
    # Two conditions: the ball reaching the ground, or a time limit that comes later.
    def f(p, t0, adjoint):
        y0, args = p
        conds = (
            lambda t, y, args, **kw: y[0],
            lambda t, y, args, **kw: 100.0 - t,
        )
        event = dfx.Event(conds, root_finder=optx.Newton(1e-12, 1e-12))
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_ball),
            dfx.Dopri5(),
            t0,
            10.0,
            None,
            y0,
            args,
            event=event,
            saveat=dfx.SaveAt(t0=True, t1=True),
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=adjoint,
        )
        return sol.ts[-1] + sol.ys[1][-1] + sol.ys[0][0]

    grad = lambda adjoint: jax.grad(f, argnums=(0, 1))(_BALL, 0.2, adjoint)
    assert_grads_close(
        grad(gqdiffrax.GQAdjoint()), grad(dfx.RecursiveCheckpointAdjoint()), 1e-7
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "t1, v0", [(10.0, 0.5), (-10.0, -0.5)], ids=["forward", "reverse"]
)
def test_condition_of_args_in_both_directions(t1, v0):
    # The condition reads `args` (the ground at 0.1 g), and the solve runs forwards
    # or backwards in time.
    def f(p, adjoint):
        condition = lambda t, y, args, **kw: y[0] - 0.1 * args[0]
        sol = _ball_solve(p, adjoint, t1=t1, condition=condition)
        return sol.ts[-1] + sol.ys[1][-1] ** 2

    p = ((jnp.asarray(5.0), jnp.asarray(v0)), jnp.array([9.81, 0.3]))
    grad = lambda adjoint: jax.jit(jax.grad(lambda p: f(p, adjoint)))(p)
    assert_grads_close(
        grad(gqdiffrax.GQAdjoint()), grad(dfx.RecursiveCheckpointAdjoint()), 1e-7
    )


#
# A boolean condition: a solve to steady state
#


def _relax(t, y, args):
    # Relaxation to the steady state c at rate k.
    k, c = args
    return -k * (y - c)


def _steady_solve(p, adjoint):
    y0, args = p
    return dfx.diffeqsolve(
        dfx.ODETerm(_relax),
        dfx.Tsit5(),
        0.0,
        jnp.inf,
        None,
        y0,
        args,
        event=dfx.Event(dfx.steady_state_event(rtol=1e-3, atol=1e-6)),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        adjoint=adjoint,
        max_steps=4096,
    )


def test_steady_state_event():
    # The solve stops at the end of the first step where |f| < 1e-6 + 1e-3 |y|; no root
    # finder places t_e, which moves in jumps, so its gradient is zero. The loss has
    # t_e in it: treating t_e as moving (as for a real-valued condition) would show.
    p = (jnp.array([2.0, -1.0]), (jnp.asarray(1.5), jnp.array([0.5, 0.3])))

    def loss(p, adjoint):
        sol = _steady_solve(p, adjoint)
        return jnp.sum(sol.ys[-1] ** 2) + sol.ts[-1]

    grad = lambda adjoint: jax.jit(jax.grad(lambda p: loss(p, adjoint)))(p)
    g_gq = grad(gqdiffrax.GQAdjoint())
    g_rca = grad(dfx.RecursiveCheckpointAdjoint())
    # y(t) = c + (y0 - c) exp(-k t), so at the solve's own (fixed) t_e,
    # dL/dy0 = 2 y e, dL/dc = 2 y (1 - e), dL/dk = -2 y . (y0 - c) t_e e, with
    # e = exp(-k t_e). The y0 gradient is small (y(t_e) has nearly forgotten y0):
    # each leaf is compared relative to itself. Measured: GQ within 1e-6 of the
    # closed form and 8e-6 of RecursiveCheckpointAdjoint (itself 8e-6 off it).
    (y0, (k, c)), t_e = p, _steady_solve(p, gqdiffrax.GQAdjoint()).ts[-1]
    assert 1 < float(t_e) < 20
    e = jnp.exp(-k * t_e)
    y = c + (y0 - c) * e
    exact = (2 * y * e, (-2 * jnp.sum(y * (y0 - c)) * t_e * e, 2 * y * (1 - e)))
    assert_tree_allclose(g_gq, g_rca, rtol=1e-4, atol=0)
    assert_tree_allclose(g_gq, exact, rtol=1e-4, atol=0)


#
# No state: y0=None
#


def _stateless_loss(args, t1, adjoint):
    # Nothing to solve: only the times and args reach the loss.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: None),
        dfx.Euler(),
        0.0,
        t1,
        0.1,
        None,
        args,
        adjoint=adjoint,
    )
    assert sol.ys is None
    return jnp.sum(jnp.sin(args)) * sol.ts[-1]


def test_none_state():
    # Gradients with respect to args (through the loss only) and t1 (through
    # sol.ts[-1] = t1).
    args, t1 = jnp.array([0.5, 2.0]), jnp.asarray(1.5)
    grad = lambda adjoint: jax.jit(
        jax.grad(lambda a, t1: _stateless_loss(a, t1, adjoint), argnums=(0, 1))
    )(args, t1)
    g_gq = grad(gqdiffrax.GQAdjoint())
    assert_tree_allclose(g_gq, grad(dfx.RecursiveCheckpointAdjoint()), rtol=1e-14)
    exact = (t1 * jnp.cos(args), jnp.sum(jnp.sin(args)))
    assert_tree_allclose(g_gq, exact, rtol=1e-14)


#
# What is refused, and why
#


def _refused(match, exc=ValueError, **kwargs):
    event = kwargs.pop(
        "event",
        dfx.Event(lambda t, y, args, **kw: y[0], root_finder=optx.Newton(1e-8, 1e-8)),
    )
    with pytest.raises(exc, match=match):
        dfx.diffeqsolve(
            dfx.ODETerm(_ball),
            dfx.Tsit5(),
            0.0,
            10.0,
            None,
            _BALL[0],
            _BALL[1],
            event=event,
            stepsize_controller=kwargs.pop(
                "stepsize_controller", dfx.PIDController(rtol=1e-6, atol=1e-6)
            ),
            adjoint=kwargs.pop("adjoint", gqdiffrax.GQAdjoint()),
            **kwargs,
        )


def test_error_mixed_boolean_and_real_conditions():
    # A boolean condition's time is held fixed, a real one's moves: not both at once.
    conds = (lambda t, y, args, **kw: y[0] < 0, lambda t, y, args, **kw: y[0])
    event = dfx.Event(conds, root_finder=optx.Newton(1e-8, 1e-8))
    _refused("mixes boolean and real-valued", event=event)


def test_error_no_root_finder():
    _refused("root finder", event=dfx.Event(lambda t, y, args, **kw: y[0]))


def test_error_unsupported_combinations():
    _refused("SaveAt", NotImplementedError, saveat=dfx.SaveAt(ts=jnp.array([0.5])))
    _refused(
        "checkpoints", NotImplementedError, adjoint=gqdiffrax.GQAdjoint(checkpoints=2)
    )
    jumps = dfx.PIDController(rtol=1e-6, atol=1e-6, jump_ts=jnp.array([0.3]))
    _refused("jump_ts", NotImplementedError, stepsize_controller=jumps)
