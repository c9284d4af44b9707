"""The one place that decides which optional dependencies are installed.

``has_module`` probes are cached so hot paths can call them freely; ``require`` raises an ImportError that tells
the user which extra to install. Nothing here imports a heavy package unless asked to.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

from semblend_core.errors import MissingDependencyError


@functools.cache
def has_module(name: str) -> bool:
    """True if ``name`` can be imported (without importing it). Blocked modules (``sys.modules[name] = None``) count as absent."""
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, extra: str | None = None, *, package: str | None = None) -> ModuleType:
    """Import ``name`` or raise ``MissingDependencyError`` naming the install command.

    ``extra``: the ``semblend`` extra that installs it (``pip install 'semblend[extra]'``; it must list the
    package in ``pyproject.toml``, which tests/test_packaging.py checks for every call). ``package``: a pip
    requirement to name instead when no extra provides the module (``pip install faiss-cpu``).
    """
    if (extra is None) == (package is None):
        raise ValueError("require() needs exactly one of extra= and package=")
    command = f"pip install 'semblend[{extra}]'" if extra is not None else f"pip install {package}"
    if not has_module(name):
        raise MissingDependencyError(f"{name} is required for this feature: {command}")
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # present but broken (e.g. blocked in sys.modules)
        raise MissingDependencyError(f"{name} could not be imported ({exc}); {command}") from exc


def triton_kernel_runs_on(device_type: str) -> bool:
    """True when this package's Triton kernels run for tensors on a device of type ``device_type``: CUDA with
    triton installed, or CPU through Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before triton
    is imported). Each kernel module's ``kernel_available`` answers through this one rule."""
    if not has_module("triton"):
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
