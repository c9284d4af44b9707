"""Test markers and their auto-skips.

* ``gpu``: needs a CUDA device (skipped on CPU-only machines such as CI).
* ``engine_vllm`` / ``engine_sglang``: need the engine importable (CI runs them in cached engine environments).
* ``engine_trtllm``: needs TensorRT-LLM importable (it cannot be installed on these machines).
* ``slow``: real models or large data; run by default, skipped with ``--fast``.

Shared fixture: ``smollm2``, the real SmolLM2-135M-Instruct weights, loaded once per session.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true", default=False, help="skip tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "engine_vllm: needs vLLM importable")
    config.addinivalue_line("markers", "engine_sglang: needs SGLang importable")
    config.addinivalue_line("markers", "engine_trtllm: needs TensorRT-LLM importable")
    config.addinivalue_line("markers", "slow: real models or large inputs (skip with --fast)")


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _cuda_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run on the H100 via the device tool)"))
        if "engine_vllm" in item.keywords and importlib.util.find_spec("vllm") is None:
            item.add_marker(pytest.mark.skip(reason="vllm not installed: run scripts/setup_vllm_env.sh (make test does)"))
        if "engine_sglang" in item.keywords and importlib.util.find_spec("sglang") is None:
            item.add_marker(pytest.mark.skip(reason="sglang not installed"))
        if "engine_trtllm" in item.keywords and importlib.util.find_spec("tensorrt_llm") is None:
            item.add_marker(pytest.mark.skip(reason="tensorrt_llm not installed (not installable here)"))
        if "slow" in item.keywords and config.getoption("--fast"):
            item.add_marker(pytest.mark.skip(reason="--fast given"))


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of real SmolLM2-135M-Instruct weights (offline GGUF asset), loaded once per test
    session and shared read-only by every module that needs them; skips when the asset is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import torch

    from semblend import assets
    from semblend_core.errors import MissingDependencyError

    try:
        assets.smollm2_gguf_path()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    return assets.load_smollm2()
