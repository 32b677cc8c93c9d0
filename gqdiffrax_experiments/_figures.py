"""The figures of the training tasks, as in the paper: training time and final metric
against width (Figures 4–7), and test loss against epoch and wall-clock time (Figures
8–10). matplotlib is imported when a figure is drawn, not before."""

import functools as ft
import pathlib
from collections.abc import Sequence

import numpy as np

from ._methods import METHODS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, series_keys):
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in series_keys), []).append(row)
    return groups


def _label(rows, series_keys, key):
    method = key[series_keys.index("method")] if "method" in series_keys else None
    parts = [METHODS[method].label] if method else []
    parts += [f"{k}={v}" for k, v in zip(series_keys, key) if k != "method"]
    color = METHODS[method].color if method and len(series_keys) == 1 else None
    return ", ".join(parts), color


def plot_scaling(
    rows: list[dict],
    path: pathlib.Path,
    *,
    x: str = "width",
    xlabel: str = "Hidden Width",
    metric_label: str,
    series_keys: Sequence[str] = ("method",),
    log_x: bool = False,
) -> str | None:
    """Training time and final test metric against `x` (mean ± std over seeds), as in
    the paper's Figures 4–7. With a single value of `x` there is nothing to scale
    over: returns why, and draws nothing."""
    values = sorted({row[x] for row in rows})
    if len(values) < 2:
        return (
            f"a scaling plot needs two or more values of {x}, this run has one "
            f"({values[0]})"
        )
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series_keys = list(series_keys)
    for key, members in _series(rows, series_keys).items():
        label, color = _label(rows, series_keys, key)
        xs = sorted({m[x] for m in members})
        for ax, column in zip(axes, ("train_s", "final_metric")):
            vals = [[m[column] for m in members if m[x] == v] for v in xs]
            ax.errorbar(
                xs,
                [np.mean(v) for v in vals],
                yerr=[np.std(v) for v in vals],
                marker="o",
                capsize=3,
                label=label,
                color=color,
            )
    axes[0].set(xlabel=xlabel, ylabel="Training Time (/s)", title="(a) Training times")
    axes[1].set(xlabel=xlabel, ylabel=metric_label, title=f"(b) {metric_label}")
    for ax in axes:
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_curves(
    rows: list[dict],
    path: pathlib.Path,
    *,
    loss_label: str = "Test Loss",
    series_keys: Sequence[str] = ("method",),
) -> None:
    """Test loss against epoch and against training wall-clock time for the largest
    width, seed 0 (the paper's Figures 8–10). Every epoch is a marker, so that a run
    of one epoch still shows its point."""
    plt = pyplot()
    width = max(row["width"] for row in rows)
    chosen = [
        r
        for r in rows
        if r["width"] == width and r["seed"] == min(q["seed"] for q in rows)
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series_keys = list(series_keys)
    for key, members in _series(chosen, series_keys).items():
        label, color = _label(chosen, series_keys, key)
        curve = members[0]["curve"]
        for ax, xkey in zip(axes, ("epoch", "wall_s")):
            ax.plot(
                [p[xkey] for p in curve],
                [p["test_loss"] for p in curve],
                marker="o",
                markersize=3,
                label=label,
                color=color,
            )
    axes[0].set(xlabel="Epoch", ylabel=loss_label, title="(a) Test loss vs epoch")
    axes[1].set(
        xlabel="Wall-clock time (s)",
        ylabel=loss_label,
        title="(b) Test loss vs wall-clock time",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(title=f"width {width}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_figures(
    rows: list[dict],
    scaling: str,
    curves: str,
    *,
    metric: str,
    loss: str = "Test Loss",
    series_keys: Sequence[str] = ("method",),
    xlabel: str = "Hidden Width",
) -> dict:
    """The two figures of a training task by file name: the scaling plot (`metric`
    and training time against width) and the loss curves (`loss`)."""
    return {
        scaling: ft.partial(
            plot_scaling,
            rows,
            metric_label=metric,
            series_keys=series_keys,
            xlabel=xlabel,
        ),
        curves: ft.partial(plot_curves, rows, loss_label=loss, series_keys=series_keys),
    }
