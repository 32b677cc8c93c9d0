"""The gradient benchmark runs end to end at smoke size, through the experiments CLI
(`python -m gqdiffrax.experiments bench-gradients`)."""

import json

import jax

from gqdiffrax.experiments import __main__ as cli, bench_gradients


def test_bench_gradients_smoke(tmp_path):
    with jax.enable_x64(False):
        assert cli.main(["bench-gradients", "--smoke", "--out", str(tmp_path)]) == 0

    written = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert written["config"]["repeats"] == 2
    rows = written["results"]
    assert {r["regime"] for r in rows} == set(bench_gradients.REGIMES)
    for row in rows:
        for method in bench_gradients.METHODS:
            times = row["times_ms"][method]
            assert len(times) == written["config"]["repeats"]
            assert all(t > 0 for t in times)
            assert row["median_ms"][method] > 0
            assert row["compile_s"][method] > 0
            # The methods differentiate the same solve: their gradients agree.
            assert row["grad_rel_err_vs_direct"][method] < 1e-3
        assert row["ratios"]["gq/direct"] > 0
        assert row["ratios"]["gq/seminorm"] > 0
        assert row["nfe_forward"] > 0
        assert f"| {row['regime']} | {row['width']} |" in markdown
    assert written["memory"], "the smoke run compares memory for one regime"
    for row in written["memory"]:
        for method in bench_gradients.MEMORY_METHODS:
            assert all(b > 0 for b in row["temp_bytes"][method].values())
    statuses = {c["status"] for c in written["targets"]}
    assert statuses <= {"PASS", "FAIL", "SKIP"}
    assert all(f"{c['status']}: {c['name']}" in markdown for c in written["targets"])
