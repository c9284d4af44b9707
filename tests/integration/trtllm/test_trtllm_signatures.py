"""The adapter's classes against TensorRT-LLM's connector interface, as a table read from a named commit.

TensorRT-LLM cannot be installed here (see ``trtllm_standins``), so the interface is pinned as data: method names and
parameter names of ``KvCacheConnectorScheduler`` / ``KvCacheConnectorWorker`` and the fields of ``RequestData`` /
``SchedulerOutput`` at commit ``035ab91cad04b7b77a479a9526edecfbc742c661``. TensorRT-LLM calls these methods
positionally and by these names; a renamed or reordered parameter in the adapter fails here.
``test_trtllm_real_bases.py`` compares the same classes with the real base classes wherever TensorRT-LLM imports.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys

import pytest
import trtllm_standins as S

from semblend.integration.trtllm import connector


def _params(fn) -> tuple[str, ...]:
    names = tuple(inspect.signature(fn).parameters)
    assert names[0] == "self", f"{fn.__qualname__} must be an instance method"
    return names[1:]


@pytest.mark.parametrize("cls,base", [(connector.SemBlendKvConnectorScheduler, "KvCacheConnectorScheduler"),
                                      (connector.SemBlendKvConnectorWorker, "KvCacheConnectorWorker")])
def test_methods_and_parameters_match_the_pinned_table(cls, base):
    for method, params in S.SIGNATURES[base].items():
        fn = getattr(cls, method, None)
        assert fn is not None, f"{cls.__name__} lacks {method}"
        assert _params(fn) == params, f"{cls.__name__}.{method}{_params(fn)} != {params} ({S.SIGNATURE_COMMIT[:12]})"


def test_no_method_is_left_to_an_absent_base():
    """Without TensorRT-LLM the plain bases must not hide a missing method: every table method is defined on the
    adapter class itself (``__init__`` aside, which the plain base provides with the same contract)."""
    for cls, base in ((connector.SemBlendKvConnectorScheduler, "KvCacheConnectorScheduler"),
                      (connector.SemBlendKvConnectorWorker, "KvCacheConnectorWorker")):
        for method in S.SIGNATURES[base]:
            assert method in cls.__dict__, f"{cls.__name__}.{method} is not defined by the adapter"


def test_the_standins_are_the_table():
    """The stand-ins the scheduler tests use are built field for field from the table."""
    assert tuple(f.name for f in dataclasses.fields(S.RequestData)) == S.REQUEST_DATA_FIELDS
    assert tuple(f.name for f in dataclasses.fields(S.SchedulerOutput)) == S.SCHEDULER_OUTPUT_FIELDS
    rd = S.RequestData(7, [1, 2], [3], 0, 2)  # positional, as TensorRT-LLM builds it
    assert (rd.request_id, rd.new_block_ids, rd.cache_salt) == (7, [3], None)


def test_the_module_is_loadable_by_name_like_the_executor_does():
    """The executor does ``importlib.import_module(connector_module)`` then ``getattr`` of both class names."""
    mod = importlib.import_module("semblend.integration.trtllm.connector")
    assert mod.SemBlendKvConnectorScheduler is connector.SemBlendKvConnectorScheduler
    assert mod.SemBlendKvConnectorWorker is connector.SemBlendKvConnectorWorker


def test_bases_are_plain_without_tensorrt_llm(monkeypatch):
    """Blocked TensorRT-LLM: the module still imports, with plain bases, and never imports torch at import time."""
    for name in [m for m in sys.modules if m.startswith("semblend.integration.trtllm")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    from semblend_core import _compat

    _compat.has_module.cache_clear()
    try:
        mod = importlib.import_module("semblend.integration.trtllm.connector")
        assert mod.BASE_MODULE is None and mod.trtllm_bases() is None
        assert mod.SemBlendKvConnectorScheduler.__mro__[1] is mod._PlainScheduler
        assert mod.SemBlendKvConnectorWorker.__mro__[1] is mod._PlainWorker
    finally:
        _compat.has_module.cache_clear()
