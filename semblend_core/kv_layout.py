"""KV-cache layout descriptors: how an engine stores one layer's keys and values.

Every layout addresses the same logical thing: token **slot** ``s``, KV head ``h``, channel ``c`` of the K or V of
one layer. Slots are token-granular:

* paged layouts (vLLM): ``slot = block_id * block_size + offset``;
* the HF contiguous cache ``[batch, num_kv_heads, seq, head_dim]``: ``slot = batch_row * seq + position``
  (the batch axis plays the block axis, ``seq`` the block size);
* SGLang's token-to-KV pool: the pool index itself.

A :class:`KvLayout` is a capability-style description (where the K/V axis is, whether there is a block axis,
whether heads come before tokens); it never names an engine in the math. A :class:`KvCacheView` binds a layout to
the per-layer tensors an engine holds (a sequence of per-layer tensors, which is how engines keep them) and checks
that they agree; :meth:`KvCacheView.geometry` turns them into a :class:`SlotGeometry`, the strides a kernel needs::

    element offset of (slot, head, channel) in one layer's K (or V) tensor
        = (slot // block_size) * stride_block + (slot % block_size) * stride_token + head * stride_head + channel

Nothing here imports torch: tensors are only asked for ``shape``, ``stride()``, ``dtype``, ``device``,
``data_ptr()`` and ``select()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from semblend_core.errors import SemBlendError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class KvLayoutError(SemBlendError, ValueError):
    """Cache tensors do not match their layout (rank, shape, strides, dtype, device); the message names the argument."""


@dataclass(frozen=True)
class KvLayout:
    """How one layer's K and V are laid out.

    * ``kv_axis``: position of the size-2 K/V axis in a layer's single tensor (0 for vLLM flash-attn
      ``[2, num_blocks, ...]``, 1 for FlashInfer ``[num_blocks, 2, ...]``); ``None`` when K and V are separate
      tensors (SGLang, HF).
    * ``has_block_axis``: the per-K (per-V) tensor starts with a block (or batch) axis; without one it is a flat
      slot pool (block size 1).
    * ``heads_before_tokens``: HND (``[.., num_kv_heads, block_size, head_dim]``) instead of NHD
      (``[.., block_size, num_kv_heads, head_dim]``).

    ``head_dim`` is always the last axis and must be contiguous (stride 1).
    """

    name: str
    kv_axis: int | None
    has_block_axis: bool
    heads_before_tokens: bool

    @property
    def kv_stacked(self) -> bool:
        """One tensor per layer holds both K and V."""
        return self.kv_axis is not None

    @property
    def kv_rank(self) -> int:
        """Rank of the K (or V) tensor of one layer, the K/V axis removed."""
        return 4 if self.has_block_axis else 3

    @property
    def layer_rank(self) -> int:
        """Rank of one layer's tensor as the engine holds it (K/V axis included when stacked)."""
        return self.kv_rank + (1 if self.kv_stacked else 0)

    def shape_doc(self) -> str:
        """Human-readable per-layer shape, for error messages."""
        if self.has_block_axis:
            dims = ["num_blocks"] + (
                ["num_kv_heads", "block_size"] if self.heads_before_tokens else ["block_size", "num_kv_heads"]
            )
        else:
            dims = ["num_kv_heads", "num_slots"] if self.heads_before_tokens else ["num_slots", "num_kv_heads"]
        dims.append("head_dim")
        if self.kv_axis is not None:
            dims.insert(self.kv_axis, "2")
        shape = "[" + ", ".join(dims) + "]"
        return shape if self.kv_stacked else f"K and V each {shape}"


# vLLM flash-attn backend: one tensor per layer, [2, num_blocks, block_size, num_kv_heads, head_dim].
VLLM_FLASH_NHD = KvLayout("vllm_flash_nhd", kv_axis=0, has_block_axis=True, heads_before_tokens=False)
# Its HND variant: [2, num_blocks, num_kv_heads, block_size, head_dim].
VLLM_FLASH_HND = KvLayout("vllm_flash_hnd", kv_axis=0, has_block_axis=True, heads_before_tokens=True)
# FlashInfer's stacking: [num_blocks, 2, block_size, num_kv_heads, head_dim].
FLASHINFER_NHD = KvLayout("flashinfer_nhd", kv_axis=1, has_block_axis=True, heads_before_tokens=False)
# SGLang token-to-KV pool: separate K and V buffers per layer, each [num_slots, num_kv_heads, head_dim].
SGLANG_TOKEN_POOL = KvLayout("sglang_token_pool", kv_axis=None, has_block_axis=False, heads_before_tokens=False)
# HF contiguous cache: separate K and V per layer, each [batch, num_kv_heads, seq, head_dim].
HF_CONTIGUOUS = KvLayout("hf_contiguous", kv_axis=None, has_block_axis=True, heads_before_tokens=True)
# SemBlend's contiguous donor store [num_layers, 2, num_donor_tokens, num_kv_heads, head_dim], seen per layer.
DONOR_CONTIGUOUS = KvLayout("donor_contiguous", kv_axis=0, has_block_axis=False, heads_before_tokens=False)

LAYOUTS: dict[str, KvLayout] = {
    lay.name: lay
    for lay in (VLLM_FLASH_NHD, VLLM_FLASH_HND, FLASHINFER_NHD, SGLANG_TOKEN_POOL, HF_CONTIGUOUS, DONOR_CONTIGUOUS)
}


@dataclass(frozen=True)
class SlotGeometry:
    """Strides (in elements) that map a token slot to its row in one layer's K (or V) tensor.

    The row ``(slot, head)`` starts at ``(slot // block_size) * stride_block + (slot % block_size) * stride_token
    + head * stride_head`` and holds ``head_dim`` contiguous channels. Identical for every layer and for K and V.
    """

    num_slots: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    stride_block: int
    stride_token: int
    stride_head: int

    def row_offset(self, slot: int, head: int) -> int:
        """Element offset of ``(slot, head, channel 0)``; the scalar form of what the kernels compute."""
        return (slot // self.block_size) * self.stride_block + (slot % self.block_size) * self.stride_token + (
            head * self.stride_head
        )


def _slot_geometry(layout: KvLayout, t: Any, what: str) -> SlotGeometry:
    shape, stride = tuple(t.shape), tuple(t.stride())
    if len(shape) != layout.kv_rank:
        raise KvLayoutError(
            f"{what}: expected rank {layout.kv_rank} for layout {layout.name} ({layout.shape_doc()}), got shape {shape}"
        )
    if shape[-1] > 1 and stride[-1] != 1:
        raise KvLayoutError(f"{what}: head_dim axis must be contiguous (stride 1), got strides {stride}")
    if layout.has_block_axis:
        nb = shape[0]
        if layout.heads_before_tokens:
            heads, bs = shape[1], shape[2]
            sb, sh, st = stride[0], stride[1], stride[2]
        else:
            bs, heads = shape[1], shape[2]
            sb, st, sh = stride[0], stride[1], stride[2]
        return SlotGeometry(nb * bs, bs, heads, shape[-1], sb, st, sh)
    if layout.heads_before_tokens:
        heads, n = shape[0], shape[1]
        sh, sb = stride[0], stride[1]
    else:
        n, heads = shape[0], shape[1]
        sb, sh = stride[0], stride[1]
    # A flat pool is a paged layout with block size 1; stride_token is then never multiplied by a non-zero.
    return SlotGeometry(n, 1, heads, shape[-1], sb, 0, sh)


@dataclass(frozen=True)
class ResolvedKv:
    """What the kernels need from a :class:`KvCacheView`, computed once per view (plain ints, no tensors).

    ``k_ptrs[i]`` / ``v_ptrs[i]`` are the base addresses of layer ``i``'s K and V; ``byte_ranges`` the ``[start,
    end)`` address range of every K and V tensor (for overlap detection).
    """

    geometry: SlotGeometry
    dtype: Any
    device: Any
    element_size: int
    k_ptrs: tuple[int, ...]
    v_ptrs: tuple[int, ...]
    byte_ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class KvCacheView:
    """The per-layer tensors of one KV cache, seen through a :class:`KvLayout`.

    ``layers[i]`` is one tensor (``layout.kv_stacked``) or a ``(k, v)`` pair. All layers must share shape, strides,
    dtype and device (engines allocate them alike); :meth:`resolve` checks that. The view holds references only:
    the kernels write into the engine's own tensors. Checks and addresses are computed on first use and kept: build
    a new view if the engine reallocates its tensors (views are cheap).
    """

    layout: KvLayout
    layers: tuple
    _resolved: ResolvedKv | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def from_donor_store(cls, store: torch.Tensor) -> KvCacheView:
        """A contiguous donor store ``[num_layers, 2, num_donor_tokens, num_kv_heads, head_dim]``; slot = token index."""
        if len(store.shape) != 5 or store.shape[1] != 2:
            raise KvLayoutError(
                "store: expected [num_layers, 2, num_donor_tokens, num_kv_heads, head_dim], "
                f"got shape {tuple(store.shape)}"
            )
        return cls(DONOR_CONTIGUOUS, tuple(store.unbind(0)))

    @classmethod
    def from_separate(
        cls, layout: KvLayout, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]
    ) -> KvCacheView:
        """Separate per-layer K and V lists (SGLang ``k_buffer``/``v_buffer``, HF key/value caches)."""
        if layout.kv_stacked:
            raise KvLayoutError(f"layout: {layout.name} stacks K and V in one tensor; pass layers=[tensor, ...]")
        if len(k_layers) != len(v_layers):
            raise KvLayoutError(f"k_layers/v_layers: {len(k_layers)} K layers but {len(v_layers)} V layers")
        return cls(layout, tuple(zip(k_layers, v_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _check_entry(self, layer: int) -> Any:
        entry = self.layers[layer]
        lay = self.layout
        if lay.kv_axis is None:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise KvLayoutError(f"layers[{layer}]: layout {lay.name} needs a (k, v) pair per layer")
            return entry
        if isinstance(entry, (tuple, list)):
            raise KvLayoutError(f"layers[{layer}]: layout {lay.name} needs one tensor per layer")
        if len(entry.shape) != lay.layer_rank:
            raise KvLayoutError(
                f"layers[{layer}]: expected rank {lay.layer_rank} ({lay.shape_doc()}), got shape {tuple(entry.shape)}"
            )
        if entry.shape[lay.kv_axis] != 2:
            raise KvLayoutError(
                f"layers[{layer}]: K/V axis {lay.kv_axis} must have size 2 ({lay.shape_doc()}), "
                f"got shape {tuple(entry.shape)}"
            )
        return entry

    def kv(self, layer: int) -> tuple[Any, Any]:
        """``(k, v)`` tensors of one layer, each of rank ``layout.kv_rank`` (views, no copy)."""
        entry = self._check_entry(layer)
        if self.layout.kv_axis is None:
            return entry[0], entry[1]
        return entry.select(self.layout.kv_axis, 0), entry.select(self.layout.kv_axis, 1)

    def resolve(self, what: str = "cache") -> ResolvedKv:
        """Check every layer against the layout and each other; return (and keep) the :class:`ResolvedKv`.

        Raises :class:`KvLayoutError` naming ``what`` (the argument) and the offending layer. Costs a few tensor
        attribute reads per layer (no views are created), once per view.
        """
        if self._resolved is not None:
            return self._resolved
        if self.num_layers == 0:
            raise KvLayoutError(f"{what}: no layers")
        ax = self.layout.kv_axis
        ref: tuple | None = None
        geom = None
        k_ptrs, v_ptrs = [], []
        for i in range(self.num_layers):
            entry = self._check_entry(i)
            if ax is None:
                parts = [("K", entry[0]), ("V", entry[1])]
            else:
                parts = [("K/V", entry)]
            for role, t in parts:
                label = f"{what}.layers[{i}] {role}"
                shape, stride = tuple(t.shape), tuple(t.stride())
                ptr = t.data_ptr()
                if ax is not None:  # drop the K/V axis; V starts one K/V stride after K
                    kv_stride = stride[ax]
                    shape, stride = shape[:ax] + shape[ax + 1:], stride[:ax] + stride[ax + 1:]
                    k_ptrs.append(ptr)
                    v_ptrs.append(ptr + kv_stride * t.element_size())
                else:
                    (k_ptrs if role == "K" else v_ptrs).append(ptr)
                if ref is None:
                    geom = _slot_geometry(self.layout, _Shaped(shape, stride), label)
                    ref = (shape, stride, t.dtype, t.device, t.element_size())
                    continue
                if shape != ref[0] or stride != ref[1]:
                    raise KvLayoutError(
                        f"{label}: shape {shape} / strides {stride} differ from layer 0 K {ref[0]} / {ref[1]}; "
                        "all layers must be allocated alike"
                    )
                if t.dtype != ref[2]:
                    raise KvLayoutError(f"{label}: dtype {t.dtype} differs from layer 0 K ({ref[2]})")
                if t.device != ref[3]:
                    raise KvLayoutError(f"{label}: device {t.device} differs from layer 0 K ({ref[3]})")
        assert geom is not None and ref is not None
        esize = ref[4]
        numel = 1
        for n in ref[0]:
            numel *= n
        # torch strides are >= 0, so a tensor spans [ptr, ptr + (1 + sum((n - 1) * stride)) * esize).
        span = 0 if numel == 0 else (1 + sum((n - 1) * st for n, st in zip(ref[0], ref[1]))) * esize
        ranges = tuple((p, p + span) for p in k_ptrs + v_ptrs if span)
        resolved = ResolvedKv(geom, ref[2], ref[3], esize, tuple(k_ptrs), tuple(v_ptrs), ranges)
        object.__setattr__(self, "_resolved", resolved)
        return resolved

    def geometry(self, what: str = "cache") -> SlotGeometry:
        """The layers' common :class:`SlotGeometry` (see :meth:`resolve`)."""
        return self.resolve(what).geometry

    @property
    def dtype(self) -> Any:
        return self.resolve().dtype

    @property
    def device(self) -> Any:
        return self.resolve().device

    def byte_ranges(self) -> tuple[tuple[int, int], ...]:
        """``[start, end)`` byte address ranges spanned by every K and V tensor (for overlap detection)."""
        return self.resolve().byte_ranges


@dataclass(frozen=True)
class _Shaped:
    """Shape and strides of a K (or V) tensor with the K/V axis removed, as ``_slot_geometry`` reads them."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def stride(self) -> tuple[int, ...]:
        return self.strides


def views_overlap(a: KvCacheView, b: KvCacheView) -> bool:
    """True if any tensor of ``a`` may share memory with any tensor of ``b`` (conservative: address ranges).

    Same-device caches only; O(n log n) in the number of tensors.
    """
    if a.device != b.device:
        return False
    events = [(s, e, 0) for s, e in a.byte_ranges()] + [(s, e, 1) for s, e in b.byte_ranges()]
    events.sort()
    max_end = [-1, -1]
    for start, end, side in events:
        # Any earlier-starting range of the other side that is still open overlaps this one.
        if start < max_end[1 - side]:
            return True
        max_end[side] = max(max_end[side], end)
    return False
