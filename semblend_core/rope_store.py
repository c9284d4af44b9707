"""Fused RoPE + KV-cache store for the freshly computed tokens of one layer.

Lifecycle inside one layer of a blended prefill (once per layer, after the Q/K/V projections):

1. the adapter projects the ``n`` fresh tokens: ``q [n, num_q_heads, head_dim]``, ``k``/``v``
   ``[n, num_kv_heads, head_dim]`` (views of the projection outputs are fine);
2. it calls :func:`rope_store` with the Hugging Face rotary ``cos``/``sin`` rows of those tokens and their cache
   rows ``positions``; one kernel launch rotates ``q`` and ``k`` and writes ``k_cache[positions] = rotate(k)``,
   ``v_cache[positions] = v``;
3. the returned rotated queries go to attention (:mod:`semblend_core.partial_attention`) over the updated cache.

Rotation is Hugging Face's non-interleaved ``rotate_half`` (``apply_rotary_pos_emb`` of Llama, Qwen2, Mistral...):
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``, computed in float32 and rounded
once to the destination dtype. ``cos``/``sin`` must have duplicated halves (``cos[:, :D/2] == cos[:, D/2:]``), as
Hugging Face's rotary embeddings produce; the kernel reads only the first half.

:func:`rope_store` is the only entry point. It validates inputs cheaply (no device sync), runs the Triton kernel
(``semblend_core.kernels._rope_store_jit``) on CUDA tensors -- or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before triton was imported -- and otherwise :func:`rope_store_reference`, the torch twin. Needs the ``gpu`` extra
(torch; triton for the kernel).
"""

from __future__ import annotations

import functools

from semblend_core._compat import has_module, require, triton_kernel_runs_on

torch = require("torch", extra="gpu")

__all__ = ["kernel_available", "rope_store", "rope_store_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COS_DTYPES = _DTYPES + (torch.float64,)
_POS_DTYPES = (torch.int32, torch.int64)
_MAX_HEAD_DIM = 256


def _validate(q, k, v, cos, sin, positions, k_cache, v_cache, q_out, check_positions: bool) -> int:
    """Check types, shapes, dtypes, devices and unit stride on head_dim; return ``n``. No device sync unless
    ``check_positions``."""
    named = (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("positions", positions),
             ("k_cache", k_cache), ("v_cache", v_cache))
    for name, t in named + ((("q_out", q_out),) if q_out is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope_store: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, want in (("q", q, "[n, num_q_heads, head_dim]"), ("k", k, "[n, num_kv_heads, head_dim]"),
                          ("v", v, "[n, num_kv_heads, head_dim]"),
                          ("k_cache", k_cache, "[kv_len, num_kv_heads, head_dim]"),
                          ("v_cache", v_cache, "[kv_len, num_kv_heads, head_dim]")):
        if t.dim() != 3:
            raise ValueError(f"rope_store: {name} must be 3-D {want}, got shape {tuple(t.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2:
            raise ValueError(f"rope_store: {name} must be 2-D [n, head_dim] (pass cos[0] for Hugging Face's "
                             f"[1, n, head_dim]), got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"rope_store: {name}.dtype={t.dtype} not supported; allowed: {_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"rope_store: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"rope_store: k_cache.dtype={k_cache.dtype} != v_cache.dtype={v_cache.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in _COS_DTYPES:
            raise TypeError(f"rope_store: {name}.dtype={t.dtype} not supported; allowed: {_COS_DTYPES}")
    if positions.dtype not in _POS_DTYPES:
        raise TypeError(f"rope_store: positions.dtype={positions.dtype}; allowed: int64, int32")

    n, num_q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"rope_store: k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if k.shape[0] != n or k.shape[2] != head_dim:
        raise ValueError(f"rope_store: k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         "(same n and head_dim)")
    num_kv_heads = k.shape[1]
    if num_q_heads == 0 or num_kv_heads == 0:
        raise ValueError(f"rope_store: zero heads: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if head_dim % 2 or not 2 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"rope_store: head_dim={head_dim} must be even and in [2, {_MAX_HEAD_DIM}]")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (n, head_dim):
            raise ValueError(f"rope_store: {name} must have shape [n={n}, head_dim={head_dim}], got {tuple(t.shape)}")
    if tuple(positions.shape) != (n,):
        raise ValueError(f"rope_store: positions must have shape [n={n}], got {tuple(positions.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"rope_store: k_cache shape {tuple(k_cache.shape)} != v_cache shape {tuple(v_cache.shape)}")
    if k_cache.shape[1:] != k.shape[1:]:
        raise ValueError(f"rope_store: k_cache shape {tuple(k_cache.shape)} does not match k {tuple(k.shape)} "
                         "(same num_kv_heads and head_dim)")
    if q_out is not None and (q_out.shape != q.shape or q_out.dtype != q.dtype):
        raise ValueError(f"rope_store: q_out must match q (shape {tuple(q.shape)}, {q.dtype}), got "
                         f"{tuple(q_out.shape)}, {q_out.dtype}")

    device = q.device
    for name, t in named + ((("q_out", q_out),) if q_out is not None else ()):
        if t.device != device:
            raise ValueError(f"rope_store: all tensors must share one device; q is on {device}, {name} on {t.device}")
        if t.dim() > 1 and t.stride(-1) != 1 and t.numel():
            raise ValueError(f"rope_store: {name} needs a unit stride on head_dim, got strides {t.stride()}")

    if check_positions and n:
        # One device sync on CUDA; hot paths leave this off and guarantee the range themselves.
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= k_cache.shape[0]:
            raise ValueError(f"rope_store: positions must lie in [0, kv_len={k_cache.shape[0]}), got [{lo}, {hi}]")
    return n


def _rotate(x, cos, sin):
    """Hugging Face ``x * cos + rotate_half(x) * sin`` in float32; ``x [n, heads, D]``, ``cos``/``sin [n, D]``."""
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.float()[:, None, :] + rotated * sin.float()[:, None, :]


def rope_store_reference(q, k, v, cos, sin, positions, k_cache, v_cache, *, q_out=None,
                         check_positions: bool = False):
    """Torch twin of :func:`rope_store` (same arguments, same effects, same result).

    Uses the full ``cos``/``sin`` rows (Hugging Face's formula literally); with duplicated halves this equals the
    kernel, which reads only the first half. Meant for CPU and tests; several small ops, so not for hot CUDA paths.
    """
    n = _validate(q, k, v, cos, sin, positions, k_cache, v_cache, q_out, check_positions)
    if n == 0:
        return q.new_empty(q.shape) if q_out is None else q_out
    q_rot = _rotate(q, cos, sin).to(q.dtype)  # before the stores: q_out may be q
    rows = positions.to(torch.int64)
    k_cache[rows] = _rotate(k, cos, sin).to(k_cache.dtype)
    v_cache[rows] = v.to(v_cache.dtype)
    if q_out is None:
        return q_rot
    q_out.copy_(q_rot)
    return q_out


def kernel_available(device) -> bool:
    """True when :func:`rope_store` would run the Triton kernel for tensors on ``device``."""
    return triton_kernel_runs_on(torch.device(device).type)


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


@functools.cache
def _meta(num_q_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """Compile-time parameters: head blocks capped at 2048 float32 elements per [heads, head_dim/2] tile, so a
    64-head model or head_dim 256 stays within registers at 4 warps; small models take all heads in one block."""
    half_pad = _next_pow2(head_dim // 2)
    cap = max(1, 2048 // half_pad)
    return {"HALF": head_dim // 2, "HALF_PAD": half_pad,
            "BLOCK_HQ": min(_next_pow2(num_q_heads), cap), "BLOCK_HKV": min(_next_pow2(num_kv_heads), cap)}


_KERNEL = None


def _launch(q, k, v, cos, sin, positions, k_cache, v_cache, q_out):
    """One kernel launch; inputs already validated, ``n > 0``."""
    global _KERNEL
    if _KERNEL is None:
        from semblend_core.kernels._rope_store_jit import rope_store_kernel

        _KERNEL = rope_store_kernel
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    positions = positions.contiguous()
    _KERNEL[(n,)](
        q, k, v, cos, sin, positions, k_cache, v_cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), q_out.stride(0), q_out.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, **_meta(num_q_heads, num_kv_heads, head_dim),
        INTERPRET=q.device.type == "cpu", num_warps=4,
    )
    return q_out


def rope_store(q, k, v, cos, sin, positions, k_cache, v_cache, *, q_out=None, check_positions: bool = False,
               validate: bool = True):
    """Rotate ``q``/``k`` with RoPE, write ``k_cache[positions] = rotate(k)``, ``v_cache[positions] = v``.

    Args:
        q: ``[n, num_q_heads, head_dim]`` fp16/bf16/fp32, any strides with a unit stride on head_dim (a view of a
            projection output is fine).
        k, v: ``[n, num_kv_heads, head_dim]``, same dtype as ``q``, any strides (unit on head_dim).
            ``num_q_heads % num_kv_heads`` need not be 0.
        cos, sin: ``[n, head_dim]`` Hugging Face rotary rows of these tokens (halves duplicated; only the first half
            is read by the kernel), fp16/bf16/fp32/fp64, unit stride on head_dim. Pass ``cos[0]`` for the
            ``[1, n, head_dim]`` that ``rotary_emb`` returns.
        positions: int64 (or int32) ``[n]`` cache rows to write. **Must lie in** ``[0, kv_len)`` **and be distinct**:
            that is the caller's responsibility (checking costs a device sync); out-of-range rows write out of
            bounds on CUDA, and with duplicates one unspecified write wins.
        k_cache, v_cache: ``[kv_len, num_kv_heads, head_dim]`` one layer's cache, same dtype (fp16/bf16/fp32, may
            differ from ``q``'s), any strides (unit on head_dim), e.g. ``buf.transpose(0, 1)`` of a
            ``[num_kv_heads, kv_len, head_dim]`` buffer. Written in place; must not overlap ``q``, ``k`` or ``v``.
        q_out: optional output like ``q`` (same shape and dtype, unit stride on head_dim); may be ``q`` itself.
        check_positions: verify ``0 <= positions < kv_len`` (one device sync on CUDA); for tests and debugging.
        validate: check the arguments (above). False skips every check, for a caller that already validated
            tensors of these shapes, dtypes and devices (the blended-prefill executor checks its first call of a
            run and repeats the same geometry per layer: ~30 us of Python per call saved).

    Returns:
        rotated ``q`` ``[n, num_q_heads, head_dim]`` in q's dtype: ``q_out`` if given, else a new contiguous tensor.

    Raises:
        TypeError / ValueError naming the offending argument. Safe to call once per layer per step; one launch.
    """
    n = _validate(q, k, v, cos, sin, positions, k_cache, v_cache, q_out, check_positions) if validate \
        else int(q.shape[0])
    if not ((q.is_cuda and has_module("triton")) or kernel_available(q.device)):  # CUDA test first: hot path
        return rope_store_reference(q, k, v, cos, sin, positions, k_cache, v_cache, q_out=q_out)
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n == 0:
        return q_out
    return _launch(q, k, v, cos, sin, positions, k_cache, v_cache, q_out)
