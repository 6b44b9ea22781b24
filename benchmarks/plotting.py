"""The benchmarks' shared output: matplotlib headless (Agg) and optional (a note instead of a
plot), figures saved the same way, and CSV tables written the same way."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional


def pyplot() -> Optional[ModuleType]:
    """``matplotlib.pyplot`` on the Agg backend, or None (said on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Lay out ``fig`` (made through :func:`pyplot`), write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys, in column order) as CSV with a header line."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
