"""Property-based test: the default GQAdjoint(), and the paper's rule per interval
GQAdjoint(IntervalGauss(C=10)), agree with RecursiveCheckpointAdjoint on random
configurations (issue 13, §4).

A configuration has a *structure* (state pytree, args pytree with non-array leaves,
SaveAt combination, solver from the shared list, constant or adaptive steps, dtype,
number of save times, and which of the two GQ adjoints)
and *data* (direction, horizon, save times with ties and touching the ends, the
initial state). Compilation dominates the cost, so structures are drawn from a pool and
each structure compiles once (`_grad_fn` is cached); the data varies freely. The fast
tier draws from a small pool, the slow tier from the full product.

The bound is the shared solver list's `grad_bound` (tests/helpers.py): the agreement
measured over the SaveAt grid times about ten, i.e. 100 * rtol for adaptive steps and
about 10 * dt0**order (scaled) for constant steps; in float32 at least 3e-4 (rounding).
It catches a gradient that is wrong by a part in a thousand: checked by running the
fast tier (the default) against local copies of the library with a planted bug.
Parameter gradients scaled by 1.001: caught on the first example (error 3.0e-4, bound
1e-4). One Gauss node fewer on every backward step (two for Tsit5 and Dopri5, not
three): caught on the sixth (1.5e-4). The `SaveAt(t0=True)` cotangent to y0 dropped:
caught on the first (1.7e-1).

Every draw differentiates the times too, float32 included (float32 time gradients once
failed under strict promotion: test_adjoint_grid's test_float32_time_gradients).
"""

import functools as ft
import itertools

import diffrax as dfx
import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import gqdiffrax

from .helpers import (
    controller,
    grad_errors,
    make_mix_field,
    SOLVERS,
    SOLVERS_BY_NAME,
    weighted_loss,
)


_ADJOINTS = {
    # The default: a Gauss rule on every backward step, stepping across save times.
    "gq": gqdiffrax.GQAdjoint(),
    # The paper's rule per interval, with ten times its node count.
    "gq-interval": gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=10.0)),
    "rca": dfx.RecursiveCheckpointAdjoint(),
    # The same, at a tolerance far below the bound: the exact gradient.
    "exact": dfx.RecursiveCheckpointAdjoint(),
}
FLOAT32_BOUND = 3e-4


def _state(kind, values, dtype):
    v = [jnp.asarray(x, dtype) for x in values]
    return {
        "vector": jnp.stack(v[:3]),
        "tuple": (jnp.stack(v[:2]), jnp.stack(v[2:4])),
        "nested": {
            "a": (v[0], jnp.stack(v[1:3])),
            "b": jnp.stack(v[3:7]).reshape(2, 2),
        },
        "scalar": v[0],
    }[kind]


# Readers of `(scale, decay)` from each args structure. Module-level functions, not
# lambdas: they are static fields of the vector field, and a new lambda per example
# would recompile every example.
def _read_array(a):
    return a, 0.1


def _read_tuple_mixed(a):
    return a[0], a[1] * a[2] / 2


def _read_dict_mixed(a):
    return a["scale"], a["decay"]


def _read_python(a):
    return a[:2]


def _read_nested_mixed(a):
    return a["p"][0] * a["p"][1][0] / 3, a["q"] * 2


def _args(kind, scale, dtype):
    """args of each structure, with its reader of `(scale, decay)`."""
    scale = jnp.asarray(scale, dtype)
    return {
        "array": (scale, _read_array),
        "tuple-mixed": ((scale, 0.1, 2, "s"), _read_tuple_mixed),
        "dict-mixed": (
            {"scale": scale, "decay": jnp.asarray(0.1, dtype), "name": "x", "n": None},
            _read_dict_mixed,
        ),
        "python": ((0.8, 0.1, "s"), _read_python),
        "nested-mixed": (
            {"p": [scale, (jnp.array(3), "s")], "q": 0.05},
            _read_nested_mixed,
        ),
    }[kind]


# A few structures' compiled gradients at a time: a slow-tier run that kept all of
# them (hundreds) crashed XLA's compiler in the worker (a segmentation fault).
@ft.lru_cache(maxsize=6)
def _grad_fn(adjoint, structure):
    state, args_kind, combo, solver, adaptive, dtype, num_ts, _ = structure
    case = SOLVERS_BY_NAME[solver]
    save_t0, save_t1, save_ts = combo

    def loss(diff, rest):
        (field, y0, args, t0, t1, ts), () = diff, rest
        dt0 = None
        if not adaptive:
            dt0 = (jnp.sign(t1 - t0) * case.dt0).astype(t0.dtype)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            case.solver,
            t0,
            t1,
            dt0,
            y0,
            args,
            saveat=dfx.SaveAt(t0=save_t0, t1=save_t1, ts=ts if save_ts else None),
            stepsize_controller=(
                dfx.PIDController(rtol=1e-12, atol=1e-12)
                if adjoint == "exact"
                else controller(case, adaptive)
            ),
            adjoint=_ADJOINTS[adjoint],
            max_steps=4096,
        )
        return weighted_loss(sol.ys)

    return eqx.filter_jit(eqx.filter_grad(loss))


def _bound(structure):
    _, _, _, solver, adaptive, dtype, _, _ = structure
    case = SOLVERS_BY_NAME[solver]
    bound = case.adaptive_bound if adaptive else case.const_bound
    return max(bound, FLOAT32_BOUND) if dtype == "float32" else bound


_STATES = ["vector", "tuple", "nested", "scalar"]
_ARGS = ["array", "tuple-mixed", "dict-mixed", "python", "nested-mixed"]
_COMBOS = [c for c in itertools.product([False, True], repeat=3) if any(c)]
_SOLVER_STEPS = [(c.name, False) for c in SOLVERS] + [
    (c.name, True) for c in SOLVERS if c.adaptive
]

# The fast tier's pool: structures that between them cover nested, scalar and tuple
# states, mixed args, three SaveAt combinations, both dtypes, adaptive steps and many
# save times (which the default steps across and the rule per interval stops at). The
# adjoint is a parameter of the test: the default first (the fast tier), then the rule
# per interval.
_FAST_POOL = [
    ("nested", "nested-mixed", (True, True, True), "Tsit5", True, "float64", 3),
    ("scalar", "dict-mixed", (False, False, True), "Dopri5", True, "float32", 3),
    ("tuple", "array", (True, False, True), "Dopri5", True, "float64", 16),
]

_full_structures = st.tuples(
    st.sampled_from(_STATES),
    st.sampled_from(_ARGS),
    st.sampled_from(_COMBOS),
    st.sampled_from(_SOLVER_STEPS),
    st.sampled_from(["float64", "float32"]),
    st.sampled_from([1, 3, 16]),
    st.sampled_from(["gq", "gq-interval"]),
).map(lambda s: (s[0], s[1], s[2], s[3][0], s[3][1], s[4], s[5], s[6]))

# Save-time fractions of the horizon: the ends, ties and anything in between.
_fraction = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0, allow_subnormal=False)
)


@st.composite
def _configs(draw, structures):
    structure = draw(structures)
    num_ts = structure[6]
    data = dict(
        direction=draw(st.sampled_from([1, -1])),
        t_start=draw(st.sampled_from([0.0, -0.5, 1.0])),
        horizon=draw(st.floats(0.5, 2.0)),
        fractions=sorted(draw(st.lists(_fraction, min_size=num_ts, max_size=num_ts))),
        values=draw(st.lists(st.floats(-1.0, 1.0), min_size=7, max_size=7)),
        scale=draw(st.floats(0.3, 1.2)),
    )
    return structure, data


def _inputs(structure, data):
    state, args_kind, _, _, _, dtype, _, _ = structure
    dtype = jnp.dtype(dtype)
    y0 = _state(state, data["values"], dtype)
    args, read = _args(args_kind, data["scale"], dtype)
    t0 = data["t_start"]
    t1 = t0 + data["direction"] * data["horizon"]
    ts = np.asarray([t0 + (t1 - t0) * f for f in data["fractions"]])
    # Ends exactly at t0 and t1, as a user would write them.
    ts = np.where(np.asarray(data["fractions"]) == 1.0, t1, ts)
    times = tuple(jnp.asarray(x, dtype) for x in (t0, t1, ts))
    diff = (make_mix_field(y0, read, dtype), y0, args)
    return diff + times, ()


def _check(structure, data):
    inputs = _inputs(structure, data)
    got = _grad_fn(structure[-1], structure)(*inputs)
    want = _grad_fn("rca", structure)(*inputs)
    errors = grad_errors(got, want)
    bound = _bound(structure)
    if max(errors) > bound and structure[4] and structure[5] == "float64":
        # Adaptive steps: the direct method is accurate to the tolerance too, not
        # exact; past the bound, judge GQ against the exact gradient instead.
        exact = _grad_fn("exact", structure)(*inputs)
        errors = grad_errors(got, exact)
    assert max(errors) <= bound, (structure, data, errors, bound)


# Every failing example hypothesis ever found, kept as explicit regressions. The first
# two pin edge cases a random draw reaches only rarely: reverse time with save times on
# both ends, and every save time repeated at t0. The third is the one failure the slow
# tier (300 examples) found: constant-step Tsit5 on a tuple state, where the time
# gradients differ from the direct method's by 1.2e-10, over the bound of 1e-10 then
# in force. It is the discretisation gap between the continuous time gradient
# (g . f(t_k, y(t_k))) and the derivative of Tsit5's dense output, not a bug; the
# constant-step bound of Tsit5 in tests/helpers.py is now 1e-9. They were found with
# the rule per interval (then the tested GQ); each runs with both rules.
_REGRESSIONS = [
    (
        ("tuple", "array", (False, False, True), "Tsit5", False, "float64", 1, "gq"),
        dict(
            direction=1,
            t_start=0.0,
            horizon=0.5,
            fractions=[0.5],
            values=[0.0] * 7,
            scale=1.0,
        ),
    ),
    (
        _FAST_POOL[0] + ("gq",),
        dict(
            direction=-1,
            t_start=0.0,
            horizon=1.5,
            fractions=[0.0, 0.5, 1.0],
            values=[0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.6],
            scale=0.8,
        ),
    ),
    (
        ("tuple", "tuple-mixed", (False, True, True), "Bosh3", False, "float64", 3)
        + ("gq",),
        dict(
            direction=1,
            t_start=-0.5,
            horizon=2.0,
            fractions=[0.0, 0.0, 0.0],
            values=[0.9, -0.7, 0.5, 0.1, -0.4, 0.2, 0.6],
            scale=1.2,
        ),
    ),
    # The slow tier's second find (300 examples): Dopri5 at rtol 1e-6 on a nested
    # state starting almost at rest. GQ is within 2.6e-6 of the exact gradient, the
    # direct method 1.5e-4 off it: the direct method's error, now judged that way.
    (
        ("nested", "array", (False, False, True), "Dopri5", True, "float64", 3, "gq"),
        dict(
            direction=1,
            t_start=0.0,
            horizon=1.0262349811488354,
            fractions=[0.0, 0.5, 0.5],
            values=[0.0, 0.0, -0.8538624691932513, 0.0, 0.0, 0.0, 0.0],
            scale=0.3,
        ),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("adjoint", ["gq", "gq-interval"])
@pytest.mark.parametrize("structure, data", _REGRESSIONS)
def test_regressions(structure, data, adjoint):
    _check(structure[:-1] + (adjoint,), data)


@hypothesis.settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@pytest.mark.parametrize("adjoint", ["gq", "gq-interval"])
@hypothesis.given(config=_configs(st.sampled_from(_FAST_POOL)))
def test_gq_matches_recursive_checkpoint(adjoint, config):
    structure, data = config
    _check(structure + (adjoint,), data)


@pytest.mark.slow
@hypothesis.settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: it once spent over five minutes on a failure whose example was
    # already printed. A failure is kept in _REGRESSIONS as found.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(_configs(_full_structures))
def test_gq_matches_recursive_checkpoint_full(config):
    _check(*config)
