"""How a task is declared and run: its command line, and the files every run writes.

A task module declares one `Task`: its name, a description, the presets of its three
sizes, its own options and a `run(args) -> Result` function. `run_task` parses the
command line (options left out take the preset of the chosen size), runs the task and
writes what it returned under `--out`: `results.json` (configuration, environment and
every row), `runs.csv` (one line per row), `curves.csv` (one line per epoch, for
training tasks), `summary.md` and the figures.
"""

import argparse
import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import gqdiffrax

from . import _cpu
from ._methods import METHODS


PROG = "python -m gqdiffrax_experiments"
SIZES = ("smoke", "default", "full")


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


# A figure is drawn by `draw(path)`, which returns `None`, or instead of drawing returns
# the reason why the figure would say nothing (e.g. a scaling plot of a single width).
Figure = Callable[[pathlib.Path], str | None]


@dataclasses.dataclass(frozen=True)
class Result:
    """What a task's run returns: one dict per row (a training run, a timed gradient, a
    step size...), a markdown summary, its figures by file name, and anything else for
    `results.json`."""

    rows: list[dict]
    summary: str
    figures: Mapping[str, Figure] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # More CSV files, `NAME.csv` from `tables[NAME]` (one dict per line), for tasks
    # whose rows make several tables.
    tables: Mapping[str, list[dict]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
    """One experiment of the command line.

    - `name`: the task as typed, `python -m gqdiffrax_experiments NAME`.
    - `description`: the first paragraph is the task list's entry; all of it heads
        `--help`.
    - `presets`: option values of each size, `"smoke"` (seconds, for tests),
        `"default"` (minutes on a CPU) and `"full"` (the paper's protocol).
    - `run(args) -> Result`: the experiment; raises `UsageError` for bad input.
    - `methods`: the choices of `--methods` (none: no such option).
    - `training`: whether the task trains models (`--widths`, `--seeds`, `--epochs`,
        `--batch-size`, `--lr`, `--devices`, `--no-nfe`, `--save-models`, and
        `--distributed`, `--coordinator`, `--num-processes`, `--process-id` for
        several processes).
    - `threads`: whether `--threads N` pins the run to N CPU threads (benchmarks).
    - `gq_constant`: whether `--C` selects the paper's rule per interval,
        `GQAdjoint(IntervalGauss(C=...))`, where `gq` is a method.
    - `arguments(parser)`: adds the task's own options.
    """

    name: str
    description: str
    presets: Mapping[str, Mapping[str, Any]]
    run: Callable[[argparse.Namespace], Result]
    methods: Sequence[str] = ()
    _: dataclasses.KW_ONLY
    training: bool = False
    threads: bool = False
    gq_constant: bool = True
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

    @property
    def summary(self) -> str:
        """The first paragraph of the description, on one line."""
        return " ".join(self.description.strip().split("\n\n")[0].split())


#
# Command line
#


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def presets(default: dict, *, smoke: dict, full: dict) -> dict[str, dict]:
    """A task's presets: the default size, and what the smoke and full sizes change."""
    return dict(smoke={**default, **smoke}, default=default, full={**default, **full})


def add_options(
    parser: argparse.ArgumentParser,
    type: Callable = positive_int,
    *,
    metavar: str = "N",
    nargs: str | None = None,
    **helps: str,
) -> None:
    """Options of one kind by destination: `add_options(parser, num_train="...")` adds
    `--num-train N`, a positive integer."""
    for dest, text in helps.items():
        flag = "--" + dest.replace("_", "-")
        parser.add_argument(flag, type=type, metavar=metavar, nargs=nargs, help=text)


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, metavar="W", nargs="+", widths="hidden widths")
    add_options(
        parser,
        seeds="run seeds 0..N-1",
        epochs="training epochs",
        batch_size="training batch size",
    )
    add_options(
        parser,
        positive_float,
        metavar="LR",
        lr="learning rate; if not set, the paper's for the width",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        metavar="N",
        help="split each batch over the first N devices (default: 1; with several "
        "processes, every device of every process)",
    )
    parser.add_argument(
        "--no-nfe",
        dest="nfe",
        action="store_false",
        help="skip counting vector-field evaluations (saves one compilation per run)",
    )
    parser.add_argument(
        "--save-models",
        action="store_true",
        help="write each trained model to DIR/models/METHOD-wWIDTH-seedS.eqx "
        "(equinox.tree_serialise_leaves)",
    )
    hosts = parser.add_argument_group(
        "several processes or hosts",
        "Start the same command once per process, each with its own --process-id; "
        "every process computes its share of each batch (data parallel) and process "
        "0 writes the files. Any of --coordinator, --num-processes and --process-id "
        "implies --distributed.",
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first; without the three options "
        "below, JAX finds them from the cluster (SLURM, Open MPI, Kubernetes, ...) or "
        "JAX_COORDINATOR_ADDRESS",
    )
    hosts.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0, where JAX's coordination service listens",
    )
    add_options(hosts, num_processes="number of processes in all")
    hosts.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="this process's index, 0 to --num-processes minus 1",
    )


def make_parser(task: Task) -> argparse.ArgumentParser:
    epilog = None
    if task.methods:
        epilog = "methods:\n" + "\n".join(
            f"  {m:<16} {METHODS[m].help}" for m in task.methods
        )
    parser = _Parser(
        prog=f"{PROG} {task.name}",
        description=task.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    if task.methods:
        parser.add_argument(
            "--methods",
            nargs="+",
            metavar="METHOD",
            help=f"any of: {', '.join(task.methods)}",
        )
    if task.training:
        _training_arguments(parser)
    if task.threads:
        parser.add_argument(
            "--threads",
            type=positive_int,
            metavar="N",
            help="run on N CPU threads: pin the process to N cores (Linux) and, for "
            "N = 1, turn off XLA's multi-threaded Eigen (default: every thread the "
            "process is given; the count and the load average are reported either "
            "way)",
        )
    if task.gq_constant and "gq" in task.methods:
        parser.add_argument(
            "--C",
            type=positive_float,
            help="run 'gq' and 'gq-interval' with the paper's rule per interval and "
            "this C, GQAdjoint(gqdiffrax.IntervalGauss(C=C)); the paper used 0.1 "
            "(default: 'gq' is GQAdjoint(), a Gauss rule on every backward step; "
            "'gq-interval' takes C=0.1)",
        )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check of the code path (mostly compilation), for tests",
    )
    size.add_argument("--full", action="store_true", help="the paper's protocol")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        metavar="DIR",
        help=f"(default: results/{task.name})",
    )
    if task.arguments is not None:
        task.arguments(parser)
    default = task.presets["default"]
    for action in parser._actions:
        value = default.get(action.dest)
        if value is not None and action.help and "default" not in action.help:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help += f" (default: {shown})"
    return parser


def parse_args(task: Task, argv: Sequence[str]) -> argparse.Namespace:
    """The options of `task`; those left out take the preset of the chosen size."""
    args = make_parser(task).parse_args(argv)
    args.task = task.name
    args.size = "smoke" if args.smoke else "full" if args.full else "default"
    for name, value in task.presets[args.size].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if task.methods:
        unknown = [m for m in args.methods if m not in task.methods]
        if unknown:
            raise UsageError(
                f"unknown method {unknown[0]!r} for task {task.name!r}; choose from "
                f"{', '.join(task.methods)}"
            )
        args.methods = list(dict.fromkeys(args.methods))
    if args.out is None:
        args.out = pathlib.Path("results") / task.name
    # Both change how JAX creates its backend, so they come before anything runs.
    if task.threads and args.threads is not None:
        try:
            _cpu.pin_threads(args.threads)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if task.training:
        _start_distributed(args)
    return args


def _start_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` with the options given, when any is."""
    given = dict(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    args.distributed = args.distributed or any(v is not None for v in given.values())
    if not args.distributed:
        return
    if args.process_id is not None and args.process_id < 0:
        raise UsageError(f"--process-id must be at least 0, got {args.process_id}")
    if None not in (args.num_processes, args.process_id):
        if args.process_id >= args.num_processes:
            raise UsageError(
                f"--process-id {args.process_id} must be below --num-processes "
                f"{args.num_processes}"
            )
    # Options left out are found by JAX from the cluster or the environment.
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def run_task(task: Task, argv: Sequence[str]) -> Result:
    """Parse `argv`, run `task` and write its files; the code path of the CLI."""
    args = parse_args(task, argv)
    result = task.run(args)
    write_outputs(args, result)
    return result


#
# Output
#


def environment() -> dict:
    devices = jax.devices()
    return dict(
        jax=jax.__version__,
        diffrax=importlib.metadata.version("diffrax"),
        equinox=importlib.metadata.version("equinox"),
        gqdiffrax=gqdiffrax.__version__,
        backend=devices[0].platform,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        cpu_count=os.cpu_count(),
        cpu_threads=_cpu.cpu_threads(),
        load_average=_cpu.load_average(),
        num_processes=jax.process_count(),
        python=platform.python_version(),
        platform=platform.platform(),
    )


def is_main_process() -> bool:
    return jax.process_index() == 0


def say(message: str) -> None:
    """Progress for the person at the terminal, from one process only."""
    if is_main_process():
        print(message, flush=True)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, pathlib.Path):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _flat(row: dict, prefix: str = "") -> dict:
    """One CSV line of a row: nested dicts become `outer.inner` columns, lists go."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = v
    return out


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# The columns of a training run's result, by header, for `summarise`.
TRAINING_COLUMNS = {
    "train_s": "train time (s)",
    "s_per_epoch": "s/epoch",
    "compile_s": "compile (s)",
    "final_metric": "test metric",
    "nfe_forward": "NFE fwd",
    "nfe_backward": "NFE bwd",
}


def write_outputs(args: argparse.Namespace, result: Result) -> pathlib.Path:
    """Write results.json, runs.csv, curves.csv (when rows have a `curve`),
    summary.md and the figures under `args.out`; print the summary."""
    out = pathlib.Path(args.out)
    if not is_main_process():
        return out
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary
    omitted = {}
    for name, draw in result.figures.items():
        reason = draw(out / name)
        if reason is not None:
            omitted[name] = reason
            summary += f"\n\n{name} omitted: {reason}."
    config = {k: v for k, v in vars(args).items() if k not in ("smoke", "full")}
    payload = dict(
        task=args.task,
        config=config,
        environment=environment(),
        runs=result.rows,
        figures_omitted=omitted,
        **result.extra,
    )
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
    _write_csv(out / "runs.csv", [_flat(row) for row in result.rows])
    for name, rows in result.tables.items():
        _write_csv(out / f"{name}.csv", [_flat(row) for row in rows])
    # One line per epoch of every training run, labelled by what identifies the run.
    results = {*TRAINING_COLUMNS, "final_test_loss"}
    curves = [
        {**{k: v for k, v in _flat(row).items() if k not in results}, **point}
        for row in result.rows
        for point in row.get("curve", ())
    ]
    if curves:
        _write_csv(out / "curves.csv", curves)
    title = f"# {args.task} ({args.size} size)\n\n"
    (out / "summary.md").write_text(title + summary + "\n")
    print(title + summary)
    print(f"\nWrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}/")
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    text = f"{float(np.mean(values)):.4g}"
    if len(values) > 1 and np.std(values) > 0:
        text += f" ± {float(np.std(values)):.2g}"
    return text


def summarise(
    rows: list[dict],
    keys: Sequence[str],
    columns: Mapping[str, str],
    *,
    count_label: str = "runs",
) -> str:
    """A markdown table: one line per distinct value of `keys`, mean ± std over seeds
    of each of `columns` (row key -> header)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    body = [
        ["–" if g is None else g for g in group]
        + [len(members)]
        + [_fmt([m[c] for m in members]) for c in columns]
        for group, members in groups.items()
    ]
    return markdown_table(list(keys) + [count_label] + list(columns.values()), body)


def training_summary(rows: list[dict], keys: Sequence[str], metric: str) -> str:
    """`summarise` of training runs: times, NFE, and the final test `metric`."""
    return summarise(rows, keys, {**TRAINING_COLUMNS, "final_metric": metric})
