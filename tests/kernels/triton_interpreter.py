"""Run kernel test cases under Triton's interpreter, in a subprocess.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first imported, and the test process has
usually imported triton already (CUDA tests, the wrappers). So the cases run in a fresh interpreter: it imports the
calling test module and maps its ``run_case(case) -> result`` over the JSON-encoded cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SUBPROCESS = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
t = importlib.import_module(sys.argv[3])
cases = json.load(sys.stdin)
print(json.dumps([t.run_case(c) for c in cases]))
"""


def case_key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


def run_cases(module: str, cases: list[dict], timeout: float = 300) -> dict[str, Any]:
    """``{case_key(case): module.run_case(case)}`` computed with ``TRITON_INTERPRET=1`` (skips without triton)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, str(ROOT), str(Path(__file__).parent), module],
        input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed:\n{proc.stderr[-4000:]}")
    return dict(zip((case_key(c) for c in cases), json.loads(proc.stdout.strip().splitlines()[-1])))
