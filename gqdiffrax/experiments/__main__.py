"""`python -m gqdiffrax.experiments TASK [options]`: the paper's experiments.

Each task lives in its own module with a `main(argv)`; modules are imported only when
their task runs, so that `--help` answers at once.
"""

import importlib
import sys


# task -> (module, one-line description)
TASKS = {
    "demo": (
        "demo",
        "the README's main job (about 1 min on a 2-core CPU): nested spheres at one "
        "width with direct, seminorm and gq; prints s/epoch, speedup and accuracy",
    ),
    "exponential": (
        "exponential",
        "Fig. 1: relative errors of L, dL/dz0, dL/da, dL/dT on z' = az against the "
        "closed form",
    ),
    "memory": (
        "memory",
        "Fig. 2: compiled memory of the gradient against solver tolerance",
    ),
    "nested-spheres": (
        "nested_spheres",
        "Fig. 4: augmented neural ODE classifier, training time and accuracy vs width",
    ),
    "sines": (
        "sines",
        "Fig. 5 and Table 4: second-order neural ODE on sine curves, 10/50 regular or "
        "irregular times",
    ),
    "crossing-trajectories": (
        "crossing",
        "Fig. 16: map x in {+1, -1} to -x with an augmented neural ODE",
    ),
    "images": (
        "images",
        "Fig. 6: convolutional neural ODE on 8x8 digits (or MNIST with --data-dir)",
    ),
    "ou-sde": (
        "ou_sde",
        "Fig. 7 and Table 6: neural SDE on an Ornstein-Uhlenbeck process; GQ on the "
        "Wong-Zakai ODE against SDE direct/backsolve",
    ),
    "c-ablation": (
        "c_ablation",
        "Table 2: nested spheres with GQ for several values of C",
    ),
    "ees-stability": (
        "ees_stability",
        "stability of the near-reversible EES25/EES27 solvers",
    ),
    "bench-gradients": (
        "bench_gradients",
        "time and accuracy of one gradient for every adjoint, in one process",
    ),
}

PROG = "python -m gqdiffrax.experiments"


def usage() -> str:
    width = max(map(len, TASKS))
    lines = [
        f"usage: {PROG} TASK [--methods M ...] [--widths W ...] [--seeds N] "
        "[--epochs N] [--smoke | --full] [--out DIR] [--devices N] [task options]",
        "",
        "Runs one of the paper's experiments and writes JSON, CSV, a markdown summary "
        "and figures under --out (default: results/TASK). The default size of every "
        "task takes minutes on a laptop CPU; --smoke is a quick check (mostly "
        "compilation); --full is the paper's protocol.",
        "",
        "tasks:",
    ]
    lines += [f"  {task:<{width}}  {desc}" for task, (_, desc) in TASKS.items()]
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
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        return _error(
            f"unknown task {task!r}; choose from {', '.join(TASKS)} (see --help)"
        )
    module = importlib.import_module(f"gqdiffrax.experiments.{TASKS[task][0]}")
    from ._common import UsageError

    try:
        module.main(rest)
    except UsageError as e:
        return _error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
