"""KV materialization kernels: fused gather -> RoPE re-rotate K -> scatter, for all layers in one launch.

Lifecycle (one call per materialized plan)::

    rerotate_scatter(src, dst, src_slots, dst_slots, delta, rope)
        1. validate caches (layout, shape, dtype, device), RoPE spec and indices   -> named ValueErrors
        2. empty plan -> return (no launch)
        3. cos/sin table from ``delta * inv_freq`` in float64, stored as float32
        4. if ``src`` and ``dst`` share memory: gather into a temporary first (read-before-write)
        5. one Triton launch over (token block x layer); on CPU the torch reference twin runs instead

Math: a key cached at position ``p`` moved to ``p + d`` is ``K_{p+d} = R(d) K_p`` (see
:mod:`semblend_core.rope_correction`). Each channel pair (NeoX: ``i, i + rotary_dim/2``; GPT-J: ``2i, 2i+1``) is
rotated by ``d * inv_freq[i]`` in float32 and cast to the destination dtype; channels past ``rotary_dim`` and all of V
are copied unchanged (bit-exact when source and destination dtypes match).

Precision choice: ``d * inv_freq`` reaches 32768 rad at ``|d| = 32K``, where float32 spacing is 0.004 rad, so an
fp32 angle would cost ~2e-3 relative error before any rounding of K. The angle and its cos/sin are therefore computed
in float64 on the cache's device (one row for a shared delta, a ``[num_tokens, rotary_dim/2]`` table for per-token
deltas; no host sync) and only the final cos/sin are rounded to float32. The kernel reads that table;
it never evaluates trigonometry itself.

Device selection: CUDA tensors use the Triton kernel. CPU tensors use the torch reference
(:func:`rerotate_scatter_reference`) unless ``TRITON_INTERPRET=1`` is set and triton is importable, in which case the
kernel runs in Triton's interpreter (tests use this). The kernel addresses each layer through a device table of
per-layer base pointers (``data_ptr``), which works in the interpreter only for CPU tensors.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from semblend_core._compat import has_module, require
from semblend_core._logging import warning_once
from semblend_core.errors import SemBlendError
from semblend_core.kv_layout import KvCacheView, KvLayoutError, SlotGeometry, views_overlap

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from semblend_core.rope_correction import RopeSpec

logger = logging.getLogger(__name__)

__all__ = [
    "KvIndexError",
    "KvLayoutError",
    "RopeSpecError",
    "kernel_backend",
    "rerotate_scatter",
    "rerotate_scatter_reference",
    "rope_cos_sin",
]

Backend = Literal["auto", "triton", "reference"]
Delta = Union[int, "torch.Tensor", Sequence[int], np.ndarray]


class KvIndexError(SemBlendError, ValueError):
    """Slot indices or deltas are malformed or out of bounds; the message names the argument."""


class RopeSpecError(SemBlendError, ValueError):
    """The RoPE spec cannot drive a re-rotation (inexact, odd rotary_dim, head_dim mismatch)."""


_SUPPORTED_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


@dataclass(frozen=True, eq=False)
class _Plan:
    """A validated call: geometries, int64 index tensors on the cache device, delta normalised."""

    src_geom: SlotGeometry
    dst_geom: SlotGeometry
    src_slots: Any  # torch.LongTensor [T]
    dst_slots: Any  # torch.LongTensor [T]
    delta: Any  # int, or torch.LongTensor [T]
    num_tokens: int
    num_layers: int

    @property
    def rotate(self) -> bool:
        return not (isinstance(self.delta, int) and self.delta == 0)


# ----------------------------------------------------------------------------------------------------- validation


def _check_dtype(dtype: Any, what: str) -> None:
    if str(dtype) not in _SUPPORTED_DTYPES:
        hint = " (fp8 caches carry scales; re-rotating them would need requantization)" if "float8" in str(dtype) else ""
        raise KvLayoutError(f"{what}: dtype {dtype} not supported{hint}; allowed: float32, float16, bfloat16")


def _check_rope(rope: RopeSpec, head_dim: int) -> None:
    for field in ("head_dim", "rotary_dim", "inv_freq", "interleaved", "exact"):
        if not hasattr(rope, field):
            raise RopeSpecError(f"rope: expected a RopeSpec, got {type(rope).__name__} without {field!r}")
    if not rope.exact:
        raise RopeSpecError(f"rope: spec is not shift-invariant ({rope.reason or 'exact=False'}); decline instead")
    if rope.head_dim != head_dim:
        raise RopeSpecError(f"rope: head_dim {rope.head_dim} != cache head_dim {head_dim}")
    if rope.rotary_dim <= 0 or rope.rotary_dim % 2 or rope.rotary_dim > head_dim:
        raise RopeSpecError(f"rope: rotary_dim must be even and in [2, head_dim={head_dim}], got {rope.rotary_dim}")
    inv_freq = np.asarray(rope.inv_freq)
    if inv_freq.shape != (rope.rotary_dim // 2,):
        raise RopeSpecError(f"rope: inv_freq must have shape ({rope.rotary_dim // 2},), got {inv_freq.shape}")
    if not np.all(np.isfinite(inv_freq)):
        raise RopeSpecError("rope: inv_freq has non-finite values")


def _as_index_tensor(x: Any, what: str, device: Any) -> torch.Tensor:
    import torch

    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1), device=device)
    if x.dim() != 1:
        raise KvIndexError(f"{what}: expected a 1-D index tensor [num_tokens], got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise KvIndexError(f"{what}: expected an integer tensor, got {x.dtype}")
    if x.device != device:
        raise KvLayoutError(f"{what}: on {x.device}, caches on {device}")
    return x.to(torch.int64)


def _validate(
    src: KvCacheView,
    dst: KvCacheView,
    src_slots: Any,
    dst_slots: Any,
    delta: Delta,
    rope: RopeSpec,
    validate_indices: bool,
) -> _Plan:
    import torch

    for what, view in (("src", src), ("dst", dst)):
        if not isinstance(view, KvCacheView):
            raise KvLayoutError(f"{what}: expected a KvCacheView, got {type(view).__name__}")
    sg = src.geometry("src")
    dg = dst.geometry("dst")
    _check_dtype(src.dtype, "src")
    _check_dtype(dst.dtype, "dst")
    if src.device != dst.device:
        raise KvLayoutError(f"dst: on {dst.device}, src on {src.device}; load the donor onto the device first")
    if src.num_layers != dst.num_layers:
        raise KvLayoutError(f"dst: {dst.num_layers} layers, src has {src.num_layers}")
    if (sg.num_kv_heads, sg.head_dim) != (dg.num_kv_heads, dg.head_dim):
        raise KvLayoutError(
            f"dst: (num_kv_heads, head_dim) = {(dg.num_kv_heads, dg.head_dim)}, src has {(sg.num_kv_heads, sg.head_dim)}"
        )
    _check_rope(rope, dg.head_dim)

    device = dst.device
    s_idx = _as_index_tensor(src_slots, "src_slots", device)
    d_idx = _as_index_tensor(dst_slots, "dst_slots", device)
    n = s_idx.numel()
    if d_idx.numel() != n:
        raise KvIndexError(f"dst_slots: {d_idx.numel()} entries, src_slots has {n}")
    if isinstance(delta, (int, np.integer)) and not isinstance(delta, bool):
        delta_n: Any = int(delta)
    elif isinstance(delta, bool):
        raise KvIndexError("delta: expected an int or an integer tensor [num_tokens], got bool")
    else:
        delta_n = _as_index_tensor(delta, "delta", device)
        if delta_n.numel() != n:
            raise KvIndexError(f"delta: {delta_n.numel()} entries, src_slots has {n}")

    if validate_indices and n > 0:
        # One host sync for all bound checks. Duplicate destinations would race (last writer unspecified).
        d_sorted = torch.sort(d_idx).values
        dup = (d_sorted[1:] == d_sorted[:-1]).any() if n > 1 else torch.zeros((), dtype=torch.bool, device=device)
        stats = torch.stack([s_idx.min(), s_idx.max(), d_sorted[0], d_sorted[-1], dup.to(torch.int64)]).tolist()
        s_min, s_max, d_min, d_max, has_dup = stats
        if s_min < 0 or s_max >= sg.num_slots:
            raise KvIndexError(f"src_slots: values in [{s_min}, {s_max}], src has {sg.num_slots} slots")
        if d_min < 0 or d_max >= dg.num_slots:
            raise KvIndexError(f"dst_slots: values in [{d_min}, {d_max}], dst has {dg.num_slots} slots")
        if has_dup:
            raise KvIndexError("dst_slots: duplicate destination slots (two tokens would race for one slot)")
    return _Plan(sg, dg, s_idx, d_idx, delta_n, n, dst.num_layers)


# ------------------------------------------------------------------------------------------------------ cos / sin


_INV_FREQ_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_inv_freq_lock = threading.Lock()


def _inv_freq_on(rope: RopeSpec, device: Any) -> torch.Tensor:
    """``rope.inv_freq`` as a float64 tensor on ``device``; cached so the hot path does no host-to-device copy."""
    import torch

    inv_freq = np.ascontiguousarray(rope.inv_freq, dtype=np.float64)
    key = (str(device), inv_freq.tobytes())
    with _inv_freq_lock:
        hit = _INV_FREQ_CACHE.get(key)
        if hit is not None:
            _INV_FREQ_CACHE.move_to_end(key)
            return hit
    t = torch.tensor(inv_freq, dtype=torch.float64, device=device)
    with _inv_freq_lock:
        _INV_FREQ_CACHE[key] = t
        while len(_INV_FREQ_CACHE) > 16:
            _INV_FREQ_CACHE.popitem(last=False)
    return t


def rope_cos_sin(
    delta: int | torch.Tensor, rope: RopeSpec, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``delta * inv_freq``, evaluated in float64, returned as float32 ``[rows, rotary_dim // 2]``.

    ``rows`` is 1 for an int ``delta`` and ``num_tokens`` for an integer ``[num_tokens]`` tensor. Computed on
    ``device`` with no host sync (``inv_freq`` is cached there). Pure; called once per materialization.
    """
    import torch

    inv_freq = _inv_freq_on(rope, device)
    if isinstance(delta, int):
        ang = (inv_freq * float(delta))[None, :]  # exact: |delta| < 2**53
    else:
        ang = delta.to(device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


# ------------------------------------------------------------------------------------------------ torch reference


def _slot_view(t: torch.Tensor, g: SlotGeometry) -> torch.Tensor:
    """``[num_blocks, block_size, num_kv_heads, head_dim]`` view of one K or V tensor (shares storage)."""
    return t.as_strided(
        (g.num_slots // g.block_size, g.block_size, g.num_kv_heads, g.head_dim),
        (g.stride_block, g.stride_token, g.stride_head, 1),
        t.storage_offset(),
    )


def _rotate_reference(k32: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Rotate channel pairs of ``k32`` ``[T, H, D]`` (float32) by per-row angles (``cos/sin`` ``[1 or T, D_rot/2]``)."""
    rot, half = rope.rotary_dim, rope.rotary_dim // 2
    c, s = cos[:, None, :], sin[:, None, :]
    if rope.interleaved:
        i1, i2 = slice(0, rot, 2), slice(1, rot, 2)
    else:
        i1, i2 = slice(0, half), slice(half, rot)
    x1, x2 = k32[..., i1], k32[..., i2]
    out = k32.clone()
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x2 * c + x1 * s
    return out


def _reference_run(src: KvCacheView, dst: KvCacheView, plan: _Plan, rope: RopeSpec) -> None:
    import torch

    sg, dg = plan.src_geom, plan.dst_geom
    sb, so = plan.src_slots // sg.block_size, plan.src_slots % sg.block_size
    db, do = plan.dst_slots // dg.block_size, plan.dst_slots % dg.block_size
    cos = sin = None
    if plan.rotate:
        cos, sin = rope_cos_sin(plan.delta, rope, dst.device)

    def gather(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = src.kv(layer)
        return _slot_view(k, sg)[sb, so], _slot_view(v, sg)[sb, so]  # advanced indexing copies

    def scatter(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if plan.rotate:
            k = _rotate_reference(k.to(torch.float32), cos, sin, rope)
        dk, dv = dst.kv(layer)
        _slot_view(dk, dg)[db, do] = k.to(dst.dtype)
        _slot_view(dv, dg)[db, do] = v.to(dst.dtype)

    if views_overlap(src, dst):
        # Read everything before writing anything: a shift in place must not read slots it already wrote.
        staged = [gather(layer) for layer in range(plan.num_layers)]
        for layer, (k, v) in enumerate(staged):
            scatter(layer, k, v)
    else:
        for layer in range(plan.num_layers):
            scatter(layer, *gather(layer))


def rerotate_scatter_reference(
    src: KvCacheView,
    dst: KvCacheView,
    src_slots: Any,
    dst_slots: Any,
    delta: Delta,
    rope: RopeSpec,
    *,
    validate_indices: bool = True,
) -> None:
    """Pure-torch twin of :func:`rerotate_scatter` (any device); same contract, same validation, same result.

    Float32 arithmetic on the same float64-derived cos/sin table; a layer loop with advanced indexing.
    """
    plan = _validate(src, dst, src_slots, dst_slots, delta, rope, validate_indices)
    if plan.num_tokens == 0:
        return
    _reference_run(src, dst, plan, rope)


# -------------------------------------------------------------------------------------------------- triton launch


def kernel_backend(device: Any) -> str:
    """``"triton"`` or ``"reference"``: what ``backend="auto"`` runs for caches on ``device``.

    CUDA -> triton (if importable and not forced into the interpreter); CPU -> triton only when
    ``TRITON_INTERPRET=1`` and triton is importable; anything else -> reference.
    """
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    dev_type = getattr(device, "type", str(device))
    if not has_module("triton"):
        return "reference"
    if dev_type == "cuda":
        # The interpreter copies tensor arguments to the host, but the pointer tables hold device addresses.
        return "reference" if interpret else "triton"
    if dev_type == "cpu":
        return "triton" if interpret else "reference"
    return "reference"


_jit_lock = threading.Lock()


def _jit_module(device: Any) -> Any:
    """The kernel module, (re)imported so that its interpret/compile mode matches the environment now."""
    require("triton", extra="gpu")
    name = "semblend_core.kernels._rerotate_jit"
    with _jit_lock:
        mod = importlib.import_module(name)
        interpreted = type(mod.rerotate_scatter_kernel).__name__ == "InterpretedFunction"
        want = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if interpreted != want:  # imported earlier under the other mode (test sessions mixing both)
            mod = importlib.reload(mod)
    return mod


_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_TABLE_CACHE_SIZE = 32
_table_lock = threading.Lock()


def _pointer_tables(view: KvCacheView) -> tuple[torch.Tensor, torch.Tensor]:
    """Device int64 tables ``[num_layers]`` of K and V base addresses; cached (engines keep their caches)."""
    import torch

    r = view.resolve()
    k_ptrs, v_ptrs = list(r.k_ptrs), list(r.v_ptrs)
    key = (str(r.device), r.k_ptrs, r.v_ptrs)
    with _table_lock:
        hit = _TABLE_CACHE.get(key)
        if hit is not None:
            _TABLE_CACHE.move_to_end(key)
            return hit
    tables = torch.tensor([k_ptrs, v_ptrs], dtype=torch.int64).to(view.device)
    pair = (tables[0], tables[1])
    with _table_lock:
        _TABLE_CACHE[key] = pair
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return pair


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_block_tokens(num_kv_heads: int, head_dim: int) -> int:
    """Tokens per program: about 1K elements of K (and as many of V) per tile, a power of two in [1, 64].

    Measured on an H100 (benchmarks/results/kernels_h100.json, 28x4x128 bf16): tiles of 512-1024 elements at
    16-32 elements per thread reach 82-88% of the device copy bandwidth; 2K+ element tiles at 4 warps fall to
    55-77%, and 8K-element tiles spill registers (30%).
    """
    per_token = _next_pow2(num_kv_heads) * _next_pow2(head_dim)
    return max(1, min(64, _next_pow2(max(1, 1024 // per_token))))


def default_num_warps(num_kv_heads: int, head_dim: int, block_tokens: int) -> int:
    """Warps per program: about 16 elements of the K tile per thread, 1 to 8 warps."""
    tile = block_tokens * _next_pow2(num_kv_heads) * _next_pow2(head_dim)
    return max(1, min(8, _next_pow2(max(1, tile // 512))))


def _launch(
    src: KvCacheView,
    dst: KvCacheView,
    src_geom: SlotGeometry,
    dst_geom: SlotGeometry,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    delta: Any,
    rope: RopeSpec,
    rotate: bool,
    block_tokens: int | None,
    num_warps: int | None,
) -> None:
    import torch
    import triton.language as tl

    tl_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    mod = _jit_module(dst.device)
    n, num_layers = src_slots.numel(), dst.num_layers
    heads, head_dim = dst_geom.num_kv_heads, dst_geom.head_dim
    bt = block_tokens or default_block_tokens(heads, head_dim)
    if rotate:
        cos, sin = rope_cos_sin(delta, rope, dst.device)
        cs_stride = 0 if isinstance(delta, int) else rope.rotary_dim // 2
    else:  # never read; any float32 tensor will do
        cos = sin = torch.empty(1, dtype=torch.float32, device=dst.device)
        cs_stride = 0
    sk, sv = _pointer_tables(src)
    dk, dv = _pointer_tables(dst)
    grid = (num_layers * math.ceil(n / bt),)
    mod.rerotate_scatter_kernel[grid](
        sk, sv, dk, dv, src_slots, dst_slots, cos, sin,
        n, num_layers, cs_stride,
        src_geom.block_size, src_geom.stride_block, src_geom.stride_token, src_geom.stride_head,
        dst_geom.block_size, dst_geom.stride_block, dst_geom.stride_token, dst_geom.stride_head,
        SRC_DTYPE=tl_dtype[src.dtype], DST_DTYPE=tl_dtype[dst.dtype],
        NUM_HEADS=heads, HEADS_PAD=_next_pow2(heads),
        HEAD_DIM=head_dim, DIM_PAD=_next_pow2(head_dim),
        ROTARY_DIM=rope.rotary_dim, HALF_PAD=_next_pow2(rope.rotary_dim // 2),
        PASS_PAD=_next_pow2(max(1, head_dim - rope.rotary_dim)), INTERLEAVED=bool(rope.interleaved), ROTATE=rotate,
        BLOCK_T=bt, num_warps=num_warps or default_num_warps(heads, head_dim, bt),
    )


def rerotate_scatter(
    src: KvCacheView,
    dst: KvCacheView,
    src_slots: Any,
    dst_slots: Any,
    delta: Delta,
    rope: RopeSpec,
    *,
    backend: Backend = "auto",
    validate_indices: bool = True,
    block_tokens: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Copy donor KV into a target cache, re-rotating K by ``delta`` positions, for all layers in one launch.

    For each token ``t`` and layer ``l``: ``dst[l].K[dst_slots[t]] = R(delta[t]) src[l].K[src_slots[t]]`` and
    ``dst[l].V[dst_slots[t]] = src[l].V[src_slots[t]]``, each row ``[num_kv_heads, head_dim]``.

    * ``src``, ``dst``: :class:`KvCacheView` of any layouts (contiguous donor store, vLLM paged NHD/HND, FlashInfer,
      SGLang pool, HF), same device, layer count, ``num_kv_heads`` and ``head_dim``; dtypes float32/float16/bfloat16
      (they may differ: the result is cast to ``dst``'s dtype). ``src`` and ``dst`` may be the same cache (a shift in
      place): every read happens before any write.
    * ``src_slots``, ``dst_slots``: integer ``[num_tokens]`` (token-granular slots); ``dst_slots`` must be unique.
    * ``delta``: ``target_position - donor_position``, one int or an integer ``[num_tokens]`` tensor. ``delta == 0``
      (int) copies K bit-exactly.
    * ``rope``: a :class:`~semblend_core.rope_correction.RopeSpec` with ``exact=True``.
    * ``validate_indices``: bound and duplicate checks (one host sync); pass False on hot paths whose indices are
      already known good.
    * ``backend``: ``"auto"`` (see :func:`kernel_backend`), ``"triton"`` or ``"reference"``.

    Raises :class:`KvLayoutError`, :class:`KvIndexError`, :class:`RopeSpecError` (all ``ValueError``) before touching
    any memory. Asynchronous on CUDA (stream-ordered on the current stream), like any kernel launch.
    """
    plan = _validate(src, dst, src_slots, dst_slots, delta, rope, validate_indices)
    if plan.num_tokens == 0:
        return
    chosen = kernel_backend(dst.device) if backend == "auto" else backend
    if chosen == "reference":
        if backend == "auto" and getattr(dst.device, "type", "") == "cuda":
            warning_once(logger, "rerotate_scatter: triton unusable on CUDA (missing or TRITON_INTERPRET=1); "
                         "using the torch reference")
        _reference_run(src, dst, plan, rope)
        return
    if chosen != "triton":
        raise ValueError(f"backend: expected 'auto', 'triton' or 'reference', got {backend!r}")
    if kernel_backend(dst.device) != "triton":
        raise ValueError(
            f"backend: triton cannot run on {dst.device} here (CPU needs TRITON_INTERPRET=1 and triton; "
            "CUDA needs triton without TRITON_INTERPRET)"
        )
    import torch

    if views_overlap(src, dst):
        # Two phases: gather (no rotation) into a contiguous temporary, then rotate+scatter from it. One extra
        # round trip of the plan's bytes; taken only when the caches share memory.
        logger.debug("rerotate_scatter: src and dst overlap; staging %d tokens", plan.num_tokens)
        sg = plan.src_geom
        tmp = torch.empty(
            (plan.num_layers, 2, plan.num_tokens, sg.num_kv_heads, sg.head_dim), dtype=src.dtype, device=src.device
        )
        tview = KvCacheView.from_donor_store(tmp)
        tgeom = tview.geometry("staging")
        order = torch.arange(plan.num_tokens, dtype=torch.int64, device=src.device)
        _launch(src, tview, sg, tgeom, plan.src_slots, order, 0, rope, False, block_tokens, num_warps)
        _launch(tview, dst, tgeom, plan.dst_geom, order, plan.dst_slots, plan.delta, rope, plan.rotate,
                block_tokens, num_warps)
        return
    _launch(src, dst, plan.src_geom, plan.dst_geom, plan.src_slots, plan.dst_slots, plan.delta, rope, plan.rotate,
            block_tokens, num_warps)
