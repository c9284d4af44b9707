"""Check SemBlend's TensorRT-LLM connector on a machine with TensorRT-LLM and a GPU (not runnable where SemBlend is
developed: TensorRT-LLM cannot be installed there). See docs/trtllm.md, "Verify it yourself".

    python examples/trtllm/verify_trtllm.py MODEL [--mode prefix|discovery_only]

What it does:

1. Greedy generation for a set of prompts with a stock ``LLM`` (no connector): the reference.
2. The same prompts with the SemBlend connector in ``--mode``. The KV cache is kept small (``max_tokens``), so the
   filler prompts push the donor's blocks out of TensorRT-LLM's own reuse pool before the target arrives: a target
   sharing the donor's long prefix is then served from SemBlend's donor store (``prefix`` mode), not from block reuse.
3. Asserts the generated token ids are identical. In ``prefix`` mode SemBlend only loads context-exact KV (the
   prefix the target shares with the donor from token 0), which is what TensorRT-LLM computes itself, so any
   difference is a bug to report.

To see loads, configure Python logging at DEBUG for ``semblend`` in the executor's worker process (the connector
logs ``SemBlend: loaded N tokens for <request>``).
"""

from __future__ import annotations

import argparse
import json
import os


def build_prompts() -> list[str]:
    doc = " ".join(f"Paragraph {i}: the committee reviewed item {i} and recorded its decision in the minutes."
                   for i in range(60))
    filler = [" ".join(f"Unrelated note {j}-{i} about the weather and the harvest." for i in range(80))
              for j in range(6)]
    return [doc + "\n\nSummarize the minutes.", *filler, doc + "\n\nList every decision in one line each."]


def run(model: str, prompts: list[str], connector: bool, mode: str) -> list[list[int]]:
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig
    from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig

    kwargs = {}
    if connector:
        os.environ["TLLM_SEMBLEND_CONFIG"] = json.dumps({"mode": mode, "min_donor_tokens": 64})
        kwargs["kv_connector_config"] = KvCacheConnectorConfig(
            connector_module="semblend.integration.trtllm.connector",
            connector_scheduler_class="SemBlendKvConnectorScheduler",
            connector_worker_class="SemBlendKvConnectorWorker")
    llm = LLM(model=model, backend="pytorch", cuda_graph_config=None,
              kv_cache_config=KvCacheConfig(enable_block_reuse=True, max_tokens=4096), **kwargs)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    out = [llm.generate(p, params).outputs[0].token_ids for p in prompts]  # one at a time: donors finish first
    llm.shutdown()
    return [list(x) for x in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mode", default="prefix", choices=["prefix", "discovery_only"])
    args = ap.parse_args()
    prompts = build_prompts()
    ref = run(args.model, prompts, connector=False, mode=args.mode)
    got = run(args.model, prompts, connector=True, mode=args.mode)
    bad = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    print(json.dumps({"mode": args.mode, "prompts": len(prompts), "identical": not bad, "differing": bad}))
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
