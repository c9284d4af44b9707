"""Real SGLang CPU pools and the scheduler's own per-request calls, for the backend tests.

Built from SGLang's classes (``ReqToTokenPool``, ``MHATokenToKVPool``, ``TokenToKVPoolAllocator``, ``Req``) and driven
with SGLang's functions in the order its scheduler calls them:

* ``req.init_next_round_input(tree)`` -> ``match_kv_cache`` -> ``tree.match_prefix`` (every scheduling round);
* admission: ``req.lock = tree.lock(req.last_node)`` (``PrefillAdder``), ``req_to_token_pool.alloc``,
  ``tree.prefix_device_indices(req)`` and the extend allocation written into the row (``alloc_for_extend``);
* finish: ``release_kv_cache(req, tree, checkpoint=True)``; abort while waiting: ``tree.finish(handle, ABORT)``;
* flush: ``tree.reset()`` then the pools' ``clear()`` (``Scheduler.flush_cache``).

The forward pass itself is not run here (test_sglang_e2e.py runs the real engine): ``prefill`` writes deterministic
per-token K/V for the computed positions, so a test can see which slots hold whose KV.
"""

from __future__ import annotations

import itertools
from array import array

import numpy as np
import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import CacheRequestOutcome
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

LAYERS, HEADS, HEAD_DIM = 2, 2, 16
_ids = itertools.count()


def publish_server_args() -> None:
    """SGLang's functions read process-wide config (``runtime_context``), which its scheduler publishes at start-up.
    Publish one for a CPU server (the SmolLM2 folder: ServerArgs reads the model's config, offline)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    from semblend.assets import load_smollm2, smollm2_cache_dir

    folder = smollm2_cache_dir()
    if not (folder / "semblend-converted.json").is_file():
        load_smollm2()
    publish(ServerArgs(model_path=str(folder), device="cpu"), role="scheduler")


class Pools:
    """One model's pools on CPU: ``size`` token slots, ``rows`` request rows."""

    def __init__(self, size: int = 1024, rows: int = 16, max_context: int = 1024, dtype=torch.float32) -> None:
        self.size = size
        self.req_to_token_pool = ReqToTokenPool(size=rows, max_context_len=max_context, device="cpu",
                                                enable_memory_saver=False)
        self.kv = MHATokenToKVPool(size=size, page_size=1, dtype=dtype, head_num=HEADS, head_dim=HEAD_DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                                   enable_alt_stream=False)
        self.allocator = TokenToKVPoolAllocator(size=size, dtype=dtype, device="cpu", kvcache=self.kv,
                                                need_sort=False)
        self.initial_free = self.free_set()

    def params(self) -> CacheInitParams:
        return CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                               token_to_kv_pool_allocator=self.allocator, page_size=1)

    def free_list(self) -> torch.Tensor:
        return torch.cat([self.allocator.free_pages, self.allocator.release_pages])

    def free_set(self) -> set[int]:
        return set(self.free_list().tolist())

    def assert_no_duplicates(self) -> None:
        free = self.free_list()
        assert free.numel() == torch.unique(free).numel(), "a slot is free twice (double free)"

    def assert_conserved(self, tree) -> None:
        """SGLang's pool invariant: available + evictable + protected == total."""
        total = self.allocator.available_size() + tree.evictable_size() + tree.protected_size()
        assert total == self.size, (self.allocator.available_size(), tree.evictable_size(), tree.protected_size())


def token_kv(token: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stand-in K/V of ``token`` at ``position`` ([LAYERS, HEADS, HEAD_DIM] each): what ``prefill``
    writes for computed positions (the real forward runs in the e2e tests)."""
    g = torch.Generator().manual_seed(token * 7919 + position)
    k = torch.randn(LAYERS, HEADS, HEAD_DIM, generator=g)
    v = torch.randn(LAYERS, HEADS, HEAD_DIM, generator=g)
    return k, v


def new_req(tokens, max_new_tokens: int = 4, **kw) -> Req:
    rid = f"r{next(_ids)}"
    return Req(rid, "", array("q", list(tokens)), SamplingParams(max_new_tokens=max_new_tokens), **kw)


def admit(pools: Pools, tree, req: Req) -> torch.Tensor:
    """What PrefillAdder + alloc_for_extend do for one new request: lock its match, give it a row holding the
    prefix indices from the tree and fresh slots for the rest. Returns the row's slots ``[len(prompt)]``."""
    req.lock = tree.lock(req.last_node)
    fill = len(req.origin_input_ids)
    pools.req_to_token_pool.alloc([req])
    prefix = tree.prefix_device_indices(req)
    assert prefix.numel() == req.prefix_len
    extend = pools.allocator.alloc(fill - req.prefix_len)
    assert extend is not None, "test pool too small"
    row = torch.cat([prefix.to(torch.int64), extend.to(torch.int64)])
    pools.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, fill)), row.to(torch.int32))
    req.kv.kv_allocated_len = fill
    req.kv.kv_committed_len = fill
    return row


def prefill(pools: Pools, req: Req, row: torch.Tensor) -> None:
    """Write the computed positions' K/V (``[prefix_len, len)``): the forward's job."""
    for pos in range(req.prefix_len, row.numel()):
        k, v = token_kv(int(req.origin_input_ids[pos]), pos)
        for layer in range(LAYERS):
            pools.kv.k_buffer[layer][row[pos]] = k[layer]
            pools.kv.v_buffer[layer][row[pos]] = v[layer]


def finish(tree, req: Req) -> None:
    """The request finished after its prefill (no decode tokens kept): SGLang's release path."""
    req.finished_reason = FINISH_LENGTH(length=0)
    req.finished_len = 0
    release_kv_cache(req, tree, checkpoint=True)


def abort_waiting(tree, req: Req) -> None:
    """``Scheduler._release_aborted_request`` for a request popped from the waiting queue."""
    tree.finish(req.cache_request_handle, CacheRequestOutcome.ABORT)


def run_request(pools: Pools, tree, tokens) -> Req:
    """Match, admit, prefill, finish: one complete request."""
    req = new_req(tokens)
    req.init_next_round_input(tree)
    row = admit(pools, tree, req)
    prefill(pools, req, row)
    finish(tree, req)
    return req


def tree_slots(tree) -> set[int]:
    """Every slot a tree node holds."""
    out: set[int] = set()
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node is not tree.root_node and node.value is not None:
            out.update(node.value.tolist())
        stack.extend(node.children.values())
    return out


def tree_keys(tree) -> list[list[int]]:
    """Every root-to-leaf token path in the tree."""
    paths: list[list[int]] = []
    stack = [(tree.root_node, [])]
    while stack:
        node, prefix = stack.pop()
        here = prefix + (list(node.key.token_ids) if node is not tree.root_node else [])
        if not node.children:
            paths.append(here)
        for child in node.children.values():
            stack.append((child, here))
    return paths


def random_tokens(n: int, seed: int, vocab: int = 30000) -> list[int]:
    return np.random.default_rng(seed).integers(100, vocab, n).tolist()
