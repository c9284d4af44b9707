"""``@triton.jit`` kernel for partial (sparse-query) causal attention. Entry point: ``semblend_core.partial_attention``.

Layout: ``q [num_q, num_heads, head_dim]``, ``k``/``v`` ``[kv_len, num_kv_heads, head_dim]``, any strides (the last
dimension contiguous is fastest); ``pos [num_q]`` int32/int64 absolute positions; ``out`` like ``q``.

One program handles ``BLOCK_M`` *rows* of one KV head, where row ``r`` is query ``r // GROUP`` and query head
``kv_head * GROUP + r % GROUP``: the ``GROUP = num_heads // num_kv_heads`` query heads that share a KV head are
packed into the row dimension, so each K/V tile is read once for all of them (GQA). Online softmax (flash-attention
style) in float32 with ``exp2``. ``DOT_F32`` (interpreter only: its bf16 ``tl.dot`` is wrong on CPU) upcasts
the dot operands after rounding them exactly as the tensor-core path does. Row ``r`` attends keys ``0 .. pos[r // GROUP]``. KV blocks past the block's
largest position are never loaded; blocks before its smallest position need no mask (the unmasked first loop).
"""

import triton
import triton.language as tl


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len, head_dim,
                  stride_kn, stride_vn, qk_scale,
                  MASKED: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    n = start_n + offs_n
    k_ptrs = k_base + n[None, :] * stride_kn + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
    v_ptrs = v_base + n[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASKED:
        n_ok = n < kv_len
        if EVEN_D:
            k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < head_dim
            k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < head_dim
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    elif IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    qk = qk * qk_scale
    if MASKED:
        # Causal limit per row; n < kv_len follows from n <= pos < kv_len.
        qk = tl.where(n[None, :] <= row_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_F32:
        # Round p to v's dtype first, as the tensor-core path does, then multiply exactly in float32.
        acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    elif IEEE:
        acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,
    num_q, kv_len, head_dim, num_m_blocks,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_om, stride_oh,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Heaviest row blocks (largest positions, when sorted) first: better tail balance under causal masking.
    pid_m = num_m_blocks - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_q * GROUP
    qi = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    row_pos = tl.load(pos_ptr + qi, mask=row_ok, other=0).to(tl.int32)
    hi = tl.max(tl.where(row_ok, row_pos, 0), 0) + 1  # keys [0, hi) may be visible to some row
    lo_full = tl.min(tl.where(row_ok, row_pos, 2147483647), 0) + 1  # keys [0, lo_full) visible to every row
    lo_full = (lo_full // BLOCK_N) * BLOCK_N

    q_ptrs = q_ptr + qi[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, lo_full, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len,
                                      head_dim, stride_kn, stride_vn, qk_scale,
                                      MASKED=False, EVEN_D=EVEN_D, IEEE=IEEE, DOT_F32=DOT_F32)
    for start_n in range(lo_full, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len,
                                      head_dim, stride_kn, stride_vn, qk_scale,
                                      MASKED=True, EVEN_D=EVEN_D, IEEE=IEEE, DOT_F32=DOT_F32)

    # Every row sees key 0 (positions are >= 0), so l_i > 0.
    acc = acc / l_i[:, None]
    o_ptrs = out_ptr + qi[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
