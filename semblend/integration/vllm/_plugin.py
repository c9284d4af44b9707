"""The vLLM general plugin that lets ``blend`` mode reach the model's weights, through vLLM's own model registry.

vLLM's KV connector API hands a connector the paged caches, never the model, and a connector must not patch vLLM.
``blend`` mode needs the model's modules (embeddings, per-layer norms / projections / MLP) to recompute tokens on
the worker. So SemBlend registers, through vLLM's out-of-tree model registry, thin subclasses of vLLM's own
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` under the same
architecture names. They add no method and change no weight or forward: their ``__init__`` calls vLLM's and then
records a weak reference to the instance in this process's registry, which the worker-side connector reads at
``register_kv_caches`` (the model is loaded by then).

How it is activated (either is enough; both are idempotent):

* installed: ``pip install 'semblend[vllm]'`` declares the ``vllm.general_plugins`` entry point ``semblend =
  semblend.integration.vllm._plugin:register``; vLLM calls it in every process it starts (API server, engine core,
  workers) unless ``VLLM_PLUGINS`` is set and does not name ``semblend``.
* explicitly, for a source checkout on ``PYTHONPATH`` (no installed entry point): call
  ``semblend.integration.vllm.register()`` before the engine is created (``LLM(...)`` / ``AsyncLLM``). With
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and a ``uni`` executor that one call covers the whole engine; with vLLM's
  worker processes they must import the plugin too, so use the entry point there.

Registration is by ``"module:Class"`` strings (vLLM imports the class lazily: no CUDA initialisation at plugin load),
resolved by this module's ``__getattr__``. Without the plugin (or for any other architecture), ``blend`` mode
declines: the connector refuses to start in ``blend`` mode when this process never ran :func:`register`, and the
worker declines every blend (vLLM recomputes) when the loaded model is not one of these classes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import weakref
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "NOT_REGISTERED", "is_registered", "live_models", "model_owning", "register"]

# Architecture -> vLLM's implementation module/class, used when vLLM's own table cannot be read (candidates in
# order: vLLM 0.26 served Mistral from ``llama``; later releases have ``mistral``).
ARCHITECTURES: dict[str, tuple[tuple[str, str], ...]] = {
    "LlamaForCausalLM": (("llama", "LlamaForCausalLM"),),
    "MistralForCausalLM": (("mistral", "MistralForCausalLM"), ("llama", "LlamaForCausalLM")),
    "Qwen2ForCausalLM": (("qwen2", "Qwen2ForCausalLM"),),
    "Qwen3ForCausalLM": (("qwen3", "Qwen3ForCausalLM"),),
}
_PREFIX = "SemBlend"
_lock = threading.Lock()
_classes: dict[str, type] = {}
_models: list[weakref.ReferenceType] = []
_registered = False


def register() -> None:
    """Register SemBlend's recording subclasses with vLLM's ``ModelRegistry`` (the ``vllm.general_plugins`` entry
    point; also the explicit call for a checkout on ``PYTHONPATH``). Idempotent, imports no model module."""
    global _registered
    from vllm import ModelRegistry

    with _lock:
        for arch in ARCHITECTURES:
            ModelRegistry.register_model(arch, f"{__name__}:{_PREFIX}{arch}")
        _registered = True
    logger.debug("SemBlend: model plugin registered for %s", ", ".join(ARCHITECTURES))


def is_registered() -> bool:
    """True once :func:`register` ran in this process."""
    return _registered


def live_models() -> list[Any]:
    """The recording models alive in this process, oldest first."""
    with _lock:
        _models[:] = [r for r in _models if r() is not None]
        return [m for m in (r() for r in _models) if m is not None]


def model_owning(attention_layer: Any) -> Any | None:
    """The recorded model (newest first) whose decoder holds ``attention_layer`` (vLLM's ``Attention`` module of
    one layer, from the forward context), or None. Identity, not shape: two engines in one process never mix."""
    for model in reversed(live_models()):
        try:
            if any(attention_layer is getattr(layer.self_attn, "attn", None) for layer in model.model.layers):
                return model
        except AttributeError:
            continue
    return None


NOT_REGISTERED = (
    "SemBlend mode 'blend' needs SemBlend's vLLM model plugin in every vLLM process, and this process has not "
    "loaded it. Install the package (pip install 'semblend[vllm]': vLLM then loads the 'semblend' entry point of "
    "group vllm.general_plugins by itself; if VLLM_PLUGINS is set it must name 'semblend'), or, for a source "
    "checkout on PYTHONPATH with an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), call "
    "semblend.integration.vllm.register() before creating the engine")


def _record(model: Any) -> None:
    with _lock:
        _models.append(weakref.ref(model))


def _base_class(arch: str) -> type:
    """vLLM's own class for ``arch``: from vLLM's built-in table when it can be read, else the known modules."""
    candidates = list(ARCHITECTURES[arch])
    try:
        from vllm.model_executor.models import registry

        table = getattr(registry, "_VLLM_MODELS", None) or {}
        if arch in table:
            candidates.insert(0, tuple(table[arch]))
    except Exception:  # noqa: BLE001 -- fall back to the known modules
        pass
    errors = []
    for module_name, class_name in candidates:
        try:
            module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
            return getattr(module, class_name)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module_name}.{class_name}: {exc}")
    raise ImportError(f"vLLM has no implementation of {arch} ({'; '.join(errors)})")


def _recording_class(arch: str) -> type:
    with _lock:
        cls = _classes.get(arch)
    if cls is not None:
        return cls
    base = _base_class(arch)

    @functools.wraps(base.__init__)  # vLLM reads the constructor's signature (vllm_config=, prefix=)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        _record(self)

    cls = type(f"{_PREFIX}{arch}", (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": f"{_PREFIX}{arch}",
        "__doc__": f"vLLM's {base.__module__}.{base.__name__}, unchanged; records itself for SemBlend's blend mode.",
    })
    with _lock:
        return _classes.setdefault(arch, cls)


def __getattr__(name: str) -> Any:
    """``SemBlend<Arch>`` classes, built on first access (what vLLM's lazy ``module:Class`` registration does)."""
    if name.startswith(_PREFIX) and name[len(_PREFIX):] in ARCHITECTURES:
        return _recording_class(name[len(_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
