"""Training across processes: two local CPU processes joined by `jax.distributed`
train nested spheres with GQAdjoint, data parallel, to the same parameters as one
process on the same global batches.

Both runs are the command line, `python -m gqdiffrax_experiments nested-spheres`, as a
user would start it on two hosts (there, `--coordinator` names the first host)."""

import json
import os
import socket
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest

from gqdiffrax_experiments import nested_spheres


# Two steps per epoch of the smoke size (40 samples, batch 20), two epochs.
TRAINING = ["nested-spheres", "--smoke", "--epochs", "2", "--no-nfe", "--save-models"]
MODEL = "models/gq-w8-seed0.eqx"
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*argv) -> subprocess.Popen:
    # On the CPU even where there is a GPU: two processes would share it.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "gqdiffrax_experiments", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _initial_model():
    """The model both runs start from (the seed fixes it), in float32."""
    with jax.enable_x64(False):
        return nested_spheres.make_run(
            width=8,
            seed=0,
            method="gq",
            train_per_class=1,
            test_per_class=1,
            batch_size=1,
        ).model


def _leaves(model):
    return [
        np.asarray(x)
        for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    ]


def _trained(path):
    return _leaves(eqx.tree_deserialise_leaves(path, _initial_model()))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    hosts = ["--coordinator", coordinator, "--num-processes", 2]
    procs = [
        _start(*TRAINING, *hosts, "--process-id", i, "--out", tmp_path / "two")
        for i in range(2)
    ]
    # The reference meanwhile: one process, one device, the same global batches.
    procs.append(_start(*TRAINING, "--out", tmp_path / "one"))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        # A process whose peer died would wait for it; never leave one behind.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    written = json.loads((tmp_path / "two" / "results.json").read_text())
    assert written["environment"]["num_processes"] == 2
    # One CPU device per process: each holds half of every batch.
    assert written["environment"]["num_devices"] == 2
    assert written["config"]["devices"] == 2
    two, one = _trained(tmp_path / "two" / MODEL), _trained(tmp_path / "one" / MODEL)
    initial = _leaves(_initial_model())
    for a, b in zip(two, one, strict=True):
        # Only the order of the batch mean's float32 sums differs.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Training moved the parameters, so the comparison says something.
    assert max(np.max(np.abs(a - x0)) for a, x0 in zip(two, initial)) > 1e-3
