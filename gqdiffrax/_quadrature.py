r"""Gauss–Legendre rules, and the quadrature rules `GQAdjoint` takes.

The parameter gradient of a neural ODE is the one-dimensional integral

$$\frac{dL}{d\theta} = \int_{t_0}^{t_K} a_z(t)^\top
\frac{\partial f}{\partial \theta}\, dt.$$

A rule is an object, as diffrax's step-size controllers are: [`gqdiffrax.StepGauss`][]
(the default) puts a Gauss rule on every step of the backward solve;
[`gqdiffrax.IntervalGauss`][] (the paper's method) puts one on each interval between
save times. `GQAdjoint`'s backward pass (`_backward.backward_pass`) is one loop over the
pieces of $[t_0, t_K]$ that the rule asks for, and calls the rule's methods for what
differs between them: where the pieces end, how each backward step is taken, where the
nodes are and how they are summed.

An interval's node count is only known at run time (the forward NFE is traced), so the
rules for every $n \le n_{\max}$ are stored in one padded table and row $n$ is looked up
dynamically; padded slots carry weight zero. The quadrature sum of an interval then
evaluates exactly $n_k$ rows (`make_node_sum`).
"""

import abc
import functools as ft
import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, Real

from ._step import GaussStep, scale_rows


MAX_NODES = 64


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Nodes and weights of the $n$-point Gauss–Legendre rule on $[-1, 1]$.

    $$\int_{-1}^{1} p(x)\,dx = \sum_{i=1}^{n} w_i\, p(x_i)$$

    holds exactly (up to about `1e-13` in float64) for every polynomial $p$ of degree at
    most $2n - 1$.

    **Arguments:**

    - `n`: the number of nodes, $1 \le n \le 64$.

    **Returns:**

    A 2-tuple `(nodes, weights)` of float64 NumPy arrays of shape `(n,)`, nodes
    ascending.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"`n` must be a Python int, got {type(n).__name__}.")
    if not 1 <= n <= MAX_NODES:
        raise ValueError(
            f"Gauss–Legendre rules are tabulated for 1 <= n <= {MAX_NODES}; got n={n}."
        )
    return _gauss_legendre(int(n))


@ft.cache
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Golub–Welsch via NumPy: eigenvalues of the Jacobi matrix, polished by one Newton
    # step inside `leggauss`. Accurate to a few ULP for n <= 64.
    nodes, weights = np.polynomial.legendre.leggauss(n)
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


@ft.cache
def _table(max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Row `n` holds the `n`-point rule with nodes *descending* (the order a backward
    solve reaches them), padded to `max_nodes` with node -1 (the interval's far end,
    where the backward solve stops anyway) and weight 0. Row 0 is all padding."""
    nodes = np.full((max_nodes + 1, max_nodes), -1.0)
    weights = np.zeros((max_nodes + 1, max_nodes))
    for n in range(1, max_nodes + 1):
        x, w = _gauss_legendre(n)
        nodes[n, :n] = x[::-1]
        weights[n, :n] = w[::-1]
    return nodes, weights


def num_nodes(
    C: float,
    nfe: Int[Array, ""] | int,
    length: Real[Array, ""] | float,
    span: Real[Array, ""] | float,
    max_nodes: int,
) -> Int[Array, ""]:
    r"""The node rule $n = \min(\lceil C \cdot \mathrm{NFE} \cdot \ell / s \rceil,
    n_{\max})$ for an interval of length $\ell$ in a solve of span $s$.

    An interval of length zero gets no nodes; one of positive length at least one.
    """
    length = jnp.abs(jnp.asarray(length))
    span = jnp.abs(jnp.asarray(span))
    frac = jnp.where(span > 0, length / jnp.where(span > 0, span, 1), 0)
    raw = C * jnp.asarray(nfe, frac.dtype) * frac
    # A product that is an integer up to rounding (0.1 * 1000 * (2π/50) / 2π) must not
    # be bumped to the next integer by the ceiling.
    raw = jnp.ceil(raw * (1 - 16 * jnp.finfo(raw.dtype).eps))
    n = jnp.clip(raw, 0, max_nodes).astype(jnp.int32)
    return jnp.where(length > 0, jnp.maximum(n, 1), 0)


def interval_rule(
    n: Int[Array, ""],
    t_start: Real[Array, ""],
    t_end: Real[Array, ""],
    max_nodes: int,
) -> tuple[Float[Array, " max_nodes"], Float[Array, " max_nodes"]]:
    r"""Times and weights of the `n`-point rule on the interval from `t_end` back to
    `t_start`, in the order a backward solve reaches them, padded to `max_nodes`.

    Maps $x \in [-1, 1]$ to $t = \tfrac{t_s + t_e}{2} + \tfrac{t_e - t_s}{2} x$, so the
    weights are scaled by $\tfrac{t_e - t_s}{2}$. Padded slots sit at `t_start` with
    weight zero.
    """
    nodes, weights = _table(max_nodes)
    dtype = jnp.result_type(t_start, t_end)
    x = jnp.asarray(nodes, dtype)[n]
    w = jnp.asarray(weights, dtype)[n]
    half = 0.5 * (t_end - t_start)
    mid = 0.5 * (t_end + t_start)
    times = mid + half * x
    # Make padded slots land exactly on `t_start`, not a rounding error away from it.
    times = jnp.where(w == 0, t_start, times)
    return times, half * w


def _node_pieces(vjp_theta, chunk, num, acc, ts, ws, zs, as_):
    r"""`acc` plus $\sum_{j < \mathrm{num}} w_j\, a_j^\top \partial f/\partial\theta
    (\tau_j, z_j)$: `num // chunk` full chunks of one `vmap`-ed VJP each, then the
    remainder in power-of-two pieces (the binary digits of `num mod chunk`), so exactly
    `num` rows are evaluated and no work goes into padding."""

    def rows(acc, start, size):
        take = lambda x: lax.dynamic_slice_in_dim(x, start, size)
        t_c, w_c, z_c, a_c = jtu.tree_map(take, (ts, ws, zs, as_))
        g = vjp_theta(t_c, z_c, scale_rows(a_c, w_c))
        return jtu.tree_map(jnp.add, acc, g)

    num_full = num // chunk
    acc = lax.fori_loop(0, num_full, lambda i, acc: rows(acc, i * chunk, chunk), acc)
    start = num_full * chunk
    size = 1 << ((chunk - 1).bit_length() - 1) if chunk > 1 else 0
    while size >= 1:
        acc, start = lax.cond(
            num - start >= size,
            lambda acc, start, size=size: (rows(acc, start, size), start + size),
            lambda acc, start: (acc, start),
            acc,
            start,
        )
        size //= 2
    return acc


def make_node_sum(chunk: int) -> Callable:
    r"""The quadrature sum of one interval, with a batching rule of its own.

    The returned `node_sum(field, theta, acc, ts, ws, zs, as_, n)` is `acc`
    $+ \sum_{j<n} w_j\, a_j^\top \partial f/\partial\theta(\tau_j, z_j)$ over the first
    `n` rows of the node arrays, for `field` a `_step.ParamField`.

    Unbatched, the piece schedule follows the interval's own node count `n`. Under
    `jax.vmap` (per-sample solves) `n` differs between samples, and a data-dependent
    `lax.cond` would be batched into a `select` that runs every piece; instead the
    schedule follows the largest `n` in the batch, which is not batched, and the extra
    rows of the other samples carry weight zero (see `interval_rule`).
    """

    def pieces(num, field, theta, acc, ts, ws, zs, as_):
        vjp_theta = lambda t, z, cot: field.vjp(theta, t, z, cot)
        return _node_pieces(vjp_theta, chunk, num, acc, ts, ws, zs, as_)

    @jax.custom_batching.custom_vmap
    def node_sum(field, theta, acc, ts, ws, zs, as_, n):
        return pieces(n, field, theta, acc, ts, ws, zs, as_)

    @node_sum.def_vmap
    def _(axis_size, in_batched, field, theta, acc, ts, ws, zs, as_, n):
        *batched, n_batched = in_batched
        num = jnp.max(n) if n_batched else n
        in_axes = jtu.tree_map(lambda b: 0 if b else None, tuple(batched))
        out = jax.vmap(
            lambda *xs: pieces(num, *xs), in_axes=in_axes, axis_size=axis_size
        )(field, theta, acc, ts, ws, zs, as_)
        return out, jtu.tree_map(lambda _: True, out)

    return node_sum


class AbstractQuadrature(eqx.Module):
    r"""How [`gqdiffrax.GQAdjoint`][] integrates $a_z^\top \partial f/\partial\theta$
    over the backward solve.

    The backward pass is one loop over pieces of $[t_0, t_K]$, each solved backwards
    from its right end; a rule says where the pieces end (`bounds`), how each backward
    step is taken (`step_solver`), where its nodes are (`node_times`) and how they are
    summed (`integrate`). Subclass it only to change these; GQAdjoint checks nothing
    more.
    """

    crosses_saves: ClassVar[bool]

    @abc.abstractmethod
    def bounds(self, times, splits):
        """The pieces' right ends: among the save `times` after $t_0$ (sorted, the
        last is where the backward solve starts) and the `splits` (sorted, or
        `None`), those where the backward solve stops."""

    @abc.abstractmethod
    def node_counts(self, nfe, lengths, span):
        """Nodes of each piece that `node_times` places, from the forward NFE."""

    @abc.abstractmethod
    def step_solver(self, solver, order, field, theta, rows):
        """The solver of the backward solve of $[z, a_z]$ on one piece."""

    @abc.abstractmethod
    def node_times(self, n, t_start, t_end):
        """Times and weights of the nodes the piece's solve saves, or `(None, None)`."""

    @abc.abstractmethod
    def integrate(self, acc, sol, field, theta, weights, n):
        """`acc` plus the piece's integral, from its backward solve `sol`."""


class StepGauss(AbstractQuadrature):
    r"""A Gauss–Legendre rule on every step of the backward solve (the default).

    On a backward step $[s, e]$ of a solver of order $p$, the
    $\lceil (p+1)/2 \rceil$ Gauss nodes are read off the step's dense output, and one
    vector-Jacobian product of the vector field, batched over them, adds

    $$\frac{e - s}{2} \sum_j w_j\, a_z(\tau_j)^\top
    \frac{\partial f}{\partial\theta}(\tau_j, z(\tau_j))$$

    to the gradient. The backward solve's step-size control then also controls the
    quadrature: wherever the integrand varies fast (a transient, a ReLU unit
    switching, a control's knot) the steps are short, and the gradient is accurate to
    the solver's tolerance there too. It assumes nothing about the integrand beyond
    what the solver assumes of the solution.

    With save times `SaveAt(ts=...)` the backward solve steps across them: a step
    adds the cotangents $\partial L/\partial y(t_k)$ of the save times it spans
    through one forward step of the solver and its dense output (the way the forward
    produced those outputs), so a time series costs about the forward's number of
    backward steps, not one or more per save time. It stops only at split times
    (`jump_ts`, a control's knots, checkpoints).

    Choose it unless you are reproducing the paper.
    """

    crosses_saves: ClassVar[bool] = True

    def bounds(self, times, splits):
        return times[-1:] if splits is None else jnp.concatenate([splits, times[-1:]])

    def node_counts(self, nfe, lengths, span):
        del nfe, span
        return jnp.zeros(lengths.shape, jnp.int32)

    def step_solver(self, solver, order, field, theta, rows):
        nodes = weights = ()
        if jtu.tree_leaves(theta):
            x, w = gauss_legendre(max(1, math.ceil((order + 1) / 2)))
            nodes, weights = tuple(map(float, x)), tuple(map(float, w))
        return GaussStep(solver, field, theta, nodes, weights, rows)

    def node_times(self, n, t_start, t_end):
        del n, t_start, t_end
        return None, None

    def integrate(self, acc, sol, field, theta, weights, n):
        del field, theta, weights, n
        return jtu.tree_map(jnp.add, acc, sol.solver_state.total)


class IntervalGauss(AbstractQuadrature):
    r"""One Gauss–Legendre rule on each interval between save times: the paper's
    method.

    The backward solve stops at every save time. On interval $k$ it puts

    $$n_k = \min\big(\lceil C \cdot \mathrm{NFE} \cdot (t_k - t_{k-1}) /
    (t_K - t_0) \rceil,\ n_{\max}\big)$$

    nodes, with NFE the forward solve's vector-field evaluations; the interval's
    backward solve saves $z$ and $a_z$ there (`SaveAt(ts=...)`), and the sum is one
    VJP of the vector field `vmap`-ed over the nodes, in chunks of at most
    `node_chunk`.

    It assumes the integrand is smooth on each interval and the forward's steps are
    spread evenly over it: a vector field with kinks (a ReLU network, an `abs`, a
    `jnp.where` on $t$ or $y$) or a fast transient breaks that, and the gradient is
    then less accurate than the tolerance asks (the Accuracy page measures by how
    much). Split at the kinks with `jump_ts` where you know them. Choose it to
    reproduce the paper, or on smooth problems with a single save time where the
    Accuracy page shows it is as accurate.

    **Arguments:**

    - `C`: scales the node count with the forward NFE; the paper used `C=0.1` (its
        Table 2 measures training with `C` from `1e-3` to `1e2`).
    - `max_nodes`: the cap $n_{\max}$ on nodes per interval, $1 \le n_{\max} \le 64$.
    - `node_chunk`: how many nodes share one `vmap`-ed VJP; the quadrature's memory
        grows with it. $n_k$ nodes are evaluated as $\lfloor n_k/c \rfloor$ chunks of
        $c$ and the remainder in power-of-two pieces, so no work goes into padding.
        Under `jax.vmap` the pieces follow the largest $n_k$ in the batch.
    """

    crosses_saves: ClassVar[bool] = False
    C: float = 0.1
    max_nodes: int = eqx.field(default=64, static=True)
    node_chunk: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        if isinstance(self.C, (int, float)) and not (
            math.isfinite(self.C) and self.C > 0
        ):
            raise ValueError(
                f"`IntervalGauss(C=...)` must be a finite positive number; got "
                f"C={self.C}. The paper used C=0.1."
            )
        if not isinstance(self.max_nodes, int) or not 1 <= self.max_nodes <= MAX_NODES:
            raise ValueError(
                f"`IntervalGauss(max_nodes=...)` must be an int in [1, {MAX_NODES}]; "
                f"got {self.max_nodes!r}. Gauss–Legendre rules are tabulated up to "
                f"{MAX_NODES} nodes (exact for polynomials of degree 127)."
            )
        if not isinstance(self.node_chunk, int) or self.node_chunk < 1:
            raise ValueError(
                "`IntervalGauss(node_chunk=...)` must be a positive int (how many "
                f"nodes share one vmapped VJP); got {self.node_chunk!r}."
            )

    def bounds(self, times, splits):
        del splits
        return times

    def node_counts(self, nfe, lengths, span):
        return num_nodes(self.C, nfe, lengths, span, self.max_nodes)

    def step_solver(self, solver, order, field, theta, rows):
        del order, field, theta, rows
        return solver

    def node_times(self, n, t_start, t_end):
        return interval_rule(n, t_start, t_end, self.max_nodes)

    def integrate(self, acc, sol, field, theta, weights, n):
        if not jtu.tree_leaves(theta):
            return acc
        zs, as_ = jtu.tree_map(lambda x: x[:-1], sol.ys)
        node_sum = make_node_sum(min(self.node_chunk, self.max_nodes))
        return node_sum(field, theta, acc, sol.ts[:-1], weights, zs, as_, n)
