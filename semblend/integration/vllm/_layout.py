"""Where vLLM's attention backend keeps each K and V element inside a layer's paged cache, read from the backend.

A layer's cache is one tensor per layer (``kv_caches[name]``), but how K and V sit inside it is the attention
backend's business and is not visible from the tensor: the same logical ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` tensor is split by content halves on the GPU backends, while vLLM's CPU backend stores, per block
and head, K transposed (``[head_size, block_size]``) in the first half of the rows and V token-first
(``[block_size, head_size]``) in the second, and its AMX path packs pairs of channels. Guessing that from the
platform produced garbage on shifted loads, so nothing here guesses:

:func:`probe_block_layout` asks the backend itself. It calls the layer's own cache-write op
(``impl.do_kv_cache_update``, the op vLLM runs in every forward) on a scratch tensor shaped like the layer's cache
but two kernel blocks long, with K and V values that encode each element's ``(token, head, channel)`` in base-16
digits (exact in float32, float16 and bfloat16), and reads back where every element landed. The result, a
:class:`BlockLayout`, is the element offset of every ``(token in block, head, channel)`` of K and of V inside a
kernel block, plus the offset between consecutive kernel blocks, verified to be the same for both blocks and a
bijection onto disjoint K and V positions. Anything else (fp8 caches, a backend without the op, a write pattern
that is not block-periodic) raises :class:`LayoutProbeError`: the connector then loads nothing.

:meth:`BlockLayout.strided` says whether the layout is an ordinary strided one with contiguous channels and the same
geometry for K and V (the GPU backends): then K and V are plain strided views and the fused Triton kernel addresses
them in place. Otherwise (the CPU backend) loads and captures go through :meth:`BlockLayout.element_index`, an
index tensor into the layer's storage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from semblend_core.errors import SemBlendError

_BASE = 16  # digits 0..15 (and 16..31 for V) are exact in every float dtype the probe accepts
PROBE_DTYPES = ("float32", "float16", "bfloat16")


class LayoutProbeError(SemBlendError, ValueError):
    """The backend's KV layout could not be read (the message says why); the connector declines every load."""


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Element offsets of K and V inside one layer's cache storage (elements, not bytes).

    * ``block_size``: tokens per kernel block (vLLM's manager block may hold several kernel blocks).
    * ``k_offsets`` / ``v_offsets``: int64 ``[block_size, num_kv_heads, head_size]``: offset of ``(token in block,
      head, channel)`` of kernel block 0, relative to the tensor's first element.
    * ``stride_block``: offset between consecutive kernel blocks.
    * ``source``: how it was read (``probe:<backend impl class>`` or ``declared:<what>``), for logs.

    Element ``(slot, head, channel)`` of K lives at ``(slot // block_size) * stride_block + k_offsets[slot %
    block_size, head, channel]``.
    """

    block_size: int
    num_kv_heads: int
    head_size: int
    stride_block: int
    k_offsets: np.ndarray
    v_offsets: np.ndarray
    source: str

    def strided(self) -> tuple[tuple[int, int, int], int, int] | None:
        """``((stride_token, stride_head, stride_channel), k_base, v_base)`` when both K and V are ordinary strided
        arrays with the same strides and contiguous channels (what the fused kernel can address); else None."""
        out = []
        for off in (self.k_offsets, self.v_offsets):
            base = int(off[0, 0, 0])
            st = int(off[1, 0, 0] - base) if self.block_size > 1 else 0
            sh = int(off[0, 1, 0] - base) if self.num_kv_heads > 1 else 0
            sc = int(off[0, 0, 1] - base) if self.head_size > 1 else 1
            t, h, c = np.meshgrid(np.arange(self.block_size), np.arange(self.num_kv_heads), np.arange(self.head_size),
                                  indexing="ij")
            if not np.array_equal(off, base + t * st + h * sh + c * sc):
                return None
            out.append(((st, sh, sc), base))
        (k_strides, k_base), (v_strides, v_base) = out
        if k_strides != v_strides or k_strides[2] != 1:
            return None
        return k_strides, k_base, v_base

    def element_index(self, slots: Any, which: str) -> Any:
        """int64 tensor ``[len(slots), num_kv_heads, head_size]`` of storage offsets of K (``which="k"``) or V of
        the given token slots (a 1-D int64 tensor, on the cache's device)."""
        import torch

        table = self._table(which, slots.device)
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        return blocks.view(-1, 1, 1) * self.stride_block + table[slots % self.block_size]

    def _table(self, which: str, device: Any) -> Any:
        import torch

        cache = self.__dict__.setdefault("_tables", {})
        key = (which, str(device))
        if key not in cache:
            off = self.k_offsets if which == "k" else self.v_offsets
            cache[key] = torch.from_numpy(np.ascontiguousarray(off)).to(device)
        return cache[key]


def _flat(t: Any) -> Any:
    """The layer tensor's storage as a 1-D view from its first element (the tensor must be dense in memory)."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if span != t.numel():
        raise LayoutProbeError(f"cache tensor {tuple(t.shape)} / strides {t.stride()} is not dense in memory")
    return t.as_strided((t.numel(),), (1,))


def layer_storage(t: Any) -> Any:
    """Public form of :func:`_flat`: the 1-D view that :meth:`BlockLayout.element_index` offsets index."""
    return _flat(t)


def _scratch_like(t: Any, block_axis: int, num_blocks: int) -> Any:
    """A tensor like ``t`` (same dtype, device, axis order in memory) with ``num_blocks`` along ``block_axis``."""
    import torch

    shape = list(t.shape)
    shape[block_axis] = num_blocks
    order = sorted(range(t.dim()), key=lambda i: (t.stride()[i], -i), reverse=True)  # outermost first
    phys = torch.empty([shape[i] for i in order], dtype=t.dtype, device=t.device)
    inverse = [order.index(i) for i in range(t.dim())]
    return phys.permute(*inverse)


def probe_block_layout(layer_cache: Any, write: Callable[[Any, Any, Any, Any], None], *, num_kv_heads: int,
                       head_size: int, kernel_block_size: int, block_axis: int, source: str) -> BlockLayout:
    """Read the K/V layout of ``layer_cache`` by letting the backend's own writer fill a two-block scratch copy.

    ``write(key, value, scratch, slot_mapping)``: the backend's cache update, ``key``/``value`` ``[num_tokens,
    num_kv_heads, head_size]`` in the cache dtype, ``slot_mapping`` int64 ``[num_tokens]``. ``block_axis``: the
    axis of ``layer_cache`` that counts kernel blocks. Raises :class:`LayoutProbeError`. Costs a few writes of two
    blocks (start-up only).
    """
    import torch

    dtype = str(layer_cache.dtype).removeprefix("torch.")
    if dtype not in PROBE_DTYPES:
        raise LayoutProbeError(f"cache dtype {dtype} cannot be probed exactly (allowed: {', '.join(PROBE_DTYPES)})")
    bs, nh, hd = int(kernel_block_size), int(num_kv_heads), int(head_size)
    n_tok = 2 * bs
    n_el = n_tok * nh * hd
    digits = max(1, math.ceil(math.log(n_el, _BASE)))
    scratch = _scratch_like(layer_cache, block_axis, 2)
    flat = _flat(scratch)
    device = layer_cache.device
    code = torch.arange(n_el, device=device, dtype=torch.int64).view(n_tok, nh, hd)
    slots = torch.arange(n_tok, device=device, dtype=torch.int64)
    k_code = torch.zeros(flat.numel(), dtype=torch.int64, device=device)
    v_code = torch.zeros_like(k_code)
    k_mask = v_mask = None
    for d in range(digits):
        digit = (code // (_BASE ** d)) % _BASE
        flat.fill_(-1.0)
        write(digit.to(layer_cache.dtype), (digit + _BASE).to(layer_cache.dtype), scratch, slots)
        got = flat.to(torch.float32)
        is_k = (got >= 0) & (got < _BASE)
        is_v = (got >= _BASE) & (got < 2 * _BASE)
        if k_mask is None:
            k_mask, v_mask = is_k, is_v
        elif not (torch.equal(k_mask, is_k) and torch.equal(v_mask, is_v)):
            raise LayoutProbeError("the backend wrote K/V to different places on different probes")
        k_code += got.where(is_k, torch.zeros_like(got)).round().to(torch.int64) * (_BASE ** d)
        v_code += (got - _BASE).where(is_v, torch.zeros_like(got)).round().to(torch.int64) * (_BASE ** d)
    assert k_mask is not None and v_mask is not None
    k_pos, v_pos = k_mask.nonzero().flatten(), v_mask.nonzero().flatten()
    if k_pos.numel() != n_el or v_pos.numel() != n_el:
        raise LayoutProbeError(f"the backend wrote {k_pos.numel()} K and {v_pos.numel()} V elements for {n_el} each")
    k_off = torch.full((n_el,), -1, dtype=torch.int64, device=device)
    v_off = torch.full((n_el,), -1, dtype=torch.int64, device=device)
    k_off[k_code[k_pos]] = k_pos
    v_off[v_code[v_pos]] = v_pos
    if bool((k_off < 0).any()) or bool((v_off < 0).any()):
        raise LayoutProbeError("the backend's write is not one element per (token, head, channel)")
    k_off, v_off = k_off.view(2, bs, nh, hd).cpu(), v_off.view(2, bs, nh, hd).cpu()
    # Block periodicity: block 1 is block 0 moved by one block stride, for K and V alike.
    stride_scratch = scratch.stride()[block_axis]
    for off in (k_off, v_off):
        if not torch.equal(off[1] - off[0], torch.full_like(off[0], stride_scratch)):
            raise LayoutProbeError("the backend's write pattern is not one kernel block per block index")
    # Translate scratch offsets into offsets of the real tensor: unravel with the scratch strides, re-ravel with the
    # real ones (they differ only where the block count enters a stride).
    k0 = _restride(k_off[0].numpy(), scratch, layer_cache)
    v0 = _restride(v_off[0].numpy(), scratch, layer_cache)
    return BlockLayout(bs, nh, hd, int(layer_cache.stride()[block_axis]), k0, v0, source)


def _restride(offsets: np.ndarray, scratch: Any, real: Any) -> np.ndarray:
    order = sorted(range(scratch.dim()), key=lambda i: (scratch.stride()[i], -i), reverse=True)
    rest = offsets.astype(np.int64).copy()
    out = np.zeros_like(rest)
    for axis in order:  # outermost first: the mixed-radix digits of the offset
        idx, rest = np.divmod(rest, scratch.stride()[axis]) if scratch.stride()[axis] else (0 * rest, rest)
        out += idx * int(real.stride()[axis])
    return out


def block_axis_of(layer_cache: Any, num_blocks: int) -> int:
    """The axis of a layer cache that counts kernel blocks: a size that is a multiple of ``num_blocks`` (a manager
    block may hold several kernel blocks) and, among those, the largest stride (pages are outermost in every paged
    layout; this also separates a block count that happens to equal the block size). The probe then verifies it."""
    cands = [i for i, n in enumerate(layer_cache.shape) if num_blocks > 0 and n >= num_blocks and n % num_blocks == 0]
    if not cands:
        raise LayoutProbeError(f"no axis of cache shape {tuple(layer_cache.shape)} counts {num_blocks} blocks")
    return max(cands, key=lambda i: layer_cache.stride()[i])
