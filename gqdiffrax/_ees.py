r"""Explicit and effectively symmetric (EES) Runge–Kutta solvers.

An EES$(n, m)$ scheme is an explicit Runge–Kutta method of classical order $n$ whose
step is its own inverse up to order $m$: stepping forward by $h$ and then back by $-h$
returns to the start up to $O(h^{m+1})$,

$$\Phi_{-h} \circ \Phi_h = \mathrm{id} + O(h^{m+1}).$$

Exactly symmetric Runge–Kutta methods are necessarily implicit; EES schemes instead
cancel the antisymmetric part of their B-series up to order $m$. This is what lets
[`gqdiffrax.ReversibleAdjoint`][] rebuild the trajectory on the backward pass by
stepping backwards, instead of storing it.

Both solvers are ordinary [`diffrax.AbstractERK`][] subclasses, so they solve ODEs
(`ODETerm`) and Stratonovich SDEs (`MultiTerm(ODETerm, ControlTerm)`) exactly as
[`diffrax.Heun`][] does: every stage is contracted against the same control increment
$(\Delta t, \Delta W)$.
"""

from collections.abc import Callable
from typing import ClassVar, TYPE_CHECKING

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractERK,
    AbstractLocalInterpolation,
    AbstractStratonovichSolver,
    ButcherTableau,
)
from jaxtyping import Array, ArrayLike, PyTree, Shaped

from ._diffrax_internals import doc_remove_args


if TYPE_CHECKING:
    from typing import ClassVar as AbstractClassVar
else:
    from equinox import AbstractClassVar


_SQRT2 = np.sqrt(2.0)

# EES(2,5; x) with x = 1/10; see the general one-parameter family in the docstring of
# `EES25`. The embedded first-order estimate is the difference to explicit Euler.
_ees25_tableau = ButcherTableau(
    c=np.array([1 / 3, 5 / 6]),
    a_lower=(
        np.array([1 / 3]),
        np.array([-5 / 48, 15 / 16]),
    ),
    b_sol=np.array([1 / 10, 1 / 2, 2 / 5]),
    b_error=np.array([1 / 10 - 1, 1 / 2, 2 / 5]),
)

# EES(2,7; x) with x = (5 - 3√2)/14.
_ees27_b = np.array(
    [
        (5 - 3 * _SQRT2) / 14,
        (3 + _SQRT2) / 14,
        3 * (-1 + 2 * _SQRT2) / 14,
        (9 - 4 * _SQRT2) / 14,
    ]
)
_ees27_tableau = ButcherTableau(
    c=np.array([(2 - _SQRT2) / 3, (2 + _SQRT2) / 6, (4 + _SQRT2) / 6]),
    a_lower=(
        np.array([(2 - _SQRT2) / 3]),
        np.array([(-4 + _SQRT2) / 24, (4 + _SQRT2) / 8]),
        np.array(
            [
                (-176 + 145 * _SQRT2) / 168,
                3 * (8 - 5 * _SQRT2) / 56,
                3 * (3 - _SQRT2) / 7,
            ]
        ),
    ),
    b_sol=_ees27_b,
    b_error=_ees27_b - np.array([1.0, 0.0, 0.0, 0.0]),
)


def _rescale(t0, t, t1):
    # (t - t0) / (t1 - t0), returning zero (and zero gradients) on an empty interval.
    empty = t0 == t1
    return jnp.where(empty, 0, t - t0) / jnp.where(empty, 1, t1 - t0)


class _QuadraticInterpolation(AbstractLocalInterpolation):
    r"""The continuous extension of a second-order Runge–Kutta step.

    With $\theta = (t - t_0)/(t_1 - t_0)$ and $k_1 = f(t_0, y_0)\,\Delta$ the first
    stage,

    $$y(t) \approx y_0 + \theta k_1 + \theta^2 (y_1 - y_0 - k_1).$$

    It matches $y_0$ and $y_1$ at the ends and the vector field at $t_0$, so its local
    error is $O(h^3)$: dense output of the same order as the solver, at no extra cost.
    It is the polynomial continuous extension $b_i(\theta) = \theta\delta_{i1} +
    \theta^2(b_i - \delta_{i1})$ of any tableau with $c_1 = 0$.
    """

    t0: ArrayLike
    t1: ArrayLike
    coeffs: PyTree[Shaped[Array, "3 ?*dims"]]

    def __init__(self, *, t0, t1, y0, y1, k):
        def _coeffs(_y0, _y1, _k):
            _k1 = _k[0]
            return jnp.stack([_y1 - _y0 - _k1, _k1, _y0])

        self.t0 = t0
        self.t1 = t1
        self.coeffs = jtu.tree_map(_coeffs, y0, y1, k)

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        del left
        if t1 is not None:
            return jtu.tree_map(jnp.subtract, self.evaluate(t1), self.evaluate(t0))
        theta = _rescale(self.t0, t0, self.t1)

        def _eval(_coeffs):
            with jax.numpy_dtype_promotion("standard"):
                return jnp.polyval(_coeffs, theta).astype(_coeffs.dtype)

        return jtu.tree_map(_eval, self.coeffs)


class AbstractEES(AbstractERK, AbstractStratonovichSolver):
    """Base class of the EES solvers: second order, Stratonovich, quadratic dense
    output, and an embedded explicit-Euler error estimate.

    `reversibility_order` is the $m$ of EES$(2, m)$: one step forward and one back
    returns to the start up to $O(h^{m+1})$.
    """

    interpolation_cls: ClassVar[Callable[..., _QuadraticInterpolation]] = (
        _QuadraticInterpolation
    )
    reversibility_order: AbstractClassVar[int]

    def order(self, terms):
        del terms
        return 2

    def strong_order(self, terms):
        # 0.5 for general (multiplicative) noise. For additive noise these schemes
        # converge with strong order 1, but diffrax has no reliable way to detect
        # additive noise from the terms, so we report the general-noise value (as
        # `diffrax.Heun` does).
        del terms
        return 0.5


class EES25(AbstractEES):
    r"""EES(2,5; 1/10): a 3-stage explicit, effectively symmetric Runge–Kutta method.

    Classical order 2, and near-reversible: $\Phi_{-h}\circ\Phi_h = \mathrm{id} +
    O(h^6)$, so that reconstructing a trajectory of $n$ steps backwards drifts by
    $O(h^5)$ on an ODE. Its Butcher tableau is

    $$
    \begin{array}{c|ccc}
    0 & & & \\
    \tfrac13 & \tfrac13 & & \\
    \tfrac56 & -\tfrac{5}{48} & \tfrac{15}{16} & \\
    \hline
    & \tfrac{1}{10} & \tfrac12 & \tfrac25
    \end{array}
    $$

    the member $x = 1/10$ of the family $b = (x, \tfrac12, \tfrac12 - x)$,
    $c_2 = a_{21} = \frac{1+2x}{4(1-x)}$, $c_3 = \frac{3}{4(1-x)}$,
    $a_{31} = \frac{(4x-1)^2}{4(x-1)(1-4x^2)}$, $a_{32} = \frac{1-x}{1-4x^2}$.

    Its stability polynomial is $R(z) = 1 + z + z^2/2 + z^3/8$, stable on the real
    interval $[-3.09, 0]$ (RK4: $[-2.79, 0]$), which is what makes it usable for
    dissipative models at steps where [`diffrax.ReversibleHeun`][] (stable only on the
    imaginary segment $[-i, i]$) blows up.

    Has an embedded first-order (explicit Euler) error estimate for adaptive steps on
    ODEs, and uses quadratic dense output. On SDEs it converges to the Stratonovich
    solution with strong order 0.5 (1 for additive noise); there the expected
    round-trip recovery error of the initial state is only $O(h^2)$.

    !!! warning

        EES schemes are weakly unstable on the imaginary axis: $|R(iy)|^2 = 1 + y^6/64$.
        This only matters for undamped oscillations at large $h\omega$.

    ??? cite "References"

        ```bibtex
        @article{shmelev2025ees,
            author={Shmelev, Daniil and Ebrahimi-Fard, Kurusch and Tapia, Nikolas and
                    Salvi, Cristopher},
            title={Explicit and Effectively Symmetric {R}unge--{K}utta Methods},
            journal={arXiv:2507.21006},
            year={2025}
        }

        @article{shmelev2025eessde,
            author={Shmelev, Daniil and Salvi, Cristopher},
            title={Explicit and Effectively Symmetric Schemes for Neural {SDE}s},
            journal={arXiv:2509.20599},
            year={2025}
        }
        ```
    """

    tableau: ClassVar[ButcherTableau] = _ees25_tableau
    reversibility_order: ClassVar[int] = 5


class EES27(AbstractEES):
    r"""EES(2,7; (5−3√2)/14): a 4-stage explicit, effectively symmetric Runge–Kutta
    method.

    Classical order 2, and near-reversible to higher order than [`gqdiffrax.EES25`][]:
    $\Phi_{-h}\circ\Phi_h = \mathrm{id} + O(h^8)$, so that reconstructing a trajectory
    of $n$ steps backwards drifts by $O(h^7)$ on an ODE. Its Butcher tableau is

    $$
    \begin{array}{c|cccc}
    0 & & & & \\
    \frac{2-\sqrt2}{3} & \frac{2-\sqrt2}{3} & & & \\
    \frac{2+\sqrt2}{6} & \frac{-4+\sqrt2}{24} & \frac{4+\sqrt2}{8} & & \\
    \frac{4+\sqrt2}{6} & \frac{-176+145\sqrt2}{168} & \frac{3(8-5\sqrt2)}{56}
        & \frac{3(3-\sqrt2)}{7} & \\
    \hline
    & \frac{5-3\sqrt2}{14} & \frac{3+\sqrt2}{14} & \frac{3(-1+2\sqrt2)}{14}
        & \frac{9-4\sqrt2}{14}
    \end{array}
    $$

    Its stability polynomial is
    $R(z) = 1 + z + \frac{z^2}{2} + \frac{2-\sqrt2}{4}z^3 + \frac{3-2\sqrt2}{8}z^4$,
    stable on the real interval $[-3.92, 0]$.

    Has an embedded first-order (explicit Euler) error estimate for adaptive steps on
    ODEs, and uses quadratic dense output. On SDEs it converges to the Stratonovich
    solution with strong order 0.5 (1 for additive noise); there the expected
    round-trip recovery error of the initial state is $O(h^3)$.

    !!! warning

        Like [`gqdiffrax.EES25`][], it is weakly unstable on the imaginary axis, which
        only matters for undamped oscillations at large $h\omega$.

    ??? cite "References"

        ```bibtex
        @article{shmelev2025ees,
            author={Shmelev, Daniil and Ebrahimi-Fard, Kurusch and Tapia, Nikolas and
                    Salvi, Cristopher},
            title={Explicit and Effectively Symmetric {R}unge--{K}utta Methods},
            journal={arXiv:2507.21006},
            year={2025}
        }

        @article{shmelev2025eessde,
            author={Shmelev, Daniil and Salvi, Cristopher},
            title={Explicit and Effectively Symmetric Schemes for Neural {SDE}s},
            journal={arXiv:2509.20599},
            year={2025}
        }
        ```
    """

    tableau: ClassVar[ButcherTableau] = _ees27_tableau
    reversibility_order: ClassVar[int] = 7


for _cls in (EES25, EES27):
    doc_remove_args("scan_kind")(_cls.__init__)
    _cls.__init__.__doc__ = """**Arguments:** None"""
del _cls
