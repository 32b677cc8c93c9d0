"""GQAdjoint over diffrax's SaveAt grid, as diffrax tests its adjoints (issue 13, §4).

`SaveAt(t0=..., t1=..., ts=...)` in all seven non-empty combinations, `ts` touching t0
and t1 and with repeated times (zero-length intervals), forward and reverse time,
constant and adaptive steps, every solver of the shared list; gradients with respect
to `y0`, `args`, the vector field's module parameters, `t0`, `t1` and `ts`, under
`jax.jit`, against `diffrax.RecursiveCheckpointAdjoint` with a bound scaled by the
tolerance (`tests/helpers.py`). The default `GQAdjoint()` (a Gauss rule on every
backward step, stepping across save times) runs every test; the paper's rule per
interval, `IntervalGauss`, runs the SaveAt grid and `vmap` as cases after it.

Compile time dominates: directions and save-time patterns are data, so one compiled
gradient per (adjoint, solver, controller, SaveAt combination, dtype) serves them all.
"""

import functools as ft
import itertools

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import gqdiffrax

from .helpers import (
    assert_grads_close,
    grad_bound,
    make_args,
    make_field,
    make_times,
    solve,
    SOLVERS,
    SOLVERS_BY_NAME,
    weighted_loss,
)


_ADJOINTS = {
    "gq": gqdiffrax.GQAdjoint(),
    # The paper's rule, with ten times its node count: accurate to the solver here.
    "gq-interval": gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=10.0)),
    "rca": dfx.RecursiveCheckpointAdjoint(),
}

# (save_t0, save_t1, save_ts): the seven non-empty combinations.
_COMBOS = [c for c in itertools.product([False, True], repeat=3) if any(c)]


def _combo_id(combo):
    return "+".join(n for n, on in zip(["t0", "t1", "ts"], combo) if on)


@ft.cache
def _grad_fn(adjoint, solver, adaptive, combo, dtype):
    """One compiled `eqx.filter_grad` per configuration, shared by every direction and
    save-time pattern (they are data)."""
    case = SOLVERS_BY_NAME[solver]
    save_t0, save_t1, save_ts = combo

    def loss(inputs):
        field, y0, args, t0, t1, ts = inputs
        sol = solve(
            field,
            y0,
            args,
            t0,
            t1,
            ts,
            adjoint=_ADJOINTS[adjoint],
            case=case,
            adaptive=adaptive,
            save_t0=save_t0,
            save_t1=save_t1,
            save_ts=save_ts,
        )
        return weighted_loss(sol.ys)

    return eqx.filter_jit(eqx.filter_grad(loss))


def _inputs(direction, kind, dtype=jnp.float64):
    t0, t1, ts = make_times(direction, kind, dtype)
    return (
        make_field(dtype),
        jnp.array([0.3, -0.5], dtype),
        make_args(dtype),
        t0,
        t1,
        ts,
    )


def _compare(adjoint, solver, adaptive, combo, direction, kind, dtype, bound):
    inputs = _inputs(direction, kind, dtype)
    got = _grad_fn(adjoint, solver, adaptive, combo, dtype)(inputs)
    want = _grad_fn("rca", solver, adaptive, combo, dtype)(inputs)
    label = (
        f"{adjoint} {solver} adaptive={adaptive} {_combo_id(combo)} {direction} {kind}"
    )
    assert_grads_close(got, want, bound, label=label)
    return got, want


def _kinds(combo):
    # Save-time patterns only matter when `ts` is saved.
    return ["interior", "touch", "repeat"] if combo[2] else ["interior"]


# Every combination with constant steps; adaptive steps on the richest one (the
# property test draws adaptive steps with every combination). The default first,
# then the rule per interval.
_GRID = [(combo, False) for combo in _COMBOS] + [((True, True, True), True)]
_GRID = [("gq", c, a) for c, a in _GRID] + [("gq-interval", c, a) for c, a in _GRID]


@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint, combo, adaptive",
    _GRID,
    ids=[f"{g}-{_combo_id(c)}-{'adaptive' if a else 'constant'}" for g, c, a in _GRID],
)
def test_saveat_grid(adjoint, combo, adaptive):
    case = SOLVERS_BY_NAME["Tsit5"]
    bound = grad_bound(case, adaptive)
    for direction in (1, -1):
        for kind in _kinds(combo):
            got, want = _compare(
                adjoint, "Tsit5", adaptive, combo, direction, kind, jnp.float64, bound
            )
            field, y0, args, t0, t1, ts = got
            # Non-array leaves of args get no gradient, as with the reference.
            assert (args["decay"], args["n"], args["name"]) == (None, None, None)
            # The comparison is not vacuous: the inputs that move a saved output
            # have gradients of size one.
            assert float(jnp.max(jnp.abs(y0))) > 1e-2
            if combo == (True, False, False):
                # Only y(t0) = y0 is saved: nothing else moves the loss.
                assert float(jnp.max(jnp.abs(field.weight))) == 0
                assert float(jnp.abs(args["scale"])) == 0
                assert float(jnp.abs(t0)) == 0
            else:
                assert float(jnp.max(jnp.abs(field.weight))) > 1e-2
                assert float(jnp.abs(args["scale"])) > 1e-2
            if not combo[1]:
                assert float(t1) == 0
            if not combo[2]:
                assert float(jnp.max(jnp.abs(ts))) == 0


# The default's backward solve steps across save times, carrying their cotangents into
# a step through the solver's dense output. Tsit5's runs the grid above; Euler's
# (linear) and Dopri8's (the 7th-order interpolant) here, over every save-time pattern
# (touching the ends, repeated) in both directions, with constant steps (the backward
# steps then fall elsewhere than the forward's) and adaptive ones.
_DENSE_GRID = [
    ("Euler", (False, True, True), False),
    ("Dopri8", (True, False, True), True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver, combo, adaptive",
    _DENSE_GRID,
    ids=[
        f"{s}-{_combo_id(c)}-{'adaptive' if a else 'constant'}"
        for s, c, a in _DENSE_GRID
    ],
)
def test_crossing_saves_through_dense_output(solver, combo, adaptive):
    bound = grad_bound(SOLVERS_BY_NAME[solver], adaptive)
    for direction in (1, -1):
        for kind in _kinds(combo):
            got, _ = _compare(
                "gq", solver, adaptive, combo, direction, kind, jnp.float64, bound
            )
            assert float(jnp.max(jnp.abs(got[0].weight))) > 1e-2


# One solver of each structure besides Tsit5 (which runs the whole grid above): no
# FSAL and order 1, FSAL and order 3, and many stages (order 8). Every solver of the
# shared list also runs `test_adjoint.py::test_every_explicit_rk_solver`, and adaptive
# steps of every solver are drawn by the property test.
_STRUCTURES = ("Euler", "Bosh3", "Dopri8")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in SOLVERS if c.name in _STRUCTURES], ids=lambda c: c.name
)
def test_every_solver(case):
    # The richest SaveAt (t0, t1 and ts touching both ends with a repeated time) in
    # both directions, with constant steps.
    adaptive = False
    bound = grad_bound(case, adaptive)
    for direction in (1, -1):
        _compare(
            "gq",
            case.name,
            adaptive,
            (True, True, True),
            direction,
            "touch",
            jnp.float64,
            bound,
        )


@pytest.mark.slow
def test_time_gradients_are_the_vector_field():
    # dL/dts_k = g_k . f(ts_k, y(ts_k)) and dL/dt1 likewise; for a saved y(t0) = y0
    # moving t0 moves nothing but the rest of the solution: check GQ's time gradients
    # against finite differences of the loss, independently of any adjoint.
    combo = (True, True, True)
    inputs = _inputs(1, "interior")
    got = _grad_fn("gq", "Dopri8", False, combo, jnp.float64)(inputs)
    value = eqx.filter_jit(
        lambda inputs: weighted_loss(
            solve(
                *inputs,
                adjoint=_ADJOINTS["rca"],
                case=SOLVERS_BY_NAME["Dopri8"],
                adaptive=False,
                save_t0=True,
                save_t1=True,
            ).ys
        )
    )
    field, y0, args, t0, t1, ts = inputs
    eps = 1e-6
    for name, index in [("t0", 3), ("t1", 4)]:
        bumped = [list(inputs), list(inputs)]
        bumped[0][index] = inputs[index] + eps
        bumped[1][index] = inputs[index] - eps
        fd = (value(tuple(bumped[0])) - value(tuple(bumped[1]))) / (2 * eps)
        assert abs(float(got[index]) - float(fd)) < 1e-6 * max(1, abs(float(fd))), name
    for k in range(4):
        up = ts.at[k].add(eps)
        down = ts.at[k].add(-eps)
        fd = (
            value((field, y0, args, t0, t1, up))
            - value((field, y0, args, t0, t1, down))
        ) / (2 * eps)
        assert abs(float(got[5][k]) - float(fd)) < 1e-6 * max(1, abs(float(fd))), k


#
# vmap, both orders with grad
#


def _vmap_loss(params, y0, t1, adjoint, dtype):
    field, args = params
    ts = jnp.stack([0.25 * t1, 0.5 * t1, 0.5 * t1, t1])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Dopri5(),
        jnp.asarray(0.0, dtype),
        t1,
        None,
        y0,
        args,
        saveat=dfx.SaveAt(t0=True, ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        adjoint=adjoint,
    )
    return weighted_loss(sol.ys)


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ["gq", "gq-interval"])
def test_vmap_both_orders(adjoint):
    # Per-sample y0 and horizons, among them a reverse-time one (t1 < t0 = 0): each
    # sample has its own direction, step count and (per interval) node count.
    # (float32 under vmap: test_adjoint.py's test_vmap_and_grad_orderings.)
    dtype = jnp.float64
    params = (make_field(dtype), make_args(dtype))
    y0s = jnp.array([[0.3, -0.5], [0.1, 0.2], [-0.4, 0.4]], dtype)
    t1s = jnp.array([1.0, 2.0, -1.5], dtype)
    bound = 1e-4 if dtype == jnp.float64 else 1e-3

    def per_sample(adjoint):
        grad = eqx.filter_grad(lambda p, y0, t1: _vmap_loss(p, y0, t1, adjoint, dtype))
        # Gradients with respect to the parameters only: the per-sample time
        # gradients in float32 are test_float32_time_gradients.
        return eqx.filter_jit(eqx.filter_vmap(grad, in_axes=(None, 0, 0)))(
            params, y0s, t1s
        )

    def of_mean(adjoint):
        loss = lambda p: jnp.mean(
            jax.vmap(lambda y0, t1: _vmap_loss(p, y0, t1, adjoint, dtype))(y0s, t1s)
        )
        return eqx.filter_jit(eqx.filter_grad(loss))(params)

    gq, rca = _ADJOINTS[adjoint], _ADJOINTS["rca"]
    per_gq = per_sample(gq)
    assert_grads_close(per_gq, per_sample(rca), bound, label="vmap(grad)")
    mean_gq = of_mean(gq)
    assert_grads_close(mean_gq, of_mean(rca), bound, label="grad(vmap)")
    # The two orders agree with each other.
    averaged = jtu.tree_map(lambda g: jnp.mean(g, axis=0), per_gq)
    assert_grads_close(averaged, mean_gq, bound, label="mean of vmap(grad)")
    assert jtu.tree_leaves(mean_gq)[0].dtype == dtype


#
# float32
#


@ft.cache
def _grad_without_times(adjoint):
    def loss(diff, times):
        sol = solve(
            *diff,
            *times,
            adjoint=_ADJOINTS[adjoint],
            case=SOLVERS_BY_NAME["Tsit5"],
            adaptive=True,
            save_t0=True,
            save_t1=True,
        )
        return weighted_loss(sol.ys)

    return eqx.filter_jit(eqx.filter_grad(loss))


@pytest.mark.slow
def test_float32_parameters_and_state():
    # Gradients with respect to everything but the times (which have their own test).
    bound = grad_bound(SOLVERS_BY_NAME["Tsit5"], True, jnp.float32)
    for direction in (1, -1):
        inputs = _inputs(direction, "touch", jnp.float32)
        diff, times = inputs[:3], inputs[3:]
        got = _grad_without_times("gq")(diff, times)
        want = _grad_without_times("rca")(diff, times)
        assert_grads_close(got, want, bound, label=f"float32 {direction}")
        assert all(g.dtype == jnp.float32 for g in jtu.tree_leaves(got))


@pytest.mark.slow
def test_float32_time_gradients():
    # Forced strict here, so that the test does not depend on conftest's setting.
    with jax.numpy_dtype_promotion("strict"):
        got, want = _compare(
            "gq",
            "Tsit5",
            True,
            (True, True, True),
            1,
            "touch",
            jnp.float32,
            grad_bound(SOLVERS_BY_NAME["Tsit5"], True, jnp.float32),
        )
    assert got[3].dtype == got[4].dtype == got[5].dtype == jnp.float32
