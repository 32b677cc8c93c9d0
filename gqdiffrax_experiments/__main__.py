"""`python -m gqdiffrax_experiments TASK [options]`: the paper's experiments and the
benchmarks, one `Task` per module."""

import sys

from . import (
    accuracy,
    bench_gradients,
    c_ablation,
    crossing,
    demo,
    ees_stability,
    ees_training,
    exponential,
    gpu_suite,
    images,
    memory,
    nested_spheres,
    ou_sde,
    reproduce,
    sines,
)
from ._task import PROG, run_task, UsageError


# In the order of `--help`.
TASKS = {
    module.TASK.name: module.TASK
    for module in (
        demo,
        exponential,
        memory,
        nested_spheres,
        sines,
        crossing,
        images,
        ou_sde,
        c_ablation,
        ees_stability,
        ees_training,
        bench_gradients,
        gpu_suite,
        accuracy,
        reproduce,
    )
}


def usage() -> str:
    width = max(map(len, TASKS))
    lines = [
        f"usage: {PROG} TASK [--smoke | --full] [--out DIR] [task options]",
        "",
        "Runs one of the paper's experiments or benchmarks and writes results.json, "
        "runs.csv, summary.md and figures under --out (default: results/TASK). The "
        "default size of every task takes minutes on a laptop CPU; --smoke is a quick "
        "check (mostly compilation); --full is the paper's protocol.",
        "",
        "tasks:",
    ]
    lines += [f"  {name:<{width}}  {task.summary}" for name, task in TASKS.items()]
    lines += ["", f"`{PROG} TASK --help` lists the options of TASK."]
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TASKS:
        return _error(
            f"unknown task {name!r}; choose from {', '.join(TASKS)} (see --help)"
        )
    try:
        run_task(TASKS[name], rest)
    except UsageError as e:
        return _error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
