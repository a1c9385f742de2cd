"""The pictures duohead draws (matplotlib, optional): the gate heat map, the needle-in-a-haystack grid and the
score grids of `duohead eval --suite ruler`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from duohead.files import atomic_write


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'duohead[plot]' (or pip install matplotlib)") from None
    return plt


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write the figure as a PNG atomically (a reader never sees half a file) and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _pyplot().close(fig)


def plot_gates(gates: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Save the gate heat map (layers down, KV heads across; 1 = retrieval) as a PNG. gates [L, Hkv]."""
    plt = _pyplot()
    data = gates.detach().float().cpu().numpy()
    layers, heads = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.5 * heads), 1.2 + 0.18 * layers))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 32)))
    ax.set_title(title or "gates (1 = retrieval, 0 = streaming)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.08)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def plot_needle_grid(
    path: str | os.PathLike, title: str, lengths: list[int], depths: list[float], grids: dict[str, list[list[float | None]]]
) -> Path:
    """Depth x context length, colour = score, one panel per task.
    grids[task][i][j] = mean score at depths[i], lengths[j] (None = not run)."""
    plt = _pyplot()
    import numpy as np

    panel_width = max(3.0, 1.0 + 0.9 * len(lengths))
    fig, axes = plt.subplots(
        1, len(grids), figsize=(1.0 + panel_width * len(grids), 1.8 + 0.4 * len(depths)), squeeze=False, layout="constrained"
    )
    image = None
    for k, (ax, (task, grid)) in enumerate(zip(axes[0], grids.items())):
        values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("depth")
        ax.set_title(task)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.suptitle(title)
    fig.colorbar(image, ax=axes[0].tolist(), label="score")
    return _save(fig, path, dpi=110)


def plot_score_grids(
    path: str | os.PathLike, title: str, columns: list[str], rows: list[str], grids: dict[str, list[list[float | None]]]
) -> Path:
    """Rows (e.g. methods) x columns (e.g. task families), colour = score, one panel per grid.
    grids[panel][i][j] = mean score of rows[i] at columns[j] (None = not run)."""
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(1.5 + (1.0 + 0.7 * len(columns)) * len(grids), 1.8 + 0.35 * len(rows)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for k, (ax, (panel, grid)) in enumerate(zip(axes[0], grids.items())):
        values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows if k == 0 else [""] * len(rows))
        ax.set_title(panel)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.suptitle(title)
    fig.colorbar(image, ax=axes[0].tolist(), label="score")
    return _save(fig, path, dpi=110)
