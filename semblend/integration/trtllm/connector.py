"""``SemBlendKvConnectorScheduler`` / ``SemBlendKvConnectorWorker``: SemBlend on TensorRT-LLM's KV cache connector.

Enable it the way LMCache or KVBM are enabled, no patch to TensorRT-LLM (``docs/trtllm.md`` has the details)::

    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig
    llm = LLM(model=..., kv_connector_config=KvCacheConnectorConfig(
        connector_module="semblend.integration.trtllm.connector",
        connector_scheduler_class="SemBlendKvConnectorScheduler",
        connector_worker_class="SemBlendKvConnectorWorker"))

Settings come from ``TLLM_SEMBLEND_CONFIG`` (``_config``); the default mode is ``discovery_only``.

The executor imports this module by name, builds the worker on every rank and the scheduler on rank 0, both from the
same ``llm_args``. The classes subclass TensorRT-LLM's ``KvCacheConnectorWorker`` / ``KvCacheConnectorScheduler``
when TensorRT-LLM is importable (``tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector``, or the older
``tensorrt_llm._torch.pyexecutor.kv_cache_connector``), and are plain classes with the same methods otherwise, so
the adapter is importable and testable without the engine. They only translate: TensorRT-LLM objects into SemBlend
types, and the work into :class:`~semblend.integration.trtllm._scheduler.SchedulerSide` /
:class:`~semblend.integration.trtllm._worker.WorkerSide`.

Method names and parameters follow TensorRT-LLM commit ``035ab91cad04b7b77a479a9526edecfbc742c661``
(``connectors/kv_cache_connector.py``); ``tests/integration/trtllm/test_trtllm_signatures.py`` pins them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from semblend.integration.trtllm._config import (
    BACKEND_LAYOUTS,
    base_namespace,
    check_materializing,
    load_settings,
    tokens_per_block,
)
from semblend.integration.trtllm._layout import PoolGeometry
from semblend.integration.trtllm._shared import shared_state_for
from semblend.integration.vllm._metadata import StepPlan

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TRTLLM_BASE_MODULES", "SemBlendKvConnectorScheduler", "SemBlendKvConnectorWorker", "trtllm_bases"]

# Where TensorRT-LLM keeps the connector interface, newest first.
TRTLLM_BASE_MODULES = (
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
)


def trtllm_bases() -> tuple[type, type, str] | None:
    """``(KvCacheConnectorScheduler, KvCacheConnectorWorker, module name)`` from TensorRT-LLM, or None when it is
    not importable (the interface module imports TensorRT-LLM's compiled bindings)."""
    from semblend_core._compat import has_module

    if not has_module("tensorrt_llm"):
        return None
    for name in TRTLLM_BASE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        sched, worker = getattr(mod, "KvCacheConnectorScheduler", None), getattr(mod, "KvCacheConnectorWorker", None)
        if sched is not None and worker is not None:
            return sched, worker, name
    return None


class _PlainScheduler:
    """Stand-in base with ``KvCacheConnectorScheduler``'s constructor contract (used when TensorRT-LLM is absent)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args

    def wait_for_initialization(self) -> None:
        return None


class _PlainWorker:
    """Stand-in base with ``KvCacheConnectorWorker``'s metadata plumbing (used when TensorRT-LLM is absent)."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata = None

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Any:
        return None


_BASES = trtllm_bases()
_SchedulerBase: type = _BASES[0] if _BASES else _PlainScheduler
_WorkerBase: type = _BASES[1] if _BASES else _PlainWorker
BASE_MODULE: str | None = _BASES[2] if _BASES else None


# ---------------------------------------------------------------------------------------------- model facts
def _hf_config(llm_args: Any) -> Any:
    """The model's transformers config: ``llm_args._semblend_hf_config`` when a caller attached one (tests, custom
    launchers), else ``AutoConfig.from_pretrained(llm_args.model)`` (TensorRT-LLM depends on transformers)."""
    attached = getattr(llm_args, "_semblend_hf_config", None)
    if attached is not None:
        return attached
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(llm_args.model),
                                      trust_remote_code=bool(getattr(llm_args, "trust_remote_code", False)),
                                      revision=getattr(llm_args, "revision", None))


def _text_config(hf_config: Any) -> Any:
    sub = getattr(hf_config, "text_config", None)
    return sub if sub is not None and getattr(hf_config, "num_attention_heads", None) is None else hf_config


def pool_geometry(llm_args: Any, hf_config: Any) -> PoolGeometry:
    """What rank 0's pool holds: layers, KV heads per rank, tokens per block, head size, block order."""
    cfg = _text_config(hf_config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
    tp = int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
    backend = str(getattr(llm_args, "attn_backend", "TRTLLM") or "TRTLLM").upper()
    return PoolGeometry(num_layers=int(cfg.num_hidden_layers),
                        num_kv_heads=max(1, kv_heads // tp), tokens_per_block=tokens_per_block(llm_args),
                        head_dim=head_dim, block_order=BACKEND_LAYOUTS.get(backend, "HND"))


def _rope(hf_config: Any) -> Any:
    """The model's RoPE spec when one spec re-rotates every layer exactly, else None."""
    from semblend_core.rope_correction import rope_spec_from_config

    try:
        spec = rope_spec_from_config(hf_config)
    except (ValueError, TypeError):
        return None
    if not spec.can_rerotate or spec.nope_layers or spec.sliding_window_layers or spec.chunked_attention_layers:
        return None
    return spec


# ---------------------------------------------------------------------------------------------- scheduler
class SemBlendKvConnectorScheduler(_SchedulerBase):
    """Scheduler (rank 0). Plans each request, decides and credits tokens, stages loads and donor captures."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        from semblend.integration.trtllm._scheduler import SchedulerSide
        from semblend_core import SemBlendPipeline
        from semblend_core.bathtub import ModelShape

        self.adapter, self.core_config = load_settings()
        if self.adapter.materializes:
            check_materializing(llm_args)
        hf_config = _hf_config(llm_args)
        cfg = _text_config(hf_config)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        shape = ModelShape(num_layers=layers, model_type=str(getattr(cfg, "model_type", "") or "")) if layers else None
        self.namespace = base_namespace(llm_args, hf_config)
        self.side = SchedulerSide(SemBlendPipeline(self.core_config, model_shape=shape), self.adapter,
                                  self.namespace, tokens_per_block=tokens_per_block(llm_args),
                                  shared=shared_state_for(llm_args))
        logger.info("SemBlend TensorRT-LLM scheduler in mode %s, namespace %s", self.adapter.mode,
                    self.namespace.key[:12])

    @property
    def pipeline(self) -> Any:
        return self.side.pipeline

    def build_connector_meta(self, scheduler_output: Any) -> StepPlan:
        return self.side.build_connector_meta(scheduler_output)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self.side.get_num_new_matched_tokens(request, num_computed_tokens)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        return self.side.request_finished(request, cache_block_ids)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self.side.update_state_after_alloc(request, block_ids)


# ---------------------------------------------------------------------------------------------- worker
class SemBlendKvConnectorWorker(_WorkerBase):
    """Worker (every rank). Loads donor KV into the pool before the forward, captures donors after it."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        from semblend.integration.trtllm._worker import WorkerSide

        self.adapter, _ = load_settings()
        if self.adapter.materializes:
            check_materializing(llm_args)
        hf_config = _hf_config(llm_args) if self.adapter.materializes else None
        geometry = pool_geometry(llm_args, hf_config) if hf_config is not None else None
        self.side = WorkerSide(shared_state_for(llm_args), geometry,
                               _rope(hf_config) if hf_config is not None else None,
                               device_bytes=self.adapter.donor_kv_gpu_bytes,
                               host_bytes=self.adapter.donor_kv_host_bytes, materialize=self.adapter.materializes)

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.side.register_kv_caches(kv_cache_tensor)

    def register_kv_cache_layout(self, layout: Any) -> None:
        self.side.register_kv_cache_layout(layout)

    def start_load_kv(self, stream: torch.cuda.Stream) -> None:
        self.side.start_load_kv(self.get_connector_meta(), stream)

    def wait_for_layer_load(self, layer_idx: int, stream: torch.cuda.Stream) -> None:
        return None  # loads are stream-ordered before the forward (``_worker``: Ordering)

    def save_kv_layer(self, layer_idx: int, stream: torch.cuda.Stream) -> None:
        return None  # captures read the finished pool in ``wait_for_save``

    def wait_for_save(self, stream: torch.cuda.Stream) -> None:
        self.side.wait_for_save(self.get_connector_meta(), stream)

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
                     ) -> tuple[list[int], list[int]]:
        return self.side.get_finished(finished_gen_req_ids, started_loading_req_ids)
