"""Partial attention vs full causal attention, Qwen2.5-7B head shape (28 q heads, 4 KV heads, head_dim 128, bf16).

``run(device="cuda") -> dict`` (called by ``benchmarks/kernels.py``; also ``python -m benchmarks.kernels_partial_attention
--out results.json``). For each sequence length and recompute fraction it times, with ``triton.testing.do_bench``
(median, CUDA events):

* the Triton partial-attention kernel on ``fraction * seq_len`` query positions ("random": uniform; "seam": what
  :func:`semblend_core.recompute.select_recompute` picks for a prompt of shifted 512-token chunks -- the first 8
  tokens after every seam plus top-deviation tokens), over the full KV with the causal mask;
* full causal attention over every position with torch SDPA on the flash backend (what a cold prefill pays);
* the same kernel on every position (its efficiency against flash on identical work);
* a fixed number of queries (``num_qs``, default 80: SemBlend's blended prefill) at every sequence length, where
  the wrapper splits the KV across programs; each case records the split count the heuristic chose, and the tile
  sweep also times every split count from 1 to 32 on those cases.

It also verifies the kernel against an fp32 reference at each size (relative Frobenius error, in query chunks) and
reports the bf16 torch reference's error next to it, with the tolerance rule of the kernel tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
SEAM_CHUNK = 512


def _positions(kind: str, seq_len: int, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = max(1, round(fraction * seq_len))
    if kind == "random":
        pos = rng.choice(seq_len - 1, size=n - 1, replace=False)
        return np.sort(np.append(pos, seq_len - 1)).astype(np.int64)
    from semblend_core.namespace import CacheNamespace
    from semblend_core.plan import Reason, SemanticKvPlan, Span
    from semblend_core.recompute import select_recompute

    # Every 512-token chunk comes from the donor at another offset: one seam per chunk after the first.
    spans = tuple(Span(donor_start=s + 64 * (s // SEAM_CHUNK), target_start=s, length=min(SEAM_CHUNK, seq_len - s))
                  for s in range(0, seq_len, SEAM_CHUNK))
    plan = SemanticKvPlan(is_hit=True, reason=Reason.HIT, target_len=seq_len, namespace=CacheNamespace.default(),
                          spans=spans)
    sel = select_recompute(plan, budget=(n - 1) / seq_len, deviation=rng.random(seq_len), seam_tokens=8)
    return np.asarray(sel.positions, dtype=np.int64)


def _attn_flops(pos: np.ndarray) -> float:
    """QK^T and PV multiply-adds over visible keys only: 4 * head_dim * heads * sum(pos + 1)."""
    return 4.0 * HEAD_DIM * HEADS * float((pos.astype(np.float64) + 1).sum())


def run(device: str = "cuda", *, seq_lens: tuple[int, ...] = (8192, 32768),
        fractions: tuple[float, ...] = (0.05, 0.15), num_qs: tuple[int, ...] = (80,),
        kinds: tuple[str, ...] = ("random", "seam"),
        verify: bool = True, sweep_tiles: bool = True, seed: int = 0) -> dict[str, Any]:
    """Benchmark on ``device`` (CUDA only); return a JSON-able dict of timings (ms), speedups and errors."""
    import torch
    import triton
    from triton.testing import do_bench

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("kernels_partial_attention.run needs a CUDA device")
    torch.manual_seed(seed)
    props = torch.cuda.get_device_properties(dev)
    out: dict[str, Any] = {
        "benchmark": "partial_attention",
        "device": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        "cases": [], "full": [], "tiles": [], "splits": [],
    }

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    for seq_len in seq_lens:
        # A fixed query count enters as the fraction that _positions rounds back to it.
        fracs = tuple(fractions) + tuple(nq / seq_len for nq in num_qs)
        _bench_seq_len(out, seq_len, fracs, kinds, verify, sweep_tiles, seed, dev, bench, len(fractions))
        torch.cuda.empty_cache()
    return out


def _bench_seq_len(out: dict[str, Any], seq_len: int, fractions: tuple[float, ...], kinds: tuple[str, ...],
                   verify: bool, sweep_tiles: bool, seed: int, dev: Any, bench: Any, num_frac: int) -> None:
    """``fractions[num_frac:]`` are fixed query counts: they get the split sweep instead of the tile sweep."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from semblend_core.partial_attention import (
        _launch,
        _pick_blocks,
        _pick_splits,
        _sm_count,
        partial_attention,
        partial_attention_reference,
    )

    scale = 1.0 / math.sqrt(HEAD_DIM)
    q_all = torch.randn(seq_len, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(seq_len, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(seq_len, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)

    # Full causal attention, flash backend (GQA natively when this torch allows it, else expanded K/V).
    qf, kf, vf = (t.transpose(0, 1)[None] for t in (q_all, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa_mode = "enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(qf, kf, vf, is_causal=True, enable_gqa=True)
    except (RuntimeError, TypeError):
        gqa_mode = "expanded_kv"
        kf = kf.repeat_interleave(HEADS // KV_HEADS, 1)
        vf = vf.repeat_interleave(HEADS // KV_HEADS, 1)

    def full_fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if gqa_mode == "enable_gqa":
                return sdpa(qf, kf, vf, is_causal=True, enable_gqa=True)
            return sdpa(qf, kf, vf, is_causal=True)

    full_ms = bench(full_fn)
    all_pos = np.arange(seq_len, dtype=np.int64)
    all_pos_t = torch.from_numpy(all_pos).to(dev)
    kernel_full_ms = bench(lambda: partial_attention(q_all, k, v, all_pos_t, check_positions=False))
    full_flops = _attn_flops(all_pos)
    # The kernel on every position against flash causal attention (bf16 vs bf16: informative, not a test).
    ref_full = full_fn()[0].transpose(0, 1).float()
    ker_full = partial_attention(q_all, k, v, all_pos_t).float()
    out["full"].append({
        "seq_len": seq_len, "sdpa_flash_causal_ms": full_ms, "kernel_all_positions_ms": kernel_full_ms,
        "sdpa_tflops": full_flops / full_ms / 1e9, "kernel_tflops": full_flops / kernel_full_ms / 1e9,
        "kernel_vs_flash_rel_diff": float((ker_full - ref_full).norm() / ref_full.norm()),
        "sdpa_gqa": gqa_mode,
    })
    del ref_full, ker_full

    for kind in kinds:
        for fi, fraction in enumerate(fractions):
            pos = np.array(_positions(kind, seq_len, fraction, seed), dtype=np.int64)  # writable copy for torch
            pos_t = torch.from_numpy(pos).to(dev)
            q = q_all[pos_t].contiguous()
            blocks = _pick_blocks(len(pos) * (HEADS // KV_HEADS), HEAD_DIM, KV_HEADS, dev, torch.bfloat16)
            programs = -(-len(pos) * (HEADS // KV_HEADS) // blocks[0]) * KV_HEADS
            splits = _pick_splits(programs, seq_len, blocks[1], _sm_count(torch.cuda.current_device()))
            ms = bench(functools.partial(partial_attention, q, k, v, pos_t, check_positions=False))
            flops = _attn_flops(pos)
            case = {
                "seq_len": seq_len, "kind": kind, "fraction": fraction, "num_q": len(pos),
                "partial_ms": ms, "full_causal_ms": full_ms, "speedup_vs_full": full_ms / ms,
                "work_fraction": flops / full_flops, "tflops": flops / ms / 1e9, "blocks": list(blocks),
                "splits": splits,
            }
            if verify:
                case.update(_verify(q, k, v, pos_t, partial_attention, partial_attention_reference))
            out["cases"].append(case)

            if sweep_tiles and kind == "random" and fi >= num_frac:
                for n_split in (1, 2, 4, 8, 16, 32):
                    ms_s = bench(functools.partial(_launch, q, k, v, pos_t, scale, splits=n_split))
                    out["splits"].append({"seq_len": seq_len, "num_q": len(pos), "blocks": list(blocks),
                                          "splits": n_split, "ms": ms_s, "heuristic": n_split == splits})
            elif sweep_tiles and kind == "random":
                for tiles in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 64, 8, 3),
                              (128, 64, 8, 3)):
                    row = {"seq_len": seq_len, "fraction": fraction, "blocks": list(tiles)}
                    try:
                        row["ms"] = bench(functools.partial(_launch, q, k, v, pos_t, scale, blocks=tiles))
                    except Exception as exc:  # noqa: BLE001 -- a tile that does not fit: record it, go on
                        row["error"] = str(exc)[:200]
                    out["tiles"].append(row)


def _verify(q, k, v, pos_t, kernel_fn, ref_fn, chunk: int = 512) -> dict[str, Any]:
    """Relative errors of kernel and bf16 torch against an fp32 reference, over all queries in chunks."""
    out = kernel_fn(q, k, v, pos_t)
    kf, vf = k.float(), v.float()
    num = {"kernel": 0.0, "torch_bf16": 0.0}
    den = 0.0
    for a in range(0, q.shape[0], chunk):
        b = min(a + chunk, q.shape[0])
        ref = ref_fn(q[a:b].float(), kf, vf, pos_t[a:b])
        base = ref_fn(q[a:b], k, v, pos_t[a:b]).float()
        num["kernel"] += float((out[a:b].float() - ref).pow(2).sum())
        num["torch_bf16"] += float((base - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    err = {key: math.sqrt(val / den) for key, val in num.items()}
    bound = 2 * err["torch_bf16"] + 2.0 ** -8
    return {"rel_err_kernel": err["kernel"], "rel_err_torch_bf16": err["torch_bf16"],
            "tolerance_bound": bound, "within_tolerance": bool(err["kernel"] <= bound and math.isfinite(err["kernel"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--num-q", type=int, action="append",
                        help="fixed query count to time at every sequence length (repeatable; default 80)")
    args = parser.parse_args()
    t0 = time.time()
    result = run(args.device, sweep_tiles=not args.no_sweep, num_qs=tuple(args.num_q or (80,)))
    result["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for row in result["full"]:
        print(f"L={row['seq_len']:6d} flash causal {row['sdpa_flash_causal_ms']:8.3f} ms "
              f"({row['sdpa_tflops']:.0f} TF/s)  kernel all-pos {row['kernel_all_positions_ms']:8.3f} ms "
              f"({row['kernel_tflops']:.0f} TF/s)  diff {row['kernel_vs_flash_rel_diff']:.2e}")
    for c in result["cases"]:
        print(f"L={c['seq_len']:6d} {c['kind']:6s} {c['fraction']:.2f} nq={c['num_q']:5d} "
              f"partial {c['partial_ms']:7.3f} ms  full {c['full_causal_ms']:7.3f} ms  x{c['speedup_vs_full']:5.1f}  "
              f"{c['tflops']:.0f} TF/s  splits {c['splits']}  err {c.get('rel_err_kernel', float('nan')):.2e} "
              f"(torch {c.get('rel_err_torch_bf16', float('nan')):.2e}) ok={c.get('within_tolerance')}")
    for t in result["tiles"]:
        print(f"tiles L={t['seq_len']} {t['fraction']:.2f} {t['blocks']}: {t.get('ms', t.get('error'))}")
    for t in result["splits"]:
        print(f"splits L={t['seq_len']} nq={t['num_q']} {t['blocks']} x{t['splits']:2d}: {t['ms']:.4f} ms"
              + ("  (heuristic)" if t["heuristic"] else ""))


if __name__ == "__main__":
    main()
