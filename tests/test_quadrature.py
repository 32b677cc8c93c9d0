import jax.numpy as jnp
import numpy as np
import pytest

import gqdiffrax
from gqdiffrax import gauss_legendre
from gqdiffrax._quadrature import interval_rule, num_nodes, tolerance_nodes


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


def test_tolerance_nodes_follow_tolerance_and_steps():
    lengths = jnp.array([0.0, 1e-3, 0.1, 1.0])
    rule = lambda steps, rtol, order=5: tolerance_nodes(
        steps, lengths, 1.0, order=order, rtol=rtol, max_nodes=64
    )
    n = rule(10, 1e-6)
    # No nodes on an empty interval; one on an interval far shorter than a step.
    assert int(n[0]) == 0 and int(n[1]) == 1
    # More nodes for longer intervals, tighter tolerances, more steps.
    assert jnp.all(jnp.diff(n) >= 0) and int(n[-1]) > int(n[-2])
    # At a fixed step count a tighter tolerance also means a smoother integrand on
    # the scale of a step ($\rho$ shrinks), so the count need not grow with it.
    assert jnp.all(rule(10, 1e-9) >= n)
    assert jnp.all(rule(40, 1e-6) >= n) and int(rule(40, 1e-6)[-1]) > int(n[-1])
    # The cap.
    assert int(rule(10**6, 1e-12)[-1]) == 64


def test_tolerance_nodes_meet_their_error_model():
    # The rule's promise on an integrand that varies on the modelled time scale:
    # g(t) = cos(lambda t) with lambda h = rho, h the step. The n-point rule it picks
    # integrates g over s steps to about the tolerance; n - 1 points do not.
    for rtol, steps in [(1e-4, 3.0), (1e-6, 5.0), (1e-8, 8.0)]:
        order = 5
        rho = rtol ** (1 / (order + 1))
        n = int(
            tolerance_nodes(
                steps, jnp.ones(1), 1.0, order=order, rtol=rtol, max_nodes=64
            )[0]
        )
        lam = steps * rho  # One unit of time holds `steps` steps.
        exact = np.sin(lam) / lam

        def err(m):
            x, w = gauss_legendre(m)
            return abs(np.sum(0.5 * w * np.cos(lam * (x + 1) / 2)) - exact) / abs(exact)

        assert err(n) <= 10 * rtol
        assert n == 1 or err(n - 1) > rtol / 10
