"""The adapter against TensorRT-LLM's real connector base classes. Runs only where TensorRT-LLM imports.

Skipped here: TensorRT-LLM cannot be installed on these machines (PyPI's 1.2.1 is a stub pointing at NVIDIA's index)
and its interface module imports compiled bindings. On a machine with TensorRT-LLM, ``pytest
tests/integration/trtllm`` runs these: the classes subclass the real bases, are concrete (every abstract method
implemented), and match the real methods' parameter names, which also re-checks the pinned table.
"""

from __future__ import annotations

import inspect

import pytest
import trtllm_standins as S

from semblend.integration.trtllm import connector

pytestmark = pytest.mark.engine_trtllm

BASES = connector.trtllm_bases()
if BASES is None:
    pytest.skip("tensorrt_llm not importable: it cannot be installed here (PyPI ships a stub); run on a machine "
                "with TensorRT-LLM", allow_module_level=True)


@pytest.mark.parametrize("which", [0, 1])
def test_subclasses_the_real_base_and_is_concrete(which):
    base = BASES[which]
    cls = (connector.SemBlendKvConnectorScheduler, connector.SemBlendKvConnectorWorker)[which]
    assert issubclass(cls, base)
    assert not inspect.isabstract(cls), f"abstract methods left: {getattr(cls, '__abstractmethods__', ())}"


@pytest.mark.parametrize("which", [0, 1])
def test_parameters_match_the_real_methods(which):
    base = BASES[which]
    cls = (connector.SemBlendKvConnectorScheduler, connector.SemBlendKvConnectorWorker)[which]
    for name, fn in inspect.getmembers(base, inspect.isfunction):
        if name.startswith("_") and name != "__init__":
            continue
        if getattr(fn, "__isabstractmethod__", False) or name in cls.__dict__:
            assert list(inspect.signature(getattr(cls, name)).parameters) == list(inspect.signature(fn).parameters)


def test_the_pinned_table_still_holds():
    for which, table in ((0, "KvCacheConnectorScheduler"), (1, "KvCacheConnectorWorker")):
        base = BASES[which]
        for method, params in S.SIGNATURES[table].items():
            if hasattr(base, method):
                assert tuple(inspect.signature(getattr(base, method)).parameters)[1:] == params
