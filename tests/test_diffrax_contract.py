"""What gqdiffrax assumes of diffrax's and equinox's private API, one test each.

Every private name and layout the adjoints use is reached through
`gqdiffrax/_diffrax_internals.py`. A diffrax release that changes one of them fails
here, with a message that names the assumption, before it can make a gradient wrong
silently (a replayed grid drifting, a saved row misplaced).
"""

import dataclasses
import inspect

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffrax import _integrate

from gqdiffrax import _diffrax_internals as internals
from gqdiffrax._adjoint_common import lax_loop


def _contract(name):
    return (
        f"diffrax/equinox broke gqdiffrax's assumption: {name}. Update "
        "gqdiffrax/_diffrax_internals.py (and its users) for this version."
    )


class _Recorder(dfx.AbstractAdjoint):
    """Runs diffrax's loop like gqdiffrax's adjoints do, and lets a test look at (and
    change) the loop state on the way in and out."""

    before: object = None
    after: object = None

    def loop(self, *, throw, passed_solver_state, passed_controller_state, **kwargs):
        del throw, passed_solver_state, passed_controller_state
        if self.before is not None:
            kwargs = self.before(kwargs)
        final_state, aux = lax_loop(self._loop, **kwargs)
        if self.after is not None:
            final_state = self.after(final_state)
        return final_state, aux


def _solve(adjoint, saveat, *, y0=None, controller=None, dt0=0.1):
    y0 = jnp.array([1.0, -0.5]) if y0 is None else y0
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -0.5 * y + jnp.sin(t)),
        dfx.Tsit5(),
        0.0,
        1.0,
        dt0,
        y0,
        saveat=saveat,
        stepsize_controller=controller or dfx.ConstantStepSize(),
        adjoint=adjoint,
    )


def test_loop_state_fields():
    names = {f.name for f in dataclasses.fields(_integrate.State)}
    read = {"tprev", "tnext", "made_jump", "num_steps", "num_accepted_steps"}
    read |= {"event_mask", "result"}
    missing = (set(internals.STATE_FIELDS) | read) - names
    assert not missing, _contract(f"diffrax's loop State has the fields {missing}")
    save = {f.name for f in dataclasses.fields(_integrate.SaveState)}
    want = {"ts", "ys", "saveat_ts_index", "save_index"}
    assert want <= save, _contract(f"diffrax's SaveState has the fields {want}")


def test_adjoint_gets_one_save_state_with_inf_filled_buffers():
    ts = jnp.linspace(0.1, 0.9, 5)
    seen = {}

    # `diffeqsolve` is jitted: look at shapes when traced, values through a callback.
    def before(kwargs):
        save_state = kwargs["init_state"].save_state
        seen["type"] = type(save_state)
        seen["shapes"] = (save_state.ts.shape, save_state.ys.shape)
        record = lambda ts: seen.__setitem__("ts", np.asarray(ts))
        jax.debug.callback(record, save_state.ts)
        return kwargs

    _solve(_Recorder(before=before), dfx.SaveAt(t0=True, ts=ts, t1=True))
    assert seen["type"] is _integrate.SaveState, _contract(
        "a SaveAt without `subs=` reaches `adjoint.loop` as one SaveState"
    )
    assert seen["shapes"] == ((7,), (7, 2)), _contract(
        "the save buffers have one row per output (t0 + ts + t1), leading ys"
    )
    assert np.all(np.isinf(seen["ts"])), _contract(
        "`diffeqsolve` fills the save buffers with inf before the loop runs "
        "(resize_save_rows copies the first row's fill)"
    )


def test_resized_and_selected_rows_give_the_users_solution():
    # What GQAdjoint does with split times: save at more times than the user asked
    # for, then hand back only the user's rows.
    ts = jnp.array([0.2, 0.6])
    extra = jnp.array([0.4, 0.8])
    merged = jnp.sort(jnp.concatenate([ts, extra]))
    rows = jnp.array([0, 1, 3, 5])  # t0, 0.2, 0.6, t1 among t0 + merged + t1

    def before(kwargs):
        saveat = eqx.tree_at(lambda s: s.subs.ts, kwargs["saveat"], merged)
        state = internals.resize_save_rows(kwargs["init_state"], 6)
        return dict(kwargs, saveat=saveat, init_state=state)

    def after(state):
        return internals.select_save_rows(state, rows, ts.shape[0])

    saveat = dfx.SaveAt(t0=True, ts=ts, t1=True)
    got = _solve(_Recorder(before=before, after=after), saveat)
    want = _solve(dfx.RecursiveCheckpointAdjoint(), saveat)
    message = _contract(
        "`diffeqsolve` builds `Solution.ts/ys` from the SaveState's rows and its "
        "`save_index`/`saveat_ts_index` counters (select_save_rows)"
    )
    np.testing.assert_array_equal(got.ts, want.ts, err_msg=message)
    np.testing.assert_allclose(got.ys, want.ys, rtol=1e-14, err_msg=message)


def test_replace_fields_none_state():
    seen = {}

    def before(kwargs):
        state = internals.replace_fields(kwargs["init_state"], y=object())
        seen["y"] = state.y
        return kwargs

    _solve(_Recorder(before=before), dfx.SaveAt(t1=True))
    assert seen["y"] is not None
    # A solve without a state (`y0=None`): the field is None, and tree_at must still
    # address it.
    state = _state()
    assert internals.replace_fields(state, y=1.0).y == 1.0
    with pytest.raises(ValueError, match="Only"):
        internals.replace_fields(state, tprev=1.0)


def test_constant_step_count():
    seen = {}

    def before(kwargs):
        n = internals.constant_step_count(kwargs["init_state"].controller_state)
        jax.debug.callback(lambda n: seen.__setitem__("n", int(n)), n)
        return kwargs

    sol = _solve(_Recorder(before=before), dfx.SaveAt(t1=True), dt0=0.07)
    assert seen["n"] == int(sol.stats["num_steps"]) == 15, _contract(
        "ConstantStepSize's state is (steps done, number of steps, t0, t1 or dt0)"
    )


def test_t1_clip_floor_is_the_loops():
    t1 = jnp.asarray(1.0)
    floor = internals.t1_clip_floor(t1)
    source = inspect.getsource(_integrate.loop)
    assert "range(100)" in source and "prevbefore" in source, _contract(
        "diffrax's loop snaps a step's end onto t1 within 100 ULP (t1_clip_floor)"
    )
    clip = _integrate._clip_to_end
    above, below = jnp.nextafter(floor, t1), floor
    assert float(clip(0.5, above, t1, floor, True)) == 1.0
    assert float(clip(0.5, below, t1, floor, True)) == float(below), _contract(
        "`_clip_to_end(tprev, tnext, t1, floor, keep_step)` snaps above the floor"
    )


def _state(**fields):
    state = _integrate.State.__new__(_integrate.State)
    for f in dataclasses.fields(_integrate.State):
        object.__setattr__(state, f.name, fields.get(f.name))
    return state


def test_only_transpose_ys():
    # Only the saved ys carry a cotangent out of the loop; a cotangent reaching any
    # other field (here the final `y`) is an error, not silently dropped.
    def out(ys, y):
        save_state = _integrate.SaveState(0, jnp.zeros(2), ys, 0)
        return internals.only_transpose_ys(_state(y=y, save_state=save_state))

    ys, y = jnp.ones((2, 3)), jnp.ones(3)
    grad = jax.grad(lambda ys: jnp.sum(out(ys, y).save_state.ys ** 2))(ys)
    np.testing.assert_allclose(grad, 2 * ys, err_msg=_contract("ys are transposed"))
    with pytest.raises(Exception, match="y cannot be reverse-mode"):
        jax.grad(lambda y: jnp.sum(out(ys, y).y))(y)
    # A solve without a state (y0=None).
    internals.only_transpose_ys(
        _state(save_state=_integrate.SaveState(0, None, None, 0))
    )


def test_term_internals():
    control = dfx.LinearInterpolation(jnp.linspace(0, 1, 4), jnp.ones((4, 2)))
    term = dfx.ControlTerm(lambda t, y, args: jnp.eye(2), control).to_ode()
    assert isinstance(term.vector_field, internals.ControlToODE), _contract(
        "`ControlTerm.to_ode()` is an ODETerm whose field is a `_ControlToODE`"
    )
    assert isinstance(term.vector_field.control_term, dfx.ControlTerm), _contract(
        "`_ControlToODE.control_term` is the ControlTerm it was built from"
    )
    wrapped = internals.WrapTerm(dfx.ODETerm(lambda t, y, args: t * y), -1)
    assert float(wrapped.vf(jnp.asarray(2.0), jnp.asarray(3.0), None)) == -6.0, (
        _contract("`WrapTerm(term, direction).vf(t, ...)` is `term.vf(-t, ...)`")
    )
    assert dfx.SaveAt(t1=True).subs.fn is internals.save_y, _contract(
        "`SaveAt`'s default `fn` is `diffrax._saveat.save_y`"
    )
    bm = dfx.VirtualBrownianTree(0, 1, 1e-3, (2,), key=jax.random.key(0))
    sde = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, a: y), dfx.ControlTerm(lambda t, y, a: y, bm)
    )
    assert internals.is_sde(sde) and not internals.is_sde(
        dfx.ODETerm(lambda t, y, a: y)
    )


def test_equinox_internals():
    out = internals.lax_while_loop(lambda c: c < 3, lambda c: c + 1, 0, max_steps=None)
    assert int(out) == 3
    with pytest.raises(Exception, match="named thing"):
        jax.grad(lambda x: internals.nondifferentiable(x, name="named thing"))(1.0)
    assert internals.doc_remove_args is eqxi.doc_remove_args


def test_unvmap_predicates_are_unbatched():
    # A `lax.cond` on them stays a branch under `vmap` (gqdiffrax skips work with it).
    xs = jnp.array([True, False, True])

    def branches(x):
        all_, any_ = internals.unvmap_all(x), internals.unvmap_any(x)
        return all_, any_

    all_, any_ = jax.vmap(branches)(xs)
    assert not bool(jnp.any(all_)) and bool(jnp.all(any_)), _contract(
        "unvmap_all/unvmap_any reduce over the vmapped axis"
    )
    branch = lambda x: jax.lax.cond(internals.unvmap_any(x), lambda: 1.0, lambda: 0.0)
    jaxpr = jax.make_jaxpr(jax.vmap(branch))(xs)
    assert "cond" in str(jaxpr) and "select_n" not in str(jaxpr), _contract(
        "a lax.cond on unvmap_any stays a cond under vmap"
    )
