"""The experiments CLI: every task at `--smoke` size writes its files, bad input is one
line on stderr, and sharding the batch over devices does not change the gradient.

Tasks run in this process through `gqdiffrax_experiments.__main__.main` (the code path
of `python -m gqdiffrax_experiments`), in float32 and with standard dtype promotion as
on the command line; `--help` and
multi-device runs go through real subprocesses. Runs of tasks are `slow`; bad input is
rejected before anything is compiled, so those tests are not.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from gqdiffrax_experiments import __main__ as cli


TRAINING_FILES = ("results.json", "runs.csv", "curves.csv", "summary.md")


def run_task(*argv):
    # As on the command line: float32, and JAX's standard dtype promotion (optax's Adam
    # promotes its int32 step count against a Python float).
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert cli.main([str(a) for a in argv]) == 0


def run_subprocess(*argv):
    return subprocess.run(
        [sys.executable, "-m", "gqdiffrax_experiments", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_training(out, *, methods, epochs, extra_keys=(), nfe=True):
    """The files of a training task, and sane rows for exactly `methods`."""
    for name in TRAINING_FILES:
        assert (out / name).is_file(), name
    assert list(out.glob("*.png")), "no figure"
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted({r["method"] for r in runs}) == sorted(methods)
    for r in runs:
        for key in extra_keys:
            assert key in r
        assert r["train_s"] > 0 and r["compile_s"] > 0
        assert math.isfinite(r["final_metric"])
        if nfe:
            assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0
        else:
            assert r["nfe_forward"] is None and r["nfe_backward"] is None
        assert [p["epoch"] for p in r["curve"]] == list(range(1, epochs + 1))
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs)
    assert {
        "train_s",
        "compile_s",
        "final_metric",
        "nfe_forward",
        "nfe_backward",
    } <= set(rows[0])
    return runs


@pytest.mark.slow
def test_help_lists_every_task():
    result = run_subprocess("--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for task in cli.TASKS:
        assert sum(line.split()[:1] == [task] for line in lines) == 1, task


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-task"], "unknown task"),
        (["nested-spheres", "--smoke", "--methods", "gq", "bogus"], "unknown method"),
        (["ou-sde", "--smoke", "--methods", "seminorm", "magic"], "unknown method"),
        (["nested-spheres", "--smoke", "--widths", "8", "0"], "positive integer"),
        (["crossing-trajectories", "--smoke", "--widths", "-3"], "positive integer"),
        (["images", "--smoke", "--data-dir", "{tmp}/missing"], "not a directory"),
        (["images", "--smoke", "--data-dir", "{tmp}/garbage"], "cannot read"),
        (["bench-gradients", "--smoke", "--repeats", "-1"], "positive integer"),
        (["bench-gradients", "--smoke", "--repeats", "0"], "positive integer"),
        (["bench-gradients", "--smoke", "--methods", "direct"], "include gq"),
        (["ees-stability", "--smoke", "--step-sizes", "0"], "positive number"),
        (["memory", "--smoke", "--full"], "not allowed with argument"),
        (["bench-gradients", "--smoke", "--threads", "0"], "positive integer"),
        (
            ["nested-spheres", "--smoke", "--num-processes", "2", "--process-id", "2"],
            "must be below --num-processes",
        ),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (garbage / stem).write_bytes(b"not an idx file")
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err


def test_gq_methods():
    # "gq" is the default GQAdjoint(); "gq-interval", and "gq" with --C, the paper's
    # rule per interval.
    import gqdiffrax
    from gqdiffrax_experiments._methods import adjoint_for, Solve

    rule = lambda method, C=None: adjoint_for(Solve(method, C=C)).quadrature
    assert isinstance(rule("gq"), gqdiffrax.StepGauss)
    assert rule("gq-interval") == gqdiffrax.IntervalGauss()
    assert rule("gq", 2.0) == rule("gq-interval", 2.0) == gqdiffrax.IntervalGauss(C=2.0)


@pytest.mark.slow
def test_bad_input_has_no_traceback():
    result = run_subprocess("bench-gradients", "--repeats", "-1")
    assert result.returncode == 2
    assert result.stderr.startswith("python -m gqdiffrax_experiments: error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    run_task("demo", "--smoke", "--no-nfe", "--out", out)
    check_training(out, methods=["direct", "seminorm", "gq"], epochs=1, nfe=False)
    printed = capsys.readouterr().out.splitlines()
    # Compilation takes most of the demo: it says so for every method.
    for method in ("direct", "seminorm", "gq"):
        assert any(
            line.startswith(f"{method} ") and "compiling" in line for line in printed
        ), method
    header = next(line for line in printed if "s/epoch" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == [
        "method",
        "s/epoch",
        "speedup vs seminorm",
        "test accuracy (%)",
    ]
    assert "speedup vs seminorm" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_nested_spheres(tmp_path):
    out = tmp_path / "spheres"
    run_task(
        "nested-spheres", "--smoke", "--methods", "adjoint", "--no-nfe", "--out", out
    )
    check_training(out, methods=["adjoint"], epochs=1, nfe=False)
    # A scaling plot of one width would be a dot: it is left out, with the reason.
    assert (out / "fig8_loss_curves.png").is_file()
    assert not (out / "fig4_scaling.png").exists()
    omitted = json.loads((out / "results.json").read_text())["figures_omitted"]
    assert "one" in omitted["fig4_scaling.png"]
    assert "fig4_scaling.png omitted" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_c_ablation_more_nodes_for_larger_C(tmp_path):
    out = tmp_path / "c"
    run_task("c-ablation", "--smoke", "--C", "0.001", "100000", "--out", out)
    runs = check_training(out, methods=["gq"], epochs=1, extra_keys=("C",))
    by_c = {r["C"]: r for r in runs}
    # C scales the number of quadrature nodes: 1e5 hits the cap of 64 per interval.
    assert by_c[1e5]["nfe_backward"] > by_c[1e-3]["nfe_backward"]
    assert by_c[1e5]["nfe_forward"] == by_c[1e-3]["nfe_forward"]


@pytest.mark.slow
def test_sines_irregular(tmp_path):
    out = tmp_path / "sines"
    run_task(
        "sines",
        "--smoke",
        "--regularity",
        "irregular",
        "--methods",
        "gq",
        "gq-interval",
        "--epochs",
        "2",
        "--no-nfe",
        "--out",
        out,
    )
    runs = check_training(
        out,
        methods=["gq", "gq-interval"],
        epochs=2,
        extra_keys=("num_times", "regularity"),
        nfe=False,
    )
    assert {r["regularity"] for r in runs} == {"irregular"}


@pytest.mark.slow
def test_crossing_trajectories(tmp_path):
    out = tmp_path / "crossing"
    run_task(
        "crossing-trajectories",
        "--smoke",
        "--methods",
        "direct",
        "--no-nfe",
        "--out",
        out,
    )
    check_training(out, methods=["direct"], epochs=2, nfe=False)


@pytest.mark.slow
def test_images_on_bundled_digits(tmp_path):
    out = tmp_path / "images"
    run_task("images", "--smoke", "--methods", "gq", "--no-nfe", "--out", out)
    check_training(out, methods=["gq"], epochs=1, nfe=False)
    assert json.loads((out / "results.json").read_text())["dataset"] == "digits"


def test_mnist_idx_files_are_read(tmp_path):
    """`--data-dir` reads MNIST's IDX format, plain or gzipped."""
    import gzip

    import numpy as np

    from gqdiffrax_experiments import images

    rng = np.random.default_rng(0)
    expected = {}
    for stem, shape in [
        ("train-images-idx3-ubyte", (5, 28, 28)),
        ("train-labels-idx1-ubyte", (5,)),
        ("t10k-images-idx3-ubyte", (3, 28, 28)),
        ("t10k-labels-idx1-ubyte", (3,)),
    ]:
        data = rng.integers(0, 256 if len(shape) > 1 else 10, shape, dtype=np.uint8)
        header = bytes([0, 0, 8, len(shape)]) + b"".join(
            n.to_bytes(4, "big") for n in shape
        )
        raw = header + data.tobytes()
        if stem.startswith("train"):
            (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (tmp_path / stem).write_bytes(raw)
        expected[stem] = data
    (train_x, train_y), (test_x, test_y) = images.load_mnist(tmp_path)
    assert train_x.shape == (5, 1, 28, 28) and test_x.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(
        train_x[:, 0] * 255, expected["train-images-idx3-ubyte"], atol=1e-3
    )
    np.testing.assert_array_equal(test_y, expected["t10k-labels-idx1-ubyte"])
    np.testing.assert_array_equal(train_y, expected["train-labels-idx1-ubyte"])


@pytest.mark.slow
def test_exponential_matches_closed_form(tmp_path):
    out = tmp_path / "exp"
    run_task("exponential", "--smoke", "--methods", "adjoint", "gq", "--out", out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"adjoint", "gq"}
    for r in runs:
        for q in ("L", "dL/dz0", "dL/da", "dL/dT"):
            assert r[f"err {q}"] < 1e-4, (r["method"], q, r[f"err {q}"])
        assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0
    # The same forward solve, and gradients of the same continuous adjoint equation.
    by_method = {(r["method"], r["T"]): r for r in runs}
    for T in {r["T"] for r in runs}:
        adjoint, gq = by_method["adjoint", T], by_method["gq", T]
        assert gq["L"] == pytest.approx(adjoint["L"], rel=1e-12)
        for q in ("dL/dz0", "dL/da", "dL/dT"):
            assert gq[q] == pytest.approx(adjoint[q], rel=1e-5)
    assert (out / "fig1_relative_errors.png").is_file()


@pytest.mark.slow
def test_accuracy_default_rule_matches_backsolve(tmp_path):
    out = tmp_path / "accuracy"
    run_task("accuracy", "--smoke", "--out", out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    error = {(r["method"], r["tol"]): r["error"] for r in runs}
    assert {tol for _, tol in error} == {1e-4, 1e-6}
    for tol in (1e-4, 1e-6):
        # float64 errors, far below float32's resolution.
        # Agreement with the direct method at the same tolerance; against the exact
        # gradient, tests/test_settling.py holds the default within twice the direct
        # method's own error on this problem.
        assert error["gq, default", tol] < 10 * tol
    assert "| exponential | 1e-06 |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_memory_direct_grows_gq_by_its_kept_states(tmp_path):
    out = tmp_path / "memory"
    run_task("memory", "--smoke", "--tols", "1e-3", "1e-6", "--out", out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    mem = {(r["method"], r["tol"]): r["temp_bytes"] for r in runs}
    steps = {r["tol"]: r["num_steps"] for r in runs}
    assert steps[1e-6] > steps[1e-3]
    assert mem["direct", 1e-6] > mem["direct", 1e-3]
    # GQ's default keeps the state (here a float64 scalar, 16 bytes with its time) at
    # every step of the budget, max_steps = 2 x forward steps: its memory grows by
    # about one row per step of budget (alignment rounds it up), less than the direct
    # method's, which stores every stage.
    growth = mem["gq", 1e-6] - mem["gq", 1e-3]
    budget_rows = 2 * (steps[1e-6] - steps[1e-3])
    assert 0 < growth <= 2 * 16 * budget_rows
    assert growth < mem["direct", 1e-6] - mem["direct", 1e-3]
    assert (out / "fig2_memory.png").is_file()


@pytest.mark.slow
def test_ou_sde(tmp_path):
    out = tmp_path / "ou"
    run_task(
        "ou-sde", "--smoke", "--methods", "gq", "sde-adjoint", "--no-nfe", "--out", out
    )
    check_training(
        out,
        methods=["gq", "sde-adjoint"],
        epochs=1,
        extra_keys=("num_cosines",),
        nfe=False,
    )


@pytest.mark.slow
def test_ees_stability(tmp_path):
    # `bench-gradients --smoke` goes through this CLI in tests/test_bench.py.
    out = tmp_path / "ees-stability"
    run_task("ees-stability", "--smoke", "--out", out)
    assert (out / "ees_stability.png").is_file()
    assert (out / "runs.csv").is_file()
    assert "largest stable h" in (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    for problem in config["problems"]:
        rows = [r for r in results["runs"] if r["problem"] == problem]
        assert {(r["solver"], r["h"]) for r in rows} == {
            (solver, h) for solver in config["solvers"] for h in config["step_sizes"]
        }
        # The largest step size of the smoke grid blows up every solver; at the
        # smallest, EES25 is stable and its reversible gradient close to the exact one.
        smallest = min(config["step_sizes"])
        for r in rows:
            assert r["stable"] == (r["h"] == smallest), r
            if r["solver"] == "EES25" and r["stable"]:
                assert r["grad_rel_error"] < 1e-2, r
        assert set(results["largest_stable_h"][problem]) == set(config["solvers"])


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax, jax.random as jr, numpy as np
    import equinox as eqx
    from gqdiffrax_experiments import __main__ as cli, nested_spheres
    from gqdiffrax_experiments._methods import Solve
    from gqdiffrax_experiments._train import Devices, sharded_loss_and_grad

    assert len(jax.devices()) == 4
    run = nested_spheres.make_run(width=8, seed=0, method="seminorm",
                                  train_per_class=4, test_per_class=2, batch_size=8)
    samples = tuple(x[:8] for x in run.train.samples)
    results = []
    for n in (1, 4):
        devices = Devices(n)
        f = eqx.filter_jit(sharded_loss_and_grad(run, Solve("seminorm"), devices))
        placed = devices.batch(samples)
        assert len(placed[0].sharding.device_set) == n
        results.append(f(devices.replicate(run.model), None, placed, (),
                         devices.replicate(jr.key(0))))
    for a, b in zip(*map(jax.tree_util.tree_leaves, results)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert cli.main(["nested-spheres", "--smoke", "--devices", "4", "--no-nfe",
                     "--out", {out!r}]) == 0
    print("OK")
    """
)


@pytest.mark.slow
def test_sharded_batch_gives_the_same_gradient(tmp_path):
    out = tmp_path / "sharded"
    result = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT.format(out=str(out))],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count=4",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")
    check_training(out, methods=["gq"], epochs=1, nfe=False)
    assert json.loads((out / "results.json").read_text())["config"]["devices"] == 4


@pytest.mark.slow
def test_ees_training(tmp_path):
    out = tmp_path / "ees-training"
    run_task("ees-training", "--smoke", "--out", out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["solver"], r["num_steps"]) for r in runs} == {
        ("EES25", 4),
        ("ReversibleHeun", 4),
    }
    for r in runs:
        assert len(r["curve"]) >= 1
        assert math.isfinite(r["first_loss"])
        # ReversibleAdjoint against the direct method through the same solver.
        assert r["grad_error_init"] < 1.0
    assert (out / "ees_training.png").is_file()
