"""Donor KV for the transformers engine: per-donor K/V tensors, byte-capacity bounded, least recently used out.

Layout per donor: ``k`` and ``v`` ``[num_layers, num_tokens, num_kv_heads, head_dim]`` (keys rotated at the
donor's own positions), on the engine's device (``tier="device"``) or in pinned host memory (``tier="host"``, CUDA
only; plain host memory on CPU). The planner's donor index (``semblend_core``) and this store are separate: a
planned donor whose KV was evicted here is a decline with reason ``donor_kv_evicted``.

Not thread-safe: one engine drives one store from one thread, like ``model.generate``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DonorKv", "DonorKvStore"]


@dataclass(frozen=True)
class DonorKv:
    """One donor's KV: ``k``/``v`` ``[num_layers, num_tokens, num_kv_heads, head_dim]``."""

    k: Any
    v: Any

    @property
    def num_tokens(self) -> int:
        return int(self.k.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.k.numel() * self.k.element_size() * 2)


class DonorKvStore:
    """LRU over donors by bytes. ``put`` evicts the least recently used donors until the new one fits."""

    def __init__(self, capacity_bytes: int, *, tier: str = "device", device: Any = "cpu") -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if tier not in ("device", "host"):
            raise ValueError(f"tier={tier!r}; allowed: device, host")
        import torch

        self.capacity_bytes = int(capacity_bytes)
        self.tier = tier
        self.device = torch.device(device)
        self._items: OrderedDict[str, DonorKv] = OrderedDict()
        self.used_bytes = 0
        self.evictions = 0

    def __contains__(self, donor_id: str) -> bool:
        return donor_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, donor_id: str, k: Any, v: Any) -> bool:
        """Store a copy of ``k``/``v``; False when one donor alone exceeds the capacity (nothing stored)."""
        import torch

        nbytes = int(k.numel() * k.element_size() * 2)
        if nbytes > self.capacity_bytes:
            logger.debug("donor %s (%d bytes) exceeds the KV store capacity %d", donor_id, nbytes,
                         self.capacity_bytes)
            return False
        self.drop(donor_id)
        while self.used_bytes + nbytes > self.capacity_bytes and self._items:
            old_id, old = self._items.popitem(last=False)
            self.used_bytes -= old.nbytes
            self.evictions += 1
            logger.debug("evicted donor KV %s", old_id)
        if self.tier == "host":
            pin = self.device.type == "cuda" or k.device.type == "cuda"
            k = k.detach().to("cpu", copy=True)
            v = v.detach().to("cpu", copy=True)
            if pin and torch.cuda.is_available():
                k, v = k.pin_memory(), v.pin_memory()
        else:
            k = k.detach().to(self.device, copy=True)
            v = v.detach().to(self.device, copy=True)
        self._items[donor_id] = DonorKv(k, v)
        self.used_bytes += nbytes
        return True

    def get(self, donor_id: str) -> DonorKv | None:
        """The donor's KV (marks it recently used) or None."""
        item = self._items.get(donor_id)
        if item is not None:
            self._items.move_to_end(donor_id)
        return item

    def drop(self, donor_id: str) -> None:
        item = self._items.pop(donor_id, None)
        if item is not None:
            self.used_bytes -= item.nbytes

    def stats(self) -> dict[str, Any]:
        return {"donors": len(self._items), "used_bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                "evictions": self.evictions, "tier": self.tier}
