"""SGLang adapter (``semblend[sglang]``): a radix-cache backend registered as ``semblend``.

Two ways in, no patch of SGLang's files (see ``docs/sglang.md``)::

    semblend-sglang --model-path ... --port 30000                                   # launcher
    python -m sglang.launch_server --model-path ... --radix-cache-backend semblend    # plugin entry point

Modules:

* ``_config``: ``SEMBLEND_*`` + ``SEMBLEND_SGLANG_CONFIG`` -> adapter settings + ``SemBlendConfig``; SGLang's
  ``ServerArgs`` / ``ModelConfig`` / ``Req`` -> namespace;
* ``_load``: plan -> prefix load (or the reason to decline), engine-free;
* ``_cache``: ``SemBlendRadixCache``, SGLang's ``RadixCache`` plus semantic prefix loads (imports SGLang);
* ``factory``: the ``TreeCacheBuildContext`` factory and ``register()`` (the ``sglang.srt.plugins`` entry point);
* ``launch``: the ``semblend-sglang`` console script.

Importing this package does not import SGLang.
"""

from semblend.integration.sglang._config import (
    BACKEND_NAME,
    CONFIG_ENV,
    MODES,
    SglangAdapterConfig,
    parse_config,
)
from semblend.integration.sglang._load import DeclineReason, PrefixLoad, prefix_load


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the ``semblend`` radix-cache backend."""
    from semblend.integration.sglang.factory import register as _register

    _register()


__all__ = ["BACKEND_NAME", "CONFIG_ENV", "MODES", "DeclineReason", "PrefixLoad", "SglangAdapterConfig",
           "parse_config", "prefix_load", "register"]
