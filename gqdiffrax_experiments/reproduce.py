"""The papers' headline results side by side (docs/reproduction.md): runs the tasks at
the page's sizes, fits the scaling slopes and tabulates ours beside the papers'.

Every part runs one task as a subprocess, `python -m gqdiffrax_experiments TASK ...
--out DIR/PART`, in the environment of this process (so `taskset` and `XLA_FLAGS`
carry over), and writes that task's own files there. Then the slope of log(seconds per
epoch) against log(width) is fitted per method and task (`loglog_slope`), and the
tables of the page are written to `summary.md`:

- `nested-spheres`, `sines`, `crossing`: time per epoch and final metric against width
    for direct, adjoint, seminorm and GQ (the GQ paper's Figures 4, 5 and 16);
- `c-ablation`, `sines-times`, `ou-cosines`: its Tables 2, 4 and 6;
- `images-b16`, `images-b256`: the batch-size crossover of its Figures 6 and 13;
- `ees-training`: the EES paper's stability claim, in training.

The default size is the page's (about an hour on one CPU core); `--full` gives every
part its task's `--full` (the paper's protocol, days on a CPU); `--smoke` is tiny.
`--resume` skips parts whose `results.json` already exists, `--parts` runs some.
"""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import time

import numpy as np

from ._figures import pyplot
from ._methods import METHODS
from ._task import markdown_table, presets, Result, say, Task, UsageError


SCALING_METHODS = ["direct", "adjoint", "seminorm", "gq"]
# Slopes are fitted over all widths, and over widths from this one up, where the
# cost of the vector field rather than fixed overheads dominates.
LARGE_WIDTH = 100


def _widths(*ws):
    return ["--widths", *map(str, ws)]


@dataclasses.dataclass(frozen=True)
class Part:
    task: str
    claim: str
    argv: dict  # size -> the task's options


def _scaling(task, claim, default, smoke_widths=(4, 8)):
    """A scaling part: the paper's learning rates by width (`--full`), cut down."""
    methods = ["--methods", *SCALING_METHODS]
    return Part(
        task,
        claim,
        dict(
            smoke=["--smoke", "--methods", "direct", "gq", *_widths(*smoke_widths)]
            + ["--no-nfe"],
            default=["--full", *methods, "--seeds", "1", "--no-nfe", *default],
            full=["--full", *methods],
        ),
    )


PARTS = {
    "nested-spheres": _scaling(
        "nested-spheres",
        "Fig. 4",
        [*_widths(5, 20, 100, 500, 1000, 2000, 3000), "--epochs", "3"]
        + ["--train-per-class", "50", "--test-per-class", "50", "--batch-size", "50"],
    ),
    "sines": _scaling(
        "sines",
        "Fig. 5",
        [*_widths(5, 20, 200, 1000, 2000), "--epochs", "5"],
    ),
    "crossing": _scaling(
        "crossing-trajectories",
        "Fig. 16",
        [*_widths(5, 20, 100, 500, 1000, 2000, 3000), "--epochs", "10"],
    ),
    "c-ablation": Part(
        "c-ablation",
        "Table 2",
        dict(smoke=["--smoke"], default=["--epochs", "20"], full=["--full"]),
    ),
    "sines-times": Part(
        "sines",
        "Table 4",
        dict(
            smoke=["--smoke", "--regularity", "regular", "irregular"],
            default=["--methods", "gq", *_widths(200), "--epochs", "30"]
            + ["--num-times", "10", "50", "--regularity", "regular", "irregular"],
            full=["--full", "--methods", "gq", *_widths(1000), "--seeds", "5"]
            + ["--num-times", "10", "50", "--regularity", "regular", "irregular"],
        ),
    ),
    "ou-cosines": Part(
        "ou-sde",
        "Table 6",
        dict(
            smoke=["--smoke", "--methods", "gq", "--num-cosines", "0", "5"],
            default=["--methods", "gq", *_widths(20), "--no-nfe", "--epochs", "40"]
            + ["--num-train", "32", "--num-cosines", "0", "1", "5", "10", "25", "50"],
            full=["--full", "--methods", "gq", *_widths(20)]
            + ["--num-cosines", "0", "1", "5", "10", "25", "50"],
        ),
    ),
    **{
        f"images-b{batch}": Part(
            "images",
            "Figs. 6, 13",
            dict(
                smoke=["--smoke", "--methods", "adjoint", "gq", "--batch-size", "4"]
                + [*_widths(2, 4), "--no-nfe"],
                default=["--methods", "adjoint", "gq", "--no-nfe"]
                + [*_widths(16, 64, 128), "--epochs", "1", "--train-size", "512"]
                + ["--test-size", "256", "--batch-size", str(batch)],
                full=["--full", "--batch-size", str(batch)],
            ),
        )
        for batch in (16, 256)
    },
    "ees-training": Part(
        "ees-training",
        "EES paper",
        dict(smoke=["--smoke"], default=[], full=["--full"]),
    ),
}
PRESETS = presets(dict(parts=list(PARTS)), smoke={}, full={})

# The GQ paper's numbers (Appendix E.2 Table 2, E.3 Table 4, F Table 6): mean ± std.
PAPER_TABLE2 = {  # C: (time to train (s), final accuracy (%)), width 1500, 5 seeds.
    1e-3: ("61.4 ± 3.0", "79.0 ± 26.9"),
    0.1: ("89.8 ± 3.1", "95.6 ± 8.8"),
    1e2: ("141.0 ± 2.4", "95.8 ± 8.4"),
    1e5: ("141.7 ± 2.4", "95.8 ± 8.4"),
}
PAPER_TABLE4 = {  # (times, regularity): (time to train (s), final MSE), width 1000.
    (10, "regular"): ("48.5 ± 1.3", "0.08 ± 0.07"),
    (10, "irregular"): ("239.2 ± 2.9", "0.07 ± 0.06"),
    (50, "regular"): ("96.7 ± 4.9", "0.11 ± 0.09"),
    (50, "irregular"): ("1880.5 ± 607.6", "0.09 ± 0.08"),
}
PAPER_TABLE6 = {  # cosines: (training time (min), mean KL (x 1e-2)), width 20.
    0: ("9.62 ± 0.09", "75.55 ± 32.30"),
    1: ("11.34 ± 0.04", "28.01 ± 2.48"),
    5: ("12.97 ± 0.06", "7.49 ± 0.86"),
    10: ("19.88 ± 6.23", "6.50 ± 0.74"),
    25: ("33.13 ± 0.96", "6.18 ± 0.68"),
    50: ("51.97 ± 0.69", "6.12 ± 0.66"),
}


def loglog_slope(x, y, *, min_x: float | None = None) -> float | None:
    """The least-squares slope of log(y) against log(x), over the points with finite,
    positive x and y (and x >= `min_x`, when given); `None` with fewer than two
    distinct x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if min_x is not None:
        keep &= x >= min_x
    if len(np.unique(x[keep])) < 2:
        return None
    slope, _ = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
    return float(slope)


def _mean_by(rows, key, value, **match):
    """{row[key]: mean of row[value]} over rows matching `match`."""
    groups = {}
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and r.get(value) is not None:
            groups.setdefault(r[key], []).append(r[value])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def _fmt(value, spec=".3g"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _pm(values, spec=".3g"):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    text = format(float(np.mean(values)), spec)
    if len(values) > 1:
        text += " ± " + format(float(np.std(values)), spec)
    return text


def scaling_slopes(runs: dict[str, list[dict]]) -> dict:
    """Per scaling part and method: the widths, seconds per epoch, final metrics and
    the fitted slopes (all widths; widths >= LARGE_WIDTH)."""
    out = {}
    for part, rows in runs.items():
        out[part] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            times = _mean_by(rows, "width", "s_per_epoch", method=method)
            metric = _mean_by(rows, "width", "final_metric", method=method)
            loss = _mean_by(rows, "width", "final_test_loss", method=method)
            out[part][method] = dict(
                widths=list(times),
                s_per_epoch=list(times.values()),
                final_metric=[metric.get(w) for w in times],
                final_test_loss=[loss.get(w) for w in times],
                slope=loglog_slope(list(times), list(times.values())),
                slope_large=loglog_slope(
                    list(times), list(times.values()), min_x=LARGE_WIDTH
                ),
            )
    return out


def slope_table(slopes: dict) -> str:
    parts = list(slopes)
    methods = list(dict.fromkeys(m for p in parts for m in slopes[p]))
    body = []
    for m in methods:
        cells = []
        for p in parts:
            s = slopes[p].get(m)
            cells.append(
                "–"
                if s is None
                else f"{_fmt(s['slope'], '.2f')} / {_fmt(s['slope_large'], '.2f')}"
            )
        body.append([METHODS[m].label, *cells])
    note = (
        "Slope of log(s/epoch) against log(width): all widths / widths >= "
        f"{LARGE_WIDTH}."
    )
    return markdown_table(["method", *parts], body) + "\n\n" + note


def scaling_table(slopes: dict, part: str, metric: str) -> str:
    data = slopes[part]
    widths = sorted({w for d in data.values() for w in d["widths"]})
    body = []
    for w in widths:
        cells = []
        for d in data.values():
            i = d["widths"].index(w) if w in d["widths"] else None
            cells.append(
                "–"
                if i is None
                else f"{d['s_per_epoch'][i]:.3g} s ({_fmt(d['final_metric'][i])}; "
                f"{_fmt(d['final_test_loss'][i], '.4g')})"
            )
        body.append([w, *cells])
    headers = ["width", *(METHODS[m].label for m in data)]
    return (
        f"**{part}**: s/epoch ({metric}; test loss) after training\n\n"
        + markdown_table(headers, body)
    )


def _beside_paper(rows, paper, selects, ours, headers, label=None) -> str:
    """One row per key of `paper` (key -> the paper's cells): `label(key)` (default:
    the key's parts), `ours(mine)` over the runs with `selects(run, key)`, then the
    paper's cells."""
    if label is None:
        label = lambda key: list(key) if isinstance(key, tuple) else [key]
    body = []
    for key, paper_cells in paper.items():
        mine = [r for r in rows if selects(r, key)]
        body.append([*label(key), *ours(mine), *paper_cells])
    return markdown_table(headers, body)


def c_table(rows) -> str:
    return _beside_paper(
        rows,
        PAPER_TABLE2,
        lambda r, c: r.get("C") == c,
        lambda mine: [
            _pm([r["train_s"] for r in mine]),
            _pm([r["final_metric"] for r in mine], ".1f"),
            _pm([r["nfe_backward"] for r in mine], ".0f"),
        ],
        ["C", "ours: train (s)", "ours: accuracy (%)", "ours: NFE bwd"]
        + ["paper: train (s)", "paper: accuracy (%)"],
        label=lambda c: [f"{c:g}"],
    )


def times_table(rows) -> str:
    return _beside_paper(
        rows,
        PAPER_TABLE4,
        lambda r, key: (r["num_times"], r["regularity"]) == key,
        lambda mine: [
            _pm([r["train_s"] for r in mine]),
            _pm([r["final_metric"] for r in mine], ".2g"),
        ],
        ["times", "regularity", "ours: train (s)", "ours: MSE"]
        + ["paper: train (s)", "paper: MSE"],
    )


def cosines_table(rows) -> str:
    return _beside_paper(
        rows,
        PAPER_TABLE6,
        lambda r, m: r["num_cosines"] == m,
        lambda mine: [
            _pm([r["train_s"] for r in mine]),
            _pm([100 * r["final_metric"] for r in mine]),
        ],
        ["cosines", "ours: train (s)", "ours: KL (x 1e-2)"]
        + ["paper: train (min)", "paper: KL (x 1e-2)"],
    )


def crossover_table(by_batch: dict[int, list[dict]]) -> str:
    """s/epoch per method, width and batch size, and GQ's over the adjoint's."""
    body = []
    for batch, rows in by_batch.items():
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for w in sorted({r["width"] for r in rows}):
            t = {
                m: _mean_by(rows, "width", "s_per_epoch", method=m).get(w)
                for m in methods
            }
            ratio = t["gq"] / t["adjoint"] if t.get("gq") and t.get("adjoint") else None
            body.append([batch, w, *(_fmt(t[m]) for m in methods), _fmt(ratio, ".2f")])
    headers = ["batch", "width", *(f"{METHODS[m].label} s/epoch" for m in methods)]
    return markdown_table(headers + ["GQ / Adjoint"], body)


def plot_scaling(slopes: dict, path: pathlib.Path) -> str | None:
    """Log-log s/epoch against width per task, with the fitted slopes in the legend."""
    if not slopes:
        return "no scaling part was run"
    plt = pyplot()
    fig, axes = plt.subplots(1, len(slopes), figsize=(4.6 * len(slopes), 3.9))
    axes = np.atleast_1d(axes)
    for ax, (part, data) in zip(axes, slopes.items()):
        for m, d in data.items():
            label = f"{METHODS[m].label} (slope {_fmt(d['slope_large'], '.2f')})"
            ax.loglog(
                d["widths"],
                d["s_per_epoch"],
                "o-",
                color=METHODS[m].color,
                label=label,
            )
        ax.set(xlabel="Hidden width", ylabel="Time per epoch (s)", title=part)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title=f"slope, width ≥ {LARGE_WIDTH}", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# Written by a part that ran to the end: its command and wall time, for `--resume`.
PART_FILE = "reproduce_part.json"


def _run_part(name: str, part: Part, size: str, out: pathlib.Path) -> dict:
    argv = [part.task, *part.argv[size], "--out", str(out / name)]
    command = [sys.executable, "-m", "gqdiffrax_experiments", *argv]
    say(f"[{name}] {' '.join(['python -m gqdiffrax_experiments', *argv])}")
    start = time.perf_counter()
    done = subprocess.run(command)
    row = dict(
        part=name,
        task=part.task,
        claim=part.claim,
        command=" ".join(["python -m gqdiffrax_experiments", *argv]),
        wall_s=time.perf_counter() - start,
        returncode=done.returncode,
    )
    if done.returncode == 0:
        (out / name / PART_FILE).write_text(json.dumps(row, indent=1))
    return row


def _load(out: pathlib.Path, name: str) -> list[dict] | None:
    path = out / name / "results.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["runs"]


def summarise(runs: dict[str, list[dict]]) -> tuple[str, dict]:
    """The page's tables from the parts' rows (by part name); and the slopes."""
    scaling_parts = ("nested-spheres", "sines", "crossing")
    metrics = ("test accuracy (%)", "test MSE", "MSE")
    slopes = scaling_slopes({p: runs[p] for p in scaling_parts if p in runs})
    sections = []
    if slopes:
        sections.append("## Scaling with width\n\n" + slope_table(slopes))
        sections += [
            scaling_table(slopes, p, m)
            for p, m in zip(scaling_parts, metrics)
            if p in slopes
        ]
    for part, title, table in (
        ("c-ablation", "Table 2: C", c_table),
        ("sines-times", "Table 4: observation times", times_table),
        ("ou-cosines", "Table 6: cosines", cosines_table),
    ):
        if part in runs:
            sections.append(f"## {title}\n\n" + table(runs[part]))
    images = {b: runs[f"images-b{b}"] for b in (16, 256) if f"images-b{b}" in runs}
    if images:
        sections.append("## Images: batch size\n\n" + crossover_table(images))
    return "\n\n".join(sections), slopes


def add_arguments(parser):
    parser.add_argument(
        "--parts", nargs="+", choices=tuple(PARTS), help="the parts to run"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip parts whose DIR/PART/results.json exists (summarise them as they "
        "are)",
    )


def run(args) -> Result:
    out = pathlib.Path(args.out)
    rows = []
    for name in args.parts:
        if args.resume and (out / name / "results.json").is_file():
            say(f"[{name}] kept from an earlier run")
            kept = out / name / PART_FILE
            if kept.is_file():
                rows.append({**json.loads(kept.read_text()), "kept": True})
            continue
        rows.append(_run_part(name, PARTS[name], args.size, out))
    failed = [r["part"] for r in rows if r["returncode"] != 0]
    if failed:
        raise UsageError(f"parts failed: {', '.join(failed)} (see their output above)")
    runs = {name: r for name in args.parts if (r := _load(out, name)) is not None}
    summary, slopes = summarise(runs)
    if "ees-training" in runs:
        ees = (out / "ees-training" / "summary.md").read_text().split("\n", 2)[2]
        summary += "\n\n## EES against Reversible Heun in training\n\n" + ees
    walls = [
        [r["part"], r["claim"], f"{r['wall_s']:.0f}", "yes" if r.get("kept") else ""]
        for r in rows
    ]
    summary += "\n\n## Wall time of the parts\n\n" + markdown_table(
        ["part", "claim", "wall (s)", "kept from an earlier run"], walls
    )
    figures = {"reproduce_scaling.png": lambda path: plot_scaling(slopes, path)}
    return Result(rows, summary, figures, extra=dict(slopes=slopes))


TASK = Task("reproduce", __doc__, PRESETS, run, arguments=add_arguments)
