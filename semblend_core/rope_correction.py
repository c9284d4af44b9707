"""RoPE re-rotation of cached keys (contract; implementation in progress).

A key cached at position ``p`` is ``K_p = s * R(p) k`` where ``R`` rotates channel pairs by ``p * inv_freq`` and ``s``
is the attention scaling (YaRN's mscale, 1 otherwise). Because rotations compose, ``K_{p+d} = R(d) K_p``: moving a
cached key by ``d`` positions is one rotation by ``d * inv_freq`` and needs neither ``p`` nor ``s``. This holds for
any position-independent ``inv_freq`` (default, linear, llama3, YaRN); it fails for dynamic NTK (``inv_freq``
depends on sequence length), so such specs carry ``exact=False`` and the planner declines materialization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeSpec:
    """How a model rotates keys; everything a re-rotation kernel needs.

    * ``head_dim``: size of one head; ``rotary_dim`` (even, <= head_dim) channels are rotated, the rest pass through.
    * ``interleaved``: False = rotate-half / NeoX pairing (channel i with i + rotary_dim/2: Llama, Qwen2, Mistral,
      SmolLM); True = GPT-J pairing (channel 2i with 2i+1).
    * ``inv_freq``: float64 numpy array ``[rotary_dim // 2]``, already scaled (linear/llama3/YaRN).
    * ``attention_scaling``: multiplier applied to cos/sin by the model (YaRN mscale); irrelevant to re-rotation.
    * ``exact``: re-rotation reproduces the model's own keys; when False, ``reason`` says why and callers decline.
    * ``sliding_window_layers``: layer indices using sliding-window attention (declared; adapters decline or
      handle them explicitly).
    """

    head_dim: int
    rotary_dim: int
    inv_freq: np.ndarray
    interleaved: bool = False
    attention_scaling: float = 1.0
    exact: bool = True
    reason: str = ""
    rope_type: str = "default"
    sliding_window_layers: tuple[int, ...] = ()
