"""Fig. 6: convolutional neural ODE on 8x8 digits (or MNIST with --data-dir).

Image classification (Section 5.5, Appendix E.4, Figure 6): a convolutional neural
ODE on scikit-learn's bundled 8x8 digits (no download), or on MNIST with
`--data-dir` pointing at its IDX files.

The architecture is the paper's: BatchNorm, ReLU, a 3x3 convolution to 10 channels,
2x2 max-pooling, ReLU and another 3x3 convolution downsample the image; the neural ODE
on [0, 1] has convolutions 10 -> W -> W -> 10 with softplus and zero padding; a
one-hidden-layer MLP (50 units) gives the logits. The 8x8 digits are upsampled to
16x16 (each pixel repeated), so that the ODE state is 10x5x5 instead of 10x1x1.
"""

import dataclasses
import functools as ft
import gzip
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from . import _figures
from ._methods import ode_solve
from ._task import add_options, presets, Result, Task, training_summary, UsageError
from ._train import Data, Run, run_grid


# Appendix E.4: lr 1e-5 for MNIST. The digits set is 40 times smaller than MNIST, so
# its default is larger.
LR = {"mnist": 1e-5, "digits": 1e-3}
METHODS = ("adjoint", "seminorm", "gq", "direct")
PRESETS = presets(
    dict(methods=["adjoint", "seminorm", "gq"], widths=[16, 64], seeds=1, epochs=2)
    | dict(batch_size=16, train_size=512, test_size=None),
    smoke=dict(methods=["gq"], widths=[4], epochs=1, train_size=32, test_size=16),
    full=dict(widths=[100, 200, 300, 400, 500], seeds=3, epochs=15, train_size=None),
)
MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (MNIST's format), optionally gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


@ft.lru_cache(maxsize=1)
def load_mnist(data_dir: pathlib.Path):
    arrays = {}
    for name, stem in MNIST_FILES.items():
        candidates = [data_dir / stem, data_dir / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UsageError(
                f"--data-dir {data_dir}: no {stem} (or {stem}.gz); expected the four "
                f"MNIST IDX files {', '.join(MNIST_FILES.values())}"
            )
        try:
            arrays[name] = read_idx(path)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--data-dir: cannot read {path}: {e}") from None
    scale = lambda x: (x[:, None] / np.float32(255)).astype(np.float32)
    return (
        (scale(arrays["train_x"]), arrays["train_y"].astype(np.int32)),
        (scale(arrays["test_x"]), arrays["test_y"].astype(np.int32)),
    )


def load_digits(seed: int):
    """scikit-learn's 1797 8x8 digits, upsampled to 16x16; 360 held out for testing."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16).repeat(2, axis=2).repeat(2, axis=3)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int32)
    return (x[360:], y[360:]), (x[:360], y[:360])


class ConvField(eqx.Module):
    convs: tuple[eqx.nn.Conv2d, ...]

    def __init__(self, width, *, key):
        k1, k2, k3 = jr.split(key, 3)
        conv = ft.partial(eqx.nn.Conv2d, kernel_size=3, padding=1)
        self.convs = (
            conv(10, width, key=k1),
            conv(width, width, key=k2),
            conv(width, 10, key=k3),
        )

    def __call__(self, t, y, args):
        del t, args

        def one(z):
            z = jax.nn.softplus(self.convs[0](z))
            z = jax.nn.softplus(self.convs[1](z))
            return self.convs[2](z)

        return jax.vmap(one)(y)


class ConvODEClassifier(eqx.Module):
    norm: eqx.nn.BatchNorm
    down: tuple[eqx.nn.Conv2d, eqx.nn.Conv2d]
    pool: eqx.nn.MaxPool2d
    field: ConvField
    head: eqx.nn.MLP

    def __init__(self, side, width, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.norm = eqx.nn.BatchNorm(1, axis_name="batch", mode="batch")
        self.down = (eqx.nn.Conv2d(1, 10, 3, key=k1), eqx.nn.Conv2d(10, 10, 3, key=k2))
        self.pool = eqx.nn.MaxPool2d(2, 2)
        self.field = ConvField(width, key=k3)
        ode_side = ((side - 2) // 2) - 2
        self.head = eqx.nn.MLP(
            10 * ode_side**2, 10, 50, 1, activation=jax.nn.relu, key=k4
        )

    def __call__(self, x, state, solve, *, inference):
        def norm(x, state):
            return self.norm(x, state, inference=inference)

        x, state = jax.vmap(
            norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)

        def downsample(x):
            x = self.pool(self.down[0](jax.nn.relu(x)))
            return self.down[1](jax.nn.relu(x))

        z0 = jax.vmap(downsample)(x)
        z1 = ode_solve(solve, self.field, 0.0, 1.0, z0).ys[-1]
        logits = jax.vmap(self.head)(z1.reshape(z1.shape[0], -1))
        return logits, state


def loss(model, state, samples, shared, key, solve):
    del shared, key
    x, y = samples
    logits, state = model(x, state, solve, inference=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def evaluate(model, state, samples, weights, shared, key, solve):
    del shared, key
    x, y = samples
    logits, _ = model(x, state, solve, inference=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(weights.dtype)
    return dict(loss=jnp.sum(weights * ce), metric=100 * jnp.sum(weights * correct))


def make_run(*, width, seed, method, args):
    del method
    if args.data_dir is not None:
        train, test = load_mnist(args.data_dir)
        lr = LR["mnist"]
    else:
        train, test = load_digits(seed)
        lr = LR["digits"]
    train = tuple(a[: args.train_size] for a in train)
    test = tuple(a[: args.test_size] for a in test)
    model, state = eqx.nn.make_with_state(ConvODEClassifier)(
        train[0].shape[-1], width, key=jr.key(seed)
    )
    run = Run(model, loss, evaluate, Data(train), Data(test), args.batch_size, lr)
    return dataclasses.replace(run, state=state, eval_batch=256)


def add_arguments(parser):
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="read MNIST from the IDX files train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        "(optionally .gz) in DIR, instead of the bundled 8x8 digits",
    )
    add_options(
        parser,
        train_size="use the first N training images",
        test_size="use the first N test images",
    )


def run(args) -> Result:
    if args.data_dir is not None:
        if not args.data_dir.is_dir():
            raise UsageError(f"--data-dir {args.data_dir} is not a directory")
        load_mnist(args.data_dir)  # Fail now, not after the first method has trained.
    elif args.size == "full":
        print(
            "note: --full without --data-dir runs the paper's protocol on the 8x8 "
            "digits, not on MNIST"
        )
    rows = run_grid(args, ft.partial(make_run, args=args))
    summary = training_summary(rows, ("method", "width"), "test accuracy (%)")
    figures = _figures.training_figures(
        rows,
        "fig6_scaling.png",
        "fig10_loss_curves.png",
        metric="Test Accuracy (%)",
        xlabel="Hidden Channels",
    )
    dataset = "mnist" if args.data_dir else "digits"
    return Result(rows, summary, figures, extra=dict(dataset=dataset))


TASK = Task(
    "images", __doc__, PRESETS, run, METHODS, training=True, arguments=add_arguments
)
