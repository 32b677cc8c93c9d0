"""Tests for the Karhunen–Loève Wiener surrogate and the Wong–Zakai / SDE terms."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
import scipy.special
import scipy.stats

import gqdiffrax

from .helpers import assert_tree_allclose, finite_difference_grad


# The paper's time-dependent Ornstein–Uhlenbeck process (Appendix F):
# dx = (mu t - theta x) dt + (sigma + phi t) o dW on [0, 10].
MU, THETA, SIGMA, PHI = 0.2, 0.1, 0.6, 0.15
OU_T0, OU_T1, OU_X0 = 0.0, 10.0, 1.0
OU_TS = np.array([2.5, 5.0, 7.5, 10.0])


def _truncated_cov(s, t, t0, t1, m):
    """Exact covariance of the m-term surrogate, sum_i 2c sin sin / ((i - 1/2) pi)^2."""
    c = t1 - t0
    k = (np.arange(1, m + 1) - 0.5) * np.pi
    s_part = np.sin(np.multiply.outer(np.asarray(s) - t0, k) / c)
    t_part = np.sin(np.multiply.outer(np.asarray(t) - t0, k) / c)
    return 2 * c * (s_part / k) @ (t_part / k).T


def _tail_bound(t0, t1, m):
    """sum_{i > m} 2c / ((i - 1/2) pi)^2 = 2c / pi^2 * trigamma(m + 1/2)."""
    return 2 * (t1 - t0) / np.pi**2 * scipy.special.polygamma(1, m + 0.5)


def _draws(key, m, shape=()):
    """The documented contract: xi_i = normal(fold_in(key, i)), i = 1..m."""
    return np.stack(
        [
            np.asarray(jr.normal(jr.fold_in(key, i), shape, jnp.float64))
            for i in range(1, m + 1)
        ]
    )


#
# The surrogate
#


def test_covariance_matches_truncated_series():
    t0, t1, n = 1.0, 4.0, 20_000
    times = np.array([1.0, 1.5, 2.2, 3.0, 3.7, 4.0])
    keys = jr.split(jr.key(0), n)
    for m, differs_from_limit in ((2, True), (10, False)):

        def sample(key):
            path = gqdiffrax.WienerSurrogate(t0, t1, (), key, num_terms=m)
            return jax.vmap(path.evaluate)(jnp.asarray(times))

        w = np.asarray(jax.jit(jax.vmap(sample))(keys))
        # W(t0) = 0 exactly.
        assert np.all(w[:, 0] == 0)
        cov_m = _truncated_cov(times, times, t0, t1, m)
        # Standard error of a Gaussian sample covariance entry.
        se = np.sqrt((np.outer(np.diag(cov_m), np.diag(cov_m)) + cov_m**2) / n)
        mean_se = np.sqrt(np.diag(cov_m) / n)
        mean = w.mean(0)
        cov_hat = np.cov(w, rowvar=False, ddof=1)
        assert np.all(np.abs(mean) <= 5 * mean_se)
        assert np.all(np.abs(cov_hat - cov_m) <= 5 * se + 1e-15)
        limit = np.minimum.outer(times, times) - t0
        assert np.max(np.abs(cov_m - limit)) <= _tail_bound(t0, t1, m)
        if differs_from_limit:
            # Two terms are far from Brownian, and the sample covariance sees it.
            z = np.abs(cov_hat - limit)[1:, 1:] / se[1:, 1:]
            assert np.max(z) > 20


def test_truncated_covariance_converges_to_brownian():
    t0, t1 = 1.0, 4.0
    times = np.linspace(t0, t1, 13)
    limit = np.minimum.outer(times, times) - t0
    errors = []
    for m in (1, 10, 100, 1000):
        err = np.max(np.abs(_truncated_cov(times, times, t0, t1, m) - limit))
        bound = _tail_bound(t0, t1, m)
        assert err <= bound * (1 + 1e-9)
        # The bound is attained at t = s = t1, where every sine is +-1.
        assert err >= 0.99 * bound
        errors.append(err)
    # Error ~ 2c / (pi^2 m): a factor ~10 per factor 10 in m.
    assert np.all(np.array(errors[1:]) / np.array(errors[:-1]) < 0.12)
    assert errors[-1] < 1e-3


def test_increments_are_gaussian():
    t0, t1, m, n = 0.0, 2.0, 10, 20_000
    a, b = 0.3, 0.8
    keys = jr.split(jr.key(1), n)
    inc = jax.jit(
        jax.vmap(
            lambda k: gqdiffrax.WienerSurrogate(t0, t1, (), k, num_terms=m).evaluate(
                a, b
            )
        )
    )(keys)
    inc = np.asarray(inc)
    cov = _truncated_cov([a, b], [a, b], t0, t1, m)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = inc / np.sqrt(var)
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(scipy.stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(scipy.stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # The KS check would see a 10% error in scale.
    assert scipy.stats.kstest(1.1 * z, "norm").pvalue < 1e-3


def test_path_is_the_documented_series():
    # derivative(t) = sqrt(2/c) sum_i xi_i cos(w_i (t - t0)),
    # with xi_i = normal(fold_in(key, i)).
    key = jr.key(2)
    t0, t1, m = 0.5, 3.0, 12
    c = t1 - t0
    xi = _draws(key, m, (2,))
    omega = (np.arange(1, m + 1) - 0.5) * np.pi / c
    ts = np.array([0.5, 1.3, 3.0])
    rate = np.sqrt(2 / c) * np.cos(np.outer(ts - t0, omega)) @ xi
    value = np.sqrt(2 * c) * (np.sin(np.outer(ts - t0, omega)) / (omega * c)) @ xi

    @jax.jit
    def probe(w):
        return jax.vmap(w.derivative)(jnp.asarray(ts)), jax.vmap(w.evaluate)(
            jnp.asarray(ts)
        )

    for running_sum in (False, True):
        w = gqdiffrax.WienerSurrogate(
            t0, t1, (2,), key, num_terms=m, running_sum=running_sum
        )
        got_rate, got_value = probe(w)
        np.testing.assert_allclose(got_rate, rate, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_value, value, rtol=1e-12, atol=1e-12)
    # More terms refine the same path: the difference is exactly the extra terms.
    coarse = gqdiffrax.WienerSurrogate(t0, t1, (2,), key, num_terms=5)
    extra = np.sqrt(2 / c) * np.cos(np.outer(ts - t0, omega[5:])) @ xi[5:]
    np.testing.assert_allclose(probe(w)[0] - probe(coarse)[0], extra, atol=1e-12)


def _bit_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)
    )


@pytest.mark.parametrize("shape", [(), (2, 3)])
def test_purity(shape):
    keys = jr.split(jr.key(3), 4)
    t0, t1, m = 0.0, 1.0, 16
    ts = jnp.array([0.1, 0.55, 1.0])

    def path(key, running_sum):
        w = gqdiffrax.WienerSurrogate(
            t0, t1, shape, key, num_terms=m, running_sum=running_sum
        )
        return (
            jax.vmap(w.evaluate)(ts),
            jax.vmap(w.derivative)(ts),
            jax.vmap(w.evaluate)(ts[:-1], ts[1:]),
        )

    single = jax.jit(path, static_argnums=1)
    batched = jax.jit(jax.vmap(path, in_axes=(0, None)), static_argnums=1)
    # Different compiled programs (vmap or not, the two modes) may fuse a multiply
    # and an add differently, so across them the path agrees to rounding: a few ulp
    # per term of the sum.
    rounding = dict(rtol=0, atol=16 * m * np.finfo(np.float64).eps)
    paths = {}
    for running_sum in (False, True):
        # Same key, fresh construction, same program: bit for bit.
        first = single(keys[0], running_sum)
        assert _bit_equal(first, single(keys[0], running_sum))
        assert _bit_equal(batched(keys, running_sum), batched(keys, running_sum))
        per_key = jax.tree.map(
            lambda *x: jnp.stack(x), *[single(k, running_sum) for k in keys]
        )
        assert_tree_allclose(batched(keys, running_sum), per_key, **rounding)
        # Other keys give other paths.
        for other in range(1, len(keys)):
            assert np.all(np.asarray(per_key[1][other]) != np.asarray(first[1]))
        paths[running_sum] = first
    # The two modes draw the same xi_i, so they give the same path.
    assert_tree_allclose(paths[True], paths[False], **rounding)
    # The stored draws are exactly the documented ones.
    stored = gqdiffrax.WienerSurrogate(t0, t1, shape, keys[0], num_terms=m)
    assert _bit_equal(stored.xi, _draws(keys[0], m, shape))


@pytest.mark.parametrize("running_sum", [False, True])
def test_derivative_matches_evaluate(running_sum):
    w = gqdiffrax.WienerSurrogate(
        0.5, 2.0, (3,), jr.key(4), num_terms=20, running_sum=running_sum
    )
    ts = jnp.array([0.5, 0.9, 1.7, 2.0])
    h, dt = 1e-5, 1e-9

    @jax.jit
    def probe(w):
        ones = jnp.ones_like(ts)
        rate = jax.vmap(w.derivative)(ts)
        jvp = jax.jvp(jax.vmap(w.evaluate), (ts,), (ones,))[1]
        # Reverse mode, through the running-sum loop too.
        grad = jax.vmap(jax.grad(lambda t: jnp.sum(w.evaluate(t))))(ts)
        fd = (jax.vmap(w.evaluate)(ts + h) - jax.vmap(w.evaluate)(ts - h)) / (2 * h)
        increments = (w.evaluate(0.7, 1.9), w.evaluate(1.9) - w.evaluate(0.7))
        empty = (w.evaluate(1.1, 1.1), w.evaluate(0.5))
        tiny = (w.evaluate(1.2, 1.2 + dt), dt * w.derivative(1.2 + dt / 2))
        return rate, jvp, grad, fd, increments, empty, tiny

    rate, jvp, grad, fd, increments, empty, tiny = probe(w)
    np.testing.assert_allclose(jvp, rate, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(grad, jnp.sum(rate, axis=1), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(fd, rate, rtol=1e-7, atol=1e-7)
    # Increments agree with differences of values, and vanish on empty intervals.
    np.testing.assert_allclose(*increments, rtol=1e-12, atol=1e-13)
    assert np.all(np.asarray(empty[0]) == 0) and np.all(np.asarray(empty[1]) == 0)
    # A tiny increment keeps its relative accuracy (no cancellation).
    np.testing.assert_allclose(*tiny, rtol=1e-6)


def test_running_sum_memory():
    # Reverse mode in time keeps O(m + size) residuals with `running_sum=True`, not the
    # m x size draws (which the stored mode holds anyway, in `xi`).
    m, size = 200, 100
    for running_sum, bound in ((True, 4 * (m + size)), (False, None)):
        w = gqdiffrax.WienerSurrogate(
            0.0, 1.0, (size,), jr.key(14), num_terms=m, running_sum=running_sum
        )
        _, vjp = jax.vjp(w.evaluate, jnp.asarray(0.3))
        residuals = sum(jnp.size(x) for x in jax.tree.leaves(vjp) if eqx.is_array(x))
        if bound is None:
            assert residuals >= m * size
        else:
            assert residuals <= bound


def test_dtypes():
    key = jr.key(5)

    @eqx.filter_jit
    def probe(w):
        t = jnp.asarray(0.3, w.dtype)
        jvp = jax.jvp(w.evaluate, (t,), (jnp.ones_like(t),))[1]
        return w.evaluate(t), w.evaluate(0.1, t), w.derivative(t), jvp

    assert all(
        x.dtype == jnp.float64
        for x in probe(gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key))
    )
    inferred = gqdiffrax.WienerSurrogate(jnp.float32(0), jnp.float32(1), (2,), key)
    explicit = gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key, dtype=jnp.float32)
    assert inferred.dtype == explicit.dtype == jnp.float32
    out = probe(inferred)
    assert all(x.dtype == jnp.float32 for x in out)
    np.testing.assert_allclose(out[3], out[2], rtol=1e-5, atol=1e-5)
    assert _bit_equal(inferred.xi, explicit.xi)
    assert_tree_allclose(out, probe(explicit), rtol=1e-6, atol=1e-6)

    # A float32 solve stays float32; a float64 surrogate in a float32 model is cast to
    # the precision of the diffusion rather than promoting the state.
    def drift(t, y, args):
        return -y

    def diffusion(t, y, args):
        return jnp.eye(2, dtype=y.dtype)

    y32 = jnp.ones(2, jnp.float32)
    w64 = gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key)
    term64 = gqdiffrax.wong_zakai_term(drift, diffusion, w64)
    assert term64.vf(jnp.float32(0.3), y32, None).dtype == jnp.float32
    sol = diffrax.diffeqsolve(
        gqdiffrax.wong_zakai_term(drift, diffusion, inferred),
        diffrax.Heun(),
        jnp.float32(0),
        jnp.float32(1),
        jnp.float32(0.1),
        y32,
    )
    assert sol.ys.dtype == jnp.float32 and np.all(np.isfinite(sol.ys))


#
# Wong–Zakai convergence on the paper's OU process
#


def _ou_mean(t):
    return MU / THETA * t - MU / THETA**2 + (OU_X0 + MU / THETA**2) * np.exp(-THETA * t)


def _ou_var(t):
    # Solves v' = -2 theta v + (sigma + phi t)^2, v(0) = 0 in closed form.
    a = PHI**2 / (2 * THETA)
    b = (SIGMA * PHI - a) / THETA
    c = (SIGMA**2 - b) / (2 * THETA)
    return a * t**2 + b * t + c * (1 - np.exp(-2 * THETA * t))


def _ou_loadings(t, m):
    r"""x_m(t) = mean(t) + sum_i xi_i L_i(t) for the Wong–Zakai ODE, with
    L_i(t) = sqrt(2/c) int_0^t e^{-theta (t - s)} (sigma + phi s) cos(w_i s) ds."""
    c = OU_T1 - OU_T0
    omega = (np.arange(1, m + 1) - 0.5) * np.pi / c
    lam = THETA + 1j * omega
    t = np.asarray(t)[..., None]
    antiderivative = np.exp(1j * omega * t) * ((SIGMA + PHI * t) / lam - PHI / lam**2)
    at_zero = np.exp(-THETA * t) * (SIGMA / lam - PHI / lam**2)
    return np.sqrt(2 / c) * (antiderivative - at_zero).real


def test_ou_truncated_variance_converges():
    exact = _ou_var(OU_TS)
    errors = [
        np.abs(_ou_var(OU_TS) - np.sum(_ou_loadings(OU_TS, m) ** 2, -1)) / exact
        for m in (1, 4, 16, 10**5)
    ]
    assert np.all(np.diff(np.array(errors), axis=0) < 0)
    assert np.all(errors[-1] < 1e-4)


@pytest.mark.slow
def test_wong_zakai_ou_moments_converge():
    n, ms = 4000, (1, 4, 16)

    def drift(t, y, args):
        return MU * t - THETA * y

    def diffusion(t, y, args):
        return SIGMA + PHI * t

    def solve(key):
        # All truncations in one solve (one compilation): the state stacks them. The
        # last one repeats m = 4 in running-sum mode.
        configs = [(m, False) for m in ms] + [(4, True)]
        fields = [
            gqdiffrax.wong_zakai_term(
                drift,
                diffusion,
                gqdiffrax.WienerSurrogate(
                    OU_T0, OU_T1, (), key, num_terms=m, running_sum=running_sum
                ),
            ).vector_field
            for m, running_sum in configs
        ]

        def vf(t, y, args):
            return jnp.stack([f(t, y[k], args) for k, f in enumerate(fields)])

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            diffrax.Heun(),
            OU_T0,
            OU_T1,
            0.01,
            jnp.full(len(configs), OU_X0),
            saveat=diffrax.SaveAt(ts=jnp.asarray(OU_TS)),
            max_steps=1000,
        )
        return sol.ys

    keys = jr.split(jr.key(6), n)
    ys = np.asarray(jax.jit(jax.vmap(solve))(keys))  # (n, times, configs)
    np.testing.assert_allclose(ys[:, :, -1], ys[:, :, 1], rtol=0, atol=1e-12)
    exact_mean, exact_var = _ou_mean(OU_TS), _ou_var(OU_TS)
    rel_errors = []
    for j, m in enumerate(ms):
        x = ys[:, :, j]
        loadings = _ou_loadings(OU_TS, m)
        # Pathwise: the solve is the linear function of the draws it should be.
        for k in range(4):
            np.testing.assert_allclose(
                x[k], exact_mean + loadings @ _draws(keys[k], m), rtol=0, atol=1e-3
            )
        # Additive noise: the mean is exact for every m (up to Monte-Carlo error).
        var_m = np.sum(loadings**2, -1)
        assert np.all(np.abs(x.mean(0) - exact_mean) <= 5 * np.sqrt(var_m / n))
        # The variance is the truncated one, up to Monte-Carlo error ...
        assert np.all(np.abs(x.var(0) - var_m) <= 5 * var_m * np.sqrt(2 / n))
        rel_errors.append(np.abs(x.var(0) - exact_var) / exact_var)
    # ... which approaches the exact variance as m grows.
    rel_errors = np.array(rel_errors)
    assert np.all(np.diff(rel_errors, axis=0) < 0)
    assert np.all(rel_errors[-1] < 0.1)


#
# Wong–Zakai and SDE terms with multiplicative noise; Itô–Stratonovich conversion
#


def _gbm(kind):
    """Itô GBM dX_k = mu_k X_k dt + X_k sum_j S_kj dW_j, returned with its Stratonovich
    drift coefficient mu_k - 1/2 sum_j S_kj^2."""
    mu = jnp.array([0.3, -0.2])
    if kind == "general":
        s = jnp.array([[0.4, -0.3, 0.2], [0.1, 0.5, -0.2]])

        def diffusion(t, y, args):
            return y[:, None] * s

        noise_shape = (3,)
    else:
        s_diag = jnp.array([0.5, 0.3])
        s = jnp.diag(s_diag)

        def diffusion(t, y, args):
            return lx.DiagonalLinearOperator(s_diag * y)

        noise_shape = (2,)

    def ito_drift(t, y, args):
        return mu * y

    strat_rate = mu - 0.5 * jnp.sum(s**2, axis=1)
    return ito_drift, diffusion, noise_shape, s, strat_rate


@pytest.mark.parametrize("kind", ["general", "diagonal"])
def test_ito_to_stratonovich_closed_form(kind):
    ito_drift, diffusion, _, _, strat_rate = _gbm(kind)
    y = jnp.array([1.3, -0.7])
    strat = gqdiffrax.ito_to_stratonovich_drift(ito_drift, diffusion)
    back = gqdiffrax.stratonovich_to_ito_drift(strat, diffusion)
    f_strat, f_back = jax.jit(lambda y: (strat(0.0, y, None), back(0.0, y, None)))(y)
    np.testing.assert_allclose(f_strat, strat_rate * y, rtol=1e-14)
    np.testing.assert_allclose(f_back, ito_drift(0.0, y, None), rtol=1e-14)
    # Scalar GBM: f_S = (mu - sigma^2 / 2) x.
    scalar = gqdiffrax.ito_to_stratonovich_drift(
        lambda t, y, args: 0.3 * y, lambda t, y, args: 0.5 * y
    )
    out = jax.jit(scalar)(0.0, jnp.asarray(2.0), None)
    np.testing.assert_allclose(out, (0.3 - 0.125) * 2.0, rtol=1e-14)


@pytest.mark.parametrize("shapes", [((3,), (2,)), ((2,), (3,)), ((2, 2), (3,))])
def test_ito_correction_nonlinear(shapes, getkey):
    # Against an independent implementation: full Jacobian, then the contraction.
    y_shape, w_shape = shapes
    n, w = int(np.prod(y_shape)), int(np.prod(w_shape))
    a = jr.normal(getkey(), (n * w, n))

    def diffusion(t, y, args):
        return jnp.tanh(a @ y.reshape(-1) + t).reshape(y_shape + w_shape)

    y = jr.normal(getkey(), y_shape)
    t = 0.3
    g = diffusion(t, y, None).reshape(n, w)
    jac = jax.jacrev(lambda z: diffusion(t, z.reshape(y_shape), None).reshape(n, w))(
        y.reshape(-1)
    )
    expected = np.einsum("kjl,lj->k", jac, g).reshape(y_shape)
    strat = gqdiffrax.ito_to_stratonovich_drift(
        lambda t, y, args: jnp.zeros_like(y), diffusion
    )
    out = jax.jit(strat)(t, y, None)
    np.testing.assert_allclose(out, -0.5 * expected, rtol=1e-12, atol=1e-14)


def test_pytree_state_with_lineax_operator():
    # State {"a": (2,), "b": ()} driven by 3 noise channels through a
    # lineax.PyTreeLinearOperator; rows g_a = [0.3 a, 0.1 a^2, sin a] and
    # g_b = [b, b^2, 0.2 b], so c_a = 0.09 a + 0.02 a^3 + cos(a) sin(a) and
    # c_b = b + 2 b^3 + 0.04 b.
    def rows(y):
        a, b = y["a"], y["b"]
        return {
            "a": jnp.stack([0.3 * a, 0.1 * a**2, jnp.sin(a)], axis=-1),
            "b": jnp.stack([b, b**2, 0.2 * b]),
        }

    def diffusion(t, y, args):
        structure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), y)
        return lx.PyTreeLinearOperator(rows(y), structure)

    def zero(t, y, args):
        return jax.tree.map(jnp.zeros_like, y)

    y = {"a": jnp.array([0.4, -0.7]), "b": jnp.asarray(1.3)}
    w = gqdiffrax.WienerSurrogate(0.0, 1.0, (3,), jr.key(13))
    strat = gqdiffrax.ito_to_stratonovich_drift(zero, diffusion)
    term = gqdiffrax.wong_zakai_term(zero, diffusion, w)
    f_strat, vf = jax.jit(lambda y: (strat(0.0, y, None), term.vf(0.3, y, None)))(y)
    a, b = y["a"], y["b"]
    c = {
        "a": 0.09 * a + 0.02 * a**3 + jnp.cos(a) * jnp.sin(a),
        "b": 1.04 * b + 2 * b**3,
    }
    assert_tree_allclose(f_strat, jax.tree.map(lambda x: -0.5 * x, c), rtol=1e-13)
    rate = w.derivative(0.3)
    assert_tree_allclose(vf, jax.tree.map(lambda r: r @ rate, rows(y)), rtol=1e-13)


@pytest.mark.parametrize("kind", ["general", "diagonal"])
def test_wong_zakai_and_sde_terms_multiplicative(kind):
    # For a smooth driving path the chain rule holds, so the Wong–Zakai ODE of Itô GBM
    # with the Stratonovich drift is solved by x0 exp(r t + S W_m(t)) pathwise. The same
    # drift and diffusion, given to `sde_terms` with the surrogate as the control,
    # agree (both use `diffrax.ControlTerm`'s contraction).
    ito_drift, diffusion, noise_shape, s, strat_rate = _gbm(kind)
    drift = gqdiffrax.ito_to_stratonovich_drift(ito_drift, diffusion)
    y0 = jnp.array([1.0, 2.0])
    t0, t1 = 0.0, 1.0

    def solve(key):
        w = gqdiffrax.WienerSurrogate(t0, t1, noise_shape, key, num_terms=8)
        ode = diffrax.diffeqsolve(
            gqdiffrax.wong_zakai_term(drift, diffusion, w),
            diffrax.Tsit5(),
            t0,
            t1,
            0.01,
            y0,
        ).ys[-1]
        cde = diffrax.diffeqsolve(
            gqdiffrax.sde_terms(drift, diffusion, w),
            diffrax.Heun(),
            t0,
            t1,
            1e-3,
            y0,
            max_steps=1000,
        ).ys[-1]
        exact = y0 * jnp.exp(strat_rate * (t1 - t0) + s @ w.evaluate(t1))
        return ode, cde, exact

    ode, cde, exact = jax.jit(jax.vmap(solve))(jr.split(jr.key(7), 4))
    np.testing.assert_allclose(ode, exact, rtol=1e-6)
    np.testing.assert_allclose(cde, exact, rtol=1e-4)


def test_sde_terms_stratonovich_solver_with_virtual_brownian_tree():
    # The evaluation recipe: Itô GBM through `ito_to_stratonovich_drift`, solved as a
    # Stratonovich SDE with Heun on a VirtualBrownianTree, converges pathwise to
    # x0 exp((mu - sigma^2 / 2) t + sigma W_t).
    mu, sigma, x0, t1, dt = 0.3, 0.5, 1.0, 1.0, 1 / 256

    def ito_drift(t, y, args):
        return mu * y

    def diffusion(t, y, args):
        return sigma * y

    drift = gqdiffrax.ito_to_stratonovich_drift(ito_drift, diffusion)

    def solve(key):
        bm = diffrax.VirtualBrownianTree(0.0, t1, tol=dt / 2, shape=(), key=key)
        sol = diffrax.diffeqsolve(
            gqdiffrax.sde_terms(drift, diffusion, bm),
            diffrax.Heun(),
            0.0,
            t1,
            dt,
            jnp.asarray(x0),
            max_steps=300,
        )
        return sol.ys[-1], bm.evaluate(0.0, t1)

    x, w = jax.jit(jax.vmap(solve))(jr.split(jr.key(8), 8))
    exact = x0 * np.exp((mu - sigma**2 / 2) * t1 + sigma * np.asarray(w))
    np.testing.assert_allclose(x, exact, rtol=2e-2)
    # Without the correction the answer is off by exp(sigma^2 t / 2), 13% here.
    assert np.all(
        np.abs(np.asarray(x) / (exact * np.exp(sigma**2 * t1 / 2)) - 1) > 0.08
    )


#
# Gradients
#


class _Drift(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.weight @ y + self.bias) - 0.5 * y * t


class _Diffusion(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, t, y, args):
        return 0.3 * jnp.tanh(self.weight @ y + self.bias).reshape(2, 3) * args


def _params(key):
    k1, k2, k3, k4 = jr.split(key, 4)
    drift = _Drift(0.5 * jr.normal(k1, (2, 2)), 0.1 * jr.normal(k2, (2,)))
    diffusion = _Diffusion(0.5 * jr.normal(k3, (6, 2)), 0.1 * jr.normal(k4, (6,)))
    # Not weak-typed, so finite differences do not retrace.
    return (
        drift,
        diffusion,
        jnp.asarray(0.8, jnp.float64),
        jnp.asarray(1.1, jnp.float64),
    )


def _make_loss(adjoint, solver, stepsize_controller):
    ts = jnp.array([0.4, 1.0])

    def loss(params, key):
        drift, diffusion_module, gamma, args = params

        # `gamma` and the diffusion module are closed over; the drift module is a
        # field of the vector field; `args` goes through diffeqsolve.
        def diffusion(t, y, args):
            return gamma * diffusion_module(t, y, args)

        def one(key):
            w = gqdiffrax.WienerSurrogate(0.0, 1.0, (3,), key, num_terms=6)
            sol = diffrax.diffeqsolve(
                gqdiffrax.wong_zakai_term(drift, diffusion, w),
                solver,
                0.0,
                1.0,
                0.05,
                jnp.array([0.5, -0.3]),
                args,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=stepsize_controller,
                adjoint=adjoint,
            )
            return jnp.sum(sol.ys**2)

        # One surrogate per sample: grad of a vmap over keys.
        return jnp.mean(jax.vmap(one)(jr.split(key, 2)))

    return loss


_SOLVES = {
    # Constant steps: autodiff is the exact derivative of the discrete solve, so it
    # can be checked against finite differences to many digits.
    "checkpoint-constant": (
        diffrax.RecursiveCheckpointAdjoint(),
        diffrax.ConstantStepSize(),
    ),
    "checkpoint": (
        diffrax.RecursiveCheckpointAdjoint(),
        diffrax.PIDController(rtol=1e-8, atol=1e-8),
    ),
    "gq": (gqdiffrax.GQAdjoint(), diffrax.PIDController(rtol=1e-8, atol=1e-8)),
}


@functools.cache
def _value_and_grad(name):
    # Compiled once and shared by the tests: each compilation takes seconds.
    adjoint, controller = _SOLVES[name]
    loss = _make_loss(adjoint, diffrax.Dopri5(), controller)
    # A training loop draws a fresh key every step without recompiling.
    return jax.jit(eqx.debug.assert_max_traces(jax.value_and_grad(loss), max_traces=1))


@pytest.mark.slow
def test_gradients_recursive_checkpoint_vs_finite_differences():
    params = _params(jr.key(10))
    key = jr.key(9)
    value_and_grad = _value_and_grad("checkpoint-constant")
    _, grads = value_and_grad(params, key)
    fd = finite_difference_grad(lambda p: value_and_grad(p, key)[0], params, eps=1e-6)
    assert_tree_allclose(grads, fd, rtol=1e-6, atol=1e-8)
    # Every part of the model gets a nonzero gradient.
    assert all(np.all(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_gradients_gq_adjoint_vs_recursive_checkpoint():
    params = _params(jr.key(10))
    rca = _value_and_grad("checkpoint")
    gq = _value_and_grad("gq")
    values = []
    for key in (jr.key(9), jr.key(19)):
        value_rca, grads_rca = rca(params, key)
        value_gq, grads_gq = gq(params, key)
        np.testing.assert_allclose(value_gq, value_rca, rtol=1e-12)
        assert_tree_allclose(grads_gq, grads_rca, rtol=1e-5, atol=1e-6)
        values.append(value_gq)
    # Fresh noise gives a fresh loss.
    assert values[0] != values[1]


def test_wong_zakai_term_is_controlterm_product(getkey):
    # The noise part is `diffrax.ControlTerm`'s own vector-field-control product, the
    # vector field of its `to_ode()`, for array and lineax diffusions.
    y = jnp.array([0.4, -1.2])
    weight = jr.normal(getkey(), (2, 3))

    def drift(t, y, args):
        return -y * t

    for noise_shape, diffusion in (
        ((3,), lambda t, y, args: jnp.tanh(weight * y[:, None])),
        ((2,), lambda t, y, args: lx.DiagonalLinearOperator(jnp.cos(y) + t)),
    ):
        w = gqdiffrax.WienerSurrogate(0.0, 1.0, noise_shape, getkey())
        noise = diffrax.ControlTerm(diffusion, w).to_ode()
        term = gqdiffrax.wong_zakai_term(drift, diffusion, w)
        for t in (0.0, 0.37, 1.0):
            expected = drift(t, y, None) + noise.vf(t, y, None)
            np.testing.assert_allclose(term.vf(t, y, None), expected, rtol=1e-15)


#
# Errors
#


def test_bad_surrogate_arguments():
    key = jr.key(11)
    with pytest.raises(ValueError, match="num_terms"):
        gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key, num_terms=0)
    with pytest.raises(ValueError, match="num_terms"):
        gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key, num_terms=2.5)
    for t0, t1 in ((1.0, 1.0), (2.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match="t0 < t1"):
            gqdiffrax.WienerSurrogate(t0, t1, (2,), key)
    with pytest.raises(ValueError, match="shape"):
        gqdiffrax.WienerSurrogate(0.0, 1.0, 2, key)
    with pytest.raises(ValueError, match="vmap"):
        gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), jr.split(key, 3))
    with pytest.raises(ValueError, match="floating"):
        gqdiffrax.WienerSurrogate(0.0, 1.0, (2,), key, dtype=jnp.int32)
    with pytest.raises(ValueError, match="scalar time"):
        gqdiffrax.WienerSurrogate(jnp.zeros(2), 1.0, (2,), key)
    # Traced times are checked at run time.
    with pytest.raises(Exception, match="t0 < t1"):
        jax.jit(lambda t1: gqdiffrax.WienerSurrogate(0.0, t1, (), key).evaluate(0.5))(
            -1.0
        )


def test_bad_diffusion_shapes():
    w = gqdiffrax.WienerSurrogate(0.0, 1.0, (3,), jr.key(12))
    y0 = jnp.ones(2)

    def drift(t, y, args):
        return -y

    def solve(diffusion, drift=drift):
        term = gqdiffrax.wong_zakai_term(drift, diffusion, w)
        return eqx.filter_eval_shape(
            diffrax.diffeqsolve, term, diffrax.Heun(), 0.0, 1.0, 0.1, y0
        )

    solve(lambda t, y, args: jnp.ones((2, 3)))  # fine
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape=\(4,\)"):
        solve(lambda t, y, args: jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3\)"):
        solve(lambda t, y, args: jnp.ones((3,)))
    with pytest.raises(ValueError, match="shape=\\(2,\\)"):
        solve(lambda t, y, args: lx.DiagonalLinearOperator(y))
    with pytest.raises(ValueError, match="structure of the state"):
        solve(lambda t, y, args: jnp.ones((2, 3)), drift=lambda t, y, args: (y, y))
    with pytest.raises(ValueError, match="lineax operator"):
        term = gqdiffrax.wong_zakai_term(
            lambda t, y, args: y, lambda t, y, args: jnp.ones((2, 3)), w
        )
        term.vf(0.0, {"a": y0}, None)
    with pytest.raises(ValueError, match="AbstractPath"):
        gqdiffrax.wong_zakai_term(drift, drift, jr.key(0))
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        gqdiffrax.sde_terms(drift, drift, None)
