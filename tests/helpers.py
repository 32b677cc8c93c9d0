"""Small shared helpers for the test suite: tree comparisons, finite differences, the
shared solver list and the problem builders the adjoint tests draw from."""

import dataclasses

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """True when two pytrees have the same structure and close leaves."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol)


def assert_tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Like `np.testing.assert_allclose`, leaf by leaf, with a useful message."""
    xs, xdef = jtu.tree_flatten(x)
    ys, ydef = jtu.tree_flatten(y)
    assert xdef == ydef, f"structures differ: {xdef} vs {ydef}"
    for a, b in zip(xs, ys):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def finite_difference_grad(f, x, *, eps=1e-6):
    """Central finite differences of a scalar function of a pytree of float64 arrays."""
    leaves, treedef = jtu.tree_flatten(x)
    grads = []
    for i, leaf in enumerate(leaves):
        leaf = np.asarray(leaf, dtype=np.float64)
        g = np.zeros_like(leaf)
        for idx in np.ndindex(leaf.shape):
            for sign in (1.0, -1.0):
                bumped = leaf.copy()
                bumped[idx] += sign * eps
                new_leaves = list(leaves)
                new_leaves[i] = jnp.asarray(bumped)
                value = float(f(jtu.tree_unflatten(treedef, new_leaves)))
                g[idx] += sign * value / (2 * eps)
        grads.append(jnp.asarray(g))
    return jtu.tree_unflatten(treedef, grads)


def random_pytree_like(key, x):
    """Random normal leaves shaped like the inexact arrays of `x`."""
    leaves, treedef = jtu.tree_flatten(x)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [
        jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
        for k, l in zip(keys, leaves)
    ]
    return jtu.tree_unflatten(treedef, new)


#
# Gradient comparisons with a bound scaled by the tolerance
#


def grad_errors(got, want):
    """Per-leaf error of `got` against the reference `want`, relative to the size of
    the reference leaf but never to less than 1: $\\max|g - g_\\mathrm{ref}| /
    \\max(1, \\max|g_\\mathrm{ref}|)$. The floor keeps entries that are zero up to
    rounding (a time gradient of a stationary output) from demanding relative
    accuracy they cannot have.

    The two trees must have the same structure, `None` leaves included (what
    `eqx.filter_grad` gives non-differentiable inputs): a gradient where the
    reference has none, or the other way round, is an error in itself."""
    got_leaves, got_def = jtu.tree_flatten(got)
    want_leaves, want_def = jtu.tree_flatten(want)
    assert got_def == want_def, f"gradient structures differ:\n{got_def}\n{want_def}"
    errors = []
    for g, w in zip(got_leaves, want_leaves):
        assert jnp.shape(g) == jnp.shape(w), (jnp.shape(g), jnp.shape(w))
        assert jnp.result_type(g) == jnp.result_type(w), (g.dtype, w.dtype)
        # Complex leaves keep their imaginary parts: the error is a modulus.
        dtype = np.complex128 if jnp.iscomplexobj(w) else np.float64
        g = np.asarray(g, dtype)
        w = np.asarray(w, dtype)
        assert np.all(np.isfinite(g)), g
        scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
        errors.append(float(np.max(np.abs(g - w), initial=0.0)) / scale)
    return errors


def relative_error(x, y):
    """$\\|x - y\\| / \\|y\\|$ over all the leaves of two pytrees together."""
    x, y = (jnp.concatenate([jnp.ravel(a) for a in jtu.tree_leaves(t)]) for t in (x, y))
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


def assert_grads_close(got, want, bound, *, label=""):
    """Every leaf of `got` within `bound` of `want` in the sense of `grad_errors`."""
    errors = grad_errors(got, want)
    worst = max(errors, default=0.0)
    shown = ", ".join(f"{e:.1e}" for e in errors)
    assert worst <= bound, f"{label} errors [{shown}] > {bound:.1e}"


#
# The shared solver list
#


@dataclasses.dataclass(frozen=True)
class SolverCase:
    """An explicit Runge–Kutta solver and what the adjoint tests may expect of it.

    `per_step` and `at_t0` count vector-field evaluations (NFE = at_t0 + per_step *
    steps, `at_t0` is the FSAL evaluation). The tolerances are for the unit-scale
    problems below (horizon <= 2, Lipschitz constant about 1):

    - constant steps of `dt0` give a global error of about `dt0**order`, and GQ and
      `RecursiveCheckpointAdjoint` (the exact derivative of the discrete solve) then
      agree to `const_bound`, relative in the sense of `grad_errors`;
    - adaptive steps with `PIDController(rtol=rtol, atol=rtol)` (only for solvers with
      an error estimate) agree to `adaptive_bound`.

    The bounds are the agreement measured on the `Field` problem below over the SaveAt
    grid in both directions (Euler 3e-2; Heun 1e-4 constant, 2e-6 adaptive; Midpoint
    and Ralston 5e-3 and 2e-4, see below; Bosh3 4e-7 and 1e-5; Tsit5, Dopri5 and
    Dopri8 below 1e-12 constant and 1e-5 adaptive) times a safety factor of about 10.
    An adaptive bound of 100 * rtol is what "accurate to the tolerance" can promise
    for both methods together on a problem this well conditioned.
    """

    solver: dfx.AbstractSolver
    order: int
    per_step: int
    at_t0: int
    adaptive: bool
    dt0: float
    const_bound: float
    rtol: float | None
    adaptive_bound: float | None

    @property
    def name(self) -> str:
        return type(self.solver).__name__


SOLVERS = [
    SolverCase(dfx.Euler(), 1, 1, 0, False, 0.01, 1e-1, None, None),
    SolverCase(dfx.Heun(), 2, 2, 0, True, 0.02, 1e-3, 1e-6, 1e-4),
    # diffrax's dense output for Midpoint and Ralston is a Hermite cubic whose end
    # slope is the solver's last stage, taken at 1/2 (2/3) of the step rather than
    # at its end. RecursiveCheckpointAdjoint differentiates that cubic, so its
    # gradients with respect to save times (and t0, t1) are off by O(dt); GQ uses the
    # vector field at the save time. Their bounds are loose for that reason alone.
    SolverCase(dfx.Midpoint(), 2, 2, 0, True, 0.02, 5e-2, 1e-6, 3e-3),
    SolverCase(dfx.Ralston(), 2, 2, 0, True, 0.02, 5e-2, 1e-6, 3e-3),
    SolverCase(dfx.Bosh3(), 3, 3, 1, True, 0.02, 1e-5, 1e-6, 1e-4),
    # Constant steps: 1e-9, not 1e-10: the property test's slow tier measured 1.2e-10 on
    # time gradients of a tuple state (see its regressions).
    SolverCase(dfx.Tsit5(), 5, 6, 1, True, 0.02, 1e-9, 1e-6, 1e-4),
    SolverCase(dfx.Dopri5(), 5, 6, 1, True, 0.02, 1e-10, 1e-6, 1e-4),
    SolverCase(dfx.Dopri8(), 8, 13, 1, True, 0.02, 1e-12, 1e-6, 1e-4),
]
SOLVERS_BY_NAME = {case.name: case for case in SOLVERS}

# Rounding in float32 sets a floor under every comparison: about 1e3 * eps32, the
# error of a few hundred steps of unit-scale arithmetic.
FLOAT32_FLOOR = 1e-4


def grad_bound(case: SolverCase, adaptive: bool, dtype=jnp.float64) -> float:
    """The bound on `GQAdjoint()` (and `IntervalGauss(C=10)`) against
    `RecursiveCheckpointAdjoint` for `case`."""
    bound = case.adaptive_bound if adaptive else case.const_bound
    assert bound is not None, f"{case.name} has no error estimate: no adaptive steps"
    if jnp.dtype(dtype) == jnp.float32:
        bound = max(bound, FLOAT32_FLOOR)
    return bound


def controller(case: SolverCase, adaptive: bool):
    """The step-size controller of `case`: its PID tolerance, or constant steps."""
    if adaptive:
        return dfx.PIDController(rtol=case.rtol, atol=case.rtol)
    return dfx.ConstantStepSize()


#
# Problem builders
#


class Field(eqx.Module):
    """A time-dependent vector field on $\\mathbb{R}^2$ with module parameters and a
    non-array field, whose `args` are a dict with an array and non-array leaves."""

    weight: jax.Array
    bias: jax.Array
    activation: str = eqx.field(static=True, default="tanh")

    def __call__(self, t, y, args):
        act = {"tanh": jnp.tanh, "sin": jnp.sin}[self.activation]
        pre = self.weight @ y + self.bias * t
        return args["scale"] * act(pre) - args["decay"] * y


def make_field(dtype=jnp.float64) -> Field:
    weight = jnp.array([[0.5, -1.0], [1.0, 0.3]], dtype)
    return Field(weight, jnp.array([0.4, -0.2], dtype))


def make_args(dtype=jnp.float64) -> dict:
    """An array leaf, a Python float, an int and a string: only `scale` is
    differentiable."""
    return {"scale": jnp.asarray(0.8, dtype), "decay": 0.1, "n": 3, "name": "field"}


def make_times(direction: int, kind: str, dtype=jnp.float64):
    """`(t0, t1, ts)` on a horizon of length 2, forwards (`direction=1`) or backwards
    (`t0 > t1`), with four save times of the given kind:

    - `"interior"`: strictly between t0 and t1, distinct;
    - `"touch"`: the first equal to t0, the last equal to t1, one repeated (a
      zero-length interval);
    - `"repeat"`: every interval between save times of length zero except one.
    """
    fractions = {
        "interior": [0.15, 0.4, 0.65, 0.9],
        "touch": [0.0, 0.3, 0.3, 1.0],
        "repeat": [0.5, 0.5, 1.0, 1.0],
    }[kind]
    t0, t1 = (0.0, 2.0) if direction == 1 else (2.0, 0.0)
    ts = [t0 + (t1 - t0) * f for f in fractions]
    return jnp.asarray(t0, dtype), jnp.asarray(t1, dtype), jnp.asarray(ts, dtype)


def weighted_loss(ys):
    """A scalar of every saved state in which every entry and every save time has its
    own weight, so that a cotangent sent to the wrong save time or leaf shows."""
    total = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(ys)))
    for i, leaf in enumerate(jtu.tree_leaves(ys)):
        weights = jnp.arange(1, leaf.size + 1, dtype=leaf.dtype).reshape(leaf.shape)
        weights = weights / leaf.size + i
        total = total + jnp.sum(jnp.sin(leaf) * weights).astype(total.dtype)
    return total


def solve(
    vector_field,
    y0,
    args,
    t0,
    t1,
    ts,
    *,
    adjoint,
    case: SolverCase,
    adaptive: bool,
    save_t0=False,
    save_t1=False,
    save_ts=True,
    max_steps=4096,
):
    """`diffeqsolve` of one problem with `case`'s solver and controller; `ts` is
    ignored unless `save_ts`."""
    dt0 = None
    if not adaptive:
        dt0 = (jnp.sign(t1 - t0) * case.dt0).astype(jnp.result_type(t0))
    return dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        case.solver,
        t0,
        t1,
        dt0,
        y0,
        args,
        saveat=dfx.SaveAt(t0=save_t0, t1=save_t1, ts=ts if save_ts else None),
        stepsize_controller=controller(case, adaptive),
        adjoint=adjoint,
        max_steps=max_steps,
    )


class MixField(eqx.Module):
    """A linear-tanh field on any pytree state, coupling every entry of every leaf;
    `read` takes `(scale, decay)` out of whatever structure `args` has."""

    weight: jax.Array
    bias: jax.Array
    read: object = eqx.field(static=True)

    def __call__(self, t, y, args):
        leaves, treedef = jtu.tree_flatten(y)
        flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
        scale, decay = self.read(args)
        scale = jnp.asarray(scale).astype(flat.dtype)
        decay = jnp.asarray(decay).astype(flat.dtype)
        out = scale * jnp.tanh(self.weight @ flat + self.bias * t) - decay * flat
        pieces, start = [], 0
        for x in leaves:
            pieces.append(out[start : start + x.size].reshape(x.shape))
            start += x.size
        return jtu.tree_unflatten(treedef, pieces)


def make_mix_field(y0, read, dtype, key=0) -> MixField:
    n = sum(x.size for x in jtu.tree_leaves(y0))
    key1, key2 = jax.random.split(jax.random.key(key))
    weight = jax.random.normal(key1, (n, n), dtype) / float(np.sqrt(n))
    bias = jax.random.normal(key2, (n,), dtype) * 0.3
    return MixField(weight, bias, read)
