"""Worker side on CUDA: the fused Triton kernel writes into vLLM-shaped paged caches in place.

Needs no vLLM (the worker side is engine-free): the cache tensors are built with the logical shape vLLM's attention
backends use, ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, in both physical orders (NHD = LBNHC,
HND = LBHNC); the layout is probed from a content-halves writer (how FlashAttention stores K and V), so the worker
takes the fused-kernel path. The expected values come from the torch reference on CPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import numpy as np

from semblend.integration.vllm._metadata import LoadSpec, SaveSpec, StepPlan
from semblend.integration.vllm._layout import probe_block_layout
from semblend.integration.vllm._worker import WorkerSide
from semblend_core.rope_correction import RopeSpec, rerotate_keys

pytestmark = pytest.mark.gpu

BS, NB, H, D, L = 16, 64, 8, 128, 4
NS = "ns"


def split_kv(t, d, _kind="content"):
    return t[..., :d], t[..., d:]


def content_write(key, value, cache, slots):
    k, v = split_kv(cache, D)
    k[slots // BS, :, slots % BS] = key
    v[slots // BS, :, slots % BS] = value


def rope() -> RopeSpec:
    return RopeSpec(head_dim=D, rotary_dim=D, inv_freq=1.0 / (1e6 ** (np.arange(0, D, 2) / D)))


def caches(order: str, dtype) -> dict:
    out = {}
    for i in range(L):
        if order == "NHD":  # physical [B, N, H, 2D] viewed as the logical [B, H, N, 2D]
            t = torch.randn(NB, BS, H, 2 * D, device="cuda", dtype=dtype).permute(0, 2, 1, 3)
        else:
            t = torch.randn(NB, H, BS, 2 * D, device="cuda", dtype=dtype)
        out[f"model.layers.{i}.self_attn.attn"] = t
    return out


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_load_and_capture_roundtrip(order, dtype):
    from semblend_core.kv_tensor_store import KvTensorStore

    kv_caches = caches(order, dtype)
    before = {n: t.clone() for n, t in kv_caches.items()}
    store = KvTensorStore(device_bytes=1 << 30)
    worker = WorkerSide(store, rope(), head_size=D)
    layout = probe_block_layout(next(iter(kv_caches.values())), content_write, num_kv_heads=H, head_size=D,
                                kernel_block_size=BS, block_axis=0, source="probe:content")
    assert layout.strided() is not None
    worker.register_kv_caches(kv_caches, layout)
    assert worker._paged is not None  # the fused kernel path
    n, delta = 1000, -300
    donor = torch.randn(L, 2, 1400, H, D, device="cuda", dtype=dtype)
    store.put(NS, "donor", donor, list(range(1400)))
    blocks = tuple(int(b) for b in torch.randperm(NB)[: -(-n // BS)])
    spec = LoadSpec("r", NS, "donor", 300, 0, n, blocks, BS)
    worker.start_load(StepPlan(loads=(spec,)))
    torch.cuda.synchronize()
    assert worker.take_load_errors() == set()
    slots = torch.tensor(spec.slots())
    names = sorted(kv_caches)
    for layer, name in enumerate(names):
        k, v = split_kv(kv_caches[name], D, "content")
        got_k = k[slots // BS, :, slots % BS].float().cpu()
        got_v = v[slots // BS, :, slots % BS].cpu()
        want_k = rerotate_keys(donor[layer, 0, 300:300 + n].float().cpu(), delta, rope())
        torch.testing.assert_close(got_k, want_k, rtol=2e-2, atol=2e-2)
        assert torch.equal(got_v, donor[layer, 1, 300:300 + n].cpu())
        # untouched elsewhere
        bk, bv = split_kv(before[name], D, "content")
        mask = torch.ones(NB * BS, dtype=torch.bool)
        mask[slots] = False
        rows = lambda x: x.permute(0, 2, 1, 3).reshape(NB * BS, H, D)
        assert torch.equal(rows(k)[mask.cuda()], rows(bk)[mask.cuda()])
        assert torch.equal(rows(v)[mask.cuda()], rows(bv)[mask.cuda()])
    # Capture what is now in the blocks and compare with the cache bit for bit.
    save = SaveSpec("r", NS, "r", n, blocks, BS, tuple(range(n)))
    worker.wait_for_save(StepPlan(saves=(save,)))
    with store.lease(NS, "r") as got:
        for layer, name in enumerate(names):
            k, v = split_kv(kv_caches[name], D, "content")
            assert torch.equal(got.kv[layer, 0], k[slots // BS, :, slots % BS])
            assert torch.equal(got.kv[layer, 1], v[slots // BS, :, slots % BS])
