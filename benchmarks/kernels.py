"""KV materialization kernels on a GPU: fused re-rotate+scatter bandwidth and host->device donor load time.

Shape: Qwen2.5-7B KV (28 layers, 4 KV heads, head_dim 128, bf16, NeoX RoPE theta 1e6), 8K and 32K tokens.

* **Copy ceiling**: ``dst.copy_(src)`` of a 2 GiB buffer; bandwidth counts bytes read + written.
* **Fused re-rotate+scatter** (:func:`semblend_core.triton_kernels.rerotate_scatter`, one launch for all layers):
  contiguous donor store -> vLLM paged cache (block 16, blocks shuffled), per-token deltas from 8 spans. Its
  fewest bytes are the plan's K and V read once and written once (indices and the cos/sin table, <1%, are not
  counted). Target: >= 70% of the copy ceiling. Variants: one shared delta, HND destination, paged donor, GPT-J
  pairing, a tile sweep, and the torch reference twin on the same GPU.
* **Host->device donor load**: a pinned ``[28, 2, T, 4, 128]`` host tensor copied ``non_blocking`` on a side
  stream, timed with CUDA events on that stream, against the 55 GB/s pinned-copy floor.
* If ``benchmarks/kernels_partial_attention.py`` exists, its ``run(device) -> dict`` is called and stored under
  ``"partial_attention"``.

Timing: ``triton.testing.do_bench`` median (it flushes L2 before every repetition); inputs also alternate between
two sets, and every working set is 19x (8K) to 75x (32K) the 50 MB L2. Output: a rich table (printed last) and
``benchmarks/results/kernels_<gpu>.json`` with the GPU name and torch/triton versions.

    python benchmarks/kernels.py [--tokens 8192 32768] [--out-dir benchmarks/results] [--no-partial-attention]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 28, 4, 128, 16
ROPE_THETA = 1_000_000.0  # Qwen2.5
PINNED_FLOOR_GBPS = 55.0
TARGET_FRACTION = 0.70


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")).lower()


def qwen_rope(interleaved: bool = False):
    from semblend_core.rope_correction import RopeSpec

    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    return RopeSpec(head_dim=HEAD_DIM, rotary_dim=HEAD_DIM, inv_freq=inv_freq, interleaved=interleaved)


def plan_indices(n_tokens: int, n_cache_slots: int, gen) -> tuple[Any, Any, Any]:
    """Donor slots 0..T-1; destination = T slots in shuffled 16-token blocks; deltas from 8 spans of varying shift."""
    import torch

    n_blocks = n_cache_slots // BLOCK
    blocks = torch.randperm(n_blocks, generator=gen)[: math.ceil(n_tokens / BLOCK)]
    dst = (blocks[:, None] * BLOCK + torch.arange(BLOCK)[None, :]).reshape(-1)[:n_tokens]
    src = torch.arange(n_tokens)
    span = math.ceil(n_tokens / 8)
    delta = torch.repeat_interleave(torch.randint(-4000, 4000, (8,), generator=gen), span)[:n_tokens]
    return src, dst, delta


def bench_copy(n: int, bench: Callable[[Callable[[], Any]], float]) -> float:
    """Median ms of one device-to-device copy of ``n`` bf16 elements."""
    import torch

    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    return bench(lambda: b.copy_(a))


def bench_fused(result: dict[str, Any], n_tok: int, copy_gbps: float, gen: Any,
                bench: Callable[[Callable[[], Any]], float], bench_graph: Callable[[Callable[[], Any]], float],
                sweep: bool) -> None:
    """Time every re-rotate+scatter variant for ``n_tok`` tokens; append to ``result["fused"]`` and ``["sweep"]``."""
    import torch

    from semblend_core.kv_layout import VLLM_FLASH_HND, VLLM_FLASH_NHD, KvCacheView
    from semblend_core.triton_kernels import (
        default_block_tokens,
        default_num_warps,
        rerotate_scatter,
        rerotate_scatter_reference,
    )

    dev, elem, rope = torch.device("cuda"), 2, qwen_rope()
    n_slots = math.ceil(n_tok * 1.25 / BLOCK) * BLOCK
    plan_bytes = 2 * LAYERS * 2 * n_tok * KV_HEADS * HEAD_DIM * elem  # K+V, read + written
    stores = [torch.randn(LAYERS, 2, n_tok, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    donors = [KvCacheView.from_donor_store(s) for s in stores]

    def paged(hnd: bool = False) -> KvCacheView:
        nb = n_slots // BLOCK
        shape = (2, nb, KV_HEADS, BLOCK, HEAD_DIM) if hnd else (2, nb, BLOCK, KV_HEADS, HEAD_DIM)
        return KvCacheView(VLLM_FLASH_HND if hnd else VLLM_FLASH_NHD,
                           [torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)])

    caches = [paged() for _ in range(2)]
    plans = []
    for _ in range(2):
        s, d, dl = plan_indices(n_tok, n_slots, gen)
        plans.append((s.to(dev), d.to(dev), dl.to(dev)))

    # Correctness on this exact shape: kernel vs torch reference (bf16 outputs within one rounding).
    check_dst = paged()
    ref_dst = KvCacheView(VLLM_FLASH_NHD, [t.clone() for t in check_dst.layers])
    rerotate_scatter(donors[0], check_dst, *plans[0], rope)
    rerotate_scatter_reference(donors[0], ref_dst, *plans[0], rope)
    max_diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(check_dst.layers, ref_dst.layers))
    result["checks"].append({"tokens": n_tok, "kernel_vs_reference_max_abs": max_diff})
    del check_dst, ref_dst

    def fused(dst_sets, src_sets=donors, scalar=False, r=rope, **kw):
        it = [0]

        def fn():
            i = it[0] = it[0] ^ 1  # alternate between two input sets
            s, d, dl = plans[i]
            rerotate_scatter(src_sets[i], dst_sets[i], s, d, 1234 if scalar else dl, r, validate_indices=False, **kw)
        return fn

    def record(name: str, fn: Callable[[], Any], graph: bool = True, **extra: Any) -> None:
        """GPU time from CUDA-graph replays (``ms``; host overhead excluded) and the eager call (``eager_ms``)."""
        eager = bench(fn)
        ms = bench_graph(fn) if graph else eager
        gbps = plan_bytes / ms / 1e6
        result["fused"].append({"tokens": n_tok, "variant": name, "ms": ms, "eager_ms": eager, "gbps": gbps,
                                "fraction_of_copy": gbps / copy_gbps, "timed_as": "graph" if graph else "eager",
                                **extra})

    bt0 = default_block_tokens(KV_HEADS, HEAD_DIM)
    record("donor->vllm_nhd, per-token delta (default tiles)", fused(caches),
           block_tokens=bt0, num_warps=default_num_warps(KV_HEADS, HEAD_DIM, bt0), plan_bytes=plan_bytes)
    record("donor->vllm_nhd, one delta", fused(caches, scalar=True))
    record("donor->vllm_nhd, GPT-J pairing", fused(caches, r=qwen_rope(interleaved=True)))
    record("donor->vllm_nhd, with index validation (1 host sync)",
           lambda: rerotate_scatter(donors[0], caches[0], *plans[0], rope), graph=False)
    hnd = [paged(hnd=True) for _ in range(2)]
    record("donor->vllm_hnd, per-token delta", fused(hnd))
    del hnd
    # Paged donor: another request's vLLM cache (its first T slots) into this one.
    record("vllm_nhd->vllm_nhd (paged donor), per-token delta", fused(caches[::-1], src_sets=caches))
    # Shift in place inside one cache (overlap -> staged through a temporary: two launches).
    shift_src = torch.arange(n_tok, device=dev)
    shift_dst = shift_src + BLOCK
    record("in-place shift of T slots by +16 (overlap: staged, 2 launches)", lambda: rerotate_scatter(
        caches[0], caches[0], shift_src, shift_dst, BLOCK, rope, validate_indices=False), graph=False)
    if sweep:
        for bt in (1, 2, 4, 8):
            for nw in (1, 2, 4):
                ms = bench_graph(fused(caches, block_tokens=bt, num_warps=nw))
                gbps = plan_bytes / ms / 1e6
                result["sweep"].append({"tokens": n_tok, "block_tokens": bt, "num_warps": nw, "ms": ms,
                                        "gbps": gbps, "fraction_of_copy": gbps / copy_gbps})
    # The torch twin on the same GPU (a per-layer loop of gathers, a rotation and scatters).
    record("torch reference twin (same plan)",
           lambda: rerotate_scatter_reference(donors[0], caches[0], *plans[0], rope, validate_indices=False),
           graph=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    import triton
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm
    from triton.testing import do_bench, do_bench_cudagraph

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--no-partial-attention", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gen = torch.Generator().manual_seed(0)
    elem = 2  # bf16
    result: dict[str, Any] = {
        "benchmark": "kv_materialization_kernels",
        "gpu": props.name, "sms": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 1e6,
        "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                  "block_size": BLOCK, "rope_theta": ROPE_THETA},
        "timing": ("ms: triton.testing.do_bench_cudagraph median (graph replays: GPU time, host overhead excluded); "
                   "eager_ms: do_bench median of eager calls (L2 flushed each rep; includes host overhead when "
                   "the host is slower than the GPU); 2 alternating input sets"),
        "target_fraction_of_copy": TARGET_FRACTION,
        "pinned_floor_gbps": PINNED_FLOOR_GBPS,
        "copy": {}, "fused": [], "sweep": [], "h2d": [], "checks": [],
    }

    def bench(fn: Callable[[], Any]) -> float:
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def bench_graph(fn: Callable[[], Any]) -> float:
        return float(do_bench_cudagraph(fn, rep=200, return_mode="median"))

    steps = ["copy"] + [f"fused T={t}" for t in args.tokens] + [f"h2d T={t}" for t in args.tokens]
    has_pa = (ROOT / "benchmarks" / "kernels_partial_attention.py").exists() and not args.no_partial_attention
    if has_pa:
        steps.append("partial_attention")
    bar = tqdm(steps, desc="kernels", file=sys.stderr)

    # ---- copy ceiling
    bar.set_postfix_str("copy")
    n_copy = (1 << 30)  # 1 Gi bf16 elements = 2 GiB
    t_copy = bench_copy(n_copy, bench)
    copy_gbps = 2 * n_copy * elem / t_copy / 1e6
    result["copy"] = {"bytes_read_plus_written": 2 * n_copy * elem, "ms": t_copy, "gbps": copy_gbps}
    torch.cuda.empty_cache()
    bar.update()

    # ---- fused re-rotate + scatter
    for n_tok in args.tokens:
        bar.set_postfix_str(f"fused T={n_tok}")
        bench_fused(result, n_tok, copy_gbps, gen, bench, bench_graph, sweep=not args.no_sweep)
        torch.cuda.empty_cache()
        bar.update()

    # ---- host -> device donor load
    side = torch.cuda.Stream()
    for n_tok in args.tokens:
        bar.set_postfix_str(f"h2d T={n_tok}")
        host = torch.empty((LAYERS, 2, n_tok, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16).pin_memory()
        host.view(torch.int16).random_()  # not zeros; bit patterns do not matter for a copy
        devbuf = torch.empty(host.shape, dtype=host.dtype, device=dev)
        nbytes = host.numel() * elem
        times = []
        for rep in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(side):
                start.record(side)
                devbuf.copy_(host, non_blocking=True)
                end.record(side)
            end.synchronize()
            if rep >= 2:  # warm-up
                times.append(start.elapsed_time(end))
        ms = float(np.median(times))
        floor_ms = nbytes / (PINNED_FLOOR_GBPS * 1e9) * 1e3
        result["h2d"].append({"tokens": n_tok, "bytes": nbytes, "ms": ms, "gbps": nbytes / ms / 1e6,
                              "floor_ms_at_55gbps": floor_ms, "fraction_of_floor_rate": floor_ms / ms})
        del host, devbuf
        torch.cuda.empty_cache()
        bar.update()

    for n_tok in args.tokens:
        sw = [r for r in result["sweep"] if r["tokens"] == n_tok]
        if sw:
            result.setdefault("best_tiles", []).append(min(sw, key=lambda r: r["ms"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out_dir / f"kernels_{gpu_slug(props.name)}.json"
    out_path.write_text(json.dumps(result, indent=2))  # written now too, in case the next part fails or hangs

    # ---- partial attention (another module's benchmark)
    if has_pa:
        bar.set_postfix_str("partial_attention")
        t0 = time.time()
        try:
            spec = importlib.util.spec_from_file_location(
                "kernels_partial_attention", ROOT / "benchmarks" / "kernels_partial_attention.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            result["partial_attention"] = mod.run("cuda")
        except Exception as exc:  # noqa: BLE001 -- keep the kernel numbers even if the other benchmark breaks
            result["partial_attention"] = {"error": f"{type(exc).__name__}: {exc}"}
        result["partial_attention_wall_s"] = time.time() - t0
        out_path.write_text(json.dumps(result, indent=2))
        bar.update()
    bar.close()

    console = Console(width=140)
    table = Table(title=f"KV materialization on {props.name} (copy ceiling {copy_gbps:.0f} GB/s)")
    for col in ("tokens", "variant", "GPU ms", "eager ms", "GB/s", "of copy"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["fused"]:
        table.add_row(str(r["tokens"]), r["variant"], f"{r['ms']:.3f}" if r["timed_as"] == "graph" else "-",
                      f"{r['eager_ms']:.3f}", f"{r['gbps']:.0f}", f"{100 * r['fraction_of_copy']:.0f}%")
    for r in result.get("best_tiles", []):
        table.add_row(str(r["tokens"]), f"best tiles: BLOCK_T={r['block_tokens']} warps={r['num_warps']}",
                      f"{r['ms']:.3f}", "", f"{r['gbps']:.0f}", f"{100 * r['fraction_of_copy']:.0f}%")
    for r in result["h2d"]:
        table.add_row(str(r["tokens"]), f"H2D pinned donor load ({r['bytes'] / 1e9:.2f} GB), floor "
                      f"{r['floor_ms_at_55gbps']:.1f} ms", "", f"{r['ms']:.2f}", f"{r['gbps']:.1f}",
                      f"{100 * r['fraction_of_floor_rate']:.0f}% of 55")
    for c in result["checks"]:
        table.add_row(str(c["tokens"]), "check: kernel vs reference max |diff| (bf16)",
                      f"{c['kernel_vs_reference_max_abs']:.2e}", "", "", "")
    console.print(f"wrote {out_path}")
    console.print(table)
    return result


if __name__ == "__main__":
    main()
