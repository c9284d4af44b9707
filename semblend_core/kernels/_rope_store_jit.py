"""``@triton.jit`` kernel: RoPE on fresh queries and keys + scatter of K/V into a layer's cache, one launch.

Only :mod:`semblend_core.rope_store` calls this (it validates, picks the head blocks and the grid). Whether the kernel
is compiled or interpreted is decided when this module is imported (``TRITON_INTERPRET=1`` must be set before).

Layout: ``q [n, num_q_heads, head_dim]``, ``k``/``v`` ``[n, num_kv_heads, head_dim]``, ``cos``/``sin``
``[n, head_dim]`` (Hugging Face rotary output, halves duplicated: only the first half is read),
``pos [n]`` int32/int64 cache rows, ``k_cache``/``v_cache`` ``[kv_len, num_kv_heads, head_dim]``, ``q_out`` like
``q``. Every tensor has a unit stride on ``head_dim``; all other strides are arguments.

One program per token (1-D grid of ``n``): it loads the token's cos/sin half-rows once, then walks its query heads
and KV heads in blocks of ``BLOCK_HQ`` / ``BLOCK_HKV`` heads (static loops, so registers stay bounded for 64-head
models). Rotation is NeoX / Hugging Face ``rotate_half`` on the pairs ``(i, i + head_dim/2)``, in float32, rounded
once on store. Each head block loads both halves before storing them, so ``q_out`` may be ``q`` itself (in place).
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(y, dst_ty: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``y`` rounded to nearest-even in ``dst_ty``. The interpreter (triton 3.9) truncates fp32 -> bf16
    casts, so there the rounding is done by hand on the bits (finite values; exact, and a no-op cast follows)."""
    if INTERPRET and dst_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dst_ty)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_src_h, stride_dst_h, cos, sin, i, half_ok,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    """Rotate ``NUM_HEADS`` rows of one token (``src_ptr``/``dst_ptr`` point at head 0, channel 0)."""
    for h0 in tl.static_range(0, NUM_HEADS, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < NUM_HEADS)[:, None] & half_ok[None, :]
        src = src_ptr + h[:, None] * stride_src_h + i[None, :]
        dst = dst_ptr + h[:, None] * stride_dst_h + i[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(dst, _round_to(y1, dst_ptr.dtype.element_ty, INTERPRET), mask=m)
        tl.store(dst + HALF, _round_to(y2, dst_ptr.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def rope_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cos_n, stride_sin_n,
    stride_kcn, stride_kch, stride_vcn, stride_vch, stride_qon, stride_qoh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    HALF_PAD: tl.constexpr,  # next_pow2(HALF)
    BLOCK_HQ: tl.constexpr,  # query heads per block, a power of two
    BLOCK_HKV: tl.constexpr,  # KV heads per block, a power of two
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1 (bf16 rounding by hand)
):
    tok = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    half_ok = i < HALF
    cos = tl.load(cos_ptr + tok * stride_cos_n + i, mask=half_ok, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * stride_sin_n + i, mask=half_ok, other=0.0).to(tl.float32)
    row = tl.load(pos_ptr + tok).to(tl.int64)

    _rotate_heads(q_ptr + tok * stride_qn, q_out_ptr + tok * stride_qon, stride_qh, stride_qoh, cos, sin, i, half_ok,
                  NUM_Q_HEADS, HALF, BLOCK_HQ, INTERPRET)
    _rotate_heads(k_ptr + tok * stride_kn, k_cache_ptr + row * stride_kcn, stride_kh, stride_kch, cos, sin, i, half_ok,
                  NUM_KV_HEADS, HALF, BLOCK_HKV, INTERPRET)

    v_src = v_ptr + tok * stride_vn
    v_dst = v_cache_ptr + row * stride_vcn
    for h0 in tl.static_range(0, NUM_KV_HEADS, BLOCK_HKV):
        h = h0 + tl.arange(0, BLOCK_HKV)
        m = (h < NUM_KV_HEADS)[:, None] & half_ok[None, :]
        src = v_src + h[:, None] * stride_vh + i[None, :]
        dst = v_dst + h[:, None] * stride_vch + i[None, :]
        lo = tl.load(src, mask=m, other=0.0).to(tl.float32)  # exact; a same-dtype store rounds nothing
        hi = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(dst, _round_to(lo, v_cache_ptr.dtype.element_ty, INTERPRET), mask=m)
        tl.store(dst + HALF, _round_to(hi, v_cache_ptr.dtype.element_ty, INTERPRET), mask=m)
