"""SemBlend's vLLM model plugin (blend mode's way to the model): declared as a ``vllm.general_plugins`` entry point,
loaded by vLLM's own plugin loader from installed metadata, and registering, lazily, subclasses of vLLM's own model
classes that vLLM can build exactly like its own.

Runs against the real vLLM of the scheduler suite's environment. The installed metadata of the editable install
points at another checkout's ``pyproject.toml``, so the entry point is exercised through a dist-info written to a
temporary folder on ``sys.path`` (what ``pip install`` writes). The recording itself is shown on real execution by
the end-to-end suite (``e2e/test_e2e_blend.py``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[3]
GROUP = "vllm.general_plugins"


@pytest.fixture()
def registry():
    """vLLM's model registry, restored after the test (the plugin overrides four architectures)."""
    from vllm import ModelRegistry

    from semblend.integration.vllm import _plugin

    saved = dict(ModelRegistry.models)
    was = _plugin._registered
    yield ModelRegistry
    ModelRegistry.models.clear()
    ModelRegistry.models.update(saved)
    _plugin._registered = was


def test_pyproject_declares_the_plugin_entry_point():
    points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    target = points[GROUP]["semblend"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_vllm_loads_the_entry_point_and_it_registers_lazy_subclasses(registry, tmp_path, monkeypatch):
    from vllm.plugins import load_plugins_by_group

    from semblend.integration.vllm import _plugin

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]["semblend"]
    dist = tmp_path / "semblend_plugin_probe-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: semblend-plugin-probe\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\nsemblend = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    _plugin._registered = False
    modules_before = set(sys.modules)

    plugins = load_plugins_by_group(GROUP)
    assert "semblend" in plugins
    plugins["semblend"]()
    assert _plugin.is_registered()
    # Lazy: registering imported none of vLLM's model modules (no CUDA initialisation at plugin load).
    assert not {m for m in set(sys.modules) - modules_before if m.startswith("vllm.model_executor.models.")}
    for arch in _plugin.ARCHITECTURES:
        entry = registry.models[arch]
        assert (entry.module_name, entry.class_name) == (_plugin.__name__, f"SemBlend{arch}")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"])
def test_recording_class_is_vllms_class_with_its_constructor_signature(arch):
    from semblend.integration.vllm import _plugin

    cls = getattr(_plugin, f"SemBlend{arch}")
    base = cls.__mro__[1]
    assert base.__module__.startswith("vllm.model_executor.models.") and base.__name__ == arch
    assert cls is getattr(_plugin, f"SemBlend{arch}")  # built once
    # vLLM's loader builds a model as cls(vllm_config=..., prefix=...) only when the signature says so.
    params = inspect.signature(cls.__init__).parameters
    assert "vllm_config" in params and "prefix" in params
    # Nothing but the constructor is added: every method, mapping and capability flag is vLLM's.
    # (Python's ABC / Protocol machinery stamps its own bookkeeping on every subclass: dunders, _abc_impl.)
    added = {k for k in vars(cls) if not (k.startswith("__") and k.endswith("__"))} - {"_abc_impl", "_is_protocol"}
    assert added == set() and cls.__init__.__wrapped__ is base.__init__
    with pytest.raises(AttributeError):
        getattr(_plugin, "SemBlendGemma2ForCausalLM")


def test_model_owning_matches_by_the_attention_layer_identity():
    from semblend.integration.vllm import _plugin

    class Attn:
        pass

    class Layer:
        def __init__(self):
            self.self_attn = type("SelfAttn", (), {})()
            self.self_attn.attn = Attn()

    class Model:
        def __init__(self):
            self.model = type("Decoder", (), {})()
            self.model.layers = [Layer(), Layer()]

    a, b = Model(), Model()
    _plugin._record(a)
    _plugin._record(b)
    assert _plugin.model_owning(a.model.layers[1].self_attn.attn) is a
    assert _plugin.model_owning(b.model.layers[0].self_attn.attn) is b
    assert _plugin.model_owning(Attn()) is None
    alive = len(_plugin.live_models())
    del a
    import gc

    gc.collect()
    assert len(_plugin.live_models()) == alive - 1  # weak references only: a dropped model is gone
