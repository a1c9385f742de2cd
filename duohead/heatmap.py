"""The familiar needle-in-a-haystack plot: depth x context length, colour = score (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_heatmap(path: Path, title: str, lengths: list[int], depths: list[float], grids: dict[str, list[list[float | None]]]) -> None:
    """One PNG with a panel per task. grids[task][i][j] = mean score at depths[i], lengths[j] (None = not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
