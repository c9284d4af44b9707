"""TensorRT-LLM's paged KV pool, seen through ``semblend_core.kv_layout`` descriptors.

What ``register_kv_caches(kv_cache_tensor)`` receives (PyTorch backend, KV cache manager V1): the executor passes
``KVCacheManager.get_unique_primary_pool()``, the C++ ``WindowBlockManager::allocatePools`` tensor::

    [num_blocks, num_layers, 2 (K, V), block_bytes]      block_bytes = num_kv_heads * tokens_per_block * head_dim

One block holds every layer's K and V for ``tokens_per_block`` tokens; a block id (``RequestData.new_block_ids``,
``update_state_after_alloc``) indexes the first axis. Inside one ``(block, layer, K|V)`` row the order is the
attention backend's:

* ``TRTLLM`` (the default): ``[num_kv_heads, tokens_per_block, head_dim]`` (``KVBlockArray::getKVLocalIdx``:
  ``head * tokens_per_block * head_dim + token * head_dim + channel``; "we have remapped K layout as the same of V");
* ``VANILLA``: ``[tokens_per_block, num_kv_heads, head_dim]`` (its attention reads ``KVCacheManager.get_buffers``,
  which reshapes the layer's pool data NHD by default).

Each layer's K (or V) is then a strided ``[num_blocks, H, T, D]`` (HND) or ``[num_blocks, T, H, D]`` (NHD) view of
the pool with a block axis, which :class:`~semblend_core.kv_layout.KvLayout` describes as it is; the core's fused
kernel addresses the pool in place. Nothing is copied and nothing here imports TensorRT-LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semblend_core.kv_layout import KvCacheView, KvLayout, KvLayoutError

# Per-layer K (or V) views of the pool; separate K and V tensors, a block axis, heads before / after tokens.
TRTLLM_POOL_HND = KvLayout("trtllm_pool_hnd", kv_axis=None, has_block_axis=True, heads_before_tokens=True)
TRTLLM_POOL_NHD = KvLayout("trtllm_pool_nhd", kv_axis=None, has_block_axis=True, heads_before_tokens=False)
POOL_LAYOUTS = {"HND": TRTLLM_POOL_HND, "NHD": TRTLLM_POOL_NHD}
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")  # what the core's kernels read and write


@dataclass(frozen=True)
class PoolGeometry:
    """What the adapter expects the registered pool to be (from the model config and ``llm_args``)."""

    num_layers: int
    num_kv_heads: int
    tokens_per_block: int
    head_dim: int
    block_order: str = "HND"  # the attention backend's order inside a block (see the module docstring)

    @property
    def block_elems(self) -> int:
        return self.num_kv_heads * self.tokens_per_block * self.head_dim


def pool_view(pool: Any, geom: PoolGeometry) -> KvCacheView:
    """A :class:`KvCacheView` of every layer's K and V inside ``pool`` (views, no copy).

    ``pool``: ``[num_blocks, num_layers, 2, num_kv_heads * tokens_per_block * head_dim]``. Raises
    :class:`~semblend_core.kv_layout.KvLayoutError` naming what differs when the tensor is not that (rank, layer
    count, K/V factor, block size, dtype, a non-contiguous row).
    """
    if geom.block_order not in POOL_LAYOUTS:
        raise KvLayoutError(f"block_order={geom.block_order!r}; allowed: {', '.join(POOL_LAYOUTS)}")
    shape = tuple(pool.shape)
    expected = f"[num_blocks, {geom.num_layers}, 2, {geom.block_elems}]"
    if len(shape) != 4:
        raise KvLayoutError(f"kv_cache_tensor: expected rank 4 {expected}, got shape {shape}")
    if shape[1] != geom.num_layers:
        raise KvLayoutError(f"kv_cache_tensor: {shape[1]} layers in the pool, the model has {geom.num_layers} "
                            "(pipeline parallelism or several pools are not supported)")
    if shape[2] != 2:
        raise KvLayoutError(f"kv_cache_tensor: K/V factor {shape[2]} (MLA / K-only caches are not supported)")
    if shape[3] != geom.block_elems:
        raise KvLayoutError(f"kv_cache_tensor: {shape[3]} elements per block and layer, expected "
                            f"num_kv_heads*tokens_per_block*head_dim = {geom.num_kv_heads}*{geom.tokens_per_block}*"
                            f"{geom.head_dim} = {geom.block_elems}")
    dtype = str(pool.dtype).removeprefix("torch.")
    if dtype not in SUPPORTED_DTYPES:
        raise KvLayoutError(f"kv_cache_tensor: dtype {dtype} (quantized KV caches are not supported); allowed: "
                            + ", ".join(SUPPORTED_DTYPES))
    if pool.stride(3) != 1:
        raise KvLayoutError(f"kv_cache_tensor: rows must be contiguous, got strides {tuple(pool.stride())}")
    h, t, d = geom.num_kv_heads, geom.tokens_per_block, geom.head_dim
    inner = (h, t, d) if geom.block_order == "HND" else (t, h, d)
    ks, vs = [], []
    for layer in range(geom.num_layers):
        ks.append(pool[:, layer, 0].unflatten(1, inner))
        vs.append(pool[:, layer, 1].unflatten(1, inner))
    view = KvCacheView.from_separate(POOL_LAYOUTS[geom.block_order], ks, vs)
    view.resolve("kv_cache_tensor")
    return view
