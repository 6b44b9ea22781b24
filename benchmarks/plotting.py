"""The benchmarks' one way to get matplotlib: headless (Agg), optional (a note instead of a plot)."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional


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
