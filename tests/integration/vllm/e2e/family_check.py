"""One model family through blend mode in real vLLM (CPU build), in its own process: ``python family_check.py
<family> <out.json>``. Run by ``test_e2e_blend_families.py``, one process per family, because one vLLM engine per
process keeps vLLM's process-wide state (distributed groups, the KV transfer group) from leaking between engines.

The model is a small config of the family's real architecture with vLLM's dummy weights (``load_format="dummy"``):
no weights of these families are available offline, and the check does not need trained ones. What it checks is
the view's math, which random weights exercise as well as trained ones: the shared executor, recomputing every
position of a prompt through ``VllmModelView`` of vLLM's own modules, must write the K/V that vLLM's own prefill
wrote (all layers, fp32). It then sends one instruction-before-document hit and records what the worker did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "max_position_embeddings": 2048,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "float32", "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rope_theta": 1000000.0,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 4,
              "attention_bias": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "rope_theta": 10000.0,
                "sliding_window": None},
}


def main(family: str, out: Path) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(HERE))  # the suite's helpers, and recording_connector for vLLM's connector factory
    import torch
    from conftest import BLOCK_SIZE, full_recompute_errors, read_layer_kv, rel_err, worker_connector
    from recording_connector import RecordingConnector
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    import semblend.integration.vllm

    folder = Path(tempfile.mkdtemp(prefix=f"semblend-{family}-"))
    (folder / "config.json").write_text(json.dumps({**COMMON, **CONFIGS[family]}))
    semblend.integration.vllm.register()  # a source checkout has no installed entry point (docs/vllm.md)
    kvt = KVTransferConfig(kv_connector="RecordingConnector", kv_connector_module_path="recording_connector",
                           kv_role="kv_both", kv_load_failure_policy="recompute",
                           kv_connector_extra_config={"mode": "blend", "min_donor_tokens": 32,
                                                      "recompute_ratio": 0.0, "check_layers": []})
    per_token = COMMON["num_hidden_layers"] * 2 * COMMON["num_key_value_heads"] * COMMON["head_dim"] * 4
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=512,
              block_size=BLOCK_SIZE, enable_prefix_caching=False, distributed_executor_backend="uni",
              enforce_eager=True, kv_transfer_config=kvt, max_num_seqs=2, seed=0,
              kv_cache_memory_bytes=64 * BLOCK_SIZE * per_token)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    side = worker_connector().worker_side
    view = side.blend_view
    report: dict = {"family": family, "blend_error": side.blend_error, "model_class": None, "layer_class": None}
    if view is not None:
        report["model_class"] = type(view._decoder).__name__
        report["layer_class"] = type(view._layers[0]).__name__
        report["kernels"] = repr(view.kernels)

    gen = torch.Generator().manual_seed(0)
    doc = torch.randint(10, COMMON["vocab_size"], (288,), generator=gen).tolist()
    prompt = doc[:120]
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    (save,) = [s for s in RecordingConnector.saves if s.num_tokens == len(prompt)]
    if view is not None:
        report["kv_rel_err_per_layer"] = full_recompute_errors(llm, prompt, save.slots())
        # How much K differs between neighbouring tokens: a check is only as strong as the KV is varied.
        keys = [read_layer_kv(save.slots(), layer)[0] for layer in range(view.num_layers)]
        report["k_neighbour_spread_per_layer"] = [rel_err(ck[1:], ck[:-1]) for ck in keys]

        # One hit: a new, longer instruction before the donor's document (prefix mode could reuse nothing here),
        # so the document moves by 8 positions and its keys are re-rotated with this family's RoPE.
        donor = doc[:8] + doc[32:]
        target = doc[16:32] + doc[32:]
        llm.generate([{"prompt_token_ids": donor}], params, use_tqdm=False)
        side.recent_blends.clear()
        RecordingConnector.blends.clear()
        hit = llm.generate([{"prompt_token_ids": target}], params, use_tqdm=False)[0]
        report["hit_cached_tokens"] = int(hit.num_cached_tokens or 0)
        report["hit_prompt_tokens"] = len(target)
        report["hit_blends"] = [dataclasses.asdict(stats) for _, stats, _ in side.recent_blends]
        report["hit_plan_deltas"] = sorted({int(s.delta) for b in RecordingConnector.blends for s in b.plan.spans})
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    try:
        main(sys.argv[1], Path(sys.argv[2]))
    finally:
        import shutil

        for folder in Path(tempfile.gettempdir()).glob(f"semblend-{sys.argv[1]}-*"):
            shutil.rmtree(folder, ignore_errors=True)
