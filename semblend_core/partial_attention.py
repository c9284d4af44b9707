"""Partial attention: a subset of query positions attends to the full (reused + fresh) KV under the causal mask.

Lifecycle inside one layer of a blended prefill:

1. the adapter has the layer's full KV ``k``/``v`` ``[kv_len, num_kv_heads, head_dim]``: re-rotated donor KV at
   reused positions, freshly computed KV at the recomputed ones (:mod:`semblend_core.recompute` picks those);
2. it computes queries only for the recomputed positions, ``q [num_q, num_heads, head_dim]``, and calls
   :func:`partial_attention` with their absolute positions ``q_positions [num_q]``;
3. the output ``[num_q, num_heads, head_dim]`` feeds the rest of the layer for those tokens only.

A query at absolute position ``p`` attends keys ``0..p`` (inclusive), so prefill chunks work too: queries may be
any positions below ``kv_len``, in any order (sorted is faster). GQA: ``num_heads`` must be a multiple of
``num_kv_heads``; query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.

:func:`partial_attention` is the only entry point. It validates inputs, runs the Triton kernel
(``semblend_core.kernels._partial_attention_jit``) on CUDA tensors -- or on CPU tensors when ``TRITON_INTERPRET=1``
was set before triton was imported -- and otherwise :func:`partial_attention_reference`, the torch SDPA twin.
When few queries leave SMs idle over a long KV, the kernel splits the keys across programs and a second kernel
merges the partial softmax states (:func:`_pick_splits` decides; the result does not depend on it beyond rounding).
Needs the ``gpu`` extra (torch; triton for the kernel).
"""

from __future__ import annotations

import functools
import logging
import math

from semblend_core._compat import require, triton_kernel_runs_on

torch = require("torch", extra="gpu")

logger = logging.getLogger(__name__)

__all__ = ["kernel_available", "partial_attention", "partial_attention_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_POS_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634


def _validate(q, k, v, q_positions, scale, check_positions: bool, dtypes: tuple = _DTYPES
              ) -> tuple[int, int, int, int, float]:
    """Check shapes, dtypes and devices; return ``(num_q, num_heads, num_kv_heads, kv_len, scale)``."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_positions", q_positions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"partial_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"partial_attention: {name} must be 3-D, got shape {tuple(t.shape)}; expected "
                             + ("[num_q, num_heads, head_dim]" if name == "q" else "[kv_len, num_kv_heads, head_dim]"))
        if t.dtype not in dtypes:
            raise TypeError(f"partial_attention: {name}.dtype={t.dtype} not supported; allowed: {dtypes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"partial_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"partial_attention: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    num_q, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, kv_head_dim = k.shape
    if head_dim != kv_head_dim:
        raise ValueError(f"partial_attention: q head_dim {head_dim} != k head_dim {kv_head_dim}")
    if head_dim == 0 or num_heads == 0 or num_kv_heads == 0:
        raise ValueError(f"partial_attention: zero-sized head or head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"partial_attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if q_positions.dim() != 1 or q_positions.shape[0] != num_q:
        raise ValueError(f"partial_attention: q_positions must have shape [num_q={num_q}], "
                         f"got {tuple(q_positions.shape)}")
    if q_positions.dtype not in _POS_DTYPES:
        raise TypeError(f"partial_attention: q_positions.dtype={q_positions.dtype}; allowed: int32, int64")
    devices = {t.device for t in (q, k, v, q_positions)}
    if len(devices) != 1:
        raise ValueError(f"partial_attention: q, k, v, q_positions must share one device, got "
                         f"{[str(t.device) for t in (q, k, v, q_positions)]}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"partial_attention: scale must be a finite number, got {scale!r}")
    if check_positions and num_q:
        # One device sync on CUDA; hot paths that guarantee the range may pass check_positions=False.
        lo, hi = int(q_positions.min()), int(q_positions.max())
        if lo < 0 or hi >= kv_len:
            raise ValueError(f"partial_attention: q_positions must lie in [0, kv_len={kv_len}), got [{lo}, {hi}]")
    return num_q, num_heads, num_kv_heads, kv_len, float(scale)


def partial_attention_reference(q, k, v, q_positions, *, scale: float | None = None):
    """Torch twin of :func:`partial_attention`: SDPA with an explicit boolean causal mask, computed in q's dtype.

    Shapes as in :func:`partial_attention`; float64 is accepted too (the tests' ground truth). Materializes a ``[num_q, kv_len]`` mask and GQA-expanded K/V, so it is
    meant for CPU, tests and verification, not for serving.
    """
    num_q, num_heads, num_kv_heads, kv_len, scale = _validate(q, k, v, q_positions, scale, check_positions=True,
                                                              dtypes=_DTYPES + (torch.float64,))
    if num_q == 0:
        return q.new_empty(q.shape)
    group = num_heads // num_kv_heads
    keys = torch.arange(kv_len, device=q.device)
    mask = keys[None, :] <= q_positions.to(torch.int64)[:, None]  # [num_q, kv_len], True = attend
    kx = k.repeat_interleave(group, dim=1) if group > 1 else k
    vx = v.repeat_interleave(group, dim=1) if group > 1 else v
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kx.transpose(0, 1)[None], vx.transpose(0, 1)[None],
        attn_mask=mask[None, None], scale=scale,
    )  # [1, num_heads, num_q, head_dim]
    return out[0].transpose(0, 1).contiguous()


def kernel_available(device) -> bool:
    """True when :func:`partial_attention` would run the Triton kernel for tensors on ``device``."""
    return triton_kernel_runs_on(torch.device(device).type)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_blocks(rows: int, head_dim: int, num_kv_heads: int, device, dtype=torch.bfloat16
                 ) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.

    Measured on an H100 (benchmarks/results/partial_attention_h100.json, Qwen2.5-7B heads, bf16, 5% and 15% of
    8K and 32K queries): 64-row blocks with 64-key tiles and 3 pipeline stages were the fastest tile or within 5%
    of it in three of four cases (4 stages won at 5% of 8K: 0.105 vs 0.135 ms), about 30% faster than 128-row
    blocks with 2 stages. Row blocks shrink when there are too few to fill the SMs. float32 and head_dim > 128 take smaller tiles and 2
    stages so that they fit shared memory and registers.
    """
    if device.type != "cuda":
        return 16, 16, 4, 1  # interpreter: small tiles keep numpy work low; speed is irrelevant there
    big = dtype == torch.float32 or head_dim > 128
    block_m = 32 if head_dim > 128 else 64
    block_n = 32 if big else 64
    num_stages = 2 if big else 3
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while block_m > 32 and triton_cdiv(rows, block_m) * num_kv_heads < sms:
        block_m //= 2
    return block_m, block_n, 4, num_stages


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_MIN_SPLIT_KEYS = 256  # keys per split at least: amortizes the workspace store and the combine pass
_MAX_SPLITS = 32


def _pick_splits(programs: int, kv_len: int, block_n: int, sms: int) -> int:
    """Number of KV splits for a grid of ``programs`` = row blocks x KV heads (power of two, 1 = no split).

    Split only when the grid leaves SMs idle (``programs < sms``): then pick the power of two nearest (in log scale)
    to ``2 * sms / programs``, so the split grid holds about two programs per SM (between 1.4x and 2.8x) -- under
    the causal mask the splits above a row block's largest position are near-empty, so one nominal wave would leave
    SMs idle again. Capped at 32 and so that each split keeps at least ``max(256, 4 * block_n)`` keys of ``kv_len``.
    Example (H100, 132 SMs; Qwen2.5-7B heads, 80 queries -> 18 row blocks of 32 x 4 KV heads = 72 programs):
    4 splits at 8K and 32K keys (288 programs); 1 below 2 * 256 keys.
    """
    if programs >= sms:
        return 1
    max_by_len = kv_len // max(_MIN_SPLIT_KEYS, 4 * block_n)
    if max_by_len < 2:
        return 1
    want = 1 << max(0, round(math.log2(2 * sms / programs)))
    return min(want, _MAX_SPLITS, 1 << (max_by_len.bit_length() - 1))


def _launch(q, k, v, q_positions, scale: float, out=None, blocks: tuple[int, int, int, int] | None = None,
            splits: int | None = None):
    """Run the Triton kernel (inputs already validated). ``blocks`` overrides the tile choice (benchmarks only);
    ``splits`` the number of KV splits (tests and benchmarks only; None = :func:`_pick_splits` on CUDA, 1 on CPU)."""
    from semblend_core.kernels._partial_attention_jit import (
        partial_attention_combine_kernel,
        partial_attention_kernel,
    )

    num_q, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # The kernel assumes a unit stride on head_dim; everything else may be strided.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q_positions = q_positions.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    rows = num_q * group
    block_m, block_n, num_warps, num_stages = blocks or _pick_blocks(rows, head_dim, num_kv_heads, q.device, q.dtype)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    num_m_blocks = triton_cdiv(rows, block_m)
    if splits is None:
        splits = 1
        if q.device.type == "cuda":
            sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
            splits = _pick_splits(num_m_blocks * num_kv_heads, kv_len, block_n, sms)
    elif not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"partial_attention: splits must be a positive int, got {splits!r}")
    # A multiple of BLOCK_N, so that no key tile straddles two splits; trailing splits may be empty.
    split_len = triton_cdiv(triton_cdiv(kv_len, splits), block_n) * block_n
    if splits > 1:
        ws_acc = torch.empty(splits, num_q, num_heads, block_d, device=q.device, dtype=torch.float32)
        ws_m = torch.empty(splits, num_q, num_heads, device=q.device, dtype=torch.float32)
        ws_l = torch.empty(splits, num_q, num_heads, device=q.device, dtype=torch.float32)
    else:
        ws_acc = ws_m = ws_l = out  # unused: the kernel stores to out directly
    even_d = block_d == head_dim
    grid = (num_m_blocks, num_kv_heads, splits)
    partial_attention_kernel[grid](
        q, k, v, q_positions, out, ws_acc, ws_m, ws_l,
        num_q, kv_len, head_dim, num_m_blocks, num_heads, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * _LOG2E,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        EVEN_D=even_d, IEEE=(q.dtype == torch.float32),
        # The interpreter's bf16 tl.dot returns garbage (triton 3.9, CPU); emulate it exactly in float32 there.
        DOT_F32=(q.device.type == "cpu" and q.dtype == torch.bfloat16),
        NUM_SPLITS=splits,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        block_r = max(1, 2048 // block_d)  # ~2K float32 accumulators per program
        num_rows = num_q * num_heads
        partial_attention_combine_kernel[(triton_cdiv(num_rows, block_r),)](
            ws_acc, ws_m, ws_l, out,
            num_rows, num_heads, head_dim, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, BLOCK_R=block_r, BLOCK_D=block_d, EVEN_D=even_d,
            num_warps=4,
        )
    return out


def partial_attention(q, k, v, q_positions, *, scale: float | None = None, out=None, check_positions: bool = True,
                      validate: bool = True):
    """Causal attention for a subset of query positions over the full KV.

    Args:
        q: ``[num_q, num_heads, head_dim]`` queries, fp16/bf16/fp32.
        k, v: ``[kv_len, num_kv_heads, head_dim]``, same dtype and device as ``q``; ``num_heads % num_kv_heads == 0``.
        q_positions: int32/int64 ``[num_q]`` absolute positions in ``[0, kv_len)``; query ``i`` attends keys
            ``0..q_positions[i]``. Any order; duplicates allowed.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        out: optional preallocated output like ``q`` (same shape, dtype, device; unit stride on head_dim); written
            in place and returned.
        check_positions: verify the position range (one device sync on CUDA). Pass False only when the caller
            guarantees it; out-of-range positions then read past ``kv_len``.
        validate: check the arguments (shapes, dtypes, devices, scale, ``out``). False skips every check (and
            ``check_positions``), for a caller that already validated tensors of this geometry (the blended-prefill
            executor, once per run).

    Returns:
        ``[num_q, num_heads, head_dim]`` in q's dtype (``out`` when given, else a new contiguous tensor). An empty
        query set returns an empty tensor.

    Raises:
        TypeError / ValueError naming the offending argument. Pure; safe to call once per layer per step.
    """
    if not validate:
        num_q = int(q.shape[0])
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if num_q == 0:
            return q.new_empty(q.shape) if out is None else out
        if kernel_available(q.device):
            return _launch(q, k, v, q_positions, scale, out=out)
        return _reference_into(q, k, v, q_positions, scale, out)
    num_q, _, _, _, scale = _validate(q, k, v, q_positions, scale, check_positions)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or (out.numel() and out.stride(-1) != 1)):
        raise ValueError(f"partial_attention: out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, "
                         f"unit stride on head_dim), got "
                         + (f"{tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}"
                            if isinstance(out, torch.Tensor) else type(out).__name__))
    if num_q == 0:
        return q.new_empty(q.shape) if out is None else out
    if kernel_available(q.device):
        return _launch(q, k, v, q_positions, scale, out=out)
    return _reference_into(q, k, v, q_positions, scale, out)


def _reference_into(q, k, v, q_positions, scale: float, out):
    result = partial_attention_reference(q, k, v, q_positions, scale=scale)
    if out is None:
        return result
    out.copy_(result)
    return out
