"""vLLM adapter (``semblend[vllm]``): ``SemBlendConnectorV1`` on vLLM's KV connector API.

Load it with ``--kv-transfer-config '{"kv_connector": "SemBlendConnectorV1", "kv_connector_module_path":
"semblend.integration.vllm.connector_v1", ...}'`` (see ``docs/vllm.md``). Modules:

* ``_config``: ``kv_connector_extra_config`` -> adapter settings + ``SemBlendConfig``; ``VllmConfig`` -> namespace;
* ``_scheduler``: scheduler side (planning, crediting tokens, exact-cache safety, donor registration);
* ``_worker``: worker side (donor KV loads into paged blocks, prompt captures into the donor KV store);
* ``_metadata``: what crosses between the two sides; ``_metrics``: connector stats;
* ``connector_v1``: the vLLM class (the only module that imports vLLM at run time);
* ``_plugin``: the ``vllm.general_plugins`` entry point (``register``) that records vLLM's model for ``blend`` mode;
  ``_model_view``: that model as the shared blended-prefill executor's ``BlendModelView``.

Importing this package does not import vLLM.
"""

from semblend.integration.vllm._config import MODES, VllmAdapterConfig, parse_extra_config

__all__ = ["MODES", "VllmAdapterConfig", "parse_extra_config", "register"]


def register() -> None:
    """Activate SemBlend's vLLM model plugin in this process (what the installed ``vllm.general_plugins`` entry
    point does): needed by ``blend`` mode when SemBlend runs from a source checkout. Call before creating the
    engine; idempotent. Imports vLLM's registry, not its model modules."""
    from semblend.integration.vllm._plugin import register as _register

    _register()
