"""``@triton.jit`` kernel for fused gather -> RoPE re-rotate K -> scatter, all layers in one launch.

Only :mod:`semblend_core.triton_kernels` calls this (it validates, builds the pointer tables and cos/sin table, and
picks the grid). Whether the kernel is compiled or interpreted is decided when this module is imported
(``TRITON_INTERPRET=1`` must be set before).
"""

import triton
import triton.language as tl


@triton.jit
def rerotate_scatter_kernel(
    src_k_table,  # int64 [num_layers]: data_ptr of each layer's source K tensor
    src_v_table,
    dst_k_table,
    dst_v_table,
    src_slots_ptr,  # int64 [num_tokens]
    dst_slots_ptr,  # int64 [num_tokens]
    cos_ptr,  # fp32 [rows, rotary_dim // 2]; rows = num_tokens (per-token delta) or 1 (one delta)
    sin_ptr,
    num_tokens,
    num_layers,
    cs_token_stride,  # rotary_dim // 2 for per-token deltas, 0 for one shared delta
    src_block_size,
    src_stride_block,
    src_stride_token,
    src_stride_head,
    dst_block_size,
    dst_stride_block,
    dst_stride_token,
    dst_stride_head,
    SRC_DTYPE: tl.constexpr,
    DST_DTYPE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,  # next_pow2(ROTARY_DIM // 2)
    PASS_PAD: tl.constexpr,  # next_pow2(HEAD_DIM - ROTARY_DIM), 1 when nothing passes through
    INTERLEAVED: tl.constexpr,
    ROTATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # 1-D grid, layer fastest: the programs that run together share one token block, so its slot indices and
    # cos/sin rows stay hot in L2 across all layers.
    pid = tl.program_id(0)
    layer = pid % num_layers
    tblock = pid // num_layers

    rows = tl.arange(0, BLOCK_T * HEADS_PAD)
    tok = tblock * BLOCK_T + rows // HEADS_PAD
    head = rows % HEADS_PAD
    tok_ok = tok < num_tokens
    row_ok = tok_ok & (head < NUM_HEADS)

    src_slot = tl.load(src_slots_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    dst_slot = tl.load(dst_slots_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
    src_row = (
        (src_slot // src_block_size) * src_stride_block
        + (src_slot % src_block_size) * src_stride_token
        + head * src_stride_head
    )
    dst_row = (
        (dst_slot // dst_block_size) * dst_stride_block
        + (dst_slot % dst_block_size) * dst_stride_token
        + head * dst_stride_head
    )

    ch = tl.arange(0, DIM_PAD)
    mask = row_ok[:, None] & (ch < HEAD_DIM)[None, :]
    src_off = src_row[:, None] + ch[None, :]
    dst_off = dst_row[:, None] + ch[None, :]

    src_k = tl.load(src_k_table + layer).to(tl.pointer_type(SRC_DTYPE))
    src_v = tl.load(src_v_table + layer).to(tl.pointer_type(SRC_DTYPE))
    dst_k = tl.load(dst_k_table + layer).to(tl.pointer_type(DST_DTYPE))
    dst_v = tl.load(dst_v_table + layer).to(tl.pointer_type(DST_DTYPE))

    # All loads of this program precede its stores; cross-program read-after-write hazards (a cache shifted in
    # place) are the host wrapper's job (it stages through a temporary).
    v = tl.load(src_v + src_off, mask=mask)
    if ROTATE:
        # Every access below is a contiguous run per row, so loads and stores stay vectorised (no gathers).
        i = tl.arange(0, HALF_PAD)
        half_mask = row_ok[:, None] & (i < ROTARY_DIM // 2)[None, :]
        cs_off = tok[:, None] * cs_token_stride + i[None, :]
        cos = tl.load(cos_ptr + cs_off, mask=half_mask, other=1.0)
        sin = tl.load(sin_ptr + cs_off, mask=half_mask, other=0.0)
        if INTERLEAVED:  # GPT-J: pairs (2i, 2i+1); load the rotary channels once and de-interleave in registers
            rc = tl.arange(0, 2 * HALF_PAD)
            rot_mask = row_ok[:, None] & (rc < ROTARY_DIM)[None, :]
            xr = tl.load(src_k + src_row[:, None] + rc[None, :], mask=rot_mask).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(xr, (BLOCK_T * HEADS_PAD, HALF_PAD, 2)))
            y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
            y = tl.reshape(y, (BLOCK_T * HEADS_PAD, 2 * HALF_PAD))
            tl.store(dst_k + dst_row[:, None] + rc[None, :], y.to(DST_DTYPE), mask=rot_mask)
        else:  # NeoX rotate-half: pairs (i, i + rotary_dim/2)
            lo_src = src_k + src_row[:, None] + i[None, :]
            lo_dst = dst_k + dst_row[:, None] + i[None, :]
            x1 = tl.load(lo_src, mask=half_mask).to(tl.float32)
            x2 = tl.load(lo_src + ROTARY_DIM // 2, mask=half_mask).to(tl.float32)
            tl.store(lo_dst, (x1 * cos - x2 * sin).to(DST_DTYPE), mask=half_mask)
            tl.store(lo_dst + ROTARY_DIM // 2, (x2 * cos + x1 * sin).to(DST_DTYPE), mask=half_mask)
        if ROTARY_DIM < HEAD_DIM:  # partial rotary: the remaining channels pass through
            pc = ROTARY_DIM + tl.arange(0, PASS_PAD)
            pass_mask = row_ok[:, None] & (pc < HEAD_DIM)[None, :]
            xp = tl.load(src_k + src_row[:, None] + pc[None, :], mask=pass_mask)
            tl.store(dst_k + dst_row[:, None] + pc[None, :], xp.to(DST_DTYPE), mask=pass_mask)
    else:
        k = tl.load(src_k + src_off, mask=mask)
        tl.store(dst_k + dst_off, k.to(DST_DTYPE), mask=mask)
    tl.store(dst_v + dst_off, v.to(DST_DTYPE), mask=mask)
