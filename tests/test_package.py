"""The package boundary: `import gqdiffrax` imports the library and its own
dependencies, nothing of the experiments harness or its extra."""

import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).parents[1]
# The `experiments` extra, and the harness itself.
HARNESS_ONLY = ("optax", "matplotlib", "tqdm", "sklearn", "gqdiffrax_experiments")


def test_import_gqdiffrax_imports_no_harness_dependency():
    code = (
        "import sys, gqdiffrax; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    imported = set(result.stdout.split())
    assert "gqdiffrax" in imported
    assert not imported & set(HARNESS_ONLY), sorted(imported & set(HARNESS_ONLY))


def test_runtime_dependencies_are_the_library_s_own():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        for dep in project["dependencies"]
    }
    assert names == {"jax", "equinox", "diffrax", "lineax", "jaxtyping", "numpy"}
    assert "diffrax>=0.7.2,<0.8" in project["dependencies"]
    extra = " ".join(project["optional-dependencies"]["experiments"])
    for name in ("optax", "matplotlib", "tqdm", "scikit-learn"):
        assert name in extra


def test_ci_runs_the_readme_s_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    install_and_run, test = [line.split("#")[0].strip() for line in block.splitlines()]
    assert install_and_run.startswith('pip install -e ".[experiments]" && ')
    assert test == 'pip install -e ".[test]" && python -m pytest'
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
