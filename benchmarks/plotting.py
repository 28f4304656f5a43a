"""matplotlib for the benchmark scripts, when it is installed (``pip install -e '.[bench]'``)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` (with a message)
    when matplotlib is not installed: the scripts then write their tables and JSON only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    return plt
