"""``@triton.jit`` kernel for partial (sparse-query) causal attention. Entry point: ``semblend_core.partial_attention``.

Layout: ``q [num_q, num_heads, head_dim]``, ``k``/``v`` ``[kv_len, num_kv_heads, head_dim]``, any strides (the last
dimension contiguous is fastest); ``pos [num_q]`` int32/int64 absolute positions; ``out`` like ``q``.

One program handles ``BLOCK_M`` *rows* of one KV head, where row ``r`` is query ``r // GROUP`` and query head
``kv_head * GROUP + r % GROUP``: the ``GROUP = num_heads // num_kv_heads`` query heads that share a KV head are
packed into the row dimension, so each K/V tile is read once for all of them (GQA). Online softmax (flash-attention
style) in float32 with ``exp2``. ``DOT_F32`` (interpreter only: its bf16 ``tl.dot`` is wrong on CPU) upcasts
the dot operands after rounding them exactly as the tensor-core path does. Row ``r`` attends keys ``0 .. pos[r // GROUP]``. KV blocks past the block's
largest position are never loaded; blocks before its smallest position need no mask (the unmasked first loop).

Split KV ("flash-decoding"): the grid's third axis cuts the key range into ``NUM_SPLITS`` pieces of ``split_len``
keys (a multiple of ``BLOCK_N``), so that a few row blocks over a long KV still fill every SM. With
``NUM_SPLITS == 1`` the kernel normalizes and stores to ``out`` directly. Otherwise each program stores its partial
softmax state -- unnormalized float32 ``acc``, running max ``m`` (log2 units) and sum ``l`` -- to float32 workspaces
``[NUM_SPLITS, num_q, num_heads(, BLOCK_D)]``, and :func:`partial_attention_combine_kernel` merges the splits into
``out``. A split that holds no key visible to a row stores ``m = -inf, l = 0, acc = 0`` for it; split 0 always
holds key 0, so every row has at least one non-empty split.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len, head_dim,
                  stride_kn, stride_vn, qk_scale,
                  MASKED: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                  MAY_BE_EMPTY: tl.constexpr):
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
    if MAY_BE_EMPTY:
        # Split KV: a row may have seen no visible key yet (its position lies below this split's keys), so m_new
        # is -inf and exp2(-inf - -inf) would be NaN. Subtracting 0 instead keeps alpha = p = 0: l, acc stay 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new  # one split: the first block holds key 0, visible to every row
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
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
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr,
    num_q, kv_len, head_dim, num_m_blocks, num_heads, split_len,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_om, stride_oh,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, NUM_SPLITS: tl.constexpr,
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

    # This program's keys: [start, end). Both loops below are clipped to it; since lo_full <= hi and start and
    # split_len are multiples of BLOCK_N, every unmasked block is whole and no block crosses into the next split.
    if NUM_SPLITS == 1:
        start = 0
        end = hi
    else:
        start = tl.program_id(2) * split_len
        end = tl.minimum(start + split_len, hi)  # end <= start: no visible key here (state stays empty)

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

    for start_n in range(start, tl.minimum(lo_full, end), BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len,
                                      head_dim, stride_kn, stride_vn, qk_scale,
                                      MASKED=False, EVEN_D=EVEN_D, IEEE=IEEE, DOT_F32=DOT_F32, MAY_BE_EMPTY=False)
    for start_n in range(tl.maximum(lo_full, start), end, BLOCK_N):
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, row_pos, kv_len,
                                      head_dim, stride_kn, stride_vn, qk_scale,
                                      MASKED=True, EVEN_D=EVEN_D, IEEE=IEEE, DOT_F32=DOT_F32,
                                      MAY_BE_EMPTY=NUM_SPLITS > 1)

    if NUM_SPLITS == 1:
        # Every row sees key 0 (positions are >= 0), so l_i > 0.
        acc = acc / l_i[:, None]
        o_ptrs = out_ptr + qi[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
        if EVEN_D:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    else:
        # Partial state for the combine kernel, row (split, query, head). acc's columns past head_dim are 0 (q and v
        # loaded as 0 there), so whole BLOCK_D rows are stored: no column mask here or in the combine loads.
        ws_row = (tl.program_id(2) * num_q + qi) * num_heads + head
        tl.store(ws_m_ptr + ws_row, m_i, mask=row_ok)
        tl.store(ws_l_ptr + ws_row, l_i, mask=row_ok)
        acc_ptrs = ws_acc_ptr + ws_row.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=row_ok[:, None])


@triton.jit
def partial_attention_combine_kernel(
    ws_acc_ptr, ws_m_ptr, ws_l_ptr, out_ptr,
    num_rows, num_heads, head_dim, stride_om, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Merge the splits' partial states: ``M = max_s m_s``, ``w_s = exp2(m_s - M)``,
    ``out = sum_s w_s acc_s / sum_s w_s l_s``. One program per ``BLOCK_R`` rows ``query * num_heads + head``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    offs_d = tl.arange(0, BLOCK_D)

    m_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m_max = tl.maximum(m_max, tl.load(ws_m_ptr + s * num_rows + rows, mask=row_ok, other=float("-inf")))
    # Split 0 holds key 0, so m_max is finite on real rows; padding rows get 0 to keep exp2 away from NaN.
    m_max = tl.where(row_ok, m_max, 0.0)

    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        ws_row = s * num_rows + rows
        w = tl.exp2(tl.load(ws_m_ptr + ws_row, mask=row_ok, other=float("-inf")) - m_max)  # 0 for empty splits
        l_sum += w * tl.load(ws_l_ptr + ws_row, mask=row_ok, other=0.0)
        acc_s = tl.load(ws_acc_ptr + ws_row.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * acc_s
    acc = acc / tl.where(row_ok, l_sum, 1.0)[:, None]

    qi = rows // num_heads
    head = rows % num_heads
    o_ptrs = out_ptr + qi[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
