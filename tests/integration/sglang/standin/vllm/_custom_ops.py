"""TEST-ENVIRONMENT STAND-IN (see ``__init__``): the name SGLang imports on CPU, never the op."""


def rotary_embedding(*args, **kwargs):
    raise RuntimeError(
        "stand-in vllm._custom_ops.rotary_embedding was called: SGLang took its fallback-kernel rotary path on CPU, "
        "which this test environment does not provide (see tests/integration/sglang/standin/vllm/__init__.py)"
    )
