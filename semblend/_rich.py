"""One rich ``Console`` factory for the CLI, demos and benchmarks' tables."""

from __future__ import annotations

import sys
from typing import Any


def wide_console(**kwargs: Any) -> Any:
    """A ``rich.console.Console``; when stdout is not a terminal (make, CI logs, pipes) it is 160 columns wide,
    because rich would otherwise fold the wide result tables into 80."""
    from rich.console import Console

    if not sys.stdout.isatty():
        kwargs.setdefault("width", 160)
    return Console(**kwargs)
