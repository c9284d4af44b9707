"""CUDA graphs of the blended-prefill layer loop, for hits whose fresh set is the same at every layer.

Why: the executor (:mod:`semblend_core.blended_prefill`) runs one layer at a time for a few dozen tokens, about a
dozen kernels per layer. Inside vLLM on an H200 (Qwen2.5-7B, 8K prompt, recompute ratio 0) launching them took
10-12 ms of host time for 5 ms of GPU work, so the first token waited on Python, not on the GPU. A graph replays
the whole loop with one launch.

What is captured: the loop of a *static* run -- no deviation check, and selected tokens (if any) fresh at every
layer, so the fresh rows are the same at every layer (recompute ratio 0: uncovered tokens and seam heads; a
``position`` selection at full depth) -- for a bucket of ``R`` fresh rows and a
bucket of ``C`` tokens: embedding, RoPE tables, then per layer ``qkv`` -> ``rope_store`` -> ``partial_attention``
-> ``finish_layer``, and the last layer's ``qkv`` -> ``rope_store``. Its inputs are static buffers this object
owns: token ids, cache slots and positions (``R``), and the KV scratch (one storage, ``C + 1`` rows, grown by
power-of-two buckets; :meth:`LayerLoopGraphs.scratch` hands it to ``assemble_kv``). A hit with ``m <= R`` fresh
rows and ``n <= C`` tokens fills rows ``[0, m)``; rows ``[m, R)`` are padding: at position 0 (RoPE and attention:
they attend key 0 only, so they cost no attention work -- padding at a late position made every padded row block
read the whole KV, +12 ms of GPU time at 32K) and writing their K/V to the spare row ``C``. No real query attends
row ``C``: a query at position ``p < n <= C`` attends keys ``0..p`` only (the causal mask), and rows are
independent everywhere else (norms, projections, MLP act per row), so the padding changes nothing a real row
computes.

Correctness: every graph is captured right after an eager warm-up run on the hit's own inputs, then replayed on
those inputs; the replay must reproduce the warm-up's outputs (relative error within :data:`SELF_CHECK_TOL`) or
graphs are switched off for this object (logged, :attr:`LayerLoopGraphs.disabled`) and every later hit runs
eagerly. A hit the graphs cannot take (:meth:`LayerLoopGraphs.run` returns None with a reason counted in
:attr:`LayerLoopGraphs.fallbacks`) runs eagerly too: graphs only change speed, never what is computed.

Off CUDA (``capture=False``) the same padded static loop runs eagerly: a stand-in that lets CPU tests check the
bucketing, padding and scratch handling; capture itself is tested on CUDA only. Needs the ``gpu`` extra (torch).
Importing ``semblend_core`` does not import this module, and importing this module does not import torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from semblend_core.blended_prefill import BlendModelView, relative_error, static_layers, to_device

logger = logging.getLogger(__name__)

__all__ = ["ROW_BUCKETS", "SELF_CHECK_TOL", "LayerLoopGraphs", "token_bucket"]

ROW_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # fresh rows per hit; more run eagerly (GPU-bound anyway)
MIN_TOKEN_BUCKET = 1024
SELF_CHECK_TOL = 1e-2  # replay vs eager warm-up on the same inputs; bf16 rounding is ~4e-3


def token_bucket(total_len: int, max_tokens: int) -> int:
    """The scratch bucket of a ``total_len``-token hit: the next power of two (at least 1024), capped at
    ``max_tokens``."""
    bucket = max(MIN_TOKEN_BUCKET, 1 << max(0, int(total_len) - 1).bit_length())
    return min(bucket, int(max_tokens))


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None for the eager stand-in
    q: Any  # [R, num_heads, head_dim]: the last layer's rotated queries (static output)
    hidden: Any  # [R, hidden_size]: the last layer's input residual stream (static output)


class LayerLoopGraphs:
    """Captured layer loops of one model view on one device (see the module docstring). Not thread-safe: one
    engine worker drives it from its forward thread, on one stream.

    Args:
        view: the executor's model view; every graph calls it.
        max_tokens: largest hit (prompt tokens) the scratch may hold; longer hits run eagerly.
        device, dtype: where and in what dtype the KV scratch lives (the view's).
        row_buckets: the fresh-row buckets, ascending.
        capture: capture CUDA graphs (default: on CUDA devices); False runs the padded loop eagerly.
    """

    def __init__(self, view: BlendModelView, *, max_tokens: int, device: Any, dtype: Any,
                 row_buckets: tuple[int, ...] = ROW_BUCKETS, capture: bool | None = None) -> None:
        import torch

        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not row_buckets or list(row_buckets) != sorted({int(r) for r in row_buckets}) or row_buckets[0] < 1:
            raise ValueError(f"row_buckets must be ascending positive ints, got {row_buckets}")
        self.view = view
        self.max_tokens = int(max_tokens)
        self.device = torch.device(device)
        self.dtype = dtype
        self.row_buckets = tuple(int(r) for r in row_buckets)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.disabled = ""  # why graphs are off for good (a failed capture or self-check), "" while they are on
        self.fallbacks: Counter[str] = Counter()  # hits run eagerly, by reason
        self.captures = 0
        self.replays = 0
        self._capacity = 0  # C of the scratch; it has C + 1 rows
        self._k = self._v = None  # [num_layers, num_kv_heads, C + 1, head_dim]: the HF layout of assemble_kv
        self._graphs: dict[tuple[int, int], _Graph] = {}
        rows = self.row_buckets[-1]
        # Token ids start valid (0) and only ever hold valid ids, so padding rows always embed a real token.
        self._ids = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self._pos = torch.zeros(2, rows, dtype=torch.int64, device=self.device)  # (cache slots, positions)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    # ------------------------------------------------------------------ scratch
    def scratch(self, total_len: int) -> tuple[Any, Any] | None:
        """``(k_store, v_store)`` ``[num_layers, num_kv_heads, >= total_len, head_dim]`` for ``assemble_kv(...,
        out=)``, or None when this object cannot take the hit (too long, graphs off). Grows the scratch to the
        hit's bucket first (dropping the graphs of the old one)."""
        import torch

        if self.disabled or total_len > self.max_tokens:
            return None
        bucket = token_bucket(total_len, self.max_tokens)
        if bucket > self._capacity:
            self._drop_graphs()
            self._k = self._v = None  # free the old storage before allocating the new one
            shape = (self.view.num_layers, self.view.num_kv_heads, bucket + 1, self.view.head_dim)
            self._k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._v = torch.zeros_like(self._k)
            self._capacity = bucket
        return self._k, self._v

    def _owns(self, k: Any, v: Any) -> bool:
        return (self._k is not None and k.data_ptr() == self._k.data_ptr() and v.data_ptr() == self._v.data_ptr()
                and k.stride() == self._k.transpose(1, 2).stride() and v.stride() == self._v.transpose(1, 2).stride())

    # ------------------------------------------------------------------ replay
    def run(self, ids: Any, active: np.ndarray, k: Any, v: Any) -> tuple[Any, Any] | None:
        """The static loop over fresh rows ``active`` (sorted positions, ``m`` of them) of the prompt ``ids``
        (LongTensor ``[n]`` on the device) with ``k``/``v`` ``[num_layers, n, num_kv_heads, head_dim]`` views of
        :meth:`scratch`. Returns ``(q, hidden)``: the last layer's rotated queries ``[R, num_heads, head_dim]``
        and input residual ``[R, hidden_size]`` (rows ``[0, m)`` are the hit's; static buffers, valid until the
        next call), with every layer's fresh K/V written at ``active``. None (reason counted in
        :attr:`fallbacks`) when the hit does not fit; then nothing was written."""
        import torch

        m, n = int(active.size), int(k.shape[1])
        reason = ("disabled" if self.disabled else "empty" if m == 0 else "rows" if m > self.row_buckets[-1]
                  else "not_scratch" if not self._owns(k, v) else "tokens" if n > self._capacity else "")
        if reason:
            self.fallbacks[reason] += 1
            return None
        rows = next(r for r in self.row_buckets if r >= m)
        bucket = token_bucket(n, self.max_tokens)
        positions = np.empty((2, rows), dtype=np.int64)
        positions[:, :m] = active
        positions[0, m:] = bucket  # padding writes the spare row ...
        positions[1, m:] = 0  # ... and sits at position 0 (attends key 0 only)
        pos = to_device(positions, self.device, out=self._pos[:, :rows])
        torch.index_select(ids, 0, pos[1, :m], out=self._ids[:m])
        key = (rows, bucket)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._build(rows, bucket, m)
            if entry is None:
                self.fallbacks["capture_failed"] += 1
                return None
            self._graphs[key] = entry
            return entry.q, entry.hidden  # the warm-up / self-check already ran this hit
        self.replays += 1
        if entry.graph is None:  # the eager stand-in
            return self._loop(rows, bucket)
        entry.graph.replay()
        return entry.q, entry.hidden

    def _loop(self, rows: int, bucket: int) -> tuple[Any, Any]:
        k = self._k[:, :, : bucket + 1].transpose(1, 2)
        v = self._v[:, :, : bucket + 1].transpose(1, 2)
        return static_layers(self.view, self._ids[:rows], self._pos[0, :rows], self._pos[1, :rows], k, v)

    def _build(self, rows: int, bucket: int, m: int) -> _Graph | None:
        """Warm up, capture and self-check the graph of ``(rows, bucket)`` on the current hit's inputs (whose K/V
        the warm-up writes, so the hit is done either way). None, with graphs switched off, when capture or the
        self-check fails."""
        import torch

        if not self.capture:
            q, hidden = self._loop(rows, bucket)
            self.captures += 1
            return _Graph(None, q, hidden)
        try:
            # Warm up on a side stream (compiles the kernels for these shapes; torch's recipe before a capture).
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                q_ref, hidden_ref = self._loop(rows, bucket)
                q_ref, hidden_ref = q_ref[:m].clone(), hidden_ref[:m].clone()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the engine's other threads may use CUDA while this thread captures.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                q, hidden = self._loop(rows, bucket)
            graph.replay()
            err = max(relative_error(q[:m], q_ref), relative_error(hidden[:m], hidden_ref))  # one sync, once per graph
        except Exception as exc:  # noqa: BLE001 -- a graph that cannot be captured means eager hits, never a crash
            self._disable(f"capture failed ({type(exc).__name__}: {exc})")
            return None
        if not err <= SELF_CHECK_TOL:
            self._disable(f"replay differs from the eager run (relative error {err:.3g})")
            return None
        self.captures += 1
        logger.info("SemBlend: captured the blend layer loop for %d rows x %d tokens (self-check error %.2g)",
                    rows, bucket, err)
        return _Graph(graph, q, hidden)

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        if self.capture:
            # A pool whose last graph is gone is released: capturing into its handle again fails an allocator
            # assert (torch 2.11, seen in vLLM on the H200), so the next graphs get a new pool.
            import torch

            self._pool = torch.cuda.graph_pool_handle()

    def _disable(self, why: str) -> None:
        self.disabled = why
        self._drop_graphs()
        self._k = self._v = None  # the scratch is never handed out again: give its memory back
        self._capacity = 0
        logger.warning("SemBlend: CUDA graphs of the blend executor switched off: %s; hits run eagerly", why)

    def summary(self) -> dict[str, Any]:
        """Counters for stats endpoints and benchmarks."""
        return {"capture": self.capture, "captures": self.captures, "replays": self.replays,
                "graphs": sorted(self._graphs), "scratch_tokens": self._capacity, "disabled": self.disabled,
                "fallbacks": dict(self.fallbacks)}
