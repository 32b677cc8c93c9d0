r"""Gauss–Legendre quadrature and the node rules of the GQ adjoint.

The parameter gradient of a neural ODE is the one-dimensional integral

$$\frac{dL}{d\theta} = \int_{t_0}^{t_K} a_z(t)^\top
\frac{\partial f}{\partial \theta}\, dt,$$

split at the save times (where $a_z$ jumps), at the step-size controller's `jump_ts`
(where the user has said the vector field is not smooth) and at forward checkpoints. On
each interval $[t_{k-1}, t_k]$ it is approximated with an $n_k$-point Gauss–Legendre
rule, exact for polynomials of degree $2n_k - 1$ (`GQAdjoint(quadrature="interval")`,
the paper's method; the default instead puts a $\lceil (p+1)/2 \rceil$-point rule on
every backward step, `StepQuadrature`). Two rules choose $n_k$; with
$\ell_k = t_k - t_{k-1}$, $T = t_1 - t_0$, NFE and $N$ the forward solve's vector-field
evaluations and steps:

- **The paper's rule** (`GQAdjoint(C=...)`):
  $n_k = \lceil C \cdot \mathrm{NFE} \cdot \ell_k / T \rceil$.
- **The tolerance rule** (`C=None`). An $n$-point rule on an interval of
  length $\ell$ has error $c_n\, \ell^{2n+1} g^{(2n)}(\xi)$ with
  $c_n = (n!)^4 / ((2n+1)((2n)!)^3)$. If the integrand varies on the time scale the
  solver resolves, $|g^{(m)}| \approx |g|\,\lambda^m$ with $\lambda h \approx \rho =
  \varepsilon^{1/(p+1)}$ for a step $h$ of a solver of order $p$ at relative tolerance
  $\varepsilon$ (`rtol`). An interval that holds $s_k = N \ell_k / T$ steps then has
  relative quadrature error about $c_n (s_k \rho)^{2n}$, and
  $n_k$ is the smallest $n$ with $c_n (s_k \rho)^{2n} \le \varepsilon$, and never
  fewer than the paper's rule at $C = 0.1$ gives. With a constant step size there is
  no tolerance; $\rho = 0.1$ (ten steps per time scale of the solution) and
  $\varepsilon = \rho^{p+1}$ stand in for it.

Both are capped at `max_nodes`. $n_k$ is only known at run time (the step count is
traced), so the rules for every $n \le n_{\max}$ are stored in one padded table and row
$n$ is looked up dynamically; padded slots carry weight zero. The quadrature sum of an
interval then evaluates exactly $n_k$ rows (`node_sum`).
"""

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, PyTree, Real

from ._adjoint_common import AbstractWrappedSolver


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


@ft.cache
def _log_error_constants(max_nodes: int) -> np.ndarray:
    r"""$\log c_n$ for $n = 1, \ldots, n_{\max}$: the $n$-point Gauss–Legendre error
    constant $c_n = (n!)^4 / ((2n+1)((2n)!)^3)$."""
    n = np.arange(1, max_nodes + 1)
    lg = np.vectorize(math.lgamma)
    return 4 * lg(n + 1) - np.log(2 * n + 1) - 3 * lg(2 * n + 1)


def tolerance_nodes(
    num_steps: Int[Array, ""] | int,
    length: Real[Array, " intervals"],
    span: Real[Array, ""] | float,
    *,
    order: int,
    rtol: Real[Array, ""] | float | None,
    max_nodes: int,
) -> Int[Array, " intervals"]:
    r"""The tolerance rule: the smallest $n$ with $c_n (s \rho)^{2n} \le
    \varepsilon$ on each interval, where $s = N \ell / T$ is the number of forward
    steps the interval holds and $\rho = \varepsilon^{1/(p+1)}$ (see the module
    docstring).

    **Arguments:**

    - `num_steps`: $N$, the forward solve's steps over the span (rejected ones too).
    - `length`: the intervals' lengths $\ell_k$.
    - `span`: $T$.
    - `order`: $p$, the solver's order.
    - `rtol`: $\varepsilon$, the step-size controller's relative tolerance; `None` for
        a constant step size.
    - `max_nodes`: the cap.

    **Returns:**

    The node count of every interval: 0 for an interval of length zero, else in
    $[1, n_{\max}]$.
    """
    length = jnp.abs(jnp.atleast_1d(jnp.asarray(length)))
    span = jnp.abs(jnp.asarray(span))
    dtype = length.dtype
    if rtol is None:
        log_rho = jnp.log(jnp.asarray(0.1, dtype))
        log_eps = (order + 1) * log_rho
    else:
        # Below float64's resolution the model stops meaning anything; the cap
        # `max_nodes` then decides.
        log_eps = jnp.log(jnp.maximum(jnp.asarray(rtol, dtype), 1e-14))
        log_rho = log_eps / (order + 1)
    frac = jnp.where(span > 0, length / jnp.where(span > 0, span, 1), 0)
    steps = jnp.asarray(num_steps, dtype) * frac
    log_s = jnp.log(jnp.where(steps > 0, steps, 1))
    n = jnp.arange(1, max_nodes + 1, dtype=dtype)[None, :]
    log_c = jnp.asarray(_log_error_constants(max_nodes), dtype)[None, :]
    log_err = log_c + 2 * n * (log_s[:, None] + log_rho)
    enough = log_err <= log_eps
    # The first `n` that is enough; `max_nodes` when none is.
    first = jnp.where(
        jnp.any(enough, axis=-1), jnp.argmax(enough, axis=-1) + 1, max_nodes
    )
    return jnp.where(length > 0, first, 0).astype(jnp.int32)


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


def _scale_rows(tree: PyTree[Array], w: Float[Array, " rows"]) -> PyTree[Array]:
    """Multiply each leaf's leading axis by the weights `w`."""
    return jtu.tree_map(
        lambda x: x * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype), tree
    )


def _node_pieces(vjp_theta, chunk, num, acc, ts, ws, zs, as_):
    r"""`acc` plus $\sum_{j < \mathrm{num}} w_j\, a_j^\top \partial f/\partial\theta
    (\tau_j, z_j)$: `num // chunk` full chunks of one `vmap`-ed VJP each, then the
    remainder in power-of-two pieces (the binary digits of `num mod chunk`), so exactly
    `num` rows are evaluated and no work goes into padding."""

    def rows(acc, start, size):
        take = lambda x: lax.dynamic_slice_in_dim(x, start, size)
        t_c, w_c, z_c, a_c = jtu.tree_map(take, (ts, ws, zs, as_))
        g = vjp_theta(t_c, z_c, _scale_rows(a_c, w_c))
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


def make_node_sum(
    f_theta: Callable[[PyTree, PyTree, Array, Array, PyTree], PyTree], chunk: int
) -> Callable:
    r"""The quadrature sum of one interval, with a batching rule of its own.

    `f_theta(theta, const, direction, t, z)` is the vector field as a function of the
    parameters `theta`. The returned
    `node_sum(theta, const, direction, acc, ts, ws, zs, as_, n)` is
    `acc` $+ \sum_{j<n} w_j\, a_j^\top \partial f/\partial\theta(\tau_j, z_j)$ over
    the first `n` rows of the node arrays.

    Unbatched, the piece schedule follows the interval's own node count `n`. Under
    `jax.vmap` (per-sample solves) `n` differs between samples, and a data-dependent
    `lax.cond` would be batched into a `select` that runs every piece; instead the
    schedule follows the largest `n` in the batch, which is not batched, and the extra
    rows of the other samples carry weight zero (see `interval_rule`).
    """

    def pieces(num, theta, const, direction, acc, ts, ws, zs, as_):
        def vjp_theta(t_c, z_c, cot):
            _, vjp = jax.vjp(
                lambda th: jax.vmap(lambda t, z: f_theta(th, const, direction, t, z))(
                    t_c, z_c
                ),
                theta,
            )
            (g,) = vjp(cot)
            return g

        return _node_pieces(vjp_theta, chunk, num, acc, ts, ws, zs, as_)

    @jax.custom_batching.custom_vmap
    def node_sum(theta, const, direction, acc, ts, ws, zs, as_, n):
        return pieces(n, theta, const, direction, acc, ts, ws, zs, as_)

    @node_sum.def_vmap
    def _(axis_size, in_batched, theta, const, direction, acc, ts, ws, zs, as_, n):
        *batched, n_batched = in_batched
        num = jnp.max(n) if n_batched else n
        in_axes = jtu.tree_map(lambda b: 0 if b else None, tuple(batched))
        out = jax.vmap(
            lambda *xs: pieces(num, *xs), in_axes=in_axes, axis_size=axis_size
        )(theta, const, direction, acc, ts, ws, zs, as_)
        return out, jtu.tree_map(lambda _: True, out)

    return node_sum


class StepQuadrature(AbstractWrappedSolver):
    r"""Wraps the solver of a backward solve so that every step also integrates
    $a_z^\top \partial f/\partial\theta$ over itself, with a Gauss–Legendre rule on
    the step's dense output, into a sum carried in the solver state. diffrax keeps a
    step's solver state only when it accepts the step, so the sum holds accepted steps
    only.

    The backward solve runs in diffrax's normalised time $s = -t$; `integrand(t, z, a)`
    takes the nodes' (forward) times, states and weighted adjoints and returns their
    summed parameter cotangent.
    """

    solver: Any
    integrand: Any = eqx.field(static=True)
    zeros: Any
    nodes: tuple[float, ...] = eqx.field(static=True)
    weights: tuple[float, ...] = eqx.field(static=True)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args), self.zeros

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        inner_state, total = solver_state
        y1, y_error, dense_info, inner_state, result = self.solver.step(
            terms, t0, t1, y0, args, inner_state, made_jump
        )
        interpolation = self.solver.interpolation_cls(t0=t0, t1=t1, **dense_info)
        x = jnp.asarray(self.nodes, t0.dtype)
        half = 0.5 * (t1 - t0)
        s = 0.5 * (t0 + t1) + half * x
        z, a = jax.vmap(interpolation.evaluate)(s)
        w = half * jnp.asarray(self.weights, t0.dtype)
        weighted = jtu.tree_map(
            lambda x: x * w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(x.dtype), a
        )
        total = jtu.tree_map(jnp.add, total, self.integrand(-s, z, weighted))
        return y1, y_error, dense_info, (inner_state, total), result
