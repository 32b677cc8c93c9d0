import os
import subprocess
import sys


# The tests check values, not speed, and most of their time is XLA compiling the
# gradients each one builds. Compile with the CPU backend's optimisations off: measured
# on one core, the gradient of a small MLP ODE compiled in 1.2 s instead of 3.2 s
# (GQAdjoint) and 1.1 s instead of 4.0 s (RecursiveCheckpointAdjoint), and ran in the
# same time to within noise. Appended to whatever `XLA_FLAGS` the caller set; processes
# the tests start (pytest's workers, CLI runs, notebooks, `jax.distributed` workers)
# inherit them. The benchmark smoke runs check that the harness works, not its figures;
# benchmarks proper run outside pytest, with XLA's defaults.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)


def _with_fast_compile_flags(flags: str) -> str:
    """`flags` and the fast-compile flags, if this jaxlib knows them (XLA aborts the
    process on an unknown flag, and these are internal ones that come and go)."""
    have = flags.split()
    added = [f for f in FAST_COMPILE_XLA_FLAGS if f not in have]
    if not added:
        return flags
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()",
        ],
        env={**os.environ, "XLA_FLAGS": " ".join(have + added)},
        capture_output=True,
    )
    return " ".join(have + added) if probe.returncode == 0 else flags


os.environ["XLA_FLAGS"] = _with_fast_compile_flags(os.environ.get("XLA_FLAGS", ""))

import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# No implicit dtype promotion: a float32 model meeting a float64 array must be cast on
# purpose, as a user under float32 would need.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _free_compiled_programs():
    """Drop JAX's compiled programs after every test. A worker otherwise keeps all of
    them: each maps memory for its code, and a long run's workers crashed inside XLA's
    compiler once their memory maps neared Linux's limit (`vm.max_map_count`, 65530;
    measured: 1,000–2,500 more maps every 20 s of compiling)."""
    yield
    jax.clear_caches()


@pytest.fixture
def getkey():
    """A fresh, deterministic PRNG key on every call: `getkey()`."""
    key = jr.key(5678)

    def _getkey():
        nonlocal key
        key, subkey = jr.split(key)
        return subkey

    return _getkey


# The fast tier (`pytest -m "not slow"`, under 3 minutes on 2 cores) runs the first
# case of every parametrised test: each family of configurations is exercised once.
# The slow tier runs the other cases, and the tests marked `slow` outright.
def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        function = (item.module.__name__, item.originalname)
        if function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)
    # The longest tests first (each 40-130 s on an idle 2-core machine), so that no
    # worker is left running one of them after the other has finished the rest.
    items.sort(key=lambda item: not any(name in item.nodeid for name in _LONGEST))


_LONGEST = (
    "test_notebooks.py::test_notebook_runs",
    "test_adjoint_property.py::test_gq_matches_recursive_checkpoint_full",
    "test_bench.py",
    "test_distributed.py",
    "test_experiments.py::test_sharded_batch_gives_the_same_gradient",
)
