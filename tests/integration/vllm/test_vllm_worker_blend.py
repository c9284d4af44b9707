"""Worker side of blend mode on CPU tensors laid out as vLLM lays out its KV cache (every layout the stand-in backends
cover, including the GPU backends' strided content halves that the fused kernel addresses in place, which the CPU
end-to-end suite does not reach).

The model is a stand-in :class:`~semblend_core.blended_prefill.BlendModelView` (a tiny random-weight decoder):
what is checked here is the worker's plumbing around the real executor -- donors leased and verified, vLLM's own
rows ``[0, local_tokens)`` read from the blocks into the scratch, rows ``[local_tokens, num_tokens)`` written back
into the request's blocks and nowhere else, and every failure reported as the credited blocks -- by comparing with
the same executor run on a plain scratch. That vLLM's real model through ``VllmModelView`` gives vLLM's own KV is
shown on real execution by ``e2e/test_e2e_blend.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytestmark = pytest.mark.engine_vllm
pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh")
torch = pytest.importorskip("torch")

import vllm_harness as H

from semblend.integration.vllm._metadata import BlendSpec, StepPlan
from semblend_core.blended_prefill import BlendModelView, assemble_kv, run_blended_prefill
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import SemanticKvPlan, Span
from test_vllm_worker import BS, NS, NUM_BLOCKS, make_worker

LAYOUTS = H.BACKENDS
NUM_HEADS, HIDDEN = 4, 48


class TinyView(BlendModelView):
    """A two-layer decoder with random weights and the harness's RoPE: enough for the executor to compute real,
    context-dependent K/V."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        d, kvh = H.HEAD_SIZE, H.NUM_KV_HEADS
        self.num_layers, self.num_kv_heads, self.head_dim = H.NUM_LAYERS, kvh, d
        self.emb = torch.randn(64, HIDDEN, generator=g)
        self.w = [{"q": torch.randn(HIDDEN, NUM_HEADS * d, generator=g) / HIDDEN ** 0.5,
                   "k": torch.randn(HIDDEN, kvh * d, generator=g) / HIDDEN ** 0.5,
                   "v": torch.randn(HIDDEN, kvh * d, generator=g) / HIDDEN ** 0.5,
                   "o": torch.randn(NUM_HEADS * d, HIDDEN, generator=g) / (NUM_HEADS * d) ** 0.5,
                   "m": torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5} for _ in range(self.num_layers)]
        self.inv_freq = torch.as_tensor(H.rope_spec().inv_freq, dtype=torch.float64)

    def embed(self, token_ids):
        return self.emb[token_ids]

    def rotary(self, positions):
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().float(), ang.sin().float()

    def qkv(self, layer, hidden):
        x = torch.nn.functional.rms_norm(hidden, (HIDDEN,))
        n, w = x.shape[0], self.w[layer]
        return ((x @ w["q"]).view(n, NUM_HEADS, -1), (x @ w["k"]).view(n, self.num_kv_heads, -1),
                (x @ w["v"]).view(n, self.num_kv_heads, -1))

    def attention_scale(self, layer):
        return self.head_dim ** -0.5

    def finish_layer(self, layer, attn_out, residual):
        h = residual + attn_out @ self.w[layer]["o"]
        return h + torch.tanh(torch.nn.functional.rms_norm(h, (HIDDEN,)) @ self.w[layer]["m"])


def tokens(n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 64, n)]


DONOR = tokens(80, 1)
PROMPT_LEN = 72
# Target: 16 own tokens (vLLM's exact hit when local_tokens=16), 8 new ones, then donor tokens [10, 50) at +14.
TARGET = tokens(24, 2) + DONOR[10:50] + tokens(8, 3)
BLOCKS = (7, 2, 12, 5, 9)  # the request's blocks, block 0 first


def plan_for(num_tokens):
    ns = CacheNamespace.default()
    return SemanticKvPlan(True, "hit", len(TARGET), ns, donor_id="donor", donor_len=len(DONOR),
                          spans=(Span(10, 24, 40),), recompute_ranges=((24, 26),), recompute_budget=0.25)


def spec_for(local, num_tokens=64, **kw):
    return BlendSpec("r", NS, plan_for(num_tokens), tuple(TARGET[:num_tokens]), num_tokens,
                     BLOCKS[: -(-num_tokens // BS)], BS, local_tokens=local, **kw)


def setup(layout, kind):
    worker, caches, layers, backend, store = make_worker(layout, kind)
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(H.NUM_LAYERS, 2, len(DONOR), H.NUM_KV_HEADS, H.HEAD_SIZE, generator=g)
    store.put(NS, "donor", kv, DONOR)
    view = TinyView()
    worker.set_blend_view(view)
    return worker, caches, layers, backend, kv, view


def expected(spec, kv, view, layers, backend):
    """The executor on a plain scratch, with vLLM's rows [0, local) read through the backend."""
    n, local = spec.num_tokens, spec.local_tokens
    k, v = assemble_kv(spec.plan, kv, n, H.rope_spec(), total_len=n)
    for layer in range(H.NUM_LAYERS):
        if local:
            k[layer, :local], v[layer, :local] = backend.read(layers[layer], spec.slots()[:local])
    run_blended_prefill(view, torch.tensor(TARGET[:n]), k, v, spec.plan, reuse_len=n, logits=False,
                        fixed_prefix=local, check_layer=spec.check_layer)
    return k, v


@pytest.mark.parametrize("layout,kind", LAYOUTS)
@pytest.mark.parametrize("local", [0, 16])
def test_blend_fills_the_credited_rows_of_the_requests_blocks_only(layout, kind, local):
    worker, caches, layers, backend, kv, view = setup(layout, kind)
    spec = spec_for(local)
    before = {n: t.clone() for n, t in caches.items()}
    want_k, want_v = expected(spec, kv, view, layers, backend)
    worker.start_load(StepPlan(blends=(spec,)))
    worker.wait_for_save(StepPlan(blends=(spec,)))
    assert worker.take_load_errors() == set()
    report = worker.take_report()
    (blended,) = report.blended
    assert report.loaded == (("r", spec.num_tokens - local),) and not report.load_failed
    assert blended[0] == "r" and blended[1] + blended[2] == spec.num_tokens - local and blended[2] > 0
    _, stats, _ = worker.recent_blends[-1]
    assert stats.fixed_prefix == local
    slots = spec.slots()
    for layer in range(H.NUM_LAYERS):
        k, v = backend.read(layers[layer], slots[local:])
        torch.testing.assert_close(k, want_k[layer, local:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v[layer, local:], rtol=1e-5, atol=1e-5)
    # vLLM's own rows and every slot outside the credited range are untouched.
    touched = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
    touched[slots[local:]] = True
    every = list(range(touched.numel()))
    for name, t in caches.items():
        for ref_rows, new_rows in zip(backend.read(before[name], every), backend.read(t, every)):
            assert torch.equal(ref_rows[~touched], new_rows[~touched])


def test_the_fixed_prefix_is_attended_to_as_vllm_wrote_it():
    """Rows [0, local) come from the blocks, not the donor: other contents there change the blended rows."""
    worker, caches, layers, backend, kv, view = setup("LBNHC", "content")
    spec = spec_for(16)
    worker.start_load(StepPlan(blends=(spec,)))
    first = backend.read(layers[1], spec.slots()[16:])[0]
    worker.wait_for_save(None)
    for layer in layers:
        backend.write(torch.zeros(16, H.NUM_KV_HEADS, H.HEAD_SIZE), torch.zeros(16, H.NUM_KV_HEADS, H.HEAD_SIZE),
                      layer, torch.tensor(spec.slots()[:16]))
    worker.start_load(StepPlan(blends=(spec,)))
    second = backend.read(layers[1], spec.slots()[16:])[0]
    worker.wait_for_save(None)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("breakage", ["evicted", "other_tokens", "no_view", "bad_range"])
def test_a_failed_blend_reports_the_credited_blocks_and_writes_nothing(breakage):
    worker, caches, layers, backend, kv, view = setup("LBNHC", "content")
    spec = spec_for(32)  # two credited blocks after vLLM's own two
    if breakage == "evicted":
        worker.store.evict(NS, "donor")
    elif breakage == "other_tokens":
        worker.store.evict(NS, "donor")
        worker.store.put(NS, "donor", kv, [(t + 1) % 64 for t in DONOR])  # same id, another prompt's KV
    elif breakage == "no_view":
        worker.set_blend_view(None, "model_not_recorded: no recorded model owns these caches")
        assert worker.take_report().blend_unavailable == ("model_not_recorded",)
    else:
        spec = dataclasses.replace(spec, local_tokens=64)
    before = {n: t.clone() for n, t in caches.items()}
    worker.start_load(StepPlan(blends=(spec,)))
    worker.wait_for_save(None)
    assert worker.take_load_errors() == set(spec.block_ids[spec.local_tokens // BS:])
    report = worker.take_report()
    assert report.load_failed == ("r",) and not report.loaded and not report.blended
    assert not report.blend_unavailable  # sent once, at set_blend_view
    for name, t in caches.items():
        assert torch.equal(before[name], t)
    assert not worker._leases._exit_callbacks


@pytest.mark.parametrize("local", [0, 16])
def test_a_static_blend_runs_through_the_workers_layer_graphs(local):
    """The worker hands the graphs' scratch to assemble_kv and the graphs to the executor: same cache rows as the
    eager executor, vLLM's own rows read into the graphs' scratch. On CPU the graphs object is the stand-in that
    runs its padded loop eagerly (``capture=False``); ``set_blend_view`` builds real ones only on a CUDA worker."""
    from semblend_core.layer_graphs import LayerLoopGraphs

    layout, kind = LAYOUTS[0]
    worker, _, layers, backend, kv, view = setup(layout, kind)
    worker.set_blend_view(view, graph_tokens=4096)
    assert worker.blend_graphs is None  # a CPU worker: no CUDA graphs
    worker.blend_graphs = LayerLoopGraphs(view, max_tokens=4096, device="cpu", dtype=torch.float32, capture=False)
    spec = spec_for(local, check_layer=None)  # no check: the fresh rows are the same at every layer
    want_k, want_v = expected(spec, kv, view, layers, backend)
    for round_ in range(2):  # the first blend builds the (stand-in) graph, the second replays it
        worker.start_load(StepPlan(blends=(spec,)))
        worker.wait_for_save(StepPlan(blends=(spec,)))
        assert worker.take_load_errors() == set() and not worker.take_report().load_failed
        slots = spec.slots()
        for layer in range(H.NUM_LAYERS):
            k, v = backend.read(layers[layer], slots[local:])
            torch.testing.assert_close(k, want_k[layer, local:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, want_v[layer, local:], rtol=1e-5, atol=1e-5)
    graphs = worker.blend_graphs
    assert (graphs.captures, graphs.replays, dict(graphs.fallbacks)) == (1, 1, {})
