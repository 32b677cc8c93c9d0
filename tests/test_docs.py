"""Build the documentation with `mkdocs build --strict`: broken links, unresolved
cross-references and docstrings that fail to render all fail the build.

Needs the `docs` extra (`pip install -e ".[docs]"`); skipped without it. The notebooks
are converted without being executed (`test_notebooks.py` executes them).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter", "pymdownx")


def test_docs_build_strict(tmp_path):
    missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"the docs dependencies are not installed ({', '.join(missing)} missing); "
            'install them with `pip install -e ".[docs]"`'
        )
    env = {**os.environ, "GQDIFFRAX_DOCS_EXECUTE": "false", "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    for page in ("index.html", "how-it-works/index.html", "api/adjoints/index.html"):
        assert (site / page).is_file(), page
    # The API pages render the docstrings, maths included.
    adjoints = (site / "api" / "adjoints" / "index.html").read_text()
    assert "gqdiffrax.GQAdjoint" in adjoints
    assert 'class="arithmatex"' in adjoints


def test_every_public_name_has_an_api_entry():
    import gqdiffrax

    public = {
        name
        for name in dir(gqdiffrax)
        if not name.startswith("_") and callable(getattr(gqdiffrax, name))
    }
    entries = {
        line.removeprefix("::: gqdiffrax.").strip()
        for page in (ROOT / "docs" / "api").glob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith("::: gqdiffrax.")
    }
    assert public, "no public names found"
    assert public <= entries, f"no API entry for {sorted(public - entries)}"
