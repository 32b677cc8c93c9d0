import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import gqdiffrax
from gqdiffrax._quadrature import interval_rule, make_node_sum, num_nodes
from gqdiffrax._step import GaussStep, ParamField

from .helpers import assert_tree_allclose


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64])
def test_exact_for_degree_2n_minus_1(n):
    x, w = gqdiffrax.gauss_legendre(n)
    assert x.shape == w.shape == (n,)
    assert np.all(np.diff(x) > 0)
    for degree in range(2 * n):
        exact = 0.0 if degree % 2 else 2.0 / (degree + 1)
        # Legendre polynomials are the well-conditioned way to check high degrees;
        # monomials up to degree 2n-1 are checked where they are representable.
        if degree <= 30:
            assert abs(np.sum(w * x**degree) - exact) < 1e-13
    for degree in range(2 * n):
        coef = np.zeros(degree + 1)
        coef[-1] = 1.0
        p = np.polynomial.legendre.legval(x, coef)
        exact = 2.0 if degree == 0 else 0.0
        assert abs(np.sum(w * p) - exact) < 1e-13


def test_not_exact_beyond_degree_2n_minus_1():
    # The rule is exact up to degree 2n - 1 and no further: P_{2n} is not integrated
    # to zero. This guards against a rule that silently has fewer nodes.
    n = 5
    x, w = gqdiffrax.gauss_legendre(n)
    coef = np.zeros(2 * n + 1)
    coef[-1] = 1.0
    assert abs(np.sum(w * np.polynomial.legendre.legval(x, coef))) > 1e-3


@pytest.mark.parametrize("n", [0, 65, -1])
def test_bad_n(n):
    with pytest.raises(ValueError, match="1 <= n <= 64"):
        gqdiffrax.gauss_legendre(n)


def test_bad_n_type():
    with pytest.raises(TypeError):
        gqdiffrax.gauss_legendre(3.0)


def test_node_rule_count_and_cap():
    # n = ceil(C * NFE * length / span), capped.
    assert int(num_nodes(0.1, 26, 1.0, 1.0, 64)) == 3
    assert int(num_nodes(0.1, 20, 1.0, 1.0, 64)) == 2
    assert int(num_nodes(0.1, 5000, 1.0, 1.0, 64)) == 64
    assert int(num_nodes(0.1, 5000, 1.0, 1.0, 10)) == 10
    # At least one node on an interval of positive length, none on an empty one.
    assert int(num_nodes(1e-6, 10, 0.5, 1.0, 64)) == 1
    assert int(num_nodes(0.1, 100, 0.0, 1.0, 64)) == 0


def test_node_rule_per_interval_split():
    # 50 equal intervals of a solve with NFE 1000 and C = 0.1: 100 nodes in total,
    # ceil(2.0) = 2 per interval; unequal intervals get nodes in proportion.
    lengths = jnp.full(50, 2 * jnp.pi / 50)
    counts = num_nodes(0.1, 1000, lengths, 2 * jnp.pi, 64)
    assert counts.tolist() == [2] * 50
    counts = num_nodes(0.1, 1000, jnp.array([0.1, 0.3, 0.6]), 1.0, 64)
    assert counts.tolist() == [10, 30, 60]


@pytest.mark.parametrize("n", [0, 1, 4, 64])
def test_interval_rule_integrates_polynomials(n):
    t_start, t_end = jnp.array(0.3), jnp.array(1.7)
    times, weights = interval_rule(jnp.array(n), t_start, t_end, 64)
    assert times.shape == weights.shape == (64,)
    # Nodes are visited from t_end down to t_start; padding sits at t_start.
    assert jnp.all(jnp.diff(times) <= 0)
    assert jnp.all((times >= t_start) & (times <= t_end))
    assert jnp.all(weights[n:] == 0) and jnp.all(times[n:] == t_start)
    if n > 0:
        degree = 2 * n - 1
        approx = jnp.sum(weights * times**degree)
        exact = (t_end ** (degree + 1) - t_start ** (degree + 1)) / (degree + 1)
        assert jnp.allclose(approx, exact, rtol=1e-12)


#
# The quadrature sum of an interval
#


def _param_field():
    """A `ParamField` of dy/dt = p * sin(y) * (1 + t) on a 2-vector, whose parameters
    `theta` are `args = p` (the term is held fixed)."""
    term = dfx.ODETerm(lambda t, y, p: p * jnp.sin(y) * (1 + t))
    theta, rest = eqx.partition((jnp.array([0.7, -1.3]), term), (True, False))
    arrays, static = eqx.partition(rest, eqx.is_array)
    return ParamField(arrays, static, jnp.array(1.0)), theta


def _rows(key, num):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    ts = jax.random.uniform(k1, (num,))
    ws = jax.random.uniform(k2, (num,))
    zs = jax.random.normal(k3, (num, 2))
    as_ = jax.random.normal(k4, (num, 2))
    return ts, ws, zs, as_


@jax.jit
def _direct_sum(field, theta, ts, ws, zs, as_, n):
    """$\\sum_{j<n} w_j a_j^\\top \\partial f/\\partial\\theta(t_j, z_j)$, as the
    gradient of $\\sum_{j<n} w_j a_j^\\top f(t_j, z_j)$."""
    ws = jnp.where(jnp.arange(ws.shape[0]) < n, ws, 0.0)

    def weighted(th):
        fs = jax.vmap(lambda t, z: field(th, t, z))(ts, zs)
        return jnp.sum(ws[:, None] * as_ * fs)

    return jax.grad(weighted)(theta)


@pytest.mark.parametrize("chunk", [3, 1, 8])
def test_node_sum_evaluates_exactly_n_rows(chunk):
    # 11 rows: with chunks of 3, n = 11 is three full chunks and pieces of 2 (the
    # binary digits of 11 mod 3). Rows from n on hold NaN states: a sum that
    # evaluated one of them, even with weight zero, would be NaN.
    field, theta = _param_field()
    ts, ws, zs, as_ = _rows(jax.random.key(0), 11)
    node_sum = jax.jit(make_node_sum(chunk))
    acc = jtu.tree_map(jnp.ones_like, theta)
    for n in [0, 1, 2, 5, 6, 11]:
        poisoned = zs.at[n:].set(jnp.nan)
        got = node_sum(field, theta, acc, ts, ws, poisoned, as_, jnp.array(n))
        want = _direct_sum(field, theta, ts, ws, zs, as_, n)
        want = jtu.tree_map(jnp.add, acc, want)
        assert_tree_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_node_sum_under_vmap_follows_the_largest_count():
    # Per-sample node counts: the batch evaluates max(n) rows of every sample, so a
    # sample's rows from its own n on must carry weight zero (as `interval_rule`
    # pads them); rows from max(n) on are never evaluated (NaN states).
    field, theta = _param_field()
    counts = jnp.array([2, 7, 0])
    rows = jax.vmap(lambda k: _rows(k, 9))(jax.random.split(jax.random.key(1), 3))
    ts, ws, zs, as_ = rows
    ws = jnp.where(jnp.arange(9)[None, :] < counts[:, None], ws, 0.0)
    poisoned = zs.at[:, int(jnp.max(counts)) :].set(jnp.nan)
    acc = jtu.tree_map(jnp.zeros_like, theta)
    node_sum = make_node_sum(4)
    got = jax.jit(jax.vmap(node_sum, in_axes=(None, None, None, 0, 0, 0, 0, 0)))(
        field, theta, acc, ts, ws, poisoned, as_, counts
    )
    for i, n in enumerate(counts.tolist()):
        want = _direct_sum(field, theta, ts[i], ws[i], zs[i], as_[i], n)
        assert_tree_allclose(jtu.tree_map(lambda g: g[i], got), want, rtol=1e-12)


#
# The rules as objects
#


def test_rules_are_public_and_default():
    assert isinstance(gqdiffrax.StepGauss(), gqdiffrax.AbstractQuadrature)
    assert isinstance(gqdiffrax.IntervalGauss(), gqdiffrax.AbstractQuadrature)
    assert gqdiffrax.StepGauss.crosses_saves
    assert not gqdiffrax.IntervalGauss.crosses_saves
    rule = gqdiffrax.IntervalGauss()
    assert (rule.C, rule.max_nodes, rule.node_chunk) == (0.1, 64, 8)


def test_bounds():
    # StepGauss stops only at the split times and the last save time (it crosses the
    # others); IntervalGauss at every row, split times included (they are rows).
    times = jnp.array([0.5, 1.0, 1.5, 2.0])
    splits = jnp.array([0.7, 1.2])
    step, interval = gqdiffrax.StepGauss(), gqdiffrax.IntervalGauss()
    assert step.bounds(times, None).tolist() == [2.0]
    assert step.bounds(times, splits).tolist() == [0.7, 1.2, 2.0]
    assert interval.bounds(times, None).tolist() == times.tolist()
    assert interval.bounds(times, splits).tolist() == times.tolist()


def test_node_counts():
    lengths = jnp.array([0.0, 0.1, 0.3, 0.6])
    for rule in [
        gqdiffrax.IntervalGauss(),
        gqdiffrax.IntervalGauss(C=2.0, max_nodes=16),
    ]:
        got = rule.node_counts(jnp.array(200), lengths, 1.0)
        want = num_nodes(rule.C, 200, lengths, 1.0, rule.max_nodes)
        assert got.tolist() == want.tolist()
    assert gqdiffrax.IntervalGauss(C=2.0, max_nodes=16).node_counts(
        200, lengths, 1.0
    ).tolist() == [0, 16, 16, 16]
    # The per-step rule places no nodes of its own: its steps carry them.
    counts = gqdiffrax.StepGauss().node_counts(jnp.array(200), lengths, 1.0)
    assert counts.tolist() == [0, 0, 0, 0]


def test_node_times():
    t_start, t_end = jnp.array(0.25), jnp.array(1.0)
    rule = gqdiffrax.IntervalGauss(max_nodes=12)
    got = rule.node_times(jnp.array(5), t_start, t_end)
    want = interval_rule(jnp.array(5), t_start, t_end, 12)
    assert_tree_allclose(got, want, rtol=0, atol=0)
    assert gqdiffrax.StepGauss().node_times(jnp.array(5), t_start, t_end) == (
        None,
        None,
    )


@pytest.mark.parametrize("order, nodes", [(1, 1), (2, 2), (4, 3), (5, 3), (8, 5)])
def test_step_solver_rule_matches_the_order(order, nodes):
    # ceil((p + 1) / 2) Gauss nodes per step: exact for degree 2 * nodes - 1 >= p, so
    # the quadrature is as accurate as a step of an order-p solver.
    field, theta = _param_field()
    solver = dfx.Tsit5()
    step = gqdiffrax.StepGauss().step_solver(solver, order, field, theta, None)
    assert isinstance(step, GaussStep) and step.solver is solver
    x, w = gqdiffrax.gauss_legendre(nodes)
    assert np.allclose(step.nodes, x, rtol=0, atol=0)
    assert np.allclose(step.weights, w, rtol=0, atol=0)
    # Nothing to differentiate: no nodes.
    no_theta = jtu.tree_map(lambda _: None, theta)
    step = gqdiffrax.StepGauss().step_solver(solver, order, field, no_theta, None)
    assert step.nodes == ()
    # The per-interval rule leaves the backward solver as it is.
    interval = gqdiffrax.IntervalGauss()
    assert interval.step_solver(solver, order, field, theta, None) is solver
