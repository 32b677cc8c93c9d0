r"""Gauss–Legendre quadrature and the node rule of the GQ adjoint.

The parameter gradient of a neural ODE is the one-dimensional integral

$$\frac{dL}{d\theta} = \int_{t_0}^{t_K} a_z(t)^\top
\frac{\partial f}{\partial \theta}\, dt,$$

split at the save times where $a_z$ jumps. On each interval
$[t_{k-1}, t_k]$ it is approximated with an $n_k$-point Gauss–Legendre rule, exact for
polynomials of degree $2n_k - 1$, where

$$n_k = \min\left(\left\lceil C \cdot \mathrm{NFE} \cdot
\frac{t_k - t_{k-1}}{t_1 - t_0} \right\rceil, n_{\max}\right)$$

and NFE is the number of vector-field evaluations of the forward solve. $n_k$ is only
known at run time (NFE is traced), so the rules for every $n \le n_{\max}$ are stored in
one padded table and row $n$ is looked up dynamically; padded slots carry weight zero.
"""

import functools as ft

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Real


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
