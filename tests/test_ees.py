"""EES solvers and `ReversibleAdjoint`.

Gradients are compared with `RecursiveCheckpointAdjoint` through the same solver, which
differentiates the same discrete forward pass exactly: `ReversibleHeun` must agree to
round-off, the EES schemes up to their reconstruction drift.
"""

import functools as ft

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import gqdiffrax
from gqdiffrax._reversible import _Grid

from .helpers import assert_tree_allclose


_SQRT2 = np.sqrt(2.0)
_RCA = dfx.RecursiveCheckpointAdjoint()
_RA = gqdiffrax.ReversibleAdjoint()


def _slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


def _max_abs(tree):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def _rel_err(x, y):
    # Worst leaf-wise relative error, so that a small leaf (say, one bias) cannot hide
    # behind a large one.
    errors = jax.tree.map(lambda a, b: _max_abs(a - b) / _max_abs(b), x, y)
    return max(jax.tree.leaves(errors))


def _arrays(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


#
# Tableaus: order conditions and linear stability.
#


def _stability_polynomial(tableau):
    # R(z) = 1 + sum_k (b^T A^{k-1} 1) z^k for an explicit s-stage method.
    s = tableau.num_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tableau.a_lower):
        a[i + 1, : i + 1] = row
    b = tableau.b_sol
    coeffs = [1.0]
    power = np.eye(s)
    for _ in range(s):
        coeffs.append(b @ power @ np.ones(s))
        power = power @ a
    return np.array(coeffs), a, b


def _real_stability_endpoint(coeffs):
    # Left end of the interval [x, 0] on which |R| <= 1: the negative real root of
    # R(z) = ±1 closest to zero.
    poly = np.polynomial.Polynomial(coeffs)
    roots = np.concatenate([(poly - 1).roots(), (poly + 1).roots()])
    real = roots[(np.abs(roots.imag) < 1e-9) & (roots.real < -1e-9)].real
    return real.max()


@pytest.mark.parametrize(
    "solver, expected, endpoint",
    [
        (gqdiffrax.EES25(), [1, 1, 1 / 2, 1 / 8], -3.09),
        (
            gqdiffrax.EES27(),
            [1, 1, 1 / 2, (2 - _SQRT2) / 4, (3 - 2 * _SQRT2) / 8],
            -3.92,
        ),
    ],
)
def test_tableau(solver, expected, endpoint):
    coeffs, a, b = _stability_polynomial(solver.tableau)
    np.testing.assert_allclose(coeffs, expected, rtol=0, atol=1e-14)
    assert round(_real_stability_endpoint(coeffs), 2) == endpoint
    # RK4, R(z) = sum_k z^k / k!, for scale: EES is more stable on the real axis.
    rk4 = _real_stability_endpoint([1, 1, 1 / 2, 1 / 6, 1 / 24])
    assert round(rk4, 2) == -2.79
    # Classical order exactly 2: the order-2 conditions hold, one of order 3 fails.
    c = a.sum(axis=1)
    np.testing.assert_allclose(c[1:], solver.tableau.c, atol=1e-15)
    np.testing.assert_allclose([b.sum(), b @ c], [1, 1 / 2], atol=1e-15)
    assert abs(b @ a @ c - 1 / 6) > 1e-2
    # The embedded estimate is b - (1, 0, ..., 0): explicit Euler, first order.
    np.testing.assert_allclose(solver.tableau.b_error, b - np.eye(len(b))[0])
    assert solver.order(dfx.ODETerm(lambda t, y, args: y)) == 2
    assert solver.strong_order(None) == 0.5


def test_ees25_family_and_imaginary_axis():
    # EES(2,5; x) at x = 1/10 from the general family.
    x = 1 / 10
    tableau = gqdiffrax.EES25().tableau
    c2 = (1 + 2 * x) / (4 * (1 - x))
    a31 = (4 * x - 1) ** 2 / (4 * (x - 1) * (1 - 4 * x**2))
    a32 = (1 - x) / (1 - 4 * x**2)
    np.testing.assert_allclose(tableau.c, [c2, 3 / (4 * (1 - x))], rtol=1e-15)
    np.testing.assert_allclose(tableau.a_lower[1], [a31, a32], rtol=1e-15)
    np.testing.assert_allclose(tableau.b_sol, [x, 1 / 2, 1 / 2 - x], rtol=1e-15)
    # Weak instability on the imaginary axis: |R(iy)|^2 = 1 + y^6/64.
    coeffs, _, _ = _stability_polynomial(tableau)
    y = np.linspace(0.1, 3, 7)
    r = np.polynomial.Polynomial(coeffs)(1j * y)
    np.testing.assert_allclose(np.abs(r) ** 2, 1 + y**6 / 64, rtol=1e-13)


#
# The solvers: ODE order, dense output, adaptive steps, SDEs.
#


def _riccati(t, y, args):
    # Nonlinear and non-autonomous, with exact solution y(t) = 1 + sin(t) from y0 = 1.
    del args
    return -(y**2) + jnp.cos(t) + (1 + jnp.sin(t)) ** 2


@eqx.filter_jit
def _riccati_error(solver, dt):
    ts = jnp.array([0.3, 0.77, 1.5, 2.21, 3.0])  # Off the step grid: dense output.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_riccati),
        solver,
        0.0,
        3.0,
        dt,
        jnp.array(1.0),
        saveat=dfx.SaveAt(ts=ts),
        max_steps=1024,
    )
    return jnp.max(jnp.abs(sol.ys - (1 + jnp.sin(ts))))


@pytest.mark.parametrize("solver", [gqdiffrax.EES25(), gqdiffrax.EES27()])
def test_ode_order_two(solver):
    hs = np.array([0.1, 0.05, 0.025, 0.0125])
    errors = np.array([float(_riccati_error(solver, jnp.asarray(h))) for h in hs])
    assert 1.85 < _slope(hs, errors) < 2.15, errors


@pytest.mark.parametrize("solver", [gqdiffrax.EES25(), gqdiffrax.EES27()])
def test_ode_adaptive(solver):
    def solve(rtol):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_riccati),
            solver,
            0.0,
            3.0,
            0.1,
            jnp.array(1.0),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
        )
        return abs(float(sol.ys[-1]) - (1 + np.sin(3.0))), int(sol.stats["num_steps"])

    (error_loose, steps_loose), (error_tight, steps_tight) = solve(1e-3), solve(1e-5)
    assert error_tight < error_loose < 1e-2
    assert error_tight < 1e-4
    assert steps_loose < steps_tight


@pytest.mark.slow
@pytest.mark.parametrize("solver", [gqdiffrax.EES25(), gqdiffrax.EES27()])
def test_sde_converges_to_stratonovich(solver):
    # dy = λy dt + μy∘dW has the Stratonovich solution y0 exp(λt + μW_t). An Itô
    # scheme would converge to y0 exp((λ - μ²/2)t + μW_t) instead.
    lam, mu, num_paths = -1.0, 0.8, 16
    keys = jr.split(jr.key(0), num_paths)

    @eqx.filter_jit
    @ft.partial(jax.vmap, in_axes=(0, None))
    def error(key, dt):
        bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2**-12, shape=(), key=key)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: lam * y),
            dfx.ControlTerm(lambda t, y, args: mu * y, bm),
        )
        sol = dfx.diffeqsolve(terms, solver, 0.0, 1.0, dt, jnp.array(1.0))
        exact = jnp.exp(lam + mu * bm.evaluate(0.0, 1.0))
        return jnp.abs(sol.ys[-1] - exact)

    hs = np.array([2.0**-3, 2.0**-5, 2.0**-7])
    errors = np.array([float(jnp.mean(error(keys, jnp.asarray(h)))) for h in hs])
    assert errors[-1] < 2e-3
    # Scalar noise is commutative, where these schemes have strong order 1.
    assert _slope(hs, errors) > 0.8, errors


#
# Reversibility of the schemes themselves.
#


def _smooth(t, y, args):
    del args
    return -jnp.sin(y) + 0.5 * jnp.cos(t)


@eqx.filter_jit
def _round_trip_error(solver, dt):
    y0 = jnp.array([1.0, -0.3])
    forward = dfx.diffeqsolve(dfx.ODETerm(_smooth), solver, 0.0, 4.0, dt, y0)
    back = dfx.diffeqsolve(
        dfx.ODETerm(_smooth), solver, 4.0, 0.0, -dt, forward.ys[-1], max_steps=None
    )
    return jnp.max(jnp.abs(back.ys[-1] - y0))


@pytest.mark.parametrize(
    "solver, slope", [(gqdiffrax.EES25(), 5), (gqdiffrax.EES27(), 7)]
)
def test_round_trip_order(solver, slope):
    assert solver.reversibility_order == slope
    hs = np.array([0.4, 0.2, 0.1])
    errors = np.array([float(_round_trip_error(solver, jnp.asarray(h))) for h in hs])
    assert errors[-1] > 1e-13  # Still well above round-off.
    assert abs(_slope(hs, errors) - slope) < 0.3, errors


def test_round_trip_reversible_heun_exact():
    term = dfx.ODETerm(_smooth)
    y0 = jnp.array([1.0, -0.3])
    save = dfx.SaveAt(t1=True, solver_state=True)
    forward = dfx.diffeqsolve(
        term, dfx.ReversibleHeun(), 0.0, 4.0, 0.4, y0, saveat=save
    )
    back = dfx.diffeqsolve(
        term,
        dfx.ReversibleHeun(),
        4.0,
        0.0,
        -0.4,
        forward.ys[-1],
        solver_state=forward.solver_state,
        made_jump=False,
    )
    assert _max_abs(back.ys[-1] - y0) < 1e-13


#
# ReversibleAdjoint: gradients against RecursiveCheckpointAdjoint.
#


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return args * self.mlp(y) * jnp.cos(t)


def _params(dtype=jnp.float64):
    mlp = eqx.nn.MLP(2, 2, 4, 1, activation=jnp.tanh, key=jr.key(0))
    field = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_array(x) else x, mlp)
    y0 = jnp.array([0.8, -0.4], dtype)
    args = jnp.asarray(0.7, dtype)
    theta = jnp.asarray(0.9, dtype)  # Closed over by a lambda.
    return y0, args, theta, _Field(field)


def _ode_loss(params, solver, adjoint, saveat, dt):
    y0, args, theta, field = params
    vector_field = lambda t, y, args: field(t, y, args) - theta * y
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        solver,
        0.0,
        2.0,
        dt,
        y0,
        args=args,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=64,
    )
    weights = jnp.linspace(1.0, 2.0, sol.ys.shape[0])[:, None]
    return jnp.sum(weights * jnp.sin(sol.ys))


_ode_grad = eqx.filter_jit(eqx.filter_grad(_ode_loss))
# Saves at t0 (saved before any step), a grid point (saved by the step ending there),
# off-grid points (interpolated) and t1.
_SAVE_MIXED = dfx.SaveAt(t0=True, ts=jnp.array([0.0, 0.35, 1.0, 1.7]), t1=True)


@pytest.mark.parametrize(
    "solver", [gqdiffrax.EES25(), gqdiffrax.EES27(), dfx.ReversibleHeun()]
)
def test_ode_gradients(solver):
    # `SaveAt(t1=True)` alone is covered by `test_sde_gradients`.
    params, saveat = _params(), _SAVE_MIXED
    hs = np.array([0.2, 0.1, 0.05])
    errors = []
    for h in hs:
        dt = jnp.asarray(h)
        grads = _ode_grad(params, solver, _RA, saveat, dt)
        expected = _ode_grad(params, solver, _RCA, saveat, dt)
        # y0, args, the closed-over theta and the module parameters all get gradients.
        assert all(_max_abs(g) > 0 for g in _arrays(expected))
        errors.append(_rel_err(_arrays(grads), _arrays(expected)))
    errors = np.array(errors)
    if isinstance(solver, dfx.ReversibleHeun):
        assert errors.max() < 1e-13, errors
    else:
        # The gradient error is the reconstruction drift, O(h^m).
        assert errors[0] < 1e-4
        assert _slope(hs, errors) > solver.reversibility_order - 1, errors


def _sde_loss(params, solver, adjoint, saveat, dt):
    y0, args, sigma, drift = params
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2**-9, shape=(2,), key=jr.key(1))
    diffusion = lambda t, y, args: lx.DiagonalLinearOperator(sigma * jnp.cos(y))
    terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
    sol = dfx.diffeqsolve(
        terms,
        solver,
        0.0,
        1.0,
        dt,
        y0,
        args=args,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=64,
    )
    return jnp.sum(jnp.sin(sol.ys))


_sde_grad = eqx.filter_jit(eqx.filter_grad(_sde_loss))


@pytest.mark.parametrize(
    "solver", [gqdiffrax.EES25(), gqdiffrax.EES27(), dfx.ReversibleHeun()]
)
def test_sde_gradients(solver):
    y0, args, sigma, field = _params()
    params = (y0, args, 0.5 * sigma, field)
    saveat = dfx.SaveAt(t1=True)
    hs = np.array([0.2, 0.1, 0.025])
    errors = []
    for h in hs:
        dt = jnp.asarray(h)
        grads = _sde_grad(params, solver, _RA, saveat, dt)
        expected = _sde_grad(params, solver, _RCA, saveat, dt)
        assert all(_max_abs(g) > 0 for g in _arrays(expected))
        errors.append(_rel_err(_arrays(grads), _arrays(expected)))
    if isinstance(solver, dfx.ReversibleHeun):
        # Exact reconstruction: the replayed Brownian increments are bitwise those of
        # the forward pass.
        assert max(errors) < 1e-13, errors
    else:
        # With noise the reconstruction drift is O(h^2) (EES25) or O(h^3) (EES27) in
        # expectation; on one path the decrease is monotone but less regular.
        assert errors[0] < 1e-4
        assert errors[0] > errors[1] > errors[2], errors
        assert errors[2] < errors[0] / 16, errors


@pytest.mark.slow
def test_checkpoint_every():
    solver, params, dt = gqdiffrax.EES25(), _params(), jnp.asarray(0.2)
    expected = _arrays(_ode_grad(params, solver, _RCA, _SAVE_MIXED, dt))

    def error(k):
        adjoint = gqdiffrax.ReversibleAdjoint(checkpoint_every=k)
        grads = _ode_grad(params, solver, adjoint, _SAVE_MIXED, dt)
        return _rel_err(_arrays(grads), expected)

    # Every state stored: nothing is reconstructed, so the gradient is exact.
    assert error(1) < 1e-13
    # Checkpoints bound the drift to a few steps.
    assert error(3) < error(None) / 10


def _vector_loss(y0, theta, adjoint, dtype):
    vector_field = lambda t, y, args: -theta * jnp.sin(y) + jnp.cos(t)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        gqdiffrax.EES27(),
        jnp.asarray(0.0, dtype),
        jnp.asarray(2.0, dtype),
        jnp.asarray(0.1, dtype),
        y0,
        saveat=dfx.SaveAt(ts=jnp.array([0.5, 2.0], dtype)),
        adjoint=adjoint,
        max_steps=None if isinstance(adjoint, gqdiffrax.ReversibleAdjoint) else 32,
    )
    return jnp.sum(sol.ys**2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_transformations(dtype):
    y0s = jnp.array([[0.8, -0.4], [1.5, 0.2], [-1.0, 2.0]], dtype)
    theta = jnp.asarray(1.3, dtype)
    grad = jax.grad(_vector_loss, argnums=(0, 1))
    vmap_of_grad = jax.jit(
        jax.vmap(grad, in_axes=(0, None, None, None)), static_argnums=(2, 3)
    )

    @ft.partial(jax.jit, static_argnums=(2, 3))
    def grad_of_vmap(y0s, theta, adjoint, dtype):
        batched = jax.vmap(_vector_loss, in_axes=(0, None, None, None))
        return jax.grad(lambda *a: jnp.sum(batched(*a, adjoint, dtype)), (0, 1))(
            y0s, theta
        )

    g_y0s, g_theta = vmap_of_grad(y0s, theta, _RA, dtype)
    gv_y0s, gv_theta = grad_of_vmap(y0s, theta, _RA, dtype)
    e_y0s, e_theta = vmap_of_grad(y0s, theta, _RCA, dtype)
    for x in (g_y0s, g_theta, gv_y0s, gv_theta):
        assert x.dtype == dtype
    # Batching the same computation two ways agrees to round-off; the exact gradient
    # up to EES27's reconstruction drift (about 1e-9 here) or float32 round-off.
    float32 = dtype == jnp.float32
    same = dict(rtol=1e-5, atol=1e-6) if float32 else dict(rtol=1e-12, atol=0)
    exact = dict(rtol=1e-5, atol=1e-6) if float32 else dict(rtol=1e-7, atol=0)
    assert_tree_allclose((gv_y0s, gv_theta), (g_y0s, g_theta.sum()), **same)
    assert_tree_allclose((g_y0s, g_theta.sum()), (e_y0s, e_theta.sum()), **exact)


@pytest.mark.slow
def test_step_to():
    # An uneven grid, through ReversibleHeun so that the comparison is exact.
    steps = jnp.array([0.0, 0.1, 0.35, 0.5, 0.9, 1.0, 1.3, 1.75, 2.0])

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(params, adjoint):
        y0, args, theta, field = params
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: field(t, y, args) - theta * y),
            dfx.ReversibleHeun(),
            0.0,
            2.0,
            None,
            y0,
            args=args,
            saveat=_SAVE_MIXED,
            stepsize_controller=dfx.StepTo(steps),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    params = _params()
    assert _rel_err(_arrays(grad(params, _RA)), _arrays(grad(params, _RCA))) < 1e-13


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_grid_is_context_independent(dtype):
    # The time grid is recomputed, not stored, so every compiled context must produce
    # the same bits: here batched, scalar, and inside a loop.
    t0, t1, num_steps = jnp.asarray(0.1, dtype), jnp.asarray(1.3, dtype), 18
    grid = _Grid(
        t0=t0,
        t1=t1,
        first=t0 + jnp.asarray(0.07, dtype),
        clip_floor=t1 - 100 * jnp.asarray(np.spacing(np.asarray(t1)), dtype),
        step=(t1 - t0) / num_steps,
        num_steps=jnp.asarray(num_steps, jnp.int32),
        ts=None,
    )
    ns = jnp.arange(num_steps + 1, dtype=jnp.int32)
    # The grid is an argument, not a constant, so that XLA cannot constant-fold it.
    batched = jax.jit(lambda g, ns: jax.vmap(g)(ns))(grid, ns)
    call = jax.jit(lambda g, n: g(n))
    scalar = jnp.stack([call(grid, n) for n in ns])
    looped = jax.jit(
        lambda g: jax.lax.fori_loop(
            0, len(ns), lambda i, out: out.at[i].set(g(i)), jnp.zeros(len(ns), dtype)
        )
    )(grid)
    np.testing.assert_array_equal(batched, scalar)
    np.testing.assert_array_equal(looped, scalar)
    assert scalar[0] == t0 and scalar[1] == grid.first and scalar[-1] == t1
    # Diffrax's `ConstantStepSize` grid, t0 + (t1 - t0) (n / N), to within two ULP.
    n = np.arange(2, num_steps, dtype=np.float64)
    expected = (0.1 + 1.2 * n / num_steps).astype(dtype)
    np.testing.assert_allclose(scalar[2:-1], expected, rtol=2 * np.finfo(dtype).eps)


def test_backward_replays_forward_times():
    # Record every time at which the vector field is evaluated. ReversibleHeun only
    # evaluates at grid points, so the backward pass (reconstruction and recomputed
    # steps) must hit exactly, bitwise, the forward pass's times: otherwise the
    # Brownian increments it replays would differ from the forward ones. (float32,
    # where one ULP of time is largest; float64 SDE gradients are checked to 1e-13 in
    # `test_sde_gradients`.)
    dtype = jnp.float32
    times = []

    def vector_field(t, y, args):
        jax.debug.callback(lambda t: times.append(float(t)), t)
        return -args * jnp.sin(y)

    def loss(args):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(vector_field),
            dfx.ReversibleHeun(),
            jnp.asarray(0.1, dtype),
            jnp.asarray(1.3, dtype),  # Not a multiple of dt0 from t0.
            jnp.asarray(0.07, dtype),
            jnp.array([0.8, -0.4], dtype),
            args=args,
            adjoint=_RA,
        )
        return jnp.sum(sol.ys**2)

    args = jnp.asarray(1.5, dtype)
    loss(args)
    forward = set(times)
    assert len(forward) == 19  # t0 and the 18 steps.
    times.clear()
    jax.grad(loss)(args)
    assert set(times) == forward


#
# Memory.
#


def _memory(adjoint, max_steps):
    def loss(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -jnp.sin(y)),  # Nonlinear (see below).
            gqdiffrax.EES25(),
            0.0,
            1.0,
            1.0 / max_steps,
            y0,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return jnp.sum(sol.ys**2)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(64)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_memory_is_flat_in_steps():
    # A nonlinear vector field: for a linear one the backward pass never reads the
    # reconstructed states and XLA removes them, which would test nothing.
    reversible = [_memory(_RA, n) for n in (16, 1024)]
    recursive = [_memory(_RCA, n) for n in (16, 1024)]
    checkpointed = _memory(gqdiffrax.ReversibleAdjoint(checkpoint_every=8), 1024)
    assert reversible[0] == reversible[1]
    assert recursive[1] > recursive[0] + 64 * 8
    # Plus O(n/k) checkpointed states, of 64 float64s each.
    assert checkpointed - reversible[1] >= 1024 // 8 * 64 * 8


#
# Refusals.
#


def _solve(solver=gqdiffrax.EES25(), adjoint=_RA, **kwargs):
    options = dict(dt0=0.1, saveat=dfx.SaveAt(t1=True), max_steps=16) | kwargs
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        solver,
        0.0,
        1.0,
        y0=jnp.array(1.0),
        adjoint=adjoint,
        **options,
    )


def test_refusals():
    with pytest.raises(ValueError, match="RecursiveCheckpointAdjoint"):
        _solve(dfx.Tsit5())
    with pytest.raises(ValueError, match="gqdiffrax.EES25"):
        _solve(dfx.HalfSolver(gqdiffrax.EES25()))
    with pytest.raises(ValueError, match="ConstantStepSize"):
        _solve(stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(NotImplementedError, match="SaveAt"):
        _solve(saveat=dfx.SaveAt(steps=True))
    with pytest.raises(NotImplementedError, match="SaveAt"):
        _solve(saveat=dfx.SaveAt(dense=True))
    with pytest.raises(NotImplementedError, match="fn"):
        _solve(saveat=dfx.SaveAt(t1=True, fn=lambda t, y, args: 2 * y))
    with pytest.raises(ValueError, match="max_steps"):
        _solve(adjoint=gqdiffrax.ReversibleAdjoint(checkpoint_every=4), max_steps=None)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="checkpoint_every"):
            gqdiffrax.ReversibleAdjoint(checkpoint_every=bad)
    bm = dfx.UnsafeBrownianPath(shape=(), key=jr.key(0))
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        dfx.diffeqsolve(
            dfx.MultiTerm(
                dfx.ODETerm(lambda t, y, args: -y),
                dfx.ControlTerm(lambda t, y, args: y, bm),
            ),
            gqdiffrax.EES25(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            adjoint=_RA,
        )


@pytest.mark.parametrize(
    "saveat, match",
    [
        (dfx.SaveAt(steps=True), "steps=True"),
        (dfx.SaveAt(dense=True), "dense=True"),
        (dfx.SaveAt(t1=True, fn=lambda t, y, args: y), "fn="),
        (dfx.SaveAt(subs=[dfx.SubSaveAt(t1=True), dfx.SubSaveAt(t0=True)]), "subs="),
    ]
    + [
        (dfx.SaveAt(t1=True, **{field: True}), f"{field}=True")
        for field in ("controller_state", "solver_state", "made_jump")
    ],
)
def test_refuses_saveat(saveat, match):
    with pytest.raises(NotImplementedError, match=f"ReversibleAdjoint.*{match}"):
        _solve(saveat=saveat)


def test_times_are_not_differentiated():
    def loss(t1):
        term = dfx.ODETerm(lambda t, y, args: -y)
        sol = dfx.diffeqsolve(
            term, gqdiffrax.EES25(), 0.0, t1, 0.1, jnp.array(1.0), adjoint=_RA
        )
        return jnp.sum(sol.ys)

    with pytest.raises(Exception, match="the times"):
        jax.grad(loss)(jnp.asarray(1.0))
