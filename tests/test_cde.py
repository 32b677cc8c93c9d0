"""`GQAdjoint` on neural controlled differential equations.

A neural CDE $dy = f_\\theta(y)\\,dX(t)$ driven by an interpolation $X$ of
irregularly sampled data, written as diffrax documents it:
`diffrax.ControlTerm(f, X).to_ode()` (or `ControlTerm(f, X)` itself, with the knots as
`jump_ts`). The integrand of the quadrature has kinks (cubic) or jumps (linear) at the
knots; GQAdjoint splits its quadrature there. Gradients with respect to the field's
parameters, the interpolated data and `y0` are compared with
`RecursiveCheckpointAdjoint` through the same solve.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import gqdiffrax
import gqdiffrax._forward

from .helpers import assert_grads_close, grad_errors


T1 = 3.0


def _problem(key, dtype=jnp.float64, num_knots=20):
    k1, k2, k3 = jr.split(key, 3)
    knots = jnp.sort(jr.uniform(k1, (num_knots,), dtype, minval=0.0, maxval=T1))
    knots = knots.at[0].set(0.0).at[-1].set(T1)
    data = jr.normal(k2, (num_knots, 2), dtype)
    mlp = eqx.nn.MLP(3, 6, 16, 2, activation=jax.nn.softplus, dtype=dtype, key=k3)
    y0 = jnp.array([0.5, -0.3, 0.1], dtype)
    return knots, data, mlp, y0


def _control(knots, data, interpolation):
    if interpolation == "linear":
        return dfx.LinearInterpolation(knots, data)
    coeffs = dfx.backward_hermite_coefficients(knots, data)
    return dfx.CubicInterpolation(knots, coeffs)


def _solve(diff, knots, *, form, interpolation, adjoint, rtol, jumps=False):
    mlp, data, y0 = diff
    control = _control(knots, data, interpolation)
    term = dfx.ControlTerm(lambda t, y, args: args(y).reshape(3, 2), control)
    if form == "to_ode":
        term = term.to_ode()
    controller = dfx.PIDController(
        rtol=rtol, atol=rtol, jump_ts=knots if jumps else None
    )
    return dfx.diffeqsolve(
        term,
        dfx.Tsit5(),
        0.0,
        T1,
        None,
        y0,
        mlp,
        saveat=dfx.SaveAt(ts=jnp.linspace(0.5, T1, 6, dtype=knots.dtype)),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=8192,
    )


def _grad(diff, knots, adjoint, **kwargs):
    def loss(diff):
        return jnp.sum(_solve(diff, knots, adjoint=adjoint, **kwargs).ys ** 2)

    return eqx.filter_jit(eqx.filter_grad(loss))(diff)


@pytest.mark.parametrize(
    "form, interpolation, jumps, bound, quadrature",
    [
        # Without jump_ts the forward solve steps across the knots and is accurate to
        # about 3e-6 here (rtol 1e-8); with them to 3e-8. (A cubic control without
        # jump_ts: test_accurate_with_the_knots_hidden.)
        ("to_ode", "linear", False, 2e-5, gqdiffrax.StepGauss()),
        ("to_ode", "cubic", True, 1e-6, gqdiffrax.StepGauss()),
        ("control", "linear", True, 1e-6, gqdiffrax.StepGauss()),
        # The paper's rule per interval, split at the knots.
        ("to_ode", "cubic", True, 1e-6, gqdiffrax.IntervalGauss(C=10.0)),
    ],
    ids=["to_ode-linear", "to_ode-cubic", "control-linear", "to_ode-cubic-interval"],
)
def test_matches_direct(getkey, form, interpolation, jumps, bound, quadrature):
    knots, data, mlp, y0 = _problem(getkey())
    kwargs = dict(form=form, interpolation=interpolation, rtol=1e-8, jumps=jumps)
    diff = (mlp, data, y0)
    g_gq = _grad(diff, knots, gqdiffrax.GQAdjoint(quadrature), **kwargs)
    g_direct = _grad(diff, knots, dfx.RecursiveCheckpointAdjoint(), **kwargs)
    assert_grads_close(g_gq, g_direct, bound, label=f"{form} {interpolation}")


@pytest.mark.slow
def test_accurate_with_the_knots_hidden(getkey, monkeypatch):
    # The same cubic CDE, with and without GQAdjoint seeing the knots (kinks of the
    # integrand): split there, or with every backward step its own Gauss rule (the
    # default's), whose step-size control finds the kinks as the forward's does, the
    # gradient is accurate to the tolerance either way.
    knots, data, mlp, y0 = _problem(getkey())
    kwargs = dict(form="to_ode", interpolation="cubic", rtol=1e-8, jumps=False)
    diff = (mlp, data, y0)
    exact = _grad(
        diff, knots, dfx.RecursiveCheckpointAdjoint(), **{**kwargs, "rtol": 1e-12}
    )
    error = lambda adjoint: max(
        grad_errors(_grad(diff, knots, adjoint, **kwargs), exact)
    )
    split = error(gqdiffrax.GQAdjoint())
    monkeypatch.setattr(gqdiffrax._forward, "knot_times", lambda term, args: None)
    hidden = error(gqdiffrax.GQAdjoint())
    assert split < 2e-5
    assert hidden < 2e-5


@pytest.mark.slow
def test_float32_vmap_over_series(getkey):
    # A batch of series, each with its own sample times (and so its own jump_ts),
    # under vmap, in float32. (Without jump_ts, stepping across the knots costs every
    # adjoint about 1e-3 at rtol 1e-5, in float64 too.)
    num = 4
    knots, data = [], []
    for _ in range(num):
        k, d, mlp, y0 = _problem(getkey(), jnp.float32, num_knots=12)
        knots.append(k)
        data.append(d)
    knots, data = jnp.stack(knots), jnp.stack(data)

    def grad(adjoint):
        def loss(diff):
            mlp, data = diff

            def one(k, d):
                sol = _solve(
                    (mlp, d, y0),
                    k,
                    form="to_ode",
                    interpolation="cubic",
                    adjoint=adjoint,
                    rtol=1e-5,
                    jumps=True,
                )
                return jnp.sum(sol.ys[-1] ** 2)

            return jnp.mean(jax.vmap(one)(knots, data))

        return eqx.filter_jit(eqx.filter_grad(loss))((mlp, data))

    g_gq = grad(gqdiffrax.GQAdjoint())
    g_direct = grad(dfx.RecursiveCheckpointAdjoint())
    assert_grads_close(g_gq, g_direct, 1e-3, label="float32 vmap")


@pytest.mark.slow
def test_interpolation_in_args(getkey):
    # A field reading the derivative of an interpolation passed as (part of) `args`:
    # GQAdjoint finds its knots there too.
    knots, data, mlp, y0 = _problem(getkey())
    weight = jr.normal(getkey(), (3, 3)) * 0.5

    def grad(adjoint):
        def loss(diff):
            weight, data = diff
            args = {"control": dfx.LinearInterpolation(knots, data), "w": weight}

            def vf(t, y, args):
                dx = args["control"].derivative(t)
                return jnp.tanh(args["w"] @ y) * jnp.sum(dx) - 0.2 * y

            sol = dfx.diffeqsolve(
                dfx.ODETerm(vf),
                dfx.Dopri5(),
                0.0,
                T1,
                None,
                y0,
                args,
                stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
                adjoint=adjoint,
                max_steps=8192,
            )
            return jnp.sum(sol.ys**2)

        return jax.jit(jax.grad(loss))((weight, data))

    assert_grads_close(
        grad(gqdiffrax.GQAdjoint()), grad(dfx.RecursiveCheckpointAdjoint()), 2e-5
    )


#
# What is refused, and why
#


def _loss(knots, data, mlp, *, form="to_ode", interpolation="linear", **kwargs):
    kwargs.setdefault("rtol", 1e-6)
    sol = _solve(
        (mlp, data, jnp.ones(3)),
        knots,
        form=form,
        interpolation=interpolation,
        adjoint=gqdiffrax.GQAdjoint(),
        **kwargs,
    )
    return jnp.sum(sol.ys)


def test_error_control_term_needs_linear_control(getkey):
    knots, data, mlp, _ = _problem(getkey())
    with pytest.raises(ValueError, match=r"to_ode\(\)"):
        _loss(knots, data, mlp, form="control", interpolation="cubic", jumps=True)


def test_error_control_term_needs_jump_ts(getkey):
    knots, data, mlp, _ = _problem(getkey())
    with pytest.raises(ValueError, match="jump_ts=control.ts"):
        _loss(knots, data, mlp, form="control")


def test_error_control_term_knots_missing_from_jump_ts(getkey):
    knots, data, mlp, _ = _problem(getkey())
    mlp_loss = lambda jump_ts: (
        dfx.diffeqsolve(
            dfx.ControlTerm(
                lambda t, y, args: args(y).reshape(3, 2),
                dfx.LinearInterpolation(knots, data),
            ),
            dfx.Tsit5(),
            0.0,
            T1,
            None,
            jnp.ones(3),
            mlp,
            stepsize_controller=dfx.PIDController(
                rtol=1e-6, atol=1e-6, jump_ts=jump_ts
            ),
            adjoint=gqdiffrax.GQAdjoint(),
        ).ys
    )
    mlp_loss(knots)  # All knots: fine.
    with pytest.raises(Exception, match="every knot of the control"):
        mlp_loss(knots[::2])


def test_error_gradient_wrt_knot_times(getkey):
    knots, data, mlp, _ = _problem(getkey())
    with pytest.raises(ValueError, match="knot times"):
        jax.grad(lambda k: _loss(k, data, mlp))(knots)
    # Not differentiated: fine.
    jax.grad(lambda d: _loss(knots, d, mlp))(data)


def test_error_time_gradient_of_a_cde(getkey):
    knots, data, mlp, _ = _problem(getkey())

    def loss(t1):
        control = dfx.LinearInterpolation(knots, data)
        term = dfx.ControlTerm(lambda t, y, args: args(y).reshape(3, 2), control)
        return dfx.diffeqsolve(
            term.to_ode(),
            dfx.Tsit5(),
            0.0,
            t1,
            0.1,
            jnp.ones(3),
            mlp,
            adjoint=gqdiffrax.GQAdjoint(),
        ).ys[-1, 0]

    with pytest.raises(ValueError, match="`t0`, `t1` or `SaveAt"):
        jax.grad(loss)(jnp.asarray(2.0))


def test_error_brownian_control(getkey):
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=getkey())
    term = dfx.ControlTerm(lambda t, y, args: jnp.eye(2), bm)
    # (Its `to_ode()` fails in diffrax itself: Brownian motion has no derivative.)
    with pytest.raises(ValueError, match="wong_zakai_term"):
        dfx.diffeqsolve(
            term,
            dfx.Heun(),
            0.0,
            1.0,
            0.1,
            jnp.ones(2),
            adjoint=gqdiffrax.GQAdjoint(),
        )


class _MyControlTerm(dfx.ControlTerm):
    pass


def test_error_control_term_subclass(getkey):
    knots, data, _, _ = _problem(getkey())
    control = dfx.LinearInterpolation(knots, data)
    term = _MyControlTerm(lambda t, y, args: jnp.ones((3, 2)), control)
    for terms in (term, term.to_ode()):
        with pytest.raises(ValueError, match="subclass of `diffrax.ControlTerm`"):
            dfx.diffeqsolve(
                terms,
                dfx.Tsit5(),
                0.0,
                T1,
                0.1,
                jnp.ones(3),
                stepsize_controller=dfx.PIDController(
                    rtol=1e-6, atol=1e-6, jump_ts=knots
                ),
                adjoint=gqdiffrax.GQAdjoint(),
            )


@pytest.mark.slow
@pytest.mark.parametrize("form", ["to_ode", "control"])
def test_reverse_time(getkey, form):
    # t0 > t1: the knots, and the check that a `ControlTerm`'s knots are jump times,
    # in diffrax's normalised time.
    knots, data, mlp, y0 = _problem(getkey())

    def grad(adjoint):
        def loss(diff):
            mlp, data = diff
            control = dfx.LinearInterpolation(knots, data)
            term = dfx.ControlTerm(lambda t, y, args: args(y).reshape(3, 2), control)
            sol = dfx.diffeqsolve(
                term.to_ode() if form == "to_ode" else term,
                dfx.Tsit5(),
                T1,
                0.0,
                None,
                y0,
                mlp,
                saveat=dfx.SaveAt(ts=jnp.array([2.0, 1.0, 0.0])),
                stepsize_controller=dfx.PIDController(
                    rtol=1e-8, atol=1e-8, jump_ts=knots
                ),
                adjoint=adjoint,
                max_steps=8192,
            )
            return jnp.sum(sol.ys**2)

        return eqx.filter_jit(eqx.filter_grad(loss))((mlp, data))

    assert_grads_close(
        grad(gqdiffrax.GQAdjoint()), grad(dfx.RecursiveCheckpointAdjoint()), 1e-6
    )
