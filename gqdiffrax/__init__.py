"""gqdiffrax: fast, memory-light gradients of neural ODEs and SDEs for Diffrax."""

import importlib.metadata

from ._adjoint import GQAdjoint as GQAdjoint
from ._ees import EES25 as EES25, EES27 as EES27
from ._quadrature import (
    AbstractQuadrature as AbstractQuadrature,
    gauss_legendre as gauss_legendre,
    IntervalGauss as IntervalGauss,
    StepGauss as StepGauss,
)
from ._reversible import ReversibleAdjoint as ReversibleAdjoint
from ._wiener import (
    ito_to_stratonovich_drift as ito_to_stratonovich_drift,
    sde_terms as sde_terms,
    stratonovich_to_ito_drift as stratonovich_to_ito_drift,
    WienerSurrogate as WienerSurrogate,
    wong_zakai_term as wong_zakai_term,
)


__version__ = importlib.metadata.version("gqdiffrax")
