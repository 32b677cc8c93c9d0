"""The release a user installs: the sdist and the wheel build and pass `twine check`,
and the wheel installs into a fresh virtual environment with the library's own
dependencies alone, where `GQAdjoint` takes a gradient without importing anything of the
`experiments` extra.

Slow (pip downloads JAX and the rest into the new environment), and needs pip's index:
PyPI, or whichever index pip is configured with.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile

import pytest


ROOT = pathlib.Path(__file__).parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What the sdist must carry beside the code: a user's first reads, and the license
# and citation that come with every copy.
SDIST_FILES = ("README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff", "pyproject.toml")
# In a fresh environment: a gradient through GQAdjoint against the exact one, and none
# of the experiments' dependencies imported on the way.
USER_CODE = textwrap.dedent(
    """
    import sys

    import diffrax
    import jax
    import jax.numpy as jnp

    import gqdiffrax


    def final_state(rate):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, rate: -rate * y),
            diffrax.Dopri5(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            args=rate,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            adjoint=gqdiffrax.GQAdjoint(),
        )
        return sol.ys[-1]


    grad = jax.grad(final_state)(jnp.array(0.5))
    exact = -jnp.exp(-0.5)  # d/dr exp(-r) at r = 0.5
    assert abs(grad - exact) < 1e-4, (grad, exact)
    extras = ("optax", "matplotlib", "tqdm", "sklearn")
    imported = [name for name in extras if name in sys.modules]
    assert not imported, imported
    print(gqdiffrax.__version__, gqdiffrax.__file__)
    """
)


def _run(*argv, **kwargs):
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, **kwargs
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_release_builds_checks_and_installs_alone(tmp_path):
    for module in ("build", "twine"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed; `pip install -e ".[test]"`')
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, ROOT)
    (sdist,) = dist.glob(f"gqdiffrax-{VERSION}.tar.gz")
    (wheel,) = dist.glob(f"gqdiffrax-{VERSION}-py3-none-any.whl")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert set(SDIST_FILES) <= names, sorted(set(SDIST_FILES) - names)
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    assert f"gqdiffrax-{VERSION}.dist-info/licenses/LICENSE" in names
    assert {name.split("/")[0] for name in names} == {
        "gqdiffrax",
        "gqdiffrax_experiments",
        f"gqdiffrax-{VERSION}.dist-info",
    }
    _run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)

    # A fresh environment, away from the repository (so that `import gqdiffrax` finds
    # the installed wheel) and from any PYTHONPATH of the caller's.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(python, "-m", "pip", "install", "--quiet", wheel, env=env, timeout=1200)
    result = _run(python, "-c", USER_CODE, cwd=tmp_path, env=env, timeout=600)
    version, location = result.stdout.split()
    assert version == VERSION
    assert pathlib.Path(location).is_relative_to(venv)
