r"""Neural SDEs through ODE adjoints: a Karhunen–Loève Wiener surrogate and Wong–Zakai
terms.

A Stratonovich SDE

$$dz = f(t, z, \theta)\,dt + g(t, z, \theta) \circ dW_t$$

is *trained* as the random ODE

$$\frac{dz_m}{dt} = f(t, z_m, \theta) + g(t, z_m, \theta)\,\frac{dB_m}{dt}(t),$$

where $B_m$ is the truncated Karhunen–Loève expansion of $W$ on $[t_0, t_1]$
([`gqdiffrax.WienerSurrogate`][]). For a fixed draw of $B_m$ this is an ordinary ODE
([`gqdiffrax.wong_zakai_term`][] builds its `diffrax.ODETerm`), so any ODE adjoint
differentiates it, in particular [`gqdiffrax.GQAdjoint`][]. By the Wong–Zakai theorem
$z_m \to z$ as $m \to \infty$, where $z$ solves the SDE **in the Stratonovich sense**.

The trained drift and diffusion are then *evaluated* with a real SDE solver, using the
same two callables:

```python
bm = diffrax.VirtualBrownianTree(t0, t1, tol=dt0 / 2, shape=(noise_dim,), key=key)
terms = gqdiffrax.sde_terms(model.drift, model.diffusion, bm)
sol = diffrax.diffeqsolve(
    terms, diffrax.ReversibleHeun(), t0, t1, dt0, y0, saveat=diffrax.SaveAt(ts=ts)
)
```

The solver must converge to the Stratonovich solution: `diffrax.Heun`,
`diffrax.ReversibleHeun`, `diffrax.Midpoint`, or gqdiffrax's EES solvers
(`gqdiffrax.EES25`, `gqdiffrax.EES27`), not `diffrax.Euler` (which is Itô).

**Itô models.** The Itô SDE $dz = f_I\,dt + g\,dW$ has the same solutions as the
Stratonovich SDE $dz = f_S\,dt + g \circ dW$ with

$$f_S = f_I - \tfrac12 c, \qquad c_k(t, z) = \sum_j \sum_l
\frac{\partial g_{kj}}{\partial z_l}(t, z)\, g_{lj}(t, z),$$

that is $c = \sum_j (\partial g_{\cdot j} / \partial z)\, g_{\cdot j}$, the
derivative of each noise column along itself. To train an Itô model with Wong–Zakai,
pass `ito_to_stratonovich_drift(f_I, g)` as the drift; to evaluate a trained
(Stratonovich) model with an Itô solver such as `diffrax.Euler`, use
`stratonovich_to_ito_drift(f_S, g)`. For additive noise ($g$ independent of $z$)
$c = 0$ and the two calculi agree.
"""

import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real


_Time = int | float | Real[ArrayLike, ""]
_Drift = Callable[[Any, PyTree[Array], Any], PyTree[Array]]
_Diffusion = Callable[[Any, PyTree[Array], Any], Array | lx.AbstractLinearOperator]


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _draw(key: PRNGKeyArray, i, shape: tuple[int, ...], dtype) -> Float[Array, "..."]:
    # The i-th coefficient, i = 1, ..., m, depends on nothing but (key, i): this is
    # what makes both modes, every re-evaluation and every truncation agree.
    return jr.normal(jr.fold_in(key, i), shape, dtype)


def _check_arguments(t0, t1, shape, key, num_terms, running_sum, dtype) -> None:
    if not (
        isinstance(shape, tuple)
        and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
            for s in shape
        )
    ):
        raise ValueError(
            "`shape` must be a tuple of non-negative ints, e.g. `shape=(3,)` for "
            f"3-dimensional noise or `shape=()` for scalar noise; got {shape!r}."
        )
    if (
        isinstance(num_terms, bool)
        or not isinstance(num_terms, (int, np.integer))
        or num_terms < 1
    ):
        raise ValueError(
            "`num_terms` must be an int >= 1 (the number of Karhunen–Loève terms; "
            f"10 is a good default); got {num_terms!r}."
        )
    if not isinstance(running_sum, bool):
        raise ValueError(f"`running_sum` must be True or False; got {running_sum!r}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "WienerSurrogate needs a real floating dtype, e.g. `dtype=jnp.float32`; "
            f"got {dtype}."
        )
    key_dtype = getattr(key, "dtype", None)
    key_shape = jnp.shape(key)
    if key_dtype is not None and jax.dtypes.issubdtype(key_dtype, jax.dtypes.prng_key):
        key_ok = key_shape == ()
    else:
        key_ok = key_dtype == jnp.uint32 and len(key_shape) == 1
    if not key_ok:
        raise ValueError(
            "`key` must be a single PRNG key such as `jax.random.key(0)`; got shape "
            f"{key_shape} and dtype {key_dtype}. For one surrogate per sample, "
            "`jax.vmap` a function that builds the surrogate over a batch of keys."
        )
    for name, t in (("t0", t0), ("t1", t1)):
        if jnp.ndim(t) != 0:
            raise ValueError(
                f"`{name}` must be a scalar time; got shape {jnp.shape(t)}. For a "
                "batch of surrogates, `jax.vmap` over their construction."
            )
    if not (_is_traced(t0) or _is_traced(t1)):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise ValueError(
                "WienerSurrogate needs finite t0 < t1: pass the interval of the "
                f"solve, earlier time first; got t0={t0}, t1={t1}."
            )


class WienerSurrogate(diffrax.AbstractPath):
    r"""A smooth surrogate for a Wiener process on $[t_0, t_1]$: its Karhunen–Loève
    expansion truncated after $m$ terms.

    With $c = t_1 - t_0$ and $\omega_i = (i - \tfrac12)\pi / c$,

    $$W_m(t) = \sqrt{2c}\, \sum_{i=1}^{m} \xi_i\,
    \frac{\sin(\omega_i (t - t_0))}{(i - \frac12)\pi}, \qquad
    \frac{dW_m}{dt}(t) = \sqrt{\frac{2}{c}}\, \sum_{i=1}^{m} \xi_i
    \cos(\omega_i (t - t_0)),$$

    with independent $\xi_i \sim \mathcal{N}(0, I)$ of shape `shape`. $W_m$ is a
    Gaussian process with $W_m(t_0) = 0$ and

    $$\mathrm{Cov}(W_m(s), W_m(t)) = \sum_{i=1}^{m} 2c\,
    \frac{\sin(\omega_i (s - t_0)) \sin(\omega_i (t - t_0))}{((i - \frac12)\pi)^2}
    \;\xrightarrow{m \to \infty}\; \min(s, t) - t_0,$$

    with an error of at most $\sum_{i > m} 2c / ((i - \frac12)\pi)^2 \approx
    2c / (\pi^2 m)$.

    `evaluate(t)` is $W_m(t)$, `evaluate(ta, tb)` the increment $W_m(t_b) - W_m(t_a)$
    (computed as a product of sines and cosines, so small increments keep their
    relative accuracy) and `derivative(t)` is $dW_m/dt$. All three are differentiable
    in time.

    **Purity.** The path is a pure function of `key`: $\xi_i$ is
    `jax.random.normal(jax.random.fold_in(key, i), shape, dtype)` for $i = 1, \dots,
    m$. There is no hidden state and no global RNG, so the forward and backward passes
    of an adjoint see the same path, under `jax.jit` and `jax.vmap`, and the same key
    in the same compiled program gives the same bits. (Between different programs,
    e.g. batched or not, XLA may fuse multiply-adds differently, so values there agree
    to rounding, as for any JAX function.) Because $\xi_i$ depends only on `key` and
    $i$, a surrogate with more terms refines the same path: its first `num_terms`
    coefficients are those of the coarser one.

    **Memory.** By default the $\xi_i$ are drawn once, when the surrogate is built,
    and stored in the field `xi` (shape `(num_terms, *shape)`, $O(m \cdot
    \mathrm{size})$ memory): every evaluation is then a short weighted sum. With
    `running_sum=True` only the key is stored and the $\xi_i$ are regenerated one at a
    time inside a loop at every evaluation: $O(\mathrm{size})$ memory, also under
    reverse-mode autodiff in time, for $m$ draws per evaluation. Both modes give the
    same path (to rounding).

    The stored draws are behind `jax.lax.stop_gradient`: they are noise, not
    parameters. An adjoint that integrates a gradient for every floating-point array of
    the vector field, differentiated or not (e.g. `diffrax.BacksolveAdjoint`), carries
    an all-zero one for `xi`, which is cheap for the usual small $m$; `running_sum=True`
    avoids it.

    !!! warning

        $W_m$ is smooth, not a Brownian motion: use it to *train* through the
        Wong–Zakai ODE ([`gqdiffrax.wong_zakai_term`][]), and use a Brownian path such
        as `diffrax.VirtualBrownianTree` to *evaluate* the trained model with an SDE
        solver. Its highest frequency is $\omega_m = (m - \frac12)\pi / c$, which an
        adaptive ODE solver has to resolve, so the cost of a solve grows with $m$.
        Outside $[t_0, t_1]$ the same formula is evaluated, but it is not Brownian
        there.

    !!! example "One surrogate per sample, fresh keys every step"

        ```python
        def sample(model, key, y0):
            bm = gqdiffrax.WienerSurrogate(t0, t1, (noise_dim,), key, num_terms=10)
            term = gqdiffrax.wong_zakai_term(model.drift, model.diffusion, bm)
            sol = diffrax.diffeqsolve(
                term, diffrax.Dopri5(), t0, t1, 0.1, y0,
                saveat=diffrax.SaveAt(ts=ts), adjoint=gqdiffrax.GQAdjoint(),
            )
            return sol.ys

        keys = jax.random.split(key, y0s.shape[0])  # a new `key` every training step
        ys = jax.vmap(sample, in_axes=(None, 0, 0))(model, keys, y0s)
        ```

        The neural-SDE example notebook (`notebooks/03_neural_sde.ipynb`) trains a
        model this way.

    ??? cite "References"

        ```bibtex
        @article{norcliffe2023faster,
            title={Faster Training of Neural {ODE}s Using Gau{\ss}--{L}egendre
                   Quadrature},
            author={Norcliffe, Alexander and Deisenroth, Marc Peter},
            journal={Transactions on Machine Learning Research},
            year={2023},
        }

        @article{wong1965convergence,
            title={On the Convergence of Ordinary Integrals to Stochastic
                   Integrals},
            author={Wong, Eugene and Zakai, Moshe},
            journal={The Annals of Mathematical Statistics},
            volume={36},
            number={5},
            pages={1560--1564},
            year={1965},
        }
        ```
    """

    t0: _Time
    t1: _Time
    key: PRNGKeyArray
    xi: Float[Array, "num_terms ..."] | None
    shape: tuple[int, ...] = eqx.field(static=True)
    num_terms: int = eqx.field(static=True)
    running_sum: bool = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)

    def __init__(
        self,
        t0: _Time,
        t1: _Time,
        shape: tuple[int, ...],
        key: PRNGKeyArray,
        *,
        num_terms: int = 10,
        running_sum: bool = False,
        dtype: Any = None,
    ):
        r"""**Arguments:**

        - `t0`: start of the interval, where $W_m(t_0) = 0$. At most the `t0` of the
            solve.
        - `t1`: end of the interval, $t_1 > t_0$. At least the `t1` of the solve.
        - `shape`: shape of the noise, a tuple of ints such as `(noise_dim,)` (or `()`
            for scalar noise).
        - `key`: one JAX PRNG key, e.g. `jax.random.key(seed)`. For a batch of
            surrogates, `jax.vmap` over keys and build one surrogate per key.
        - `num_terms`: $m \ge 1$, the number of terms of the expansion.
        - `running_sum`: if `True`, store only the key and regenerate the $\xi_i$ one
            at a time at every evaluation, with memory independent of `num_terms`.
            Same path either way.
        - `dtype`: floating dtype of the path. Defaults to the dtype of `t0` and `t1`
            (the default floating dtype for Python numbers). The path depends on the
            dtype: float32 and float64 surrogates with the same key are different
            draws.
        """
        if dtype is None:
            with jax.numpy_dtype_promotion("standard"):
                dtype = jnp.result_type(t0, t1, float)
        dtype = jax.dtypes.canonicalize_dtype(dtype)
        if isinstance(shape, list):
            shape = tuple(shape)
        # Checked before drawing, so that a bad key or shape gets this message rather
        # than one from inside `jax.random`.
        _check_arguments(t0, t1, shape, key, num_terms, running_sum, dtype)
        if _is_traced(t0) or _is_traced(t1):
            t0, t1 = eqx.error_if(
                (t0, t1),
                jnp.invert(jnp.asarray(t0) < jnp.asarray(t1)),
                "WienerSurrogate needs t0 < t1: pass the solve's interval, earlier "
                "time first.",
            )
        self.t0 = t0
        self.t1 = t1
        self.key = key
        self.shape = shape
        self.num_terms = num_terms
        self.running_sum = running_sum
        self.dtype = dtype
        if running_sum:
            self.xi = None
        else:
            indices = jnp.arange(1, num_terms + 1)
            self.xi = jax.vmap(lambda i: _draw(key, i, shape, dtype))(indices)

    def _times(self) -> tuple[Float[Array, ""], Float[Array, ""]]:
        t0 = jnp.asarray(self.t0, self.dtype)
        return t0, jnp.asarray(self.t1, self.dtype) - t0

    def _frequencies(self, span: Float[Array, ""]) -> Float[Array, " num_terms"]:
        # omega_i = (i - 1/2) pi / c for i = 1, ..., m.
        half_integers = jnp.arange(self.num_terms, dtype=self.dtype) + 0.5
        return half_integers * (jnp.pi / span)

    def _combine(self, weights: Float[Array, " num_terms"]) -> Float[Array, "..."]:
        r"""$\sum_i w_i \xi_i$."""
        if self.xi is not None:
            xi = lax.stop_gradient(self.xi)
            return jnp.tensordot(weights, xi, axes=1)

        # Rematerialise the draw under reverse-mode autodiff (in time) too, so that
        # the loop does not save all m draws as residuals.
        @jax.checkpoint
        def body(k, acc):
            return acc + weights[k] * _draw(self.key, k + 1, self.shape, self.dtype)

        zero = jnp.zeros(self.shape, self.dtype)
        return lax.fori_loop(0, self.num_terms, body, zero)

    def evaluate(
        self, t0: _Time, t1: _Time | None = None, left: bool = True
    ) -> Float[Array, "..."]:
        r"""$W_m(t_0)$, or the increment $W_m(t_1) - W_m(t_0)$ if `t1` is given.

        **Arguments:**

        - `t0`: a time (inside the surrogate's interval).
        - `t1`: optional second time.
        - `left`: ignored; the path is smooth.

        **Returns:**

        An array of shape `shape` and dtype `dtype`.
        """
        del left
        start, span = self._times()
        omega = self._frequencies(span)
        scale = jnp.sqrt(2 / span)
        ta = jnp.astype(t0, self.dtype)
        if t1 is None:
            return self._combine(scale * jnp.sin(omega * (ta - start)) / omega)
        tb = jnp.astype(t1, self.dtype)
        # sin(w b) - sin(w a) = 2 cos(w (a + b) / 2) sin(w (b - a) / 2), which keeps
        # small increments accurate instead of cancelling two large values.
        middle = 0.5 * (ta + tb) - start
        half_step = 0.5 * (tb - ta)
        weights = jnp.cos(omega * middle) * jnp.sin(omega * half_step) / omega
        return self._combine(2 * scale * weights)

    def derivative(self, t: _Time, left: bool = True) -> Float[Array, "..."]:
        r"""The rate $\frac{dW_m}{dt}(t)$.

        **Arguments:**

        - `t`: a time (inside the surrogate's interval).
        - `left`: ignored; the path is smooth.

        **Returns:**

        An array of shape `shape` and dtype `dtype`.
        """
        del left
        start, span = self._times()
        omega = self._frequencies(span)
        tau = jnp.astype(t, self.dtype) - start
        return self._combine(jnp.sqrt(2 / span) * jnp.cos(omega * tau))


def _noise_rate(
    g: Array | lx.AbstractLinearOperator, rate: Array, y: PyTree[Array]
) -> Array:
    """The noise rate in the dtype of the diffusion `g`, once `g` is checked to contract
    with it into the shape of the state, with shape errors that say what to change.

    The rate takes the precision of the model, so that a float32 model can use a
    surrogate built with default (possibly float64) times."""
    if isinstance(g, lx.AbstractLinearOperator):
        in_struct = g.in_structure()
        if jtu.tree_structure(in_struct) != jtu.tree_structure(rate) or (
            in_struct.shape != rate.shape
        ):
            raise ValueError(
                "The diffusion returned a lineax operator with input structure "
                f"{in_struct}, but the surrogate's noise has shape {rate.shape}. Build "
                f"the surrogate with `shape={getattr(in_struct, 'shape', '...')}`, or "
                "return an operator acting on vectors of the surrogate's shape."
            )
        out_struct = g.out_structure()
        y_struct = jtu.tree_map(
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), y
        )
        same_shapes = jtu.tree_structure(out_struct) == jtu.tree_structure(
            y_struct
        ) and all(
            o.shape == s.shape
            for o, s in zip(jtu.tree_leaves(out_struct), jtu.tree_leaves(y_struct))
        )
        if not same_shapes:
            raise ValueError(
                "The diffusion returned a lineax operator with output structure "
                f"{out_struct}, but the state is {y_struct}; the operator must map "
                "the noise to the shape of the state."
            )
        return rate.astype(in_struct.dtype)
    if not eqx.is_array(y):
        raise ValueError(
            "For a PyTree state, the diffusion must return a lineax operator (e.g. "
            "`lineax.PyTreeLinearOperator`) that maps the noise to the state; an array "
            "diffusion needs a single-array state."
        )
    shape = jnp.shape(g)
    want = jnp.shape(y) + rate.shape
    if shape != want:
        hint = ""
        if shape[: jnp.ndim(y)] == jnp.shape(y) and len(shape) > jnp.ndim(y):
            hint = f" or build the surrogate with `shape={shape[jnp.ndim(y) :]}`"
        raise ValueError(
            f"The diffusion returned an array of shape {shape}, but the state has "
            f"shape {jnp.shape(y)} and the surrogate's noise has shape {rate.shape}, "
            f"so it must have shape {want} (state dims then noise dims, contracted "
            f"with the noise as in `diffrax.ControlTerm`). Return that shape{hint}; "
            "for diagonal noise return `lineax.DiagonalLinearOperator(...)`."
        )
    return rate.astype(jnp.result_type(g))


class _WongZakaiVectorField(eqx.Module):
    r"""$f(t, y) + g(t, y)\,dB/dt(t)$, the noise part being the vector-field-control
    product of `diffrax.ControlTerm(diffusion, surrogate)`, i.e. what its `to_ode()`
    computes, with the rate cast to the dtype of the diffusion."""

    drift: _Drift
    diffusion: _Diffusion
    surrogate: diffrax.AbstractPath

    def __call__(self, t, y, args):
        f = self.drift(t, y, args)
        noise_term = diffrax.ControlTerm(self.diffusion, self.surrogate)
        # `vf` then `prod` rather than `vf_prod`: the rate takes the dtype of the
        # diffusion, which is known only once the diffusion is evaluated.
        g = noise_term.vf(t, y, args)
        rate = _noise_rate(g, self.surrogate.derivative(t), y)
        noise = noise_term.prod(g, rate)
        if jtu.tree_structure(f) != jtu.tree_structure(noise):
            raise ValueError(
                "The drift must return a PyTree with the structure of the state "
                f"(here {jtu.tree_structure(noise)}); got {jtu.tree_structure(f)}."
            )
        with jax.numpy_dtype_promotion("standard"):
            return jtu.tree_map(
                lambda fi, ni: jnp.broadcast_to(fi, jnp.shape(ni)) + ni, f, noise
            )


def wong_zakai_term(
    drift: _Drift, diffusion: _Diffusion, surrogate: diffrax.AbstractPath
) -> diffrax.ODETerm:
    r"""The Wong–Zakai ODE of a Stratonovich SDE, as a `diffrax.ODETerm`:

    $$\frac{dz}{dt} = f(t, z, \text{args}) + g(t, z, \text{args})\,
    \frac{dB}{dt}(t),$$

    where $B$ is `surrogate` (typically a [`gqdiffrax.WienerSurrogate`][]). It is an
    ordinary `ODETerm`, so it works with every ODE solver and adjoint, including
    [`gqdiffrax.GQAdjoint`][]. Its vector field is an `eqx.Module` with fields
    `drift`, `diffusion` and `surrogate`, so parameters of `eqx.Module` drifts and
    diffusions (and arrays they close over) receive gradients. The surrogate's key is
    not a floating-point array and never does.

    `drift` and `diffusion` follow `diffrax.ODETerm` and `diffrax.ControlTerm`, so the
    same pair evaluates the SDE with [`gqdiffrax.sde_terms`][]:

    - `drift(t, y, args)` returns a PyTree like `y`.
    - `diffusion(t, y, args)` returns either an array of shape
        `y.shape + surrogate_shape` (general noise; the trailing dimensions are
        contracted with $dB/dt$), or a lineax operator whose `.mv` maps the noise to
        the state, e.g. `lineax.DiagonalLinearOperator(d)` for diagonal noise
        $g = \mathrm{diag}(d)$ with a surrogate of shape `y.shape`.

    The rate $dB/dt$ is cast to the dtype of the diffusion. Shape mismatches raise a
    `ValueError` when the solve is traced.

    !!! example

        ```python
        drift = eqx.nn.MLP(2, 2, 16, 2, key=k1)
        diffusion = eqx.nn.MLP(2, 2 * 3, 16, 2, key=k2)  # general noise, 3 channels
        model_drift = lambda t, y, args: drift(y)
        model_diffusion = lambda t, y, args: diffusion(y).reshape(2, 3)
        bm = gqdiffrax.WienerSurrogate(0.0, 1.0, (3,), key, num_terms=10)
        term = gqdiffrax.wong_zakai_term(model_drift, model_diffusion, bm)
        sol = diffrax.diffeqsolve(
            term, diffrax.Dopri5(), 0.0, 1.0, 0.1, y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            adjoint=gqdiffrax.GQAdjoint(),
        )
        ```

    **Arguments:**

    - `drift`: the drift $f$, `drift(t, y, args)`.
    - `diffusion`: the diffusion $g$, `diffusion(t, y, args)`.
    - `surrogate`: a differentiable `diffrax.AbstractPath`; its `derivative(t)` is
        $dB/dt$.

    **Returns:**

    A `diffrax.ODETerm` for $dz/dt = f + g\,dB/dt$. Its limit as the surrogate tends to
    Brownian motion is the **Stratonovich** SDE; see
    [`gqdiffrax.ito_to_stratonovich_drift`][] for Itô models.
    """
    if not callable(drift) or not callable(diffusion):
        raise ValueError(
            "`drift` and `diffusion` must be callables `(t, y, args) -> ...`, as for "
            "`diffrax.ODETerm` and `diffrax.ControlTerm`."
        )
    if not isinstance(surrogate, diffrax.AbstractPath):
        raise ValueError(
            "`surrogate` must be a `diffrax.AbstractPath` with a `derivative`, e.g. "
            f"`gqdiffrax.WienerSurrogate(t0, t1, shape, key)`; got {type(surrogate)}."
        )
    return diffrax.ODETerm(_WongZakaiVectorField(drift, diffusion, surrogate))


def sde_terms(
    drift: _Drift, diffusion: _Diffusion, brownian: diffrax.AbstractPath
) -> diffrax.MultiTerm:
    r"""The terms of the SDE $dz = f\,dt + g\,dW$ for a diffrax SDE solver: the
    evaluation-time counterpart of [`gqdiffrax.wong_zakai_term`][], taking the same
    `drift` and `diffusion`.

    Returns `MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian))`. With a
    Stratonovich solver (`diffrax.Heun`, `diffrax.ReversibleHeun`,
    `diffrax.Midpoint`, `gqdiffrax.EES25`, `gqdiffrax.EES27`) this solves the
    Stratonovich SDE that Wong–Zakai training approximates:

    ```python
    bm = diffrax.VirtualBrownianTree(t0, t1, tol=dt0 / 2, shape=(noise_dim,), key=key)
    terms = gqdiffrax.sde_terms(drift, diffusion, bm)
    sol = diffrax.diffeqsolve(terms, diffrax.Heun(), t0, t1, dt0, y0)
    ```

    For an Itô solver such as `diffrax.Euler`, pass
    `stratonovich_to_ito_drift(drift, diffusion)` as the drift.

    **Arguments:**

    - `drift`: `drift(t, y, args)`, as for `diffrax.ODETerm`.
    - `diffusion`: `diffusion(t, y, args)`, as for `diffrax.ControlTerm`.
    - `brownian`: a Brownian path, typically `diffrax.VirtualBrownianTree` (any
        `diffrax.AbstractPath` is accepted).

    **Returns:**

    A `diffrax.MultiTerm` to pass to `diffrax.diffeqsolve`.
    """
    if not isinstance(brownian, diffrax.AbstractPath):
        raise ValueError(
            "`brownian` must be a diffrax path, e.g. `diffrax.VirtualBrownianTree(t0, "
            f"t1, tol, shape, key)`; got {type(brownian)}."
        )
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
    )


def _ito_correction(diffusion: _Diffusion, t, y, args) -> PyTree[Array]:
    r"""$c = \sum_j (\partial g_{\cdot j} / \partial z)\, g_{\cdot j}$ at $(t, y)$."""
    y_flat, unravel = jfu.ravel_pytree(y)

    def matrix(z_flat: Float[Array, " n"]) -> Float[Array, "n w"]:
        g = diffusion(t, unravel(z_flat), args)
        if isinstance(g, lx.AbstractLinearOperator):
            return g.as_matrix()
        if not eqx.is_array(y):
            raise ValueError(
                "For a PyTree state, the diffusion must return a lineax operator."
            )
        g = jnp.asarray(g)
        if g.shape[: jnp.ndim(y)] != jnp.shape(y):
            raise ValueError(
                f"The diffusion returned shape {g.shape}; it must start with the "
                f"state's shape {jnp.shape(y)} (state dims then noise dims)."
            )
        return g.reshape(y_flat.size, -1)

    g = matrix(y_flat)
    n, w = g.shape
    if w <= n:
        # One JVP per noise channel j, along column j; keep column j of the result.
        def along_column(column):
            return jax.jvp(matrix, (y_flat,), (column,))[1]

        dg = jax.vmap(along_column, in_axes=1)(g)  # (j, n, w)
        correction = jnp.einsum("jkj->k", dg)
    else:
        # Fewer state dimensions than channels: one JVP per state dimension.
        jac = jax.jacfwd(matrix)(y_flat)  # (k, j, l)
        correction = jnp.einsum("kjl,lj->k", jac, g)
    return unravel(correction)


class _CorrectedDrift(eqx.Module):
    drift: _Drift
    diffusion: _Diffusion
    sign: float = eqx.field(static=True)

    def __call__(self, t, y, args):
        f = self.drift(t, y, args)
        c = _ito_correction(self.diffusion, t, y, args)
        with jax.numpy_dtype_promotion("standard"):
            return jtu.tree_map(lambda fi, ci: fi + (self.sign * 0.5) * ci, f, c)


def ito_to_stratonovich_drift(drift: _Drift, diffusion: _Diffusion) -> _Drift:
    r"""The Stratonovich drift of an Itô SDE.

    The Itô SDE $dz = f_I\,dt + g\,dW$ and the Stratonovich SDE
    $dz = f_S\,dt + g \circ dW$ have the same solutions when

    $$f_S(t, z) = f_I(t, z) - \frac12 \sum_j
    \frac{\partial g_{\cdot j}}{\partial z}(t, z)\, g_{\cdot j}(t, z).$$

    Wong–Zakai training ([`gqdiffrax.wong_zakai_term`][]) converges to the
    Stratonovich SDE, so pass the returned drift to it to train a model whose drift is
    meant in the Itô sense. The correction is computed with forward-mode autodiff
    (`jax.jvp`, one per noise channel, or `jax.jacfwd` when there are fewer state
    dimensions than channels); it vanishes for additive noise. For example, geometric
    Brownian motion $dz = \mu z\,dt + \sigma z\,dW$ has $f_S = (\mu - \sigma^2/2) z$.

    **Arguments:**

    - `drift`: the Itô drift `drift(t, y, args)`.
    - `diffusion`: `diffusion(t, y, args)`, an array of shape `y.shape + noise_shape`
        or a lineax operator (as for [`gqdiffrax.wong_zakai_term`][]).

    **Returns:**

    The Stratonovich drift, a callable `(t, y, args) -> PyTree` (an `eqx.Module`, so
    parameters of `drift` and `diffusion` stay visible to autodiff and adjoints).
    """
    return _CorrectedDrift(drift, diffusion, -1.0)


def stratonovich_to_ito_drift(drift: _Drift, diffusion: _Diffusion) -> _Drift:
    r"""The Itô drift of a Stratonovich SDE: the inverse of
    [`gqdiffrax.ito_to_stratonovich_drift`][],

    $$f_I(t, z) = f_S(t, z) + \frac12 \sum_j
    \frac{\partial g_{\cdot j}}{\partial z}(t, z)\, g_{\cdot j}(t, z).$$

    Use it to evaluate a model trained with Wong–Zakai (a Stratonovich model) with an
    Itô solver such as `diffrax.Euler`.

    **Arguments:**

    - `drift`: the Stratonovich drift `drift(t, y, args)`.
    - `diffusion`: as for [`gqdiffrax.ito_to_stratonovich_drift`][].

    **Returns:**

    The Itô drift, a callable `(t, y, args) -> PyTree`.
    """
    return _CorrectedDrift(drift, diffusion, 1.0)
