"""TensorRT-LLM adapter (``semblend[trtllm]``): SemBlend on TensorRT-LLM's KV cache connector (PyTorch backend).

Load it with ``LLM(..., kv_connector_config=KvCacheConnectorConfig(connector_module=
"semblend.integration.trtllm.connector", connector_scheduler_class="SemBlendKvConnectorScheduler",
connector_worker_class="SemBlendKvConnectorWorker"))`` (see ``docs/trtllm.md``). Modules, in data-path order:

* ``_config``: ``TLLM_SEMBLEND_CONFIG`` -> adapter settings + ``SemBlendConfig``; ``llm_args`` -> start-up checks,
  namespace (cache salt and LoRA task per request);
* ``_layout``: the paged pool ``register_kv_caches`` receives, as ``semblend_core.kv_layout`` views;
* ``_shared``: what the two sides share inside rank 0's process (donor residency, leases, worker reports);
* ``_scheduler``: scheduler side (planning, every decline, crediting tokens, staging loads and captures);
* ``_worker``: worker side (donor KV into the request's blocks with the core's kernel; prompt captures);
* ``connector``: the two classes TensorRT-LLM imports (the only module that imports TensorRT-LLM, when present).

Importing this package does not import TensorRT-LLM or torch.
"""

from semblend.integration.trtllm._config import CONFIG_ENV, MODES, load_settings

__all__ = ["CONFIG_ENV", "MODES", "load_settings"]
