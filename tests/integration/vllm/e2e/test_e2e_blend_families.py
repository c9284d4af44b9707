"""Blend mode on every model family SemBlend's vLLM view supports, in real vLLM (CPU build): Qwen2, Qwen3 and
Mistral (Llama is SmolLM2, in ``test_e2e_blend.py``). Each family runs in its own process (``family_check.py``):
a small config of the real architecture with vLLM's dummy weights, since no trained weights of these families are
offline here; the checks are about the view's math, which random weights exercise as well (the test also checks that
the KV they give is varied enough for the comparison to mean something).

Per family: the view is built (vLLM's own decoder and layer classes, recorded by the model plugin), the executor's
full recompute of a prompt writes the K/V vLLM's own prefill wrote at every layer (fp32), and an
instruction-before-document hit is blended: credited through the document's last whole block, with only the new
instruction, the seam head and the suffix recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_blends_with_the_engines_own_kv(family, tmp_path):
    out = tmp_path / f"{family}.json"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([str(HERE.parents[3]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "family_check.py"), family, str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["blend_error"] == "", report
    prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
    assert report["layer_class"] == f"{prefix}DecoderLayer", report  # vLLM's own class for this family
    errs = report["kv_rel_err_per_layer"]
    assert len(errs) == 4 and max(max(e) for e in errs) < 1e-5, errs
    assert min(report["k_neighbour_spread_per_layer"]) > 0.1, report  # varied KV: the comparison can fail
    # The hit: the document (256 of 272 tokens, floored to 32-token blocks) is credited and blended in one run.
    assert report["hit_cached_tokens"] == 256 and report["hit_prompt_tokens"] == 272, report
    assert 8 in report["hit_plan_deltas"], report  # the document moved: keys re-rotated by this family's RoPE
    (stats,) = report["hit_blends"]
    # Only the 16 new instruction tokens (moved from another donor: the sink positions, recomputed) and the seam
    # head of the document are fresh, at every layer (ratio 0: nothing budgeted); 236 positions reused.
    assert stats["active_per_layer"] == [stats["mandatory"]] * 4 and 16 <= stats["mandatory"] <= 24, stats
