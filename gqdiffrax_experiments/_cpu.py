"""The CPU a benchmark runs on: how many threads it is given, how busy the machine is,
and `pin_threads`, which restricts XLA to N cores before JAX starts its backend."""

import os

from jax._src import xla_bridge  # Only for `backends_are_initialized`.


# XLA's CPU backend runs Eigen's matrix products on a thread pool of its own unless
# told not to. The pool of the PJRT CPU client itself is sized by the CPUs the process
# may run on (its affinity), which `pin_threads` sets.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def cpu_threads() -> int:
    """The CPUs this process may run on: its affinity where the OS has one (Linux),
    otherwise every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> dict[str, float] | None:
    """The 1, 5 and 15 minute load averages of the machine (`None` where the OS has
    none): how many processes were running or waiting for a CPU."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def pin_threads(n: int) -> None:
    """Run XLA on `n` CPU threads: the first `n` CPUs of this process's affinity and,
    for `n == 1`, no multi-threaded Eigen either.

    Both take effect only when JAX creates its backend, so this must come before
    anything runs on a device (importing JAX is fine).

    **Raises:**

    `ValueError` if JAX's backend already exists or `n` exceeds the CPUs available.
    """
    if xla_bridge.backends_are_initialized():
        raise ValueError(
            "--threads must be set before JAX starts its backend; run the task in a "
            "fresh process (`python -m gqdiffrax_experiments TASK --threads N`)"
        )
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        if n > len(available):
            raise ValueError(
                f"--threads {n}: this process may only use {len(available)} CPUs"
            )
        os.sched_setaffinity(0, available[:n])
    elif n > (os.cpu_count() or 1):
        raise ValueError(f"--threads {n}: this machine has {os.cpu_count()} CPUs")
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if SINGLE_THREAD_XLA_FLAGS not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()


def describe(threads_flag: int | None) -> dict:
    """What a results file records about the CPU: the threads given, whether they were
    pinned, XLA's flags and the load average now."""
    return dict(
        threads=cpu_threads(),
        pinned=threads_flag is not None,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average=load_average(),
    )


def header(cpu: dict, load_end: dict | None = None) -> str:
    """One line for a table's header: threads and load averages."""
    pinned = "pinned with --threads" if cpu["pinned"] else "not pinned"
    text = f"CPU threads: {cpu['threads']} ({pinned})"
    fmt = lambda load: "/".join(f"{load[k]:.2f}" for k in ("1m", "5m", "15m"))
    if cpu["load_average"] is not None:
        text += f"; load average (1/5/15 min) {fmt(cpu['load_average'])} at the start"
        if load_end is not None:
            text += f", {fmt(load_end)} at the end"
    return text + "."
