"""One gradient on the GQ paper's kind of problem, in JAX and in PyTorch, one core each.

The problem: $dz/dt = \\mathrm{MLP}([z, t])$, $z \\in \\mathbb{R}^4$, two softplus
hidden layers of width $W$, a state of shape (200, 4), $t \\in [0, 1]$, Dopri5 with
rtol = atol = 1e-3, loss $\\sum z(1)^2$, float32. Both engines start from the same
weights and state: PyTorch's default initialisation, drawn in numpy.

    taskset -c 1 python benchmarks/torch_side_by_side.py jax
    taskset -c 1 python benchmarks/torch_side_by_side.py torch --gq-code DIR

`DIR` holds the package `torch_gq_adjoint` from the paper's repository
(a-norcliffe/torch_gq_adjoint); `torch` and `torchdiffeq` must be installed. Each
engine runs single-threaded in its own process; within it the methods are
interleaved, 7 times, after 2 untimed calls, and the median is printed with each
method's gradient error relative to the engine's own direct method. Compile time is
excluded (JAX compiles ahead of time). The docs' page "Where the time goes" quotes
this script's output.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np


WIDTHS = (256, 1024)
REPEATS = 7
TOL = 1e-3


def initial(width, seed=0):
    """Weights `[(w, b)]` of `Linear(5, W)`, `Linear(W, W)`, `Linear(W, 4)` (PyTorch's
    layout and default initialisation) and the initial state."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in [(5, width), (width, width), (width, 4)]:
        bound = 1 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        layers.append((w, b))
    return layers, rng.standard_normal((200, 4)).astype(np.float32)


def interleaved(calls):
    """Median seconds of each call, timed `REPEATS` times in rotated order."""
    names = list(calls)
    for name in names:
        calls[name]()
        calls[name]()
    times = {name: [] for name in names}
    for r in range(REPEATS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(engine, width, medians, errors):
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"{engine}, W={width} (load {load}):")
    for name, seconds in medians.items():
        error = f"  error vs direct {errors[name]:.1e}" if name in errors else ""
        print(f"  {name:24s} {1e3 * seconds:8.1f} ms{error}")


def run_jax(width):
    os.environ["XLA_FLAGS"] = (
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    import diffrax as dfx
    import jax
    import jax.numpy as jnp

    import gqdiffrax

    layers, z0 = initial(width)
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in layers]

    def field(t, z, params):
        x = jnp.concatenate([z, jnp.full((z.shape[0], 1), t, z.dtype)], axis=1)
        for i, (w, b) in enumerate(params):
            x = x @ w.T + b
            x = jax.nn.softplus(x) if i < len(params) - 1 else x
        return x

    def loss(params, adjoint):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Dopri5(),
            0.0,
            1.0,
            None,
            jnp.asarray(z0),
            params,
            stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    adjoints = {
        "GQAdjoint()": gqdiffrax.GQAdjoint(),
        "GQAdjoint(state_budget=0)": gqdiffrax.GQAdjoint(state_budget=0),
        "IntervalGauss(C=0.1)": gqdiffrax.GQAdjoint(gqdiffrax.IntervalGauss(C=0.1)),
        "direct": dfx.RecursiveCheckpointAdjoint(),
    }
    compiled = {
        name: jax.jit(jax.grad(lambda p, a=a: loss(p, a))).lower(params).compile()
        for name, a in adjoints.items()
    }
    forward = jax.jit(lambda p: loss(p, adjoints["direct"])).lower(params).compile()
    compiled["forward only"] = forward
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    ref = flat(compiled["direct"](params))
    errors = {
        name: float(jnp.linalg.norm(flat(compiled[name](params)) - ref))
        / float(jnp.linalg.norm(ref))
        for name in adjoints
        if name != "direct"
    }
    calls = {
        name: lambda c=c: jax.block_until_ready(c(params))
        for name, c in compiled.items()
    }
    report("JAX", width, interleaved(calls), errors)


def run_torch(width, gq_code):
    import torch
    import torchdiffeq

    sys.path.insert(0, gq_code)
    from torch_gq_adjoint import odeint_adjoint_gq

    torch.set_num_threads(1)

    class Field(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            for w, b in layers:
                linear = torch.nn.Linear(w.shape[1], w.shape[0])
                linear.weight.data = torch.tensor(w)
                linear.bias.data = torch.tensor(b)
                self.layers.append(linear)
            self.nfe = 0  # torch_gq_adjoint sizes its rule from this count

        def forward(self, t, z):
            self.nfe += 1
            x = torch.cat([z, t.expand(z.shape[0], 1)], dim=1)
            for i, linear in enumerate(self.layers):
                x = linear(x)
                if i < len(self.layers) - 1:
                    x = torch.nn.functional.softplus(x)
            return x

    layers, z0 = initial(width)
    field, z0, ts = Field(layers), torch.tensor(z0), torch.tensor([0.0, 1.0])
    options = dict(rtol=TOL, atol=TOL, method="dopri5")

    def forward():
        with torch.no_grad():
            torchdiffeq.odeint(field, z0, ts, **options)

    def gradient(solve):
        field.zero_grad()
        (solve(field, z0, ts, **options)[-1] ** 2).sum().backward()
        return torch.cat([p.grad.ravel() for p in field.parameters()])

    ref = gradient(torchdiffeq.odeint)
    gq = gradient(odeint_adjoint_gq)
    errors = {"torch_gq_adjoint": float((gq - ref).norm() / ref.norm())}
    calls = {
        "forward only": forward,
        "torch_gq_adjoint": lambda: gradient(odeint_adjoint_gq),
        "torchdiffeq direct": lambda: gradient(torchdiffeq.odeint),
    }
    report("PyTorch", width, interleaved(calls), errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine", choices=["jax", "torch"])
    parser.add_argument("--gq-code", help="folder holding torch_gq_adjoint")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    args = parser.parse_args()
    if args.engine == "torch" and args.gq_code is None:
        parser.error("the torch engine needs --gq-code")
    for width in args.widths:
        if args.engine == "jax":
            run_jax(width)
        else:
            run_torch(width, args.gq_code)


if __name__ == "__main__":
    main()
