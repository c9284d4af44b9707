"""`import semblend_core` must work with only numpy + rapidfuzz: every heavy package blocked in sys.modules."""

import subprocess
import sys
import textwrap

BLOCKED = ["torch", "triton", "transformers", "sentence_transformers", "onnxruntime", "vllm", "sglang",
           "tensorrt_llm", "lmcache", "prometheus_client", "usearch", "faiss"]


def test_core_imports_and_plans_with_heavy_packages_blocked():
    code = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # makes `import name` raise ImportError
        import numpy as np
        import semblend_core
        from semblend_core import SemBlendConfig, SemBlendPipeline, SemanticKvPlan, CacheNamespace
        p = SemBlendPipeline(SemBlendConfig(min_prompt_tokens=8))
        doc = np.random.default_rng(0).integers(0, 50000, 500)
        p.register_donor("d", doc, text="a document")
        plan = p.plan(np.concatenate([[1, 2, 3], doc]), text="a question about a document")
        assert plan.is_hit, plan.reason
        heavy = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]
        assert not heavy, heavy
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
