"""RoPE re-rotation error on CPU, over the acceptance test's own cases: the numbers the README quotes.

For each RoPE style of ``tests/core/test_rope_correction.py`` (Llama, Llama 3.1 scaling, YaRN, linear, Qwen2,
GPT-NeoX and Phi partial rotary, GPT-J interleaved) and key dtype (fp32, bf16, fp16): keys rotated at position
``p`` by the model's own transformers rotary code are re-rotated by ``delta`` with
:func:`semblend_core.rope_correction.rerotate_keys` and compared with a float64 rotation at ``p + delta``
(relative Frobenius error). Cases, exactly as in the tests (their helpers are imported, not copied, so the two
cannot drift): ``per_token`` -- 256 tokens, positions in [0, 28000], per-token deltas in [-4096, 4096] (seeded as in
``test_rerotated_model_keys_match_keys_at_shifted_position``); ``one_delta`` -- 64 tokens at positions
27936-27999, one delta in {4096, -4096, 1, -1, 0} (``test_one_int_delta_for_all_tokens``). Besides those seeds,
``--seeds`` more random draws of the per-token case give the spread. The ``model_fp32`` row is the model's own
fp32 rotation at ``p + delta`` against the same float64 truth: the floor any re-rotation can reach.

    python benchmarks/rope_error.py            # writes benchmarks/results/rope_error.json (~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS_DIR, write_json

from semblend.lookup_bench import machine_info

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")


def _test_module() -> Any:
    spec = importlib.util.spec_from_file_location("_rope_cases", ROOT / "tests" / "core" / "test_rope_correction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _per_token_case(t: Any, name: str, dtype_name: str, seed: int | None) -> tuple[float, float]:
    """(re-rotation error, model fp32 floor) for 256 tokens; ``seed=None`` reproduces the test's draw."""
    import torch

    from semblend_core.rope_correction import rerotate_keys, rope_spec_from_config

    cfg, model_rotate = t.style(name)
    spec = rope_spec_from_config(cfg)
    base = 10 * t.STYLES.index(name) + len(dtype_name)
    gen = torch.Generator().manual_seed(base if seed is None else 1000 * (seed + 1) + base)
    n = 256
    k_raw = t._raw_keys(n, dtype_name, seed=1 if seed is None else 100 + seed)
    p = torch.randint(0, t.MAX_POS + 1, (n,), generator=gen)
    p[:4] = torch.tensor([0, 1, t.MAX_POS - 1, t.MAX_POS])
    delta = torch.randint(-t.MAX_DELTA, t.MAX_DELTA + 1, (n,), generator=gen)
    delta[:4] = torch.tensor([t.MAX_DELTA, -1, -t.MAX_DELTA, 0])
    delta = torch.where(p + delta < 0, -delta, delta)
    ref = t.truth(k_raw, (p + delta).numpy(), spec)
    err = t.rel_err(rerotate_keys(model_rotate(k_raw, p), delta, spec), ref)
    floor = t.rel_err(model_rotate(k_raw.float(), p + delta), t.truth(k_raw.float(), (p + delta).numpy(), spec))
    return err, floor


def _one_delta_case(t: Any, name: str, dtype_name: str) -> float:
    import torch

    from semblend_core.rope_correction import rerotate_keys, rope_spec_from_config

    cfg, model_rotate = t.style(name)
    spec = rope_spec_from_config(cfg)
    k_raw = t._raw_keys(64, dtype_name, seed=2)
    p = torch.arange(t.MAX_POS - 64, t.MAX_POS)
    worst = 0.0
    for delta in (t.MAX_DELTA, -t.MAX_DELTA, 1, -1, 0):
        out = rerotate_keys(model_rotate(k_raw, p), delta, spec)
        worst = max(worst, t.rel_err(out, t.truth(k_raw, (p + delta).numpy(), spec)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "rope_error.json")
    ap.add_argument("--seeds", type=int, default=20, help="extra random draws of the per-token case")
    args = ap.parse_args()
    import torch

    t = _test_module()
    t0 = time.perf_counter()
    rows = []
    for name in t.STYLES:
        for dtype_name in DTYPES:
            test_err, floor = _per_token_case(t, name, dtype_name, None)
            extra = [_per_token_case(t, name, dtype_name, s)[0] for s in range(args.seeds)]
            row = {"style": name, "dtype": dtype_name, "per_token_test_case": test_err,
                   "per_token_max_over_seeds": max([test_err] + extra),
                   "per_token_median_over_seeds": float(np.median([test_err] + extra)),
                   "model_fp32_floor": floor, "test_tolerance": t.TOL[dtype_name]}
            if dtype_name in ("float32", "bfloat16"):
                row["one_delta_test_case_max"] = _one_delta_case(t, name, dtype_name)
            rows.append(row)
            print(f"{name:9s} {dtype_name:9s} test {test_err:.3e}  max/{args.seeds + 1} "
                  f"{row['per_token_max_over_seeds']:.3e}  one-delta {row.get('one_delta_test_case_max', float('nan')):.3e}  model-fp32 floor {floor:.3e}")
    summary = {}
    for dtype_name in DTYPES:
        sel = [r for r in rows if r["dtype"] == dtype_name]
        summary[dtype_name] = {
            "max_test_cases": max(max(r["per_token_test_case"], r.get("one_delta_test_case_max", 0.0)) for r in sel),
            "max_over_seeds": max(r["per_token_max_over_seeds"] for r in sel),
            "worst_style": max(sel, key=lambda r: r["per_token_max_over_seeds"])["style"],
            "test_tolerance": t.TOL[dtype_name],
        }
    result = {
        "benchmark": "rope_error",
        "what": "relative Frobenius error of rerotate_keys(model keys at p, delta) vs float64 keys at p + delta",
        "cases": {"per_token": "256 tokens, p in [0, 28000], per-token delta in [-4096, 4096], heads 2, head_dim 32",
                  "one_delta": "64 tokens at 27936-27999, delta in {4096, -4096, 1, -1, 0} (max reported)",
                  "seeds": args.seeds, "source": "tests/core/test_rope_correction.py (helpers imported)"},
        "device": "cpu", "torch": torch.__version__, "machine": machine_info(),
        "summary": summary, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"wrote {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
