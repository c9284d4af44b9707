import numpy as np
import pytest

from semblend_core import SemBlendConfig, SemBlendPipeline
from semblend_core.donor_store import DonorStore

pytest.importorskip("usearch")


def _unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_usearch_matches_exact_cosine_top1_and_respects_namespace_and_eviction():
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 300, 32)
    exact = DonorStore(1000, embedding_dim=32)
    ann = DonorStore(1000, embedding_dim=32, ann_backend="usearch")
    tokens = rng.integers(0, 1000, 40)
    for i, v in enumerate(vecs):
        for store in (exact, ann):
            store.register(f"d{i}", tokens + i, "ns" if i % 2 == 0 else "other", embedding=v)
    queries = vecs[::2][:50] + 0.05 * _unit(rng, 50, 32)
    agree = 0
    for q in queries:
        q = q / np.linalg.norm(q)
        e = exact.nearest(q, "ns", 1)[0]
        a = ann.nearest(q, "ns", 1)[0]
        agree += exact.get(e[0]).donor_id == ann.get(a[0]).donor_id
        assert ann.get(a[0]).namespace_key == "ns"
    assert agree >= 48
    assert ann.remove("d0", "ns")
    found = ann.nearest(vecs[0], "ns", 3)
    assert all(ann.get(s).donor_id != "d0" for s, _ in found)


def test_pipeline_accepts_ann_backend():
    p = SemBlendPipeline(SemBlendConfig(ann_backend="usearch", min_prompt_tokens=8))
    doc = np.random.default_rng(1).integers(0, 50000, 300)
    p.register_donor("d", doc, text="a text about cats")
    assert p.plan(np.concatenate([[1, 2], doc]), text="cats").donor_id == "d"
