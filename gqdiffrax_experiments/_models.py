"""Models shared by several tasks: an MLP vector field and an augmented neural ODE."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._methods import ode_solve, Solve


class MLPField(eqx.Module):
    r"""An MLP vector field on a batch of states, $f(t, z) = \mathrm{MLP}([z, t])$ (or
    $\mathrm{MLP}(z)$), two hidden layers of `width` with softplus activations."""

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(self, in_size, out_size, width, *, time_dependent, key):
        self.time_dependent = time_dependent
        self.mlp = eqx.nn.MLP(
            in_size + time_dependent,
            out_size,
            width,
            depth=2,
            activation=jax.nn.softplus,
            key=key,
        )

    def __call__(self, t, y, args):
        del args
        if self.time_dependent:
            t = jnp.broadcast_to(jnp.asarray(t, y.dtype), y.shape[:-1] + (1,))
            y = jnp.concatenate([y, t], axis=-1)
        return jax.vmap(self.mlp)(y)


class AugmentedODE(eqx.Module):
    """Augmented neural ODE: pad the input with zeros, flow it over [0, 1], and read
    out either a linear layer of the final state (`head`) or its first coordinate."""

    field: MLPField
    head: eqx.nn.Linear | None
    augment: int = eqx.field(static=True)

    def __init__(self, data_dim, augment, width, *, out_size, time_dependent, key):
        fkey, hkey = jr.split(key)
        dim = data_dim + augment
        self.field = MLPField(dim, dim, width, time_dependent=time_dependent, key=fkey)
        self.head = None if out_size is None else eqx.nn.Linear(dim, out_size, key=hkey)
        self.augment = augment

    def __call__(self, x, solve: Solve):
        z0 = jnp.concatenate(
            [x, jnp.zeros(x.shape[:-1] + (self.augment,), x.dtype)], -1
        )
        z1 = ode_solve(solve, self.field, 0.0, 1.0, z0).ys[-1]
        return z1[..., :1] if self.head is None else jax.vmap(self.head)(z1)
