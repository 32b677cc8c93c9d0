"""Small shared helpers for the test suite."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """True when two pytrees have the same structure and close leaves."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol)


def assert_tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Like `np.testing.assert_allclose`, leaf by leaf, with a useful message."""
    xs, xdef = jtu.tree_flatten(x)
    ys, ydef = jtu.tree_flatten(y)
    assert xdef == ydef, f"structures differ: {xdef} vs {ydef}"
    for a, b in zip(xs, ys):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def finite_difference_grad(f, x, *, eps=1e-6):
    """Central finite differences of a scalar function of a pytree of float64 arrays."""
    leaves, treedef = jtu.tree_flatten(x)
    grads = []
    for i, leaf in enumerate(leaves):
        leaf = np.asarray(leaf, dtype=np.float64)
        g = np.zeros_like(leaf)
        for idx in np.ndindex(leaf.shape):
            for sign in (1.0, -1.0):
                bumped = leaf.copy()
                bumped[idx] += sign * eps
                new_leaves = list(leaves)
                new_leaves[i] = jnp.asarray(bumped)
                value = float(f(jtu.tree_unflatten(treedef, new_leaves)))
                g[idx] += sign * value / (2 * eps)
        grads.append(jnp.asarray(g))
    return jtu.tree_unflatten(treedef, grads)


def random_pytree_like(key, x):
    """Random normal leaves shaped like the inexact arrays of `x`."""
    leaves, treedef = jtu.tree_flatten(x)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [
        jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
        for k, l in zip(keys, leaves)
    ]
    return jtu.tree_unflatten(treedef, new)
