"""mkdocs hooks: documentation mode for Equinox, and links for references to Diffrax's
API such as [`diffrax.diffeqsolve`][].

Our docstrings cross-reference Diffrax the way Diffrax's own docs do. The build must
not download Diffrax's inventory (it runs offline in CI), so the few targets we use are
listed here and registered with mkdocs-autorefs before it resolves references. Add an
entry when a docstring or page links a new Diffrax name: `mkdocs build --strict` fails
on unknown ones.
"""

import html as html_lib
import re
import typing

import mkdocs.plugins


# Equinox's documentation helpers (e.g. `doc_remove_args`, used to hide the `scan_kind`
# argument of the EES solvers) act only when this is set before the package is imported,
# which mkdocstrings does later in the build. Diffrax's docs do the same.
typing.GENERATING_DOCUMENTATION = "gqdiffrax"  # pyright: ignore


DIFFRAX_DOCS = "https://docs.kidger.site/diffrax/api/"

# name -> page of Diffrax's API docs (relative to DIFFRAX_DOCS)
DIFFRAX_PAGES = {
    "diffeqsolve": "diffeqsolve/",
    "AbstractAdjoint": "adjoints/",
    "RecursiveCheckpointAdjoint": "adjoints/",
    "BacksolveAdjoint": "adjoints/",
    "DirectAdjoint": "adjoints/",
    "ImplicitAdjoint": "adjoints/",
    "SaveAt": "saveat/",
    "ODETerm": "terms/",
    "ControlTerm": "terms/",
    "MultiTerm": "terms/",
    "AbstractPath": "path/",
    "LinearInterpolation": "interpolation/",
    "CubicInterpolation": "interpolation/",
    "Event": "events/",
    "VirtualBrownianTree": "brownian/",
    "PIDController": "stepsize_controller/",
    "ConstantStepSize": "stepsize_controller/",
    "StepTo": "stepsize_controller/",
    "AbstractERK": "solvers/abstract_solvers/",
    "AbstractStratonovichSolver": "solvers/abstract_solvers/",
    "Euler": "solvers/ode_solvers/",
    "Heun": "solvers/ode_solvers/",
    "Midpoint": "solvers/ode_solvers/",
    "Tsit5": "solvers/ode_solvers/",
    "Dopri5": "solvers/ode_solvers/",
    "ReversibleHeun": "solvers/ode_solvers/",
}


@mkdocs.plugins.event_priority(100)  # Before autorefs resolves references (-50).
def on_env(env, config, files):
    autorefs = config.plugins["autorefs"]
    for name, page in DIFFRAX_PAGES.items():
        identifier = f"diffrax.{name}"
        autorefs.register_url(identifier, f"{DIFFRAX_DOCS}{page}#{identifier}")
    return env


# An `eqx.Module` whose `__init__` is generated from its fields inherits `object`'s
# docstring for it, which `merge_init_into_class` would print under the class.
_OBJECT_INIT_DOC = re.compile(
    r"<p>Initialize self\.\s+See help\(type\(self\)\) for accurate signature\.</p>"
)


@mkdocs.plugins.event_priority(-100)  # After mkdocs-jupyter and the typeset plugin.
def on_page_content(html, page, config, files):
    if page.file.src_uri.endswith(".ipynb"):
        # mkdocs-jupyter titles a notebook page by its first heading with the inline
        # code dropped ("Quickstart: a neural ODE trained with"); keep all its text.
        h1 = _FIRST_H1.search(html)
        if h1 is not None:
            title = _ANCHOR_LINK.sub("", h1.group(1))
            page.title = html_lib.unescape(_TAG.sub("", title)).strip()
    return _OBJECT_INIT_DOC.sub("", html)


_FIRST_H1 = re.compile(r"<h1[^>]*>(.*?)</h1>", re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)
_TAG = re.compile(r"<[^>]+>")
