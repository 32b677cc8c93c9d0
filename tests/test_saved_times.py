"""Gradients through `sol.ts`: a saved `t0`, `ts` or `t1` is that input, so a loss of
the saved times moves with them, as with `RecursiveCheckpointAdjoint` (GQAdjoint once
returned zero here without a word)."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import gqdiffrax

from .helpers import assert_tree_allclose


def _loss(p, adjoint, saveat):
    t0, t1, ts = p
    saveat = {
        "t0_ts_t1": dfx.SaveAt(t0=True, ts=ts, t1=True),
        "ts": dfx.SaveAt(ts=ts),
        "t1": dfx.SaveAt(t1=True),
    }[saveat]
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, a: -y + jnp.sin(t)),
        dfx.Tsit5(),
        t0,
        t1,
        None,
        jnp.ones(2),
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-9),
        adjoint=adjoint,
    )
    return jnp.sum(sol.ts**2) + jnp.sum(sol.ys)


_DEFAULT = gqdiffrax.GQAdjoint()
_INTERVAL = gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=10.0))


@pytest.mark.parametrize(
    "adjoint, saveat, reverse",
    [
        (_DEFAULT, "t0_ts_t1", False),
        (_DEFAULT, "t0_ts_t1", True),
        (_DEFAULT, "ts", True),
        (_DEFAULT, "t1", False),
        (_INTERVAL, "t0_ts_t1", False),
    ],
    ids=[
        "default-all",
        "default-all-reverse",
        "default-ts-reverse",
        "default-t1",
        "interval-all",
    ],
)
def test_saved_times_carry_their_gradient(adjoint, saveat, reverse):
    p = (jnp.asarray(0.0), jnp.asarray(2.0), jnp.array([0.5, 1.0]))
    if reverse:
        p = (jnp.asarray(2.0), jnp.asarray(0.0), jnp.array([1.5, 1.0]))
    grad = lambda adj: eqx.filter_jit(jax.grad(_loss))(p, adj, saveat)
    assert_tree_allclose(
        grad(adjoint), grad(dfx.RecursiveCheckpointAdjoint()), rtol=1e-6, atol=1e-8
    )
