"""Build vLLM's real scheduler on CPU with SemBlendConnectorV1, the way vLLM's own connector unit tests do.

* ``make_vllm_config``: a local model directory (a tiny Qwen2 ``config.json``; no weights, no tokenizer, no hub),
  ``DeviceConfig("cpu")``, and a ``KVTransferConfig`` that loads the connector through
  ``kv_connector_module_path`` (vLLM's factory imports our module by path, as ``vllm serve`` would).
* ``make_scheduler``: ``Scheduler`` over a one-group ``FullAttentionSpec`` KV cache config.
* ``Engine``: one scheduler plus one worker-side connector over CPU paged-cache tensors laid out as vLLM lays them
  out, and a stand-in model (``FakeModel``) whose K/V for a token depends only on the token and its position
  (``K = R(pos) e_k(token)``, ``V = e_v(token)``). With it, KV moved from a donor and re-rotated must equal what a
  cold prefill writes, so the whole load path is checked against an independent computation. The model is a stand-in
  because no model weights can run here; everything else is vLLM's own code.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from semblend_core.rope_correction import apply_rope, rope_spec_from_config

CONNECTOR_MODULE = "semblend.integration.vllm.connector_v1"
NUM_KV_HEADS = 2
HEAD_SIZE = 32
NUM_LAYERS = 2
EOS = 999

TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": NUM_KV_HEADS, "num_hidden_layers": NUM_LAYERS,
    "head_dim": HEAD_SIZE, "vocab_size": 1000, "max_position_embeddings": 8192, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "torch_dtype": "float32", "tie_word_embeddings": True, "hidden_act": "silu",
}


def write_model_dir(path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_QWEN2))
    return str(path)


def make_vllm_config(model_dir: str, *, mode: str | None = "discovery_only", extra: dict | None = None,
                     block_size: int = 16, max_num_batched_tokens: int = 512, max_num_seqs: int = 16,
                     enable_prefix_caching: bool = True, connector: bool = True,
                     kv_load_failure_policy: str = "recompute") -> Any:
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model_config = ModelConfig(model=model_dir, dtype="float32", seed=0, skip_tokenizer_init=True,
                               max_model_len=8192)
    scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                       max_model_len=8192, enable_chunked_prefill=True,
                                       is_encoder_decoder=model_config.is_encoder_decoder)
    cache_config = CacheConfig(block_size=block_size, gpu_memory_utilization=0.9, cache_dtype="auto",
                               enable_prefix_caching=enable_prefix_caching)
    kv_transfer_config = None
    if connector:
        extra_config = dict(extra or {})
        if mode is not None:
            extra_config["mode"] = mode
        kv_transfer_config = KVTransferConfig(
            kv_connector="SemBlendConnectorV1", kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both",
            kv_connector_extra_config=extra_config, kv_load_failure_policy=kv_load_failure_policy)
    return VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                      kv_transfer_config=kv_transfer_config, device_config=DeviceConfig("cpu"))


def kv_cache_config(block_size: int, num_blocks: int) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE,
                             dtype=torch.float32)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def make_scheduler(vllm_config: Any, num_blocks: int = 256) -> Any:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    block_size = vllm_config.cache_config.block_size
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config(block_size, num_blocks),
                     structured_output_manager=StructuredOutputManager(vllm_config), block_size=block_size,
                     log_stats=True)


_none_hash_ready = False
_ids = itertools.count()


def make_request(tokens: Sequence[int], *, max_tokens: int = 4, req_id: str | None = None,
                 block_size: int = 16, cache_salt: str | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    global _none_hash_ready
    if not _none_hash_ready:
        init_none_hash(sha256)
        _none_hash_ready = True
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, EOS)
    return Request(request_id=req_id or f"req-{next(_ids)}", prompt_token_ids=list(tokens), sampling_params=params,
                   pooling_params=None, cache_salt=cache_salt,
                   block_hasher=get_request_block_hasher(block_size, sha256))


# ------------------------------------------------------------------------------------------- paged cache tensors
def paged_kv_caches(block_size: int, num_blocks: int, layout: str = "LBHNC") -> dict[str, torch.Tensor]:
    """Per-layer cache tensors exactly as vLLM's worker views its allocation.

    vLLM 0.33: ``create_kv_cache_views`` over one int8 allocation, physical order from ``KVCacheLayout[layout]``.
    Older releases: the attention backend's ``get_kv_cache_shape`` (logical ``[num_blocks, num_kv_heads,
    block_size, 2 * head_size]``) permuted by its ``get_kv_cache_stride_order`` for NHD (LBNHC) or HND (LBHNC).
    """
    cfg = kv_cache_config(block_size, num_blocks)
    group = cfg.kv_cache_groups[0]
    spec = group.kv_cache_spec
    try:
        from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views
        from vllm.v1.kv_cache_layout import KVCacheLayout
    except ImportError:
        return _paged_kv_caches_legacy(group, block_size, num_blocks, layout)
    page = spec.page_size_bytes
    size = page * num_blocks * NUM_LAYERS
    raw = torch.zeros(size, dtype=torch.int8)
    tensor = KVCacheTensor(size=size, layers=list(group.layer_names), layer_stride=page * num_blocks,
                           block_stride=page)
    views = create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout[layout], tensor)
    return dict(zip(group.layer_names, views))


def _paged_kv_caches_legacy(group: Any, block_size: int, num_blocks: int, layout: str) -> dict[str, torch.Tensor]:
    from vllm.v1.attention.backends import utils as backend_utils
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    shape = FlashAttentionBackend.get_kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, HEAD_SIZE)
    previous = getattr(backend_utils, "_KV_CACHE_LAYOUT_OVERRIDE", None)
    backend_utils._KV_CACHE_LAYOUT_OVERRIDE = {"LBNHC": "NHD", "LBHNC": "HND"}[layout]
    try:
        order = FlashAttentionBackend.get_kv_cache_stride_order()
    finally:
        backend_utils._KV_CACHE_LAYOUT_OVERRIDE = previous
    inverse = [order.index(i) for i in range(len(order))]
    out = {}
    for name in group.layer_names:
        physical = torch.zeros([shape[i] for i in order], dtype=torch.float32)
        out[name] = physical.permute(*inverse)
    return out


# ------------------------------------------------------------------------------------------- stand-in backends
class StandInBackend:
    """How an attention backend writes and reads K/V inside a layer cache ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]`` (logical shape; physical order from the layout). A stand-in because vLLM's real cache-write
    ops are compiled per platform (the CUDA build here has no CPU ops); the e2e suite runs the real CPU backend.

    * ``content``: K = ``[..., :head_size]``, V = ``[..., head_size:]`` (vLLM's GPU backends);
    * ``cpu_vec``: vLLM's CPU backend (its ``vec`` ISA): the block's rows are read as ``[2 * block_size,
      head_size]``; the first half holds K *transposed* (``[head_size, block_size]``), the second V token-first.
    """

    KINDS = ("content", "cpu_vec")

    def __init__(self, kind: str) -> None:
        assert kind in self.KINDS, kind
        self.kind = kind

    def _kv(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` as ``[num_blocks, num_kv_heads, block_size, head_size]`` views addressing the true elements."""
        nb, nh, bs, two_d = cache.shape
        d = two_d // 2
        if self.kind == "content":
            return cache[..., :d], cache[..., d:]
        rows = cache.view(nb, nh, 2 * bs, d)
        k_region, v = rows[:, :, :bs], rows[:, :, bs:]
        # k_region's memory for one (block, head) is bs * d contiguous elements holding K^T [d, bs].
        k = torch.as_strided(k_region, (nb, nh, bs, d),
                             (k_region.stride(0), k_region.stride(1), 1, bs), k_region.storage_offset())
        return k, v

    def write(self, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        k, v = self._kv(cache)
        bs = cache.shape[2]
        blk, off = slots // bs, slots % bs
        k[blk, :, off] = key.to(k.dtype)
        v[blk, :, off] = value.to(v.dtype)

    def read(self, cache: torch.Tensor, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._kv(cache)
        bs = cache.shape[2]
        s = torch.as_tensor(list(slots), dtype=torch.long)
        return k[s // bs, :, s % bs].clone(), v[s // bs, :, s % bs].clone()

    def attach(self, vllm_config: Any, layer_names: Sequence[str]) -> None:
        """Register stand-in attention layers where vLLM keeps its real ones (the connector reads the layout via
        ``static_forward_context[name].impl.do_kv_cache_update``)."""
        from types import SimpleNamespace

        backend = self

        class Impl:
            def do_kv_cache_update(self, layer: Any, key: Any, value: Any, kv_cache: Any, slot_mapping: Any) -> None:
                backend.write(key, value, kv_cache, slot_mapping)

        impl = Impl()
        ctx = vllm_config.compilation_config.static_forward_context
        for name in layer_names:
            ctx[name] = SimpleNamespace(impl=impl)


BACKENDS = [("LBHNC", "cpu_vec"), ("LBNHC", "content"), ("LBHNC", "content")]


# ------------------------------------------------------------------------------------------- stand-in model
def rope_spec() -> Any:
    return rope_spec_from_config(TINY_QWEN2)


class FakeModel:
    """Writes K = R(pos) e_k(token) and V = e_v(token) for every scheduled token (see module docstring), through
    the stand-in backend's own write op, as a forward pass would."""

    def __init__(self, caches: list[torch.Tensor], backend: StandInBackend, block_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        vocab = TINY_QWEN2["vocab_size"]
        self.emb_k = torch.randn(NUM_LAYERS, vocab, NUM_KV_HEADS, HEAD_SIZE, generator=g)
        self.emb_v = torch.randn(NUM_LAYERS, vocab, NUM_KV_HEADS, HEAD_SIZE, generator=g)
        self.caches = caches
        self.backend = backend
        self.block_size = block_size
        self.rope = rope_spec()

    def expected(self, layer: int, tokens: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        ids = torch.tensor(list(tokens), dtype=torch.long)
        pos = torch.tensor(list(positions), dtype=torch.long)
        return apply_rope(self.emb_k[layer, ids], pos, self.rope), self.emb_v[layer, ids]

    def _slots(self, positions: Sequence[int], block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([block_ids[p // self.block_size] * self.block_size + p % self.block_size
                             for p in positions], dtype=torch.long)

    def write(self, tokens: Sequence[int], positions: Sequence[int], block_ids: Sequence[int]) -> None:
        if not tokens:
            return
        slots = self._slots(positions, block_ids)
        for layer, cache in enumerate(self.caches):
            ek, ev = self.expected(layer, tokens, positions)
            self.backend.write(ek, ev, cache, slots)

    def read(self, layer: int, positions: Sequence[int], block_ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return self.backend.read(self.caches[layer], self._slots(positions, block_ids).tolist())


@dataclass
class StepResult:
    output: Any
    engine_outputs: Any
    loads: tuple = ()
    saves: tuple = ()
    load_errors: set = field(default_factory=set)


class Engine:
    """Real scheduler + real worker-side connector + stand-in model, stepped like vLLM's engine core."""

    def __init__(self, vllm_config: Any, num_blocks: int = 256, layout: str = "LBHNC", backend: str = "cpu_vec",
                 worker: bool = True, stand_in_blend: bool = True) -> None:
        self.vllm_config = vllm_config
        self.stand_in_blend = stand_in_blend
        self.blends_seen: list[Any] = []
        self.block_size = vllm_config.cache_config.block_size
        self.scheduler = make_scheduler(vllm_config, num_blocks)
        self.requests: dict[str, Any] = {}
        self.block_ids: dict[str, list[int]] = {}
        self.worker = None
        self.model = None
        if worker and vllm_config.kv_transfer_config is not None:
            from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
            from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

            from semblend.integration.vllm import register

            # A vLLM worker process has run its general plugins (SemBlend's entry point) before it builds the
            # connector; this harness is not a vLLM process, so it does what that entry point does. That vLLM's own
            # loader finds and runs the entry point is test_vllm_plugin.py's job.
            register()
            self.worker = KVConnectorFactory.create_connector(
                vllm_config, KVConnectorRole.WORKER, kv_cache_config(self.block_size, num_blocks))
            caches = paged_kv_caches(self.block_size, num_blocks, layout)
            names = sorted(caches, key=lambda n: int(n.split(".")[2]))
            self.backend = StandInBackend(backend)
            self.backend.attach(vllm_config, names)
            self.worker.register_kv_caches(caches)
            if stand_in_blend:
                # The stand-in model is no vLLM model, so the worker found no model view and queued
                # blend_unavailable; this harness runs the blends itself (_stand_in_blends) and takes that back.
                side = self.worker.worker_side
                side.blend_error = ""
                side._report = dataclasses.replace(side._report, blend_unavailable=())
            self.model = FakeModel([caches[n] for n in names], self.backend, self.block_size)

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    def add(self, request: Any) -> Any:
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)
        return request

    def _track_blocks(self, out: Any) -> list[tuple[str, int, int]]:
        """Update per-request block ids from the scheduler output; return (req_id, start, count) computed now."""
        work = []
        for new in out.scheduled_new_reqs:
            self.block_ids[new.req_id] = list(new.block_ids[0])
            work.append((new.req_id, new.num_computed_tokens, out.num_scheduled_tokens[new.req_id]))
        cached = out.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if ids is not None:
                if req_id in resumed:
                    self.block_ids[req_id] = list(ids[0])
                else:
                    self.block_ids.setdefault(req_id, []).extend(ids[0])
            work.append((req_id, cached.num_computed_tokens[i], out.num_scheduled_tokens[req_id]))
        return work

    def step(self, *, fail_loads: bool = False, before_forward=None) -> StepResult:
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        work = self._track_blocks(out)
        meta = out.kv_connector_metadata
        plan = getattr(meta, "plan", None)
        errors: set[int] = set()
        wmeta = None
        blend_report = None
        if self.worker is not None:
            blends = tuple(getattr(plan, "blends", ()) or ())
            self.blends_seen.extend(blends)
            if blends and self.stand_in_blend:
                meta = type(meta)(dataclasses.replace(plan, blends=()))
            self.worker.bind_connector_metadata(meta)
            if fail_loads:
                self.worker.worker_side.store = _BrokenStore(self.worker.worker_side.store)
            self.worker.start_load_kv(None)
            if fail_loads:
                self.worker.worker_side.store = self.worker.worker_side.store.inner
            if blends and self.stand_in_blend:
                blend_report, blend_errors = self._stand_in_blends(blends, fail=fail_loads)
                errors |= blend_errors
        if before_forward is not None:
            before_forward(out)
        if self.model is not None:
            for req_id, start, count in work:
                req = self.requests[req_id]
                toks = list(req.all_token_ids)[start:start + count]
                self.model.write(toks, range(start, start + len(toks)), self.block_ids[req_id])
        if self.worker is not None:
            self.worker.wait_for_save()
            errors |= self.worker.get_block_ids_with_load_errors()
            wmeta = self.worker.build_connector_worker_meta()
            if blend_report is not None:
                from semblend.integration.vllm.connector_v1 import SemBlendWorkerMetadata

                if wmeta is None:
                    wmeta = SemBlendWorkerMetadata(dataclasses.replace(blend_report, workers=1))
                else:
                    wmeta = SemBlendWorkerMetadata(wmeta.report.merge(blend_report))
            self.worker.clear_connector_metadata()
        req_ids = [w[0] for w in work]
        sampled = []
        for req_id, start, count in work:
            req = self.requests[req_id]
            sampled.append([7] if start + count >= req.num_tokens else [])
        kv_out = None
        if wmeta is not None or errors:
            kv_out = KVConnectorOutput(invalid_block_ids=errors, kv_connector_worker_meta=wmeta)
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
                                pooler_output=None, kv_connector_output=kv_out)
        eco = self.scheduler.update_from_output(out, mro)
        return StepResult(out, eco, plan.loads if plan else (), plan.saves if plan else (), errors)

    def _stand_in_blends(self, blends: Sequence[Any], *, fail: bool) -> tuple[Any, set[int]]:
        """What a correct blended prefill writes, for the stand-in model: every span's donor KV read from the
        worker's real donor KV store at the span's donor positions and re-rotated by its delta; every other
        position of ``[local_tokens, num_tokens)`` (uncovered, or in the plan's recompute ranges) computed fresh
        by the model. A stand-in because the executor needs a real model (the e2e suite runs it); since the
        stand-in model's K/V are context-free, a correct BlendSpec yields exactly a cold prefill's KV."""
        from semblend.integration.vllm._metadata import WorkerReport
        from semblend_core.rope_correction import rerotate_keys

        report, errors = WorkerReport(workers=0), set()
        store = self.worker.worker_side.store
        for spec in blends:
            if fail:
                errors.update(spec.credited_block_ids())
                report = report.merge(WorkerReport(load_failed=(spec.req_id,), workers=0))
                continue
            lo, hi = spec.local_tokens, spec.num_tokens
            fresh = np.ones(hi - lo, dtype=bool)
            for span in spec.plan.spans:
                a, b = max(span.target_start, lo), min(span.target_end, hi)
                if a < b:
                    fresh[a - lo:b - lo] = False
            for a, b in spec.plan.recompute_ranges:
                if b > lo and a < hi:
                    fresh[max(a, lo) - lo:min(b, hi) - lo] = True
            slots = spec.slots()
            for span in spec.plan.spans:
                pos = [p for p in range(max(span.target_start, lo), min(span.target_end, hi)) if not fresh[p - lo]]
                if not pos:
                    continue
                kv = store.get(spec.namespace_key, spec.plan.donor_of(span)).kv
                src = torch.tensor([p - span.delta for p in pos], dtype=torch.long)
                dst = torch.tensor([slots[p] for p in pos], dtype=torch.long)
                for layer, cache in enumerate(self.model.caches):
                    k = rerotate_keys(kv[layer, 0, src].float(), span.delta, self.model.rope)
                    self.backend.write(k, kv[layer, 1, src].float(), cache, dst)
            recompute = [lo + i for i in np.flatnonzero(fresh).tolist()]
            toks = [spec.token_ids[p] for p in recompute]
            self.model.write(toks, recompute, list(spec.block_ids))
            report = report.merge(WorkerReport(loaded=((spec.req_id, spec.num_blended),),
                                               blended=((spec.req_id, spec.num_blended - len(recompute),
                                                         len(recompute)),), workers=0))
        return report, errors

    def run_until_done(self, max_steps: int = 200) -> list[StepResult]:
        results = []
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return results
            results.append(self.step())
        raise AssertionError("requests did not finish")


class _BrokenStore:
    """A donor KV store whose every lease fails (simulates a donor evicted between scheduling and loading)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def lease(self, *a: Any, **kw: Any) -> Any:
        raise KeyError("donor evicted")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def scheduling_trace(results: list[StepResult]) -> list[tuple]:
    """What the scheduler decided each step, as plain data (for byte-identical comparisons)."""
    trace = []
    for r in results:
        out = r.output
        new = tuple((n.req_id, tuple(map(tuple, n.block_ids)), n.num_computed_tokens)
                    for n in out.scheduled_new_reqs)
        cached = out.scheduled_cached_reqs
        cached_t = tuple((rid, cached.num_computed_tokens[i],
                          tuple(map(tuple, cached.new_block_ids[i])) if cached.new_block_ids[i] else None)
                         for i, rid in enumerate(cached.req_ids))
        trace.append((new, cached_t, tuple(sorted(out.num_scheduled_tokens.items())),
                      tuple(sorted(out.finished_req_ids))))
    return trace


def tokens(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(10, 990, size=n)]
