"""One way to draw the benchmarks' line charts (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

Series = dict[str, tuple[list[float], list[float], str]]  # label -> (x, y, matplotlib style)


def line_chart(path: Path, series: Series, xlabel: str, ylabel: str, title: str,
               logx: bool = False, logy: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y, style) in series.items():
        ax.plot(x, y, style, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
