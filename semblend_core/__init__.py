"""SemBlend core: engine-agnostic semantic KV-cache reuse planning.

Needs only numpy and rapidfuzz. Data path, one module per stage, in call order::

    config -> namespace -> segmentation -> fingerprint -> embedder -> donor_store -> alignment -> bathtub
           -> plan -> pipeline (-> rope_correction / partial_attention / kv kernels, behind the ``gpu`` extra)

Public API::

    from semblend_core import SemBlendConfig, SemBlendPipeline, SemanticKvPlan, CacheNamespace
"""

import logging

from semblend_core.config import SemBlendConfig
from semblend_core.errors import (
    ConfigError,
    DuplicateDonorError,
    InvalidInputError,
    InvalidTokensError,
    MissingDependencyError,
    SemBlendError,
    StoreFullError,
)
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import FuzzySpan, Outcome, PlanTimings, Reason, SemanticKvPlan, Span

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "CacheNamespace", "ConfigError", "DuplicateDonorError", "FuzzySpan", "InvalidInputError", "InvalidTokensError",
    "MissingDependencyError", "Outcome", "PlanTimings", "Reason", "SemBlendConfig", "SemBlendError",
    "SemBlendPipeline", "SemanticKvPlan", "Span", "StoreFullError", "__version__",
]


def __getattr__(name: str):  # the pipeline pulls in more modules; import it on first use
    if name == "SemBlendPipeline":
        from semblend_core.pipeline import SemBlendPipeline

        return SemBlendPipeline
    raise AttributeError(name)
