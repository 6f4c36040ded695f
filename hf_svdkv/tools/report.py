"""Tables and figures for the commands' results: one rich table on the terminal, the same as Markdown for the docs,
figures as files. The eval, bench and generate commands describe their rows; this draws them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Width of a table printed to a pipe or a log: rich would otherwise wrap at 80 columns.
PIPE_WIDTH = 140


def console() -> Any:
    from rich.console import Console

    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=PIPE_WIDTH)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], out: Any = None) -> None:
    """A rich table: the first column left-aligned (row names), the others right-aligned (numbers)."""
    from rich.table import Table

    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    (out or console()).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The same table as Markdown lines (numbers right-aligned)."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure (PNG, PDF, SVG ...) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """matplotlib's subplots, on the file-only backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
