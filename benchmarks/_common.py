"""Helpers shared by the benchmark scripts in this folder (not part of the installed package)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Make `python benchmarks/<script>.py` work from a source checkout without installing the package.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def write_json(result: Any, path: Path, *, compact: bool = False) -> Path:
    """Write ``result`` as indented JSON (``NaN`` kept out: it is not JSON). ``compact``: one line, for files of
    many per-hit records (indenting puts every float of a list on its own line: several times the size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, separators=(",", ":"), allow_nan=False) if compact else \
        json.dumps(result, indent=2, allow_nan=False)
    path.write_text(text + "\n")
    return path


def setup_logging(verbose: bool) -> None:
    """Show SemBlend's INFO logs on stderr when ``verbose`` (benchmarks are scripts: they may own handlers)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
