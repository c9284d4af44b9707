"""CUDA graphs of the executor's layer loop (``semblend_core.layer_graphs``) on tiny random-weight models.

As in ``test_blended_prefill.py`` every plan reuses the prompt's own cold KV, so a correct run reproduces the
model's own forward. On CPU the graphs object runs its padded static loop eagerly (``capture=False``): a stand-in
for the capture, which cannot run here, that still checks the bucketing, the padding rows and the scratch; the
capture itself is checked by the CUDA tests at the end (run on the H200, skipped elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_blended_prefill import N, cold, plan_of, prompt, rope_spec_of, tiny

from semblend.integration.transformers.blend import TransformersModelView
from semblend_core.blended_prefill import assemble_kv, run_blended_prefill
from semblend_core.layer_graphs import LayerLoopGraphs, token_bucket
from semblend_core.plan import Span
from semblend_core.recompute import SelectionStrategy

HALF = N // 2
SEAMS = (Span(0, 0, HALF), Span(HALF, HALF, N - 8 - HALF))


@pytest.fixture(scope="module")
def model():
    return tiny("qwen2")


@pytest.fixture(scope="module")
def spec(model):
    return rope_spec_of(model)


def graphs_for(model, **kw):
    view = TransformersModelView(model)
    kw.setdefault("max_tokens", 4096)
    return view, LayerLoopGraphs(view, device="cpu", dtype=torch.float32, capture=False, **kw)


def run(view, ids, plan, spec, kv, *, graphs=None, reuse_len, logits, fixed_prefix=0, out=None, **kw):
    k, v = assemble_kv(plan, kv, reuse_len, spec, total_len=int(ids.shape[0]), out=out)
    with torch.no_grad():
        stats, lg = run_blended_prefill(view, ids, k, v, plan, reuse_len=reuse_len, logits=logits, graphs=graphs,
                                        fixed_prefix=fixed_prefix, **kw)
    return stats, lg, k.clone(), v.clone()


def test_token_buckets_are_powers_of_two_from_1k_capped_at_max():
    assert [token_bucket(n, 1 << 15) for n in (1, 1024, 1025, 8176, 8192, 8193, 32704)] == \
        [1024, 1024, 2048, 8192, 8192, 16384, 32768]
    assert token_bucket(30000, 30000) == 30000 and token_bucket(700, 900) == 900


@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("layout", ["seams", "uncovered_tail", "fixed_prefix"])
def test_a_static_run_through_the_graphs_equals_the_eager_executor_and_cold(model, spec, layout, logits):
    """Same logits, K/V and stats as the eager loop (and the model's own forward), through the padded loop: the
    hit's fresh rows are padded to a row bucket, and padding touches only the scratch's spare row."""
    ids = prompt()
    ref_logits, k_ref, v_ref = cold(model, ids)
    kv = torch.stack((k_ref, v_ref), dim=1)
    reuse_len = N - 8 if logits else N
    fixed = 0
    if layout == "seams":
        plan = plan_of(SEAMS, N, ranges=((HALF, HALF + 2),))
    elif layout == "uncovered_tail":
        plan = plan_of((Span(0, 0, 50),), N)
    else:
        plan, fixed = plan_of(SEAMS, N, ranges=((HALF, HALF + 3),)), 24
    view, graphs = graphs_for(model)
    eager = run(view, ids, plan, spec, kv, reuse_len=reuse_len, logits=logits, fixed_prefix=fixed)
    out = graphs.scratch(N)
    bucket = token_bucket(N, graphs.max_tokens)
    assert out is not None and out[0].shape[2] == bucket + 1
    out[0][:, :, N:bucket].fill_(7.0)  # stale rows of an earlier, longer hit: must survive
    graphed = run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=reuse_len, logits=logits,
                  fixed_prefix=fixed, out=out)
    assert graphs.captures == 1 and not graphs.fallbacks
    assert graphed[0] == eager[0]
    # Padding rows write the spare row and sit at position 0: they attend key 0 only, so they cost no attention.
    m = graphed[0].active_per_layer[0] + (N - reuse_len)
    rows = next(r for r in graphs.row_buckets if r >= m)
    assert rows > m and graphs._pos[0, m:rows].eq(bucket).all() and graphs._pos[1, m:rows].eq(0).all()
    if logits:
        torch.testing.assert_close(graphed[1], eager[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graphed[1], ref_logits, atol=1e-5, rtol=1e-5)
    else:
        assert graphed[1] is None
    for got, want, ref in ((graphed[2], eager[2], k_ref), (graphed[3], eager[3], v_ref)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert bool((out[0][:, :, N:bucket] == 7.0).all())

    # A second hit of the same buckets replays the same loop (another prompt, same result as eager).
    ids2 = prompt(seed=5)
    _, k2, v2 = cold(model, ids2)
    kv2 = torch.stack((k2, v2), dim=1)
    want = run(view, ids2, plan, spec, kv2, reuse_len=reuse_len, logits=logits, fixed_prefix=fixed)
    got = run(view, ids2, plan, spec, kv2, graphs=graphs, reuse_len=reuse_len, logits=logits, out=graphs.scratch(N),
              fixed_prefix=fixed)
    assert graphs.captures == 1 and graphs.replays == 1
    if logits:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[3], want[3], atol=1e-6, rtol=1e-6)


def test_runs_the_graphs_cannot_take_run_eagerly_with_a_reason(model, spec):
    ids = prompt()
    _, k_ref, v_ref = cold(model, ids)
    kv = torch.stack((k_ref, v_ref), dim=1)
    view, graphs = graphs_for(model, row_buckets=(16,))
    # More fresh rows than the largest bucket: uncovered [40, 80).
    plan = plan_of((Span(0, 0, 40),), N)
    got = run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=N, logits=False, out=graphs.scratch(N))
    assert graphs.fallbacks == {"rows": 1} and graphs.captures == 0
    torch.testing.assert_close(got[2], k_ref, atol=2e-5, rtol=1e-4)
    # K/V not in the graphs' scratch.
    plan = plan_of((Span(0, 0, N - 4),), N)
    run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=N, logits=False)
    assert graphs.fallbacks["not_scratch"] == 1 and graphs.captures == 0
    # A deviation check or a selection of partial depth: fresh rows change per layer, never graphed (not asked).
    seams = plan_of(SEAMS, N, budget=0.3, ranges=((HALF, HALF + 2),))
    for kw in ({"check_layer": 1}, {"selection": SelectionStrategy("position", depth=0.5)}):
        got = run(view, ids, seams, spec, kv, graphs=graphs, reuse_len=N - 8, logits=True, out=graphs.scratch(N),
                  **kw)
        assert got[0].token_layers > 2 * 4
    assert graphs.captures == 0 and graphs.replays == 0 and sum(graphs.fallbacks.values()) == 2
    # Longer than max_tokens: no scratch.
    assert LayerLoopGraphs(view, max_tokens=64, device="cpu", dtype=torch.float32).scratch(N) is None


@pytest.mark.parametrize("name", ["position", "query"])
def test_a_selection_fresh_at_every_layer_is_static_and_graphed(model, spec, name):
    ids = prompt()
    ref_logits, k_ref, v_ref = cold(model, ids)
    kv = torch.stack((k_ref, v_ref), dim=1)
    plan = plan_of(SEAMS, N, budget=0.2, ranges=((HALF, HALF + 2),))
    view, graphs = graphs_for(model)
    selection = SelectionStrategy(name)
    want = run(view, ids, plan, spec, kv, reuse_len=N - 8, logits=True, selection=selection)
    got = run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=N - 8, logits=True, selection=selection,
              out=graphs.scratch(N))
    assert graphs.captures == 1 and not graphs.fallbacks
    assert got[0] == want[0] and got[0].active_per_layer[0] > 2  # the budget bought fresh tokens
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)


def test_the_scratch_grows_by_buckets_and_drops_the_old_graphs(model, spec):
    view, graphs = graphs_for(model)
    ids = prompt()
    _, k_ref, v_ref = cold(model, ids)
    plan = plan_of((Span(0, 0, 70),), N)
    run(view, ids, plan, spec, torch.stack((k_ref, v_ref), dim=1), graphs=graphs, reuse_len=N, logits=False,
        out=graphs.scratch(N))
    assert graphs.summary()["graphs"] == [(16, 1024)] and graphs.summary()["scratch_tokens"] == 1024
    first = graphs.scratch(N)[0]
    assert graphs.scratch(1000)[0] is first  # same bucket: same storage
    grown = graphs.scratch(1500)
    assert grown[0].shape[2] == 2049 and graphs.summary()["graphs"] == []
    with pytest.raises(ValueError, match="cannot hold"):
        assemble_kv(plan, torch.stack((k_ref, v_ref), dim=1), N, spec, total_len=3000, out=grown)


def test_bad_construction_fails_loudly(model):
    view = TransformersModelView(model)
    with pytest.raises(ValueError, match="max_tokens"):
        LayerLoopGraphs(view, max_tokens=0, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="row_buckets"):
        LayerLoopGraphs(view, max_tokens=10, device="cpu", dtype=torch.float32, row_buckets=(32, 16))
    with pytest.raises(ValueError, match="CUDA"):
        LayerLoopGraphs(view, max_tokens=10, device="cpu", dtype=torch.float32, capture=True)


# ---------------------------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.gpu  # CUDA graph capture: auto-skipped without a GPU (run on the H200)


def _cuda_model(dtype):
    m = tiny("qwen2").to("cuda", dtype)
    return m, rope_spec_of(m)


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_graphs_replay_the_eager_executor_on_cuda(dtype):
    dtype = getattr(torch, dtype)
    model, spec = _cuda_model(dtype)
    view = TransformersModelView(model)
    graphs = LayerLoopGraphs(view, max_tokens=4096, device="cuda", dtype=dtype)
    plan = plan_of(SEAMS, N, ranges=((HALF, HALF + 2),))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for seed in (1, 2, 3):  # capture on the first hit, replay on the next ones
        ids = prompt(seed=seed).cuda()
        _, k_ref, v_ref = cold(model, ids)
        kv = torch.stack((k_ref, v_ref), dim=1)
        want = run(view, ids, plan, spec, kv, reuse_len=N - 8, logits=True)
        got = run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=N - 8, logits=True, out=graphs.scratch(N))
        torch.testing.assert_close(got[1], want[1], **tol)
        torch.testing.assert_close(got[2], want[2], **tol)
        torch.testing.assert_close(got[3], want[3], **tol)
    assert graphs.captures == 1 and graphs.replays == 2 and not graphs.disabled and not graphs.fallbacks
    # A longer hit grows the scratch and drops every graph (their pool is released); the next capture needs a new
    # pool (capturing into the released one fails an allocator assert).
    assert graphs.scratch(1500) is not None and graphs.summary()["graphs"] == []
    got = run(view, ids, plan, spec, kv, graphs=graphs, reuse_len=N - 8, logits=True, out=graphs.scratch(N))
    torch.testing.assert_close(got[1], want[1], **tol)
    assert graphs.captures == 2 and not graphs.disabled and graphs.summary()["graphs"] == [(16, 1024)]


@cuda
def test_a_failed_self_check_switches_graphs_off_and_the_hit_still_runs(monkeypatch):
    from semblend_core import layer_graphs

    model, spec = _cuda_model(torch.float32)
    view = TransformersModelView(model)
    graphs = LayerLoopGraphs(view, max_tokens=4096, device="cuda", dtype=torch.float32)
    monkeypatch.setattr(layer_graphs, "relative_error", lambda got, want: 1.0)
    ids = prompt().cuda()
    ref_logits, k_ref, v_ref = cold(model, ids)
    plan = plan_of(SEAMS, N, ranges=((HALF, HALF + 2),))
    got = run(view, ids, plan, spec, torch.stack((k_ref, v_ref), dim=1), graphs=graphs, reuse_len=N - 8,
              logits=True, out=graphs.scratch(N))
    assert "replay differs" in graphs.disabled and graphs.fallbacks == {"capture_failed": 1}
    torch.testing.assert_close(got[1], ref_logits, atol=1e-4, rtol=1e-4)
    assert graphs.scratch(N) is None
    assert np.isfinite(got[1].cpu().numpy()).all()
