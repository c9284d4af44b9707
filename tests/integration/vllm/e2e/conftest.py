"""Real vLLM (the CPU build, ``vllm-cpu``) running SmolLM2-135M-Instruct with SemBlendConnectorV1 end to end.

Runs only in the environment of ``scripts/setup_vllm_cpu_env.sh`` (``make test`` builds it); elsewhere every test
here is skipped with a reason. One engine per test module (start-up ~10 s on two idle cores), in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``) so the tests can reach the
scheduler's and the worker's connector instances. Small ``max_model_len``, a small KV cache, short prompts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
# SemBlend logs through a NullHandler (library logging); show its warnings in this suite's output.
if not logging.getLogger("semblend").handlers[1:]:
    _handler = logging.StreamHandler()
    _handler.setLevel(logging.WARNING)
    logging.getLogger("semblend").addHandler(_handler)
BLOCK_SIZE = 32  # the CPU attention backend needs a multiple of 32
MAX_MODEL_LEN = 512


def _vllm_cpu_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm not installed: run scripts/setup_vllm_cpu_env.sh (make test does)"
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "needs the CPU build of vLLM (vllm-cpu): run scripts/setup_vllm_cpu_env.sh (make test does)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _vllm_cpu_reason()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def kv_bytes_per_token(num_layers: int = 30, num_kv_heads: int = 3, head_size: int = 64, elem: int = 4) -> int:
    return num_layers * 2 * num_kv_heads * head_size * elem


def make_llm(*, prefix_caching: bool, num_blocks: int = 64, extra: dict | None = None, max_num_seqs: int = 4) -> Any:
    """A vLLM engine over the converted SmolLM2 folder with the recording SemBlend connector (prefix mode)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # recording_connector is imported by vLLM's connector factory
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from recording_connector import RecordingConnector
    from semblend import assets

    RecordingConnector.reset()
    folder = assets.smollm2_model_dir()
    config = {"mode": "prefix", "min_donor_tokens": 32, **(extra or {})}
    if config["mode"] == "prefix":
        # The suite checks moved (shifted) loads on real execution, so it opts in to them (off by default).
        config.setdefault("load_moved_prefix", True)
    if config["mode"] == "blend":
        # A source checkout has no installed entry point: the explicit call (docs/vllm.md) activates the model
        # plugin in this process, which is the whole engine here (in-process, uni executor).
        import semblend.integration.vllm

        semblend.integration.vllm.register()
    kvt = KVTransferConfig(kv_connector="RecordingConnector", kv_connector_module_path="recording_connector",
                           kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=config)
    return LLM(model=str(folder), dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
               enable_prefix_caching=prefix_caching, distributed_executor_backend="uni", enforce_eager=True,
               kv_transfer_config=kvt, max_num_seqs=max_num_seqs, seed=0,
               kv_cache_memory_bytes=num_blocks * BLOCK_SIZE * kv_bytes_per_token())


def shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 -- best effort between modules
        pass
    from vllm.distributed.kv_transfer import kv_transfer_state

    try:
        kv_transfer_state.ensure_kv_transfer_shutdown()
    except Exception:  # noqa: BLE001
        pass
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()  # what vLLM's own tests do between engines in one process


# ---------------------------------------------------------------------------------------------- engine access
def scheduler_connector(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()


def worker_connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def generate(llm: Any, prompts: Sequence[Sequence[int]], max_tokens: int = 16, salt: str | None = None,
             ) -> list[list[int]]:
    """Greedy completions (token ids). ``salt`` puts the prompts in their own cache namespace (a cold run)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    inputs = []
    for p in prompts:
        item: dict[str, Any] = {"prompt_token_ids": list(p)}
        if salt is not None:
            item["cache_salt"] = salt
        inputs.append(item)
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def read_layer_kv(slots: Sequence[int], layer: int = 0) -> tuple[Any, Any]:
    """K and V ``[len(slots), num_kv_heads, head_size]`` of one layer at cache slots, read through the layout the
    connector read from the attention backend."""
    import torch

    side = worker_connector().worker_side
    idx = torch.tensor(list(slots), dtype=torch.int64)
    storage = side._storages[layer]
    return (storage[side.layout.element_index(idx, "k")].clone(),
            storage[side.layout.element_index(idx, "v")].clone())


def full_recompute_errors(llm: Any, prompt: Sequence[int], slots: Sequence[int]) -> list[tuple[float, float]]:
    """Blend mode: the shared executor recomputing every position of ``prompt`` through the worker's
    ``VllmModelView`` vs the K/V vLLM's own prefill wrote for it at cache ``slots``: relative error of (K, V) per
    layer (the executor writes into a zeroed scratch, never into the cache)."""
    import torch

    from semblend_core.blended_prefill import run_blended_prefill
    from semblend_core.plan import SemanticKvPlan

    side = worker_connector().worker_side
    view = side.blend_view
    assert view is not None, side.blend_error
    n = len(prompt)
    k = torch.zeros(view.num_layers, n, view.num_kv_heads, view.head_dim)
    v = torch.zeros_like(k)
    ns = scheduler_connector(llm).scheduler_side.base_namespace
    plan = SemanticKvPlan(False, "view_check", n, ns, recompute_ranges=((0, n),))
    with torch.inference_mode():
        run_blended_prefill(view, torch.tensor(list(prompt)), k, v, plan, reuse_len=n, logits=False)
    errs = []
    for layer in range(view.num_layers):
        ck, cv = read_layer_kv(slots, layer)
        errs.append((rel_err(k[layer], ck), rel_err(v[layer], cv)))
    return errs


def fresh_layer0_kv(llm: Any, tokens: Sequence[int], positions: Sequence[int]) -> tuple[Any, Any]:
    """Layer-0 K (RoPE at ``positions``) and V of ``tokens`` computed from vLLM's own model modules: layer 0's
    attention input depends only on the token, so this is what any prefill writes for them."""
    import torch

    ids = torch.tensor(list(tokens), dtype=torch.long)
    pos = torch.tensor(list(positions), dtype=torch.long)

    def compute(model: Any) -> tuple[Any, Any]:
        inner = model.model
        attn = inner.layers[0].self_attn
        with torch.no_grad():
            h = inner.embed_tokens(ids)
            h = inner.layers[0].input_layernorm(h)
            qkv, _ = attn.qkv_proj(h)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(pos, q, k)
        n_kv = attn.num_kv_heads
        return k.reshape(len(ids), n_kv, -1).clone(), v.reshape(len(ids), n_kv, -1).clone()

    return llm.apply_model(compute)[0]


def rel_err(a: Any, b: Any) -> float:
    import torch

    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- prompts
DOCUMENT = (
    "The city council met on Tuesday to review the plan for a light rail line between the northern suburbs and "
    "the harbour district. The transport office estimated that the line would carry about forty thousand "
    "passengers a day within five years of opening, and that traffic on the coastal road would fall by one "
    "eighth. Residents of the old market quarter asked for a station near the covered market, while shop owners "
    "on Bridge Street worried about two years of construction noise. The engineers answered that the tunnel "
    "section under the river would be bored from the south bank, so most of the work would happen away from "
    "homes. The council also heard that the regional government had promised to pay half of the cost if "
    "construction began before the end of next year, and that a European loan could cover a further quarter. "
    "Several members asked whether buses on the same route would be cut; the office said that two lines would be "
    "shortened and one would be moved to serve the new hospital instead. The vote was postponed to the next "
    "meeting so that the finance committee could check the loan terms."
)
PREAMBLE = "You are given a news report. Read it carefully, then answer the question that follows it.\n\n"
QUESTIONS = ("\n\nQuestion: How many passengers a day is the line expected to carry?\nAnswer:",
             "\n\nQuestion: Who asked for a station near the covered market?\nAnswer:")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from semblend import assets

    return AutoTokenizer.from_pretrained(str(assets.smollm2_model_dir()), local_files_only=True)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
