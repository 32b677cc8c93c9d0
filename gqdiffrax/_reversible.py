r"""The near-reversible adjoint: O(1)-memory gradients by stepping backwards.

The forward pass keeps only the final state (and every $k$-th state with
`checkpoint_every=k`). The backward pass walks the steps in reverse; for step $n$ it

1. reconstructs $(y_{n-1}, s_{n-1})$ (state and solver state) from $(y_n, s_n)$ by
   running the solver from $t_n$ to $t_{n-1}$ with the negated increment
   $-(\Delta t_n, \Delta W_n)$, or loads it when it is a checkpoint;
2. recomputes the forward step $(y_{n-1}, s_{n-1}) \mapsto (y_n, s_n)$ and pulls the
   running cotangent back through it, adding the contributions of any `SaveAt(ts=...)`
   outputs interpolated inside the step.

Only the recomputed forward step is differentiated, never the reconstruction, so each
step's parameter cotangent is accumulated exactly once.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import (
    AbstractAdjoint,
    AbstractSolver,
    AbstractStepSizeController,
    AbstractTerm,
    ConstantStepSize,
    MultiTerm,
    RESULTS,
    ReversibleHeun,
    StepTo,
    UnsafeBrownianPath,
)
from jaxtyping import Array

from ._adjoint_common import (
    AbstractWrappedSolver,
    check_saveat,
    closure_convert_terms,
    fill_cotangents,
    lax_loop,
    nondiff,
    t0_cotangent,
)
from ._diffrax_internals import (
    constant_step_count,
    only_transpose_ys,
    replace_fields,
    t1_clip_floor,
)
from ._ees import EES25, EES27


_REVERSIBLE_SOLVERS = (EES25, EES27, ReversibleHeun)
_FIXED_GRID_CONTROLLERS = (ConstantStepSize, StepTo)
_NAME = "gqdiffrax.ReversibleAdjoint()"


def _is_atomic_term(x) -> bool:
    return isinstance(x, AbstractTerm) and not isinstance(x, MultiTerm)


class _Reversed(AbstractTerm):
    """Runs a term over a step $t_n \\to t_{n-1}$ with exactly the negated control of
    the forward step $t_{n-1} \\to t_n$.

    Going through `contr(t_{n-1}, t_n)` (rather than trusting a control path to
    evaluate a reversed interval) makes "the same Brownian increment, negated" hold
    bitwise for any path.
    """

    term: AbstractTerm

    def vf(self, t, y, args):
        return self.term.vf(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return jtu.tree_map(jnp.negative, self.term.contr(t1, t0, **kwargs))

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.term.vf_prod(t, y, args, control)

    def is_vf_expensive(self, t0, t1, y, args):
        return self.term.is_vf_expensive(t1, t0, y, args)


class _Checkpointing(AbstractWrappedSolver):
    """Wraps a solver during the forward pass so that its state also carries a buffer
    holding $(y, s)$ after every `every`-th step.

    Step $jk$ is written to slot $j - 1$; all other steps write to a final scratch slot,
    so that every step does one unconditional in-place update and no `cond` has to
    carry the buffer.
    """

    solver: AbstractSolver
    every: int = eqx.field(static=True)

    def init(self, terms, t0, t1, y0, args):
        raise AssertionError(
            "`_Checkpointing` states are built by `ReversibleAdjoint`."
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state, count, buffer = solver_state
        y1, y_error, dense_info, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        count = count + 1
        scratch = len(jtu.tree_leaves(buffer)[0]) - 1
        slot = jnp.where(count % self.every == 0, count // self.every - 1, scratch)
        buffer = jtu.tree_map(
            lambda b, x: lax.dynamic_update_index_in_dim(b, x, slot, axis=0),
            buffer,
            (y1, inner_state),
        )
        return y1, y_error, dense_info, (inner_state, count, buffer), result


class _Grid(eqx.Module):
    r"""The time grid as a closed form in the step index: `grid(n)` is $t_n$.

    The forward pass steps on it (through `_GridController`) and the backward pass
    recomputes it, so that no time is stored per step. Both passes evaluate this one
    function, and it contains no division: recomputing diffrax's own
    `t0 + (t1 - t0) * (n / N)` would not give the same bits, because XLA rewrites a
    division by a broadcast scalar into a multiplication by its reciprocal in some
    compiled contexts and not in others. For an SDE this is what makes the replayed
    Brownian increments bitwise those of the forward pass.

    On $[t_0, T]$ with $N$ steps:

    - `ConstantStepSize`: the first step ends at $\min(t_0 + \Delta t_0, T)$ as set up
      by `diffeqsolve`, then $t_n = t_0 + n h$ with $h = (T - t_0)/N$ computed once,
      and $t_N = T$: diffrax's grid to within two ULP (diffrax computes
      $t_0 + (T - t_0)(n/N)$).
    - `StepTo(ts)`: $t_n$ = `ts[n]`.

    Both are clipped to $T$ within 100 ULP, as diffrax's solve loop does.
    """

    t0: Array
    t1: Array
    first: Array
    clip_floor: Array
    step: Array | None
    num_steps: Array | None
    ts: Array | None

    def __call__(self, n):
        if self.ts is None:
            t = self.t0 + n.astype(self.step.dtype) * self.step
            t = jnp.where(n == self.num_steps, self.t1, t)
        else:
            t = self.ts[n]
        t = jnp.where(t > self.clip_floor, self.t1, t)
        return jnp.where(n == 0, self.t0, jnp.where(n == 1, self.first, t))


def _make_grid(stepsize_controller, init_state, t1) -> _Grid:
    t0 = init_state.tprev
    if isinstance(stepsize_controller, StepTo):
        step = num_steps = None
        ts = stepsize_controller.ts
    else:
        num_steps = constant_step_count(init_state.controller_state)
        step = (t1 - t0) / jnp.maximum(num_steps, 1).astype(jnp.result_type(t0))
        step = eqx.error_if(
            step,
            ~jnp.isfinite(t1),
            "`ReversibleAdjoint` needs a finite `t1` with `ConstantStepSize`.",
        )
        ts = None
    return _Grid(t0, t1, init_state.tnext, t1_clip_floor(t1), step, num_steps, ts)


class _GridController(AbstractStepSizeController):
    """Steps on a `_Grid`; its state is the index of the current `tnext`."""

    grid: _Grid

    def wrap(self, direction):
        return self

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        raise AssertionError("`_GridController` states are built by the adjoint.")

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, n):
        del t0, y0, y1_candidate, args, y_error, error_order
        return True, t1, self.grid(n + 1), False, n + 1, RESULTS.successful


def _forward(self, y, solver_state, args, terms, *, init_state, **kwargs):
    init_state = replace_fields(init_state, y=y, solver_state=solver_state)
    return lax_loop(self._loop, args=args, terms=terms, init_state=init_state, **kwargs)


@eqx.filter_custom_vjp
def _reversible_loop(y__ss__args__terms, *, self, **kwargs):
    return _forward(self, *y__ss__args__terms, **kwargs)


@_reversible_loop.def_fwd
def _reversible_loop_fwd(
    perturbed, y__ss__args__terms, *, self, solver, init_state, max_steps, **kwargs
):
    del perturbed
    y, solver_state, args, terms = y__ss__args__terms
    k = self.checkpoint_every
    if k is None:
        checkpoints = None
        final_state, aux_stats = _forward(
            self,
            y,
            solver_state,
            args,
            terms,
            solver=solver,
            init_state=init_state,
            max_steps=max_steps,
            **kwargs,
        )
    else:
        # One slot per checkpoint plus one scratch slot; see `_Checkpointing`.
        num_slots = max_steps // k + 1
        buffer = jtu.tree_map(
            lambda x: jnp.zeros((num_slots, *jnp.shape(x)), jnp.result_type(x)),
            (y, solver_state),
        )
        wrapped_state = (solver_state, jnp.asarray(0, jnp.int32), buffer)
        final_state, aux_stats = _forward(
            self,
            y,
            wrapped_state,
            args,
            terms,
            solver=_Checkpointing(solver, k),
            init_state=init_state,
            max_steps=max_steps,
            **kwargs,
        )
        inner_state, _, checkpoints = final_state.solver_state
        final_state = replace_fields(final_state, solver_state=inner_state)
    residuals = (
        final_state.y,
        final_state.solver_state,
        final_state.num_steps,
        checkpoints,
    )
    return (final_state, aux_stats), residuals


def _ts_cotangent(solver, ts, grad_ys, offset, dense_info, n, t_prev, t_next):
    """Cotangent of a step's dense output from the `SaveAt(ts=...)` values that the
    forward pass interpolated inside it: those with $t_{n-1} < ts_j \\le t_n$ (all
    $ts_j \\le t_1$ for the first step)."""
    zeros = jtu.tree_map(jnp.zeros_like, dense_info)
    if ts is None:
        return zeros
    lo = jnp.where(n == 1, 0, jnp.searchsorted(ts, t_prev, side="right"))
    hi = jnp.searchsorted(ts, t_next, side="right")

    def evaluate(_dense_info, t):
        interp = solver.interpolation_cls(t0=t_prev, t1=t_next, **_dense_info)
        return interp.evaluate(t)

    def body(carry):
        j, acc = carry
        g = jtu.tree_map(lambda gy: gy[offset + j], grad_ys)
        _, vjp = jax.vjp(lambda d: evaluate(d, ts[j]), dense_info)
        (a,) = vjp(g)
        return j + 1, jtu.tree_map(jnp.add, acc, a)

    _, acc = lax.while_loop(lambda c: c[0] < hi, body, (lo, zeros))
    return acc


@_reversible_loop.def_bwd
def _reversible_loop_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__ss__args__terms,
    *,
    self,
    solver,
    stepsize_controller,
    saveat,
    init_state,
    **kwargs,
):
    del kwargs
    y_final, ss_final, num_steps, checkpoints = residuals
    y0, ss0, args, terms = y__ss__args__terms
    perturbed_y0, perturbed_ss0, perturbed_args, perturbed_terms = perturbed
    params = (args, terms)
    diff_params, nondiff_params = eqx.partition(
        params, (perturbed_args, perturbed_terms)
    )
    rev_terms = jtu.tree_map(_Reversed, terms, is_leaf=_is_atomic_term)
    time = stepsize_controller.grid
    k = self.checkpoint_every

    subsaveat = saveat.subs
    grad_ys = grad_final_state__aux_stats[0].save_state.ys
    # The (unfilled) output buffers give the shapes of the missing cotangents.
    grad_ys = fill_cotangents(init_state.save_state.ys, grad_ys)
    offset = 1 if subsaveat.t0 else 0
    num_ts = 0 if subsaveat.ts is None else len(subsaveat.ts)
    made_jump0 = init_state.made_jump

    def step(y, ss, _diff_params, t_prev, t_next, made_jump):
        _args, _terms = eqx.combine(_diff_params, nondiff_params)
        y1, _, dense_info, ss1, _ = solver.step(
            _terms, t_prev, t_next, y, _args, ss, made_jump
        )
        return y1, ss1, dense_info

    def reconstruct(y, ss, t_next, t_prev):
        y_prev, _, _, ss_prev, _ = solver.step(
            rev_terms, t_next, t_prev, y, args, ss, False
        )
        return y_prev, ss_prev

    def load(m):
        if k is None:
            return y0, ss0
        # Slot `m // k - 1` holds the state after step `m`; state 0 is the input.
        stored = jtu.tree_map(lambda b: b[m // k - 1], checkpoints)
        return jtu.tree_map(lambda a, b: jnp.where(m == 0, a, b), (y0, ss0), stored)

    def body(carry):
        n, y, ss, a_y, a_ss, a_params = carry
        t_next = time(n)
        t_prev = time(n - 1)
        m = n - 1
        is_checkpoint = (m == 0) if k is None else (m % k == 0)
        y_prev, ss_prev = lax.cond(
            is_checkpoint,
            lambda: load(m),
            lambda: reconstruct(y, ss, t_next, t_prev),
        )
        if made_jump0 is False:
            made_jump = False
        else:
            made_jump = made_jump0 & (n == 1)
        (_, _, dense_info), vjp = jax.vjp(
            lambda _y, _ss, _p: step(_y, _ss, _p, t_prev, t_next, made_jump),
            y_prev,
            ss_prev,
            diff_params,
        )
        a_dense = _ts_cotangent(
            solver, subsaveat.ts, grad_ys, offset, dense_info, n, t_prev, t_next
        )
        a_y, a_ss, g_params = vjp((a_y, a_ss, a_dense))
        a_params = jtu.tree_map(jnp.add, a_params, g_params)
        return m, y_prev, ss_prev, a_y, a_ss, a_params

    a_y = jtu.tree_map(jnp.zeros_like, y_final)
    if subsaveat.t1:
        a_y = jtu.tree_map(lambda a, g: a + g[-1], a_y, grad_ys)
    a_ss = jtu.tree_map(jnp.zeros_like, ss_final)
    a_params = jtu.tree_map(jnp.zeros_like, diff_params)
    carry = (num_steps, y_final, ss_final, a_y, a_ss, a_params)
    _, _, _, a_y, a_ss, a_params = lax.while_loop(lambda c: c[0] > 0, body, carry)

    a_y = jtu.tree_map(jnp.add, a_y, t0_cotangent(saveat, grad_ys, a_y))
    if num_ts > 0:
        # When t0 == t1 no step is taken and every `ts` output is y0 itself.
        no_steps = num_steps == 0
        a_y = jtu.tree_map(
            lambda a, g: a + jnp.where(no_steps, g[offset : offset + num_ts].sum(0), 0),
            a_y,
            grad_ys,
        )
    keep = lambda g, p: g if p else None
    grad_y0 = jtu.tree_map(keep, a_y, perturbed_y0)
    grad_ss0 = jtu.tree_map(keep, a_ss, perturbed_ss0)
    grad_args, grad_terms = a_params
    return grad_y0, grad_ss0, grad_args, grad_terms


class ReversibleAdjoint(AbstractAdjoint):
    r"""Backpropagate through [`diffrax.diffeqsolve`][] in $O(1)$ memory by
    reconstructing the trajectory backwards, step by step.

    For a solver whose step $\Phi_h$ is (nearly) its own inverse,
    $\Phi_{-h} \circ \Phi_h = \mathrm{id} + O(h^{m+1})$, the forward pass stores only
    the final state. On the backward pass each earlier state is rebuilt by running the
    same solver from $t_n$ to $t_{n-1}$ with the negated increment $-(\Delta t_n,
    \Delta W_n)$ (for an SDE: the same Brownian increment, negated), and the cotangent
    is pulled back through the recomputed forward step. Memory is $O(1)$ in the number
    of steps; the backward pass costs one reconstruction step and one differentiated
    step per forward step.

    Supported solvers:

    - [`diffrax.ReversibleHeun`][]: algebraically reversible, so the reconstruction and
        the gradients are exact up to floating-point round-off. Linearly stable only on
        the imaginary segment $[-i, i]$: it blows up on dissipative models at large
        steps.
    - [`gqdiffrax.EES25`][], [`gqdiffrax.EES27`][]: reconstruct with a global drift of
        $O(h^5)$ and $O(h^7)$ on ODEs ($O(h^2)$ and $O(h^3)$ in expectation on SDEs),
        which is also the order of the gradient error; stable on the real intervals
        $[-3.09, 0]$ and $[-3.92, 0]$.

    Gradients are computed with respect to `y0`, `args`, and the parameters of the
    vector fields in `terms`, including arrays closed over by a plain function or
    lambda. Not with respect to `t0`, `t1`, `dt0` or `SaveAt(ts=...)`.

    !!! warning

        The time grid must be known in advance: use `dt0=...` with
        `stepsize_controller=diffrax.ConstantStepSize()` (the default) or
        `diffrax.StepTo(ts=...)`. Only `SaveAt(t0=..., t1=..., ts=...)` is supported,
        and no events.

    !!! warning

        With an EES solver the gradients are approximate: their error is the
        accumulated reconstruction drift. `checkpoint_every=k` bounds it to $k$ steps at
        a memory cost of $O(n/k)$ states.

    ??? cite "References"

        ```bibtex
        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }

        @article{shmelev2025eessde,
            author={Shmelev, Daniil and Salvi, Cristopher},
            title={Explicit and Effectively Symmetric Schemes for Neural {SDE}s},
            journal={arXiv:2509.20599},
            year={2025}
        }
        ```
    """

    checkpoint_every: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        k = self.checkpoint_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                "`ReversibleAdjoint(checkpoint_every=...)` must be `None` (store only "
                f"the final state) or a positive integer; got {k!r}."
            )

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t1,
        max_steps,
        init_state,
        throw,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        # `kwargs` (`t0`, `dt0`, `progress_meter`) go to diffrax's loop as they are.
        del throw, passed_solver_state, passed_controller_state
        _check_supported(
            solver, stepsize_controller, event, saveat, terms, max_steps, self
        )
        # Step on a grid that the backward pass can recompute bitwise; see `_Grid`.
        grid = _make_grid(stepsize_controller, init_state, t1)
        init_state = replace_fields(
            init_state, controller_state=jnp.asarray(1, jnp.int32)
        )
        terms = closure_convert_terms(terms, init_state.tprev, init_state.y, args)
        y = init_state.y
        solver_state = init_state.solver_state
        # `y` and the solver state travel as differentiable inputs of the custom VJP:
        # the initial solver state of `ReversibleHeun` depends on `y0` and the
        # parameters through `f(t0, y0)`, and must receive its cotangent.
        init_state = replace_fields(init_state, y=None, solver_state=None)
        # Everything else enters the custom VJP as a keyword argument, which it does
        # not differentiate. The only arrays there are times: if they are
        # differentiated, say so by name rather than leaving it to `filter_custom_vjp`'s
        # generic complaint about its keyword arguments.
        kwargs = nondiff(
            dict(
                kwargs,
                solver=solver,
                stepsize_controller=_GridController(grid),
                event=event,
                saveat=saveat,
                t1=t1,
                max_steps=max_steps,
                init_state=init_state,
            ),
            name=f"With `adjoint={_NAME}`, the times (`t0`, `t1`, `dt0`, "
            "`SaveAt(ts=...)`, `StepTo(ts=...)`)",
        )
        final_state, aux_stats = _reversible_loop(
            (y, solver_state, args, terms), self=self, **kwargs
        )
        return only_transpose_ys(final_state), aux_stats


def _check_supported(solver, stepsize_controller, event, saveat, terms, max_steps, adj):
    """Raises, at trace time, for everything `ReversibleAdjoint` cannot do."""
    # Exact type checks: a subclass may change the step (its tableau, or `step`
    # itself), and then it is no longer the step we know how to reverse.
    if type(solver) not in _REVERSIBLE_SOLVERS:
        raise ValueError(
            "`ReversibleAdjoint` reconstructs the forward trajectory by stepping "
            "backwards, which needs a (near-)reversible solver: `gqdiffrax.EES25()`, "
            "`gqdiffrax.EES27()` or `diffrax.ReversibleHeun()`. Got "
            f"`{type(solver).__name__}`. Switch to one of these solvers, or keep this "
            "solver and use `adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    if type(stepsize_controller) not in _FIXED_GRID_CONTROLLERS:
        raise ValueError(
            "`ReversibleAdjoint` recomputes the time grid on the backward pass, so it "
            "needs a fixed grid: `stepsize_controller=diffrax.ConstantStepSize()` with "
            "`dt0=...`, or `diffrax.StepTo(ts=...)`. Got "
            f"`{type(stepsize_controller).__name__}`. For adaptive steps use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    if event is not None:
        raise NotImplementedError(
            "`ReversibleAdjoint` does not support events; use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
    is_unsafe = lambda x: isinstance(x, UnsafeBrownianPath)
    if any(map(is_unsafe, jtu.tree_leaves(terms, is_leaf=is_unsafe))):
        raise ValueError(
            "`ReversibleAdjoint` replays each Brownian increment on the backward pass, "
            "which `UnsafeBrownianPath` cannot do. Use `diffrax.VirtualBrownianTree`."
        )
    check_saveat(saveat, _NAME)
    if adj.checkpoint_every is not None and max_steps is None:
        raise ValueError(
            "`ReversibleAdjoint(checkpoint_every=...)` allocates its checkpoints from "
            "`max_steps`, so it cannot be used with `max_steps=None`. Pass an upper "
            "bound on the number of steps, e.g. `max_steps=4096`."
        )


ReversibleAdjoint.__init__.__doc__ = r"""**Arguments:**

- `checkpoint_every`: `None` (the default) to keep only the final state, so that memory
    is independent of the number of steps. Or a positive integer $k$: also keep the
    state after every $k$-th step, which resets the reconstruction drift of the EES
    solvers every $k$ steps, for $O(n/k)$ memory. Requires `max_steps` to be set.
"""
