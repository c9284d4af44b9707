"""SemBlend's reference engine over Hugging Face transformers (extra ``semblend[transformers]``).

``SemBlendEngine(model, tokenizer, config)`` wraps a Llama/Qwen2/Mistral-family causal LM: ``generate`` plans reuse
with ``semblend_core``, builds the prompt's cache from re-rotated donor KV plus selectively recomputed tokens, and
decodes with the model's own ``generate``. ``run_demo`` is the ``semblend demo`` command's body.
"""

from semblend_core._compat import require

require("torch", extra="transformers")
require("transformers", extra="transformers")

from semblend.integration.transformers.engine import (
    EngineOptions,
    GenerationResult,
    PrefillResult,
    SemBlendEngine,
)

__all__ = ["EngineOptions", "GenerationResult", "PrefillResult", "SemBlendEngine", "run_demo"]


def __getattr__(name: str):  # the demo pulls in assets and rich; import on first use
    if name == "run_demo":
        from semblend.integration.transformers.demo import run_demo

        return run_demo
    raise AttributeError(name)
