"""The gradient benchmark runs end to end at smoke size, through the experiments CLI
(`python -m gqdiffrax_experiments bench-gradients`), and writes what every task writes.
A benchmark, not a test of speed: its timings are only checked to exist."""

import csv
import json
import subprocess
import sys

import jax
import pytest

from gqdiffrax_experiments import __main__ as cli, bench_gradients


@pytest.mark.slow
def test_bench_gradients_smoke(tmp_path):
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert cli.main(["bench-gradients", "--smoke", "--out", str(tmp_path)]) == 0

    written = json.loads((tmp_path / "results.json").read_text())
    summary = (tmp_path / "summary.md").read_text()
    assert written["config"]["repeats"] == 2
    rows = written["runs"]
    assert {r["regime"] for r in rows} == set(bench_gradients.REGIMES)
    for row in rows:
        for method in bench_gradients.METHODS:
            times = row["times_ms"][method]
            assert len(times) == written["config"]["repeats"]
            assert all(t > 0 for t in times)
            assert row["compile_s"][method] > 0
            # The methods differentiate the same solve: their gradients agree.
            assert row["grad_rel_err_vs_direct"][method] < 1e-3
        assert set(row["ratios"]) == {"gq/direct", "gq/seminorm"}
        assert row["nfe_forward"] > 0
        assert f"| {row['regime']} | {row['width']} |" in summary
    with open(tmp_path / "runs.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows)
    assert {"regime", "width", "median_ms.gq", "ratios.gq/direct"} <= set(lines[0])
    # The threads each method ran on and how busy the machine was, in every output.
    assert {"threads", "load_average.1m", "load_average.15m"} <= set(lines[0])
    assert written["cpu"]["threads"] == rows[0]["threads"] >= 1
    assert not written["cpu"]["pinned"]
    assert "CPU threads: " in summary and "load average (1/5/15 min)" in summary
    assert (tmp_path / "bench_gradients.png").is_file()
    assert written["memory"], "the smoke run compares memory for one regime"
    for row in written["memory"]:
        for method in bench_gradients.MEMORY_METHODS:
            assert all(b > 0 for b in row["temp_bytes"][method].values())
    statuses = {c["status"] for c in written["targets"]}
    assert statuses <= {"PASS", "FAIL", "SKIP"}
    assert all(f"{c['status']}: {c['name']}" in summary for c in written["targets"])


@pytest.mark.slow
def test_bench_gradients_pinned_to_one_thread(tmp_path):
    # A process of its own: the pinning must come before JAX starts its backend, and
    # must not pin the test runner.
    argv = ["bench-gradients", "--smoke", "--threads", "1", "--regimes", "a"]
    argv += ["--methods", "direct", "gq", "--no-memory", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "gqdiffrax_experiments", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "results.json").read_text())
    cpu = written["cpu"]
    assert cpu["threads"] == 1 and cpu["pinned"]
    assert "--xla_cpu_multi_thread_eigen=false" in cpu["xla_flags"]
    assert [r["threads"] for r in written["runs"]] == [1]
    assert "CPU threads: 1 (pinned with --threads)" in result.stdout


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    # The GPU suite's code path at toy size on the CPU; on a GPU its default size is
    # the benchmark.
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert cli.main(["gpu-suite", "--smoke", "--out", str(tmp_path)]) == 0

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["not_run"] == []
    tables = {}
    for name in ("gradients", "crossover"):
        with open(tmp_path / f"{name}.csv") as f:
            tables[name] = list(csv.DictReader(f))
    assert [(r["regime"], r["width"]) for r in tables["gradients"]] == [("a", "8")]
    assert [r["batch_size"] for r in tables["crossover"]] == ["4"]
    for name, columns in {
        "gradients": ["regime", "width", "num_params", "nfe_forward"],
        "crossover": ["batch_size", "width"],
    }.items():
        columns += ["median_ms.direct", "median_ms.gq", "ratio.gq/direct"]
        columns += [
            "compile_s.direct",
            "compile_s.gq",
            "temp_mib.direct",
            "temp_mib.gq",
        ]
        assert set(columns) <= set(tables[name][0]), name
        for row in tables[name]:
            assert float(row["median_ms.gq"]) > 0 and float(row["ratio.gq/direct"]) > 0
    # Both methods differentiate the same solve.
    assert float(tables["gradients"][0]["grad_rel_err_vs_direct.gq"]) < 1e-3
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "| regime | width | params | NFE | direct ms | gq ms | gq/direct | "
        "gq grad rel err | compile s (direct/gq) | temp MiB (direct/gq) |"
    ) in summary
    assert (
        "| batch | width | direct ms/step | gq ms/step | gq/direct | "
        "compile s (direct/gq) | temp MiB (direct/gq) |"
    ) in summary
    assert "CPU threads: " in summary
