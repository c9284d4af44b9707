"""TTFT: cold prefill vs SemBlend hit vs SemBlend miss, 1K-32K prompt tokens, Qwen2.5-7B-shaped RANDOM weights.

Random weights are fine for speed (every FLOP and byte is the real model's) and say nothing about quality; every
result row and the plot are labelled ``random weights``. Quality is ``benchmarks/quality.py``'s job.

Per prompt length ``L`` (one donor, one target):

* donor  = [instruction A: 48 tokens] + document + [question: 16 tokens]
* target = [instruction B: 64 tokens] + document + [question: 16 tokens]   (the document moves by +16: RoPE
  re-rotation, one seam, an uncovered instruction; the pipeline plans it from the token ids)
* miss   = fresh random tokens of length L (the planner finds no donor; overhead = planning)

Measured (median of ``--repeats`` after a warm-up; CUDA synchronised at every stage boundary):
``cold`` (model forward, ``logits_to_keep=1``), ``hit`` per operating point (recompute budget x deviation check),
with donor KV resident on the GPU and in pinned host memory, and ``miss``. Breakdown: plan, load (gather +
re-rotate + assemble), recompute (layer loop), suffix (model forward over the tail).

Run (H100, ~4 min)::

    python benchmarks/ttft.py --device cuda --out benchmarks/results

writes ``ttft_h100.json`` and ``ttft_h100.png`` (name from ``--tag``). ``--smoke`` runs a tiny model on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np

logger = logging.getLogger("benchmarks.ttft")

QWEN25_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=65536, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False,
)
SMOKE = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False,
)
# (name, recompute_budget, check_layer): the operating points timed for every hit.
OPERATING_POINTS = (("b0_nocheck", 0.0, None), ("b5_check", 0.05, 1), ("b15_check", 0.15, 1))


def build_model(shape: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    params = dict(shape)
    theta = params.pop("rope_theta")
    config = Qwen2Config(**params, rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


class Tok:
    """Token-id prompts only; ``decode`` for completeness."""

    eos_token_id = None
    pad_token_id = 0
    name_or_path = "random-ids"

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def prompts(length: int, vocab: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    ins_a, ins_b, question = (rng.integers(3, vocab, n).tolist() for n in (48, 64, 16))
    doc = rng.integers(3, vocab, length - 64 - 16).tolist()
    donor = ins_a + doc + question
    target = ins_b + doc + question
    miss = rng.integers(3, vocab, length).tolist()
    return donor, target, miss


def median_timings(runs: list[Any]) -> dict[str, float]:
    keys = runs[0].timings.keys()
    return {k: statistics.median(r.timings[k] for r in runs) for k in keys}


def gpu_kernel_seconds(fn: Any) -> float | None:
    """Sum of CUDA kernel times of one ``fn()`` call (torch.profiler): how long the GPU was actually busy.

    Compared with the wall-clock TTFT it shows whether a path is GPU-bound or host (kernel-launch) bound.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        return sum(float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
                   for e in events) / 1e6
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the timings stand without it
        logger.warning("profiler unavailable: %s", exc)
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from semblend.integration.transformers import EngineOptions, SemBlendEngine
    from semblend_core import SemBlendConfig
    from semblend_core.pipeline import SemBlendPipeline  # noqa: F401  (import cost stays out of the timings)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = SMOKE if args.smoke else QWEN25_7B
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    build_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    lengths = [int(x) for x in args.lengths.split(",")]
    base_cfg = dict(max_prompt_tokens=1 << 17)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(lengths), desc="ttft", disable=args.no_progress)
    for length in lengths:
        donor, target, miss = prompts(length, shape["vocab_size"], seed=length)
        row: dict[str, Any] = {"prompt_tokens": length}
        engines = {}
        for name, budget, check in OPERATING_POINTS:
            for tier in ("device", "host"):
                if tier == "host" and device != "cuda":
                    continue
                eng = SemBlendEngine(model, Tok(), SemBlendConfig(recompute_budget=budget, **base_cfg),
                                     EngineOptions(check_layer=check, kv_tier=tier, kv_capacity_bytes=16 << 30))
                engines[(name, tier)] = eng
        # The donor: one cold prefill; its KV and tokens then enter every engine's stores (as a prefill would).
        any_eng = next(iter(engines.values()))
        first = any_eng.prefill(donor)
        k, v = any_eng.donor_kv(first)
        for eng in engines.values():
            if eng is not any_eng:
                eng.kv_store.put(eng.namespace.key, first.request_id, torch.stack((k, v), dim=1), donor)
                eng.pipeline.register_donor(first.request_id, donor, namespace=eng.namespace)
        del first, k, v
        any_eng.cold_prefill(target)  # warm-up at this length
        cold = [any_eng.cold_prefill(target) for _ in range(args.repeats)]
        row["cold_s"] = statistics.median(r.timings["total"] for r in cold)
        if device == "cuda":
            row["cold_gpu_kernel_s"] = gpu_kernel_seconds(lambda: any_eng.cold_prefill(target))
        for (name, tier), eng in engines.items():
            eng.prefill(target, register=False)  # warm-up (kernel compile, allocator)
            hits = [eng.prefill(target, register=False) for _ in range(args.repeats)]
            outcomes = {h.outcome for h in hits}
            key = f"hit_{name}_{tier}"
            med = median_timings(hits)
            row[key] = {
                "ttft_s": med["total"], "breakdown_s": {k: med[k] for k in ("plan", "load", "recompute", "suffix")},
                "outcomes": sorted(outcomes), "recomputed_fraction": hits[0].recomputed_fraction,
                "reuse_ratio": hits[0].reuse_ratio, "speedup": row["cold_s"] / med["total"],
            }
            if device == "cuda" and tier == "device":
                row[key]["gpu_kernel_s"] = gpu_kernel_seconds(lambda: eng.prefill(target, register=False))
        miss_eng = engines[(OPERATING_POINTS[-1][0], "device")]
        miss_eng.prefill(miss, register=False)
        misses = [miss_eng.prefill(miss, register=False) for _ in range(args.repeats)]
        med = median_timings(misses)
        row["miss"] = {"ttft_s": med["total"], "plan_s": med["plan"], "outcomes": sorted({m.outcome for m in misses}),
                       "overhead_vs_cold": med["total"] / row["cold_s"] - 1.0,
                       "plan_overhead_vs_cold": med["plan"] / row["cold_s"]}
        rows.append(row)
        del engines, cold, hits, misses
        if device == "cuda":
            torch.cuda.empty_cache()
        bar.update(1)
        logger.info("L=%d cold %.3fs %s", length, row["cold_s"],
                    {k: round(v["speedup"], 2) for k, v in row.items() if k.startswith("hit_")})
    bar.close()
    return {
        "benchmark": "ttft", "label": "RANDOM WEIGHTS (speed only): Qwen2.5-7B shape" if not args.smoke
        else "RANDOM WEIGHTS smoke model", "model_shape": shape, "dtype": str(dtype), "device": gpu,
        "torch": torch.__version__, "attention": "sdpa (cold, checked layers) + semblend partial_attention",
        "operating_points": [{"name": n, "recompute_budget": b, "check_layer": c} for n, b, c in OPERATING_POINTS],
        "repeats": args.repeats, "model_build_s": build_s, "rows": rows,
        "targets": {"hit_speedup_8k": 10.0, "hit_speedup_32k": 25.0, "miss_overhead_8k": 0.01},
    }


def table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"TTFT, {result['label']}, {result['device']}")
    t.add_column("tokens", justify="right")
    t.add_column("cold", justify="right")
    names = [k for k in result["rows"][0] if k.startswith("hit_")]
    for n in names:
        t.add_column(n.removeprefix("hit_"), justify="right")
    t.add_column("miss overhead", justify="right")
    busy = "cold_gpu_kernel_s" in result["rows"][0]
    if busy:
        t.add_column("GPU busy cold / b0 hit", justify="right")
    for r in result["rows"]:
        cells = [str(r["prompt_tokens"]), f"{r['cold_s'] * 1e3:.1f} ms"]
        cells += [f"{r[n]['ttft_s'] * 1e3:.1f} ms ({r[n]['speedup']:.1f}x)" for n in names]
        cells.append(f"{r['miss']['overhead_vs_cold']:+.2%}")
        if busy:
            c, h = r.get("cold_gpu_kernel_s"), r.get("hit_b0_nocheck_device", {}).get("gpu_kernel_s")
            cells.append(f"{c * 1e3:.1f} / {h * 1e3:.1f} ms" if c is not None and h is not None else "n/a")
        t.add_row(*cells)
    Console(width=200).print(t)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["prompt_tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(x, [r["cold_s"] * 1e3 for r in rows], "k-o", label="cold prefill")
    ax1.plot(x, [r["miss"]["ttft_s"] * 1e3 for r in rows], "k--x", label="SemBlend miss")
    for n in [k for k in rows[0] if k.startswith("hit_")]:
        ax1.plot(x, [r[n]["ttft_s"] * 1e3 for r in rows], "-o", label=n.removeprefix("hit_"))
    ax1.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (ms)")
    ax1.legend(fontsize=7)
    ax1.set_title("TTFT")
    last = rows[-1]
    names = [k for k in last if k.startswith("hit_")]
    parts = ("plan", "load", "recompute", "suffix")
    bottom = np.zeros(len(names))
    for p in parts:
        vals = np.array([last[n]["breakdown_s"][p] * 1e3 for n in names])
        ax2.bar([n.removeprefix("hit_") for n in names], vals, bottom=bottom, label=p)
        bottom += vals
    ax2.set(ylabel="ms", title=f"hit breakdown at {last['prompt_tokens']} tokens")
    ax2.tick_params(axis="x", rotation=30, labelsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['label']} - {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--smoke", action="store_true", help="tiny random model (CPU check of the script)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke and args.lengths == ap.get_default("lengths"):
        args.lengths = "256,512"
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ttft_{args.tag}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"ttft_{args.tag}.png")
    table(result)


if __name__ == "__main__":
    main()
