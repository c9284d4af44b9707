"""The shared blended-prefill executor (``semblend_core.blended_prefill``) on tiny random-weight transformers models.

The executor's logic needs no real weights: every plan here reuses the prompt's *own* cold KV (delta 0), so
whatever the executor recomputes or reuses, a correct run reproduces the model's own cold forward (logits and K/V
of every layer), and any deviation is an executor bug. The reference is always an independent forward of the
Hugging Face model, never a recorded number. Real weights: ``tests/integration/transformers/test_hf_smollm2_executor.py``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from semblend.integration.transformers.blend import TransformersModelView, model_support
from semblend_core.blended_prefill import BlendModelView, BlendStats, assemble_kv, run_blended_prefill
from semblend_core.namespace import CacheNamespace
from semblend_core.plan import Reason, SemanticKvPlan, Span
from semblend_core.recompute import SelectionStrategy

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
FAMILIES = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16}}
N = 80


def tiny(model_type: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**BASE, **FAMILIES[model_type]})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def prompt(n: int = N, seed: int = 1):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def cold(model, ids):
    """``(logits [vocab] float32, k, v [num_layers, n, kv_heads, head_dim])`` of the model's own forward."""
    from semblend.integration.transformers.engine import cache_layers_kv

    with torch.no_grad():
        out = model(ids[None], use_cache=True)
    layers = cache_layers_kv(out.past_key_values)
    k = torch.stack([lk[0].transpose(0, 1) for lk, _ in layers])
    v = torch.stack([lv[0].transpose(0, 1) for _, lv in layers])
    return out.logits[0, -1].float(), k, v


def plan_of(spans, n, *, budget=0.0, ranges=(), num_layers=4):
    return SemanticKvPlan(True, Reason.HIT, n, CacheNamespace(), donor_id="d", donor_len=n, spans=tuple(spans),
                          recompute_ranges=tuple(ranges), recompute_budget=budget,
                          layer_recompute=(budget,) * num_layers if budget else ())


def scratch(plan, k_cold, v_cold, reuse_len, n, spec):
    """The executor's input: the plan's spans of the prompt's own KV re-rotated into place (rows no span covers
    are zero)."""
    return assemble_kv(plan, torch.stack((k_cold, v_cold), dim=1), reuse_len, spec, total_len=n)


def assert_kv_equal(k, v, k_ref, v_ref, rows=slice(None)):
    torch.testing.assert_close(k[:, rows], k_ref[:, rows], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(v[:, rows], v_ref[:, rows], atol=2e-5, rtol=1e-4)


class SpyView(TransformersModelView):
    """The real view, counting the executor's calls; ``logits`` refuses (a view without an LM head)."""

    def __init__(self, model):
        super().__init__(model)
        self.calls: dict[str, int] = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def embed(self, token_ids):
        self._count("embed")
        return super().embed(token_ids)

    def qkv(self, layer, hidden):
        self._count("qkv")
        return super().qkv(layer, hidden)

    def finish_layer(self, layer, attn_out, residual):
        self._count("finish_layer")
        return super().finish_layer(layer, attn_out, residual)

    def logits(self, hidden):
        raise AssertionError("logits must not be called with logits=False")


def rope_spec_of(model):
    """The model's RoPE spec, asserting the executor supports it."""
    ok, reason, rope_spec = model_support(model)
    assert ok, reason
    return rope_spec


@pytest.fixture(scope="module")
def spec(llama):
    return rope_spec_of(llama)


# Plans over the prompt's own KV: (spans, recompute ranges, budget, check_layer, selection).
HALF = N // 2
PATHS = {
    "exact_prefix": ((Span(0, 0, N - 8),), (), 0.0, 1, None),
    "seam_no_budget": ((Span(0, 0, HALF), Span(HALF, HALF, N - 8 - HALF)), ((HALF, HALF + 2),), 0.0, 1, None),
    "seam_checked": ((Span(0, 0, HALF), Span(HALF, HALF, N - 8 - HALF)), ((HALF, HALF + 2),), 0.3, 1, None),
    "full_recompute": ((Span(0, 0, HALF), Span(HALF, HALF, N - 8 - HALF)), (), 1.0, 1, None),
    "query_selected": ((Span(0, 0, HALF), Span(HALF, HALF, N - 8 - HALF)), ((HALF, HALF + 2),), 0.3, None,
                       SelectionStrategy("query")),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_view_executor_reproduces_the_cold_forward(family, path):
    """logits=True through TransformersModelView: logits and every layer's K/V equal the model's own forward, on
    every allowlisted family (Qwen3: per-head q/k norms) and every active-set path."""
    model = tiny(family)
    ok, reason, spec = model_support(model)
    assert ok, reason
    spans, ranges, budget, check_layer, selection = PATHS[path]
    ids = prompt()
    ref_logits, k_ref, v_ref = cold(model, ids)
    plan = plan_of(spans, N, budget=budget, ranges=ranges)
    reuse_len = N - 8
    k, v = assemble_kv(plan, torch.stack((k_ref, v_ref), dim=1), reuse_len, spec, total_len=N)
    with torch.no_grad():
        stats, logits = run_blended_prefill(TransformersModelView(model), ids, k, v, plan, reuse_len=reuse_len,
                                            check_layer=check_layer, selection=selection)
    assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert_kv_equal(k, v, k_ref, v_ref)
    assert stats.prefix_len == reuse_len and stats.fixed_prefix == 0
    if path == "exact_prefix":
        assert stats.token_layers == 0 and not stats.checked
    if path == "full_recompute":  # budget 1: every seamed token fresh at every layer (the prefix span is exact)
        assert stats.checked and stats.active_per_layer == (reuse_len,) * 2 + (reuse_len - HALF,) * 2
    if path == "seam_checked":
        assert stats.checked and stats.active_per_layer[:2] == (reuse_len, reuse_len)
        assert stats.mandatory == 2 < stats.active_per_layer[2] < reuse_len
    if path == "query_selected":
        assert not stats.checked and stats.probe_token_layers > 0 and stats.active_per_layer[0] > 2


def test_blend_prefill_wrapper_is_the_executor(llama, spec):
    from semblend.integration.transformers.blend import blend_prefill

    spans, ranges, budget, check_layer, _ = PATHS["seam_checked"]
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    plan = plan_of(spans, N, budget=budget, ranges=ranges)
    runs = []
    for fn in (blend_prefill, None):
        k, v = scratch(plan, k_ref, v_ref, N - 8, N, spec)
        with torch.no_grad():
            if fn is None:
                runs.append(run_blended_prefill(TransformersModelView(llama), ids, k, v, plan, reuse_len=N - 8,
                                                check_layer=check_layer) + (k, v))
            else:
                runs.append(fn(llama, ids, k, v, plan, reuse_len=N - 8, check_layer=check_layer) + (k, v))
    (s0, l0, k0, v0), (s1, l1, k1, v1) = runs
    assert s0 == s1 and torch.equal(l0, l1) and torch.equal(k0, k1) and torch.equal(v0, v1)


def test_logits_false_fills_uncovered_rows_with_cold_kv_and_skips_the_last_layers_attention(llama, spec):
    """reuse_len == n, an exact prefix [0, A) and uncovered rows [A, n): only those rows run, every layer's K/V
    equals cold, the last layer runs no attention / MLP and no logits."""
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    a = 50
    plan = plan_of((Span(0, 0, a),), N)
    k, v = scratch(plan, k_ref, v_ref, N, N, spec)
    assert not k[:, a:].any()  # really uncovered: zero until computed
    view = SpyView(llama)
    with torch.no_grad():
        stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=N, logits=False)
    assert logits is None
    assert_kv_equal(k, v, k_ref, v_ref)
    assert stats == BlendStats(N, (N - a,) * 4, False, N - a, 0, 0)
    assert view.calls == {"embed": 1, "qkv": 4, "finish_layer": 3}


def test_logits_false_with_seams_checked_and_selected(llama, spec):
    """logits=False through the deviation check and a query-aware selection: still cold K/V everywhere (the KV
    reused is the prompt's own), budgeted rows counted, no logits."""
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    spans = (Span(0, 0, 30), Span(36, 36, N - 36))  # uncovered [30, 36), a seamed span up to n
    for kwargs in (dict(check_layer=1), dict(selection=SelectionStrategy("query"))):
        plan = plan_of(spans, N, budget=0.3, ranges=((36, 38),))
        k, v = scratch(plan, k_ref, v_ref, N, N, spec)
        view = SpyView(llama)
        with torch.no_grad():
            stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=N, logits=False, **kwargs)
        assert logits is None
        assert_kv_equal(k, v, k_ref, v_ref)
        assert stats.mandatory == 8 and min(stats.active_per_layer) >= 8 and stats.token_layers > 8 * 4
        assert stats.checked == ("check_layer" in kwargs)


FIXED_PATHS = {"plain": (0.0, dict(check_layer=None)), "checked": (0.5, dict(check_layer=1)),
               "selected": (0.5, dict(selection=SelectionStrategy("query")))}


@pytest.mark.parametrize("with_logits", [False, True])
@pytest.mark.parametrize("path", sorted(FIXED_PATHS))
def test_fixed_prefix_rows_are_never_touched_nor_counted(llama, spec, path, with_logits):
    """[0, F) is the engine's own exact hit: no span there, yet not recomputed, not a candidate, bitwise intact
    and not counted, through the plain, checked and selected paths, with and without logits."""
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    f, p = 24, N - 8
    budget, kwargs = FIXED_PATHS[path]
    plan = plan_of((Span(f, f, p - f),), N, budget=budget)  # seamed (not at 0): candidates [f, p)
    reuse_len = p if with_logits else N  # logits=False: the tail [p, n) is rows no span covers
    k, v = scratch(plan, k_ref, v_ref, reuse_len, N, spec)
    # The engine's rows, offset so that a rewrite (which would reproduce the cold KV) cannot go unnoticed.
    k[:, :f], v[:, :f] = k_ref[:, :f] + 1e-3, v_ref[:, :f] - 1e-3
    k_fixed, v_fixed = k[:, :f].clone(), v[:, :f].clone()
    with torch.no_grad():
        stats, logits = run_blended_prefill(TransformersModelView(llama), ids, k, v, plan, reuse_len=reuse_len,
                                            logits=with_logits, fixed_prefix=f, **kwargs)
    assert torch.equal(k[:, :f], k_fixed) and torch.equal(v[:, :f], v_fixed)
    assert stats.fixed_prefix == f and stats.prefix_len == reuse_len
    mandatory = 0 if with_logits else N - p  # with logits, [p, n) is the suffix, not counted
    assert stats.mandatory == mandatory
    assert max(stats.active_per_layer) <= reuse_len - f
    if path == "plain":
        assert stats.active_per_layer == (mandatory,) * 4 and not stats.checked
    if path == "checked":
        assert stats.checked and stats.active_per_layer[:2] == (reuse_len - f,) * 2
        assert mandatory < stats.active_per_layer[2] < reuse_len - f
    if path == "selected":
        assert not stats.checked and stats.active_per_layer[0] > mandatory
    assert (logits is None) == (not with_logits)


def test_fixed_prefix_matches_cold_exactly_when_its_kv_is_final(llama, spec):
    ids = prompt()
    ref_logits, k_ref, v_ref = cold(llama, ids)
    f, p = 24, N - 8
    plan = plan_of((Span(f, f, p - f),), N)
    for with_logits, reuse_len in ((True, p), (False, N)):
        k, v = scratch(plan, k_ref, v_ref, reuse_len, N, spec)
        k[:, :f], v[:, :f] = k_ref[:, :f], v_ref[:, :f]
        with torch.no_grad():
            _, logits = run_blended_prefill(TransformersModelView(llama), ids, k, v, plan, reuse_len=reuse_len,
                                            logits=with_logits, fixed_prefix=f)
        assert_kv_equal(k, v, k_ref, v_ref)
        if with_logits:
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_nothing_to_compute_returns_at_once(llama):
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    cases = {
        "all_exact": (plan_of((Span(0, 0, N),), N), 0),
        "seamed_without_budget": (plan_of((Span(0, 0, 30), Span(30, 30, N - 30)), N, budget=0.0), 0),
        "all_fixed": (plan_of((), N), N),
        "fixed_then_exact": (plan_of((Span(0, 0, N),), N), 16),
    }
    for name, (plan, fixed) in cases.items():
        k, v = k_ref.clone(), v_ref.clone()
        view = SpyView(llama)
        stats, logits = run_blended_prefill(view, ids, k, v, plan, reuse_len=N, logits=False, fixed_prefix=fixed)
        assert logits is None and view.calls == {}, name
        assert stats == BlendStats(N, (0,) * 4, False, 0, 0, fixed), name
        assert stats.token_layers == 0
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref), name


def test_the_check_compares_fresh_kv_with_the_reused_rows(llama, spec):
    """Rows whose reused K/V deviate (here: corrupted at and above the check layer) are the ones kept fresh after
    it. Were the fresh K/V compared with themselves (the store already done), every score would be 0 and the
    ranking would keep the first candidates instead: the corrupted rows would stay corrupted."""
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    spans = (Span(0, 0, 8), Span(8, 8, N - 8))  # candidates [8, n)
    bad = torch.tensor([60, 70, 75])
    for with_logits, reuse_len in ((False, N), (True, N - 1)):
        plan = plan_of(spans, N, budget=0.1)
        k, v = scratch(plan, k_ref, v_ref, reuse_len, N, spec)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(k[1:, bad].shape, generator=gen)
        k[1:, bad] += noise
        v[1:, bad] -= noise
        with torch.no_grad():
            stats, _ = run_blended_prefill(TransformersModelView(llama), ids, k, v, plan, reuse_len=reuse_len,
                                           check_layer=1, logits=with_logits)
        assert stats.checked and 3 <= stats.active_per_layer[2] < reuse_len - 8
        assert_kv_equal(k, v, k_ref, v_ref, rows=bad)  # recomputed at every layer: the check picked them


def test_bad_arguments_raise(llama):
    ids = prompt()
    _, k_ref, v_ref = cold(llama, ids)
    plan = plan_of((Span(0, 0, N - 8),), N)
    view = TransformersModelView(llama)
    for kwargs, match in ((dict(reuse_len=N), "logits=True"), (dict(reuse_len=0), "reuse_len"),
                          (dict(reuse_len=N + 1, logits=False), "logits=False"),
                          (dict(reuse_len=N - 8, fixed_prefix=N - 7), "fixed_prefix"),
                          (dict(reuse_len=N - 8, fixed_prefix=-1), "fixed_prefix")):
        with pytest.raises(ValueError, match=match):
            run_blended_prefill(view, ids, k_ref.clone(), v_ref.clone(), plan, **kwargs)
    with pytest.raises(ValueError, match="num_layers=4, n=80"):
        run_blended_prefill(view, ids, k_ref[:, :-1], v_ref[:, :-1], plan, reuse_len=N - 8)

    class NoHead(TransformersModelView):
        logits = BlendModelView.logits  # the contract's default: no LM head

    k = k_ref.clone()
    with pytest.raises(ValueError, match="no LM head"):
        run_blended_prefill(NoHead(llama), ids, k, v_ref.clone(), plan_of((Span(0, 0, 40),), N), reuse_len=N - 8)
    assert torch.equal(k, k_ref)  # refused before any work
    stats, logits = run_blended_prefill(NoHead(llama), ids, k, v_ref.clone(), plan_of((Span(0, 0, 40),), N),
                                        reuse_len=N, logits=False)
    assert logits is None and stats.mandatory == N - 40


def test_blend_stats_fixed_prefix_defaults_to_zero():
    stats = BlendStats(10, (2, 1), True, 1)
    assert stats.fixed_prefix == 0 and stats.token_layers == 3
    assert [f.name for f in dataclasses.fields(BlendStats)][-1] == "fixed_prefix"


def test_view_dimensions_follow_the_model(llama):
    view = TransformersModelView(tiny("qwen3"))
    assert (view.num_layers, view.num_kv_heads, view.head_dim) == (4, 2, 16)
    view = TransformersModelView(llama)
    assert (view.num_layers, view.num_kv_heads, view.head_dim) == (4, 2, 16)
    cos, sin = view.rotary(torch.arange(5))
    assert cos.shape == sin.shape == (5, 16) and torch.equal(cos[:, :8], cos[:, 8:])
    assert np.isclose(view.attention_scale(0), 16 ** -0.5)


def test_importing_the_executor_does_not_import_torch():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "triton", "transformers"):
            sys.modules[name] = None
        from semblend_core.blended_prefill import BlendModelView, BlendStats, run_blended_prefill, _nested_counts
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
