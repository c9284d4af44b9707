"""Stand-ins for the TensorRT-LLM objects the connector receives, built from the pinned signature table.

Why stand-ins: TensorRT-LLM cannot be installed on these machines (PyPI's ``tensorrt_llm`` 1.2.1 is a stub that
points at NVIDIA's own index, the GPU machine has none either), and its connector interface module imports the
compiled bindings (``tensorrt_llm.bindings``), so not even the dataclasses can be imported alone. Every field and
method below is one TensorRT-LLM has at commit ``SIGNATURE_COMMIT`` (``SIGNATURES`` / ``REQUEST_DATA_FIELDS``);
``test_trtllm_signatures.py`` checks that the stand-ins and the adapter match that table, and
``test_trtllm_real_bases.py`` re-runs the checks against the real classes wherever TensorRT-LLM is importable.

Also here: a CPU pool tensor in the layout ``register_kv_caches`` receives, and independent readers/writers of it
that follow TensorRT-LLM's own addressing formula (``KVBlockArray::getKVLocalIdx``), not the adapter's views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

# TensorRT-LLM commit the table was read from: tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py.
SIGNATURE_COMMIT = "035ab91cad04b7b77a479a9526edecfbc742c661"
# Older commits whose (flat) methods have the same names and parameters: the connectors/ path before the
# per-layer-group forms (cache_salt_id instead of cache_salt), and the original pyexecutor/kv_cache_connector.py.
OLDER_COMMITS = ("5a06f334f04fb515ff79f73b7f0f7726ad757361", "00fdcbff5ad82a6438b3e0c9dbc5480b6ee52bdc")

# method -> parameter names after ``self``, as declared by the abstract base classes at SIGNATURE_COMMIT.
SIGNATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "KvCacheConnectorScheduler": {
        "__init__": ("llm_args",),
        "build_connector_meta": ("scheduler_output",),
        "get_num_new_matched_tokens": ("request", "num_computed_tokens"),
        "request_finished": ("request", "cache_block_ids"),
        "update_state_after_alloc": ("request", "block_ids"),
    },
    "KvCacheConnectorWorker": {
        "__init__": ("llm_args",),
        "register_kv_caches": ("kv_cache_tensor",),
        "register_kv_cache_layout": ("layout",),
        "start_load_kv": ("stream",),
        "wait_for_layer_load": ("layer_idx", "stream"),
        "save_kv_layer": ("layer_idx", "stream"),
        "wait_for_save": ("stream",),
        "get_finished": ("finished_gen_req_ids", "started_loading_req_ids"),
    },
}
# RequestData fields in declaration order (SIGNATURE_COMMIT) and SchedulerOutput's.
REQUEST_DATA_FIELDS = ("request_id", "new_tokens", "new_block_ids", "computed_position", "num_scheduled_tokens",
                       "block_hashes", "priorities", "cache_salt", "new_block_ids_by_layer_group")
SCHEDULER_OUTPUT_FIELDS = ("new_requests", "cached_requests", "attention_dp_rank")


@dataclass
class RequestData:
    """Stand-in of ``RequestData`` (SIGNATURE_COMMIT), field for field."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    priorities: list[int] | None = None
    cache_salt: str | None = None
    new_block_ids_by_layer_group: list[list[int]] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """Stand-in of ``SchedulerOutput`` (SIGNATURE_COMMIT)."""

    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)
    attention_dp_rank: int | None = None


class LlmRequest:
    """Stand-in of the bound C++ ``LlmRequest`` the scheduler receives: the attributes the adapter reads
    (``request_id``, ``get_tokens(beam)``, ``prompt_len``, ``context_current_position``, ``cache_salt`` or the
    older ``cache_salt_id``, ``lora_task_id``)."""

    def __init__(self, request_id: int, tokens: list[int], *, cache_salt: str | None = None,
                 cache_salt_id: int | None = None, lora_task_id: int | None = None, salt_bound: bool = True) -> None:
        self.request_id = request_id
        self._tokens = list(tokens)
        self.prompt_len = len(tokens)
        self.context_current_position = 0
        if cache_salt is not None:
            self.cache_salt = cache_salt  # newer bindings (a string)
        elif salt_bound:
            self.cache_salt_id = cache_salt_id  # older bindings: an optional int, None without a salt
        self.lora_task_id = lora_task_id

    def get_tokens(self, beam: int) -> list[int]:
        assert beam == 0
        return list(self._tokens)


def llm_args(*, tokens_per_block: int = 16, enable_block_reuse: bool = True, attn_backend: str = "TRTLLM",
             host_cache_size: int | None = None, tensor_parallel_size: int = 1, hf_config: Any = None,
             **extra: Any) -> SimpleNamespace:
    """Stand-in of ``TorchLlmArgs`` with the fields the adapter reads (names as in ``llm_args.py``)."""
    kv = SimpleNamespace(enable_block_reuse=enable_block_reuse, tokens_per_block=tokens_per_block,
                         host_cache_size=host_cache_size, dtype="auto", use_kv_cache_manager_v2=False)
    ns = SimpleNamespace(model="test/model", revision=None, tokenizer=None, tokenizer_revision=None, dtype="auto",
                         quant_config=None, kv_cache_config=kv, attn_backend=attn_backend,
                         tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=1,
                         enable_attention_dp=False, _semblend_hf_config=hf_config)
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


# ------------------------------------------------------------------------------------------ the pool, independently
def make_pool(num_blocks: int, num_layers: int, heads: int, tokens_per_block: int, head_dim: int,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """``[num_blocks, num_layers, 2, heads * tokens_per_block * head_dim]`` filled with random values (untouched
    slots must keep them)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(num_blocks, num_layers, 2, heads * tokens_per_block * head_dim, generator=g)
    return pool.to(dtype)


def _flat_index(order: str, heads: int, tpb: int, head_dim: int, offsets: torch.Tensor) -> torch.Tensor:
    """Element index inside one ``(block, layer, K|V)`` row of ``[len(offsets), heads, head_dim]``, written out from
    TensorRT-LLM's formulas: HND ``KVBlockArray::getKVLocalIdx`` = ``head * tpb * head_dim + token * head_dim +
    channel``; NHD (``get_buffers(kv_layout="NHD")``) = ``token * heads * head_dim + head * head_dim + channel``."""
    tok = offsets[:, None, None]
    head = torch.arange(heads)[None, :, None]
    chan = torch.arange(head_dim)[None, None, :]
    if order == "HND":
        return head * tpb * head_dim + tok * head_dim + chan
    return tok * heads * head_dim + head * head_dim + chan


def _addresses(block_ids, start: int, n: int, order: str, heads: int, tpb: int, head_dim: int):
    """``(block index [n, 1, 1], element index [n, heads, head_dim])`` of target tokens ``[start, start + n)`` of a
    request whose ``block_ids[0]`` holds token ``start // tpb * tpb``."""
    first = start // tpb
    t = torch.arange(start, start + n)
    blocks = torch.tensor([block_ids[int(x) // tpb - first] for x in t], dtype=torch.int64)
    return blocks[:, None, None], _flat_index(order, heads, tpb, head_dim, t % tpb)


def read_tokens(pool, order, block_ids, start, n, layer, kv, heads, tpb, head_dim) -> torch.Tensor:
    """``[n, heads, head_dim]`` of K (``kv=0``) or V (``kv=1``) for target tokens ``[start, start + n)``."""
    blocks, idx = _addresses(block_ids, start, n, order, heads, tpb, head_dim)
    return pool[:, layer, kv][blocks, idx]


def read_token(pool, order, block, layer, kv, tok, heads, tpb, head_dim) -> torch.Tensor:
    """``[heads, head_dim]`` of one token at offset ``tok`` of block ``block``."""
    return read_tokens(pool, order, [block], tok, 1, layer, kv, heads, tpb, head_dim)[0]


def write_tokens(pool, order, block_ids, start, kv: torch.Tensor, heads, tpb, head_dim) -> None:
    """Emulate TensorRT-LLM's forward writing ``kv`` ``[num_layers, 2, n, heads, head_dim]`` for target tokens
    ``[start, start + n)`` into the request's blocks."""
    n = kv.shape[2]
    blocks, idx = _addresses(block_ids, start, n, order, heads, tpb, head_dim)
    for layer in range(kv.shape[0]):
        for which in range(2):
            pool[:, layer, which][blocks, idx] = kv[layer, which].to(pool.dtype)


def write_request_kv(pool, order, block_ids, kv: torch.Tensor, heads, tpb, head_dim) -> None:
    """A whole prompt's KV (tokens ``[0, n)``) into its blocks."""
    write_tokens(pool, order, block_ids, 0, kv, heads, tpb, head_dim)


# ------------------------------------------------------------------------------------------ the executor's call order
class Executor:
    """TensorRT-LLM's call order for a connector, one request at a time, around the two real adapter classes.

    Per request (``run``): ``KVCacheManager.addSequence`` asks ``get_num_new_matched_tokens(request, own_hit)`` and
    allocates the blocks (``update_state_after_alloc``); the step's ``build_connector_meta`` sees the request in
    ``new_requests`` with ``computed_position`` excluding the connector's tokens (``build_scheduler_output``); the
    worker gets ``bind_connector_meta`` then ``start_load_kv`` before the forward; the forward is emulated: it
    writes ``kv_fn(prompt)`` for the tokens it computes; ``wait_for_save`` after it; then ``request_finished``.
    Both classes are built from one stand-in ``llm_args`` (as the executor does), so they share rank 0's state.
    """

    def __init__(self, monkeypatch, hf_config, kv_fn, *, num_blocks, tokens_per_block, mode="prefix", pool=None,
                 dtype=torch.float32, **args):
        import json

        from semblend.integration.trtllm import connector

        cfg = {"mode": mode, "min_donor_tokens": 32, "donor_kv_gpu_bytes": 1 << 28}
        monkeypatch.setenv("TLLM_SEMBLEND_CONFIG", json.dumps(cfg))
        self.args = llm_args(tokens_per_block=tokens_per_block, hf_config=hf_config, **args)
        self.sched = connector.SemBlendKvConnectorScheduler(self.args)
        self.worker = connector.SemBlendKvConnectorWorker(self.args)
        g = connector.pool_geometry(self.args, hf_config)
        self.geom = g
        self.T = tokens_per_block
        self.order = g.block_order
        self.pool = make_pool(num_blocks, g.num_layers, g.num_kv_heads, g.tokens_per_block, g.head_dim,
                              dtype=dtype) if pool is None else pool
        self.num_blocks = num_blocks
        self.kv_fn = kv_fn
        self.worker.register_kv_caches(self.pool)
        self.next_block = 0
        self.loads = []

    def blocks(self, n_tokens):
        nb = -(-n_tokens // self.T)
        ids = [(self.next_block + i) % self.num_blocks for i in range(nb)]
        self.next_block += nb
        return ids

    def admit(self, req, own_hit=0):
        n, is_async = self.sched.get_num_new_matched_tokens(req, own_hit)
        assert is_async is False
        ids = self.blocks(req.prompt_len)
        self.sched.update_state_after_alloc(req, ids)
        return n, ids

    def step(self, req, ids, own_hit, n_matched):
        prepopulated = own_hit + n_matched
        rd = RequestData(req.request_id, req.get_tokens(0), list(ids), prepopulated - n_matched,
                         req.prompt_len - prepopulated, cache_salt=getattr(req, "cache_salt", None))
        meta = self.sched.build_connector_meta(SchedulerOutput(new_requests=[rd]))
        self.loads.extend(meta.loads)
        self.worker.bind_connector_meta(meta)
        self.worker.start_load_kv(None)
        kv = self.kv_fn(req.get_tokens(0))  # the forward computes [prepopulated, prompt_len)
        g = self.geom
        write_tokens(self.pool, self.order, ids[prepopulated // self.T:], prepopulated, kv[:, :, prepopulated:],
                     g.num_kv_heads, self.T, g.head_dim)
        self.worker.wait_for_save(None)
        req.context_current_position = req.prompt_len
        return meta

    def run(self, req, own_hit=0):
        n, ids = self.admit(req, own_hit)
        meta = self.step(req, ids, own_hit, n)
        assert self.sched.request_finished(req, ids) is False
        return n, ids, meta

    def read(self, ids, start, n, layer, which):
        g = self.geom
        return read_tokens(self.pool, self.order, ids[start // self.T:], start, n, layer, which, g.num_kv_heads,
                           self.T, g.head_dim)

    def stats(self):
        return self.sched.pipeline.stats()
