"""Fused RoPE + KV-cache store: the torch twin against Hugging Face, host-wrapper validation, and the Triton kernel
against the twin.

Anchor: :func:`rope_store_reference` equals Hugging Face's own ``apply_rotary_pos_emb`` (Llama) with
``LlamaRotaryEmbedding`` cos/sin in float32 to 1e-6. Kernel vs twin: float32 to 1e-5; fp16/bf16 within about one
ulp (compared as float with atol = rtol = 1e-2; both round a float32 result once, so they differ at most where GPU
FMA contraction moves a float32 result across a rounding boundary). Rows of the cache not in ``positions`` must
stay bit-identical.

The Triton kernel runs on CPU through ``TRITON_INTERPRET=1``, which must be set before triton is imported, so those
cases run in one subprocess per module; a Qwen2.5-7B-sized case runs on CUDA under ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import os

import pytest
import triton_interpreter

torch = pytest.importorskip("torch")

from semblend_core.rope_store import kernel_available, rope_store, rope_store_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float32": {"atol": 1e-5, "rtol": 1e-5}, "bfloat16": {"atol": 1e-2, "rtol": 1e-2},
       "float16": {"atol": 1e-2, "rtol": 1e-2}}


# --------------------------------------------------------------------------- shared case machinery
def hf_cos_sin(positions, head_dim: int, dtype, theta: float = 10000.0):
    """Hugging Face default RoPE rows ``[n, head_dim]`` (halves duplicated), computed as LlamaRotaryEmbedding does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(case: dict, device: str = "cpu") -> dict:
    """Fresh inputs for one case. Keys: seed, dtype, n, hq, hkv, d, kv_len; optional cache_dtype, cos_dtype,
    cache_layout ("strided": ``buf.transpose(0, 1)`` of a ``[hkv, kv_len, d]`` buffer | "contiguous"),
    cos_layout ("strided": rows of a wider table), q_out ("new" | "strided" | "inplace")."""
    g = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    cache_dtype = DTYPES[case.get("cache_dtype", case["dtype"])]
    n, hq, hkv, d, kv_len = case["n"], case["hq"], case["hkv"], case["d"], case["kv_len"]
    # q/k/v: views of one fused projection output [n, (hq + 2 hkv) * d], as a model's qkv_proj produces.
    proj = (torch.randn(n, (hq + 2 * hkv) * d, generator=g) * 2).to(dtype)
    q = proj[:, : hq * d].view(n, hq, d)
    k = proj[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
    v = proj[:, (hq + hkv) * d:].view(n, hkv, d)
    positions = torch.randperm(kv_len, generator=g)[:n]  # unsorted, distinct
    cos, sin = hf_cos_sin(positions + case.get("offset", 0), d, DTYPES.get(case.get("cos_dtype"), torch.float32))
    if case.get("cos_layout") == "strided":
        wide = torch.zeros(n, 2, d, dtype=cos.dtype)
        wide[:, 0], wide[:, 1] = cos, sin
        cos, sin = wide[:, 0], wide[:, 1]
    if case.get("cache_layout", "strided") == "strided":
        kc = torch.randn(hkv, kv_len, d, generator=g).to(cache_dtype).transpose(0, 1)
        vc = torch.randn(hkv, kv_len, d, generator=g).to(cache_dtype).transpose(0, 1)
    else:
        kc = torch.randn(kv_len, hkv, d, generator=g).to(cache_dtype)
        vc = torch.randn(kv_len, hkv, d, generator=g).to(cache_dtype)
    out = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "positions": positions.to(torch.int64),
           "k_cache": kc, "v_cache": vc}
    return {name: t.to(device) for name, t in out.items()}


def _clone_cache(t):
    """A copy with the same strides (so the reference writes through the same layout)."""
    c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    c.copy_(t)
    return c


def run_case(case: dict, device: str = "cpu") -> dict:
    """Kernel (through the public wrapper) vs the torch twin. Returns failure messages (None = pass)."""
    x = make_inputs(case, device)
    k0, v0 = x["k_cache"].clone(), x["v_cache"].clone()
    ref_kc, ref_vc = _clone_cache(x["k_cache"]), _clone_cache(x["v_cache"])
    q_ref = rope_store_reference(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["positions"], ref_kc, ref_vc,
                                 check_positions=True)
    mode = case.get("q_out", "new")
    q_in = x["q"]
    q_out = None
    if mode == "strided":
        q_out = torch.full((q_in.shape[0], q_in.shape[1] + 3, q_in.shape[2]), float("nan"), dtype=q_in.dtype,
                           device=device)[:, 1: 1 + q_in.shape[1]]
    elif mode == "inplace":
        q_in = q_in.clone()
        q_out = q_in
    q_k = rope_store(q_in, x["k"], x["v"], x["cos"], x["sin"], x["positions"], x["k_cache"], x["v_cache"],
                     q_out=q_out, check_positions=True)
    res = {"kernel_ran": kernel_available(device), "returned_out": q_out is None or q_k is q_out,
           "contiguous": q_out is not None or q_k.is_contiguous(), "dtype": str(q_k.dtype)}
    tol = TOL[case["dtype"]]
    for name, a, b in (("q", q_k, q_ref), ("k_cache", x["k_cache"], ref_kc), ("v_cache", x["v_cache"], ref_vc)):
        try:
            torch.testing.assert_close(a.float(), b.float(), **tol)
            res[name] = None
        except AssertionError as exc:
            res[name] = str(exc)
        res[name + "_max_abs"] = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    untouched = torch.ones(x["k_cache"].shape[0], dtype=torch.bool, device=device)
    untouched[x["positions"]] = False
    res["untouched_equal"] = bool(torch.equal(x["k_cache"][untouched], k0[untouched])
                                  and torch.equal(x["v_cache"][untouched], v0[untouched]))
    res["v_exact"] = bool(torch.equal(x["v_cache"][x["positions"]], x["v"].to(x["v_cache"].dtype)))
    return res


def check(case: dict, res: dict) -> None:
    assert res["kernel_ran"]
    for name in ("q", "k_cache", "v_cache"):
        assert res[name] is None, f"{case}: {name} kernel vs reference:\n{res[name]}"
    assert res["returned_out"] and res["contiguous"]
    assert res["dtype"] == str(DTYPES[case["dtype"]])
    assert res["untouched_equal"], f"{case}: cache rows outside positions changed"
    assert res["v_exact"], f"{case}: v not stored exactly"


def interp_cases() -> list[dict]:
    cases = []
    seed = 0
    for dtype in DTYPES:
        for d in (64, 128, 80):
            seed += 1
            cases.append({"seed": seed, "dtype": dtype, "n": 9, "hq": 14, "hkv": 2, "d": d, "kv_len": 40,
                          "cos_dtype": dtype if seed % 2 else "float32", "offset": 1000})
    cases += [
        {"seed": 50, "dtype": "bfloat16", "n": 1, "hq": 28, "hkv": 4, "d": 128, "kv_len": 5},       # single token
        {"seed": 51, "dtype": "float16", "n": 6, "hq": 5, "hkv": 3, "d": 96, "kv_len": 11,         # hq % hkv != 0
         "cache_layout": "contiguous", "cos_layout": "strided", "q_out": "strided"},
        {"seed": 52, "dtype": "float32", "n": 4, "hq": 64, "hkv": 8, "d": 256, "kv_len": 9,        # several head blocks
         "q_out": "inplace"},
        {"seed": 53, "dtype": "float32", "n": 7, "hq": 7, "hkv": 1, "d": 80, "kv_len": 30,         # fp32 -> bf16 cache
         "cache_dtype": "bfloat16", "offset": 31000},
        {"seed": 54, "dtype": "bfloat16", "n": 12, "hq": 4, "hkv": 4, "d": 2, "kv_len": 12},       # every row, d=2
    ]
    return cases


@pytest.fixture(scope="module")
def interp_results():
    return triton_interpreter.run_cases("test_rope_store", interp_cases())


def _case_id(c: dict) -> str:
    extra = [f"{key}={c[key]}" for key in ("cache_dtype", "cache_layout", "cos_layout", "q_out") if key in c]
    return "-".join([c["dtype"], f"n{c['n']}", f"h{c['hq']}/{c['hkv']}", f"d{c['d']}", f"L{c['kv_len']}"] + extra)


@pytest.mark.parametrize("case", interp_cases(), ids=_case_id)
def test_kernel_interpreter(case, interp_results):
    check(case, interp_results[triton_interpreter.case_key(case)])


# --------------------------------------------------------------------------- reference (no triton)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_reference_matches_hugging_face(head_dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hq, hkv, n, kv_len = 14, 2, 9, 3000
    config = LlamaConfig(hidden_size=hq * head_dim, num_attention_heads=hq, num_key_value_heads=hkv,
                         head_dim=head_dim, max_position_embeddings=4096)
    g = torch.Generator().manual_seed(head_dim)
    positions = torch.randperm(kv_len, generator=g)[:n]
    q = torch.randn(n, hq, head_dim, generator=g)
    k = torch.randn(n, hkv, head_dim, generator=g)
    v = torch.randn(n, hkv, head_dim, generator=g)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, n, head_dim], float32
    torch.testing.assert_close(cos[0, :, : head_dim // 2], cos[0, :, head_dim // 2:], rtol=0, atol=0)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # [1, H, n, D]

    kc = torch.randn(hkv, kv_len, head_dim, generator=g).transpose(0, 1)
    vc = torch.randn(hkv, kv_len, head_dim, generator=g).transpose(0, 1)
    k0, v0 = kc.clone(), vc.clone()
    out = rope_store_reference(q, k, v, cos[0], sin[0], positions, kc, vc, check_positions=True)
    torch.testing.assert_close(out, q_hf[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(kc[positions], k_hf[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(vc[positions], v, rtol=0, atol=0)
    rest = torch.ones(kv_len, dtype=torch.bool)
    rest[positions] = False
    assert torch.equal(kc[rest], k0[rest]) and torch.equal(vc[rest], v0[rest])
    assert out.is_contiguous()


def test_reference_rounds_once():
    """Half dtypes: the result is the float32 rotation rounded once (not HF's per-op rounding at bf16)."""
    case = {"seed": 3, "dtype": "bfloat16", "n": 5, "hq": 4, "hkv": 2, "d": 32, "kv_len": 8}
    x = make_inputs(case)
    out = rope_store_reference(x["q"], x["k"], x["v"], x["cos"], x["sin"], x["positions"], x["k_cache"],
                               x["v_cache"])
    q32 = x["q"].float()
    rot = torch.cat((-q32[..., 16:], q32[..., :16]), -1)
    want = (q32 * x["cos"][:, None] + rot * x["sin"][:, None]).to(torch.bfloat16)
    assert torch.equal(out, want)


def test_cpu_wrapper_without_interpreter_uses_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the wrapper runs the kernel on CPU")
    assert not kernel_available("cpu")
    case = {"seed": 5, "dtype": "bfloat16", "n": 5, "hq": 8, "hkv": 2, "d": 16, "kv_len": 12}
    x, y = make_inputs(case), make_inputs(case)
    out = rope_store(*x.values())
    want = rope_store_reference(*y.values())
    assert torch.equal(out, want) and torch.equal(x["k_cache"], y["k_cache"]) and torch.equal(x["v_cache"],
                                                                                                y["v_cache"])
    q_out = torch.empty_like(out)
    assert rope_store(*make_inputs(case).values(), q_out=q_out) is q_out and torch.equal(q_out, want)


def test_empty_token_set():
    x = make_inputs({"seed": 1, "dtype": "float32", "n": 0, "hq": 4, "hkv": 2, "d": 16, "kv_len": 6})
    k0 = x["k_cache"].clone()
    out = rope_store(*x.values())
    assert out.shape == (0, 4, 16) and out.dtype == torch.float32
    assert torch.equal(x["k_cache"], k0)
    assert rope_store_reference(*x.values()).shape == (0, 4, 16)


def _bad_args() -> dict:
    return make_inputs({"seed": 2, "dtype": "float32", "n": 3, "hq": 4, "hkv": 2, "d": 16, "kv_len": 10,
                        "cache_layout": "contiguous"})


@pytest.mark.parametrize("bad, err, match", [
    ({"q": torch.randn(3, 64)}, ValueError, "q must be 3-D"),
    ({"k_cache": torch.randn(10, 32)}, ValueError, "k_cache must be 3-D"),
    ({"cos": torch.randn(1, 3, 16)}, ValueError, "cos must be 2-D"),
    ({"sin": torch.randn(3, 8)}, ValueError, r"sin must have shape \[n=3, head_dim=16\]"),
    ({"k": torch.randn(3, 3, 16)}, ValueError, "k shape"),
    ({"k": torch.randn(4, 2, 16), "v": torch.randn(4, 2, 16)}, ValueError, "does not match q"),
    ({"q": torch.randn(3, 4, 15), "k": torch.randn(3, 2, 15), "v": torch.randn(3, 2, 15)}, ValueError, "even"),
    ({"q": torch.randn(3, 4, 258), "k": torch.randn(3, 2, 258), "v": torch.randn(3, 2, 258)}, ValueError, "256"),
    ({"q": torch.randn(3, 0, 16)}, ValueError, "zero heads"),
    ({"k_cache": torch.randn(10, 3, 16), "v_cache": torch.randn(10, 3, 16)}, ValueError, "does not match k"),
    ({"v_cache": torch.randn(11, 2, 16)}, ValueError, "v_cache shape"),
    ({"positions": torch.tensor([0, 1])}, ValueError, "positions must have shape"),
    ({"positions": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "positions.dtype"),
    ({"q": torch.randn(3, 4, 16, dtype=torch.float64)}, TypeError, "q.dtype"),
    ({"v": torch.randn(3, 2, 16, dtype=torch.float16)}, TypeError, "dtypes differ"),
    ({"v_cache": torch.randn(10, 2, 16, dtype=torch.float16)}, TypeError, "v_cache.dtype"),
    ({"cos": torch.ones(3, 16, dtype=torch.int32)}, TypeError, "cos.dtype"),
    ({"k": torch.randn(3, 16, 2).transpose(1, 2)}, ValueError, "k needs a unit stride"),
    ({"k_cache": torch.randn(10, 16, 2).transpose(1, 2)}, ValueError, "k_cache needs a unit stride"),
    ({"q_out": torch.empty(3, 4, 8)}, ValueError, "q_out must match q"),
    ({"q_out": torch.empty(3, 4, 16, dtype=torch.float16)}, ValueError, "q_out must match q"),
    ({"q_out": torch.empty(3, 16, 4).transpose(1, 2)}, ValueError, "q_out needs a unit stride"),
    ({"q_out": "out"}, TypeError, "q_out must be a torch.Tensor"),
    ({"positions": [0, 1, 2]}, TypeError, "positions must be a torch.Tensor"),
    ({"positions": torch.tensor([0, 5, 10]), "check_positions": True}, ValueError, r"\[0, kv_len=10\)"),
    ({"positions": torch.tensor([-1, 5, 9]), "check_positions": True}, ValueError, r"\[0, kv_len=10\)"),
])
@pytest.mark.parametrize("fn", [rope_store, rope_store_reference], ids=["wrapper", "reference"])
def test_validation_errors(fn, bad, err, match):
    args = _bad_args()
    bad = dict(bad)  # shared between the two fn parametrizations
    kw = {key: bad.pop(key) for key in ("q_out", "check_positions") if key in bad}
    args.update(bad)
    with pytest.raises(err, match=match):
        fn(*args.values(), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    args = _bad_args()
    args["v_cache"] = args["v_cache"].cuda()
    with pytest.raises(ValueError, match="share one device"):
        rope_store(*args.values())


# --------------------------------------------------------------------------- CUDA
GPU_CASES = [
    {"seed": 100, "dtype": "bfloat16", "n": 80, "hq": 28, "hkv": 4, "d": 128, "kv_len": 8192,
     "cos_dtype": "bfloat16", "offset": 0},                                 # Qwen2.5-7B layer, HF bf16 cos/sin
    {"seed": 101, "dtype": "float16", "n": 300, "hq": 32, "hkv": 8, "d": 128, "kv_len": 4099, "q_out": "strided"},
    {"seed": 102, "dtype": "float32", "n": 33, "hq": 12, "hkv": 12, "d": 80, "kv_len": 513,
     "cache_layout": "contiguous"},
    {"seed": 103, "dtype": "bfloat16", "n": 17, "hq": 64, "hkv": 8, "d": 256, "kv_len": 300, "q_out": "inplace"},
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_kernel_cuda(case):
    pytest.importorskip("triton")
    assert kernel_available("cuda")
    check(case, run_case(case, device="cuda"))


def test_unvalidated_call_equals_validated_and_skips_the_checks(monkeypatch):
    """``validate=False`` (the executor's per-layer calls after its first) has the same effects and result, and
    where the kernel runs it goes straight to the launch without the argument checks (the twin checks on its own)."""
    import semblend_core.rope_store as rs

    case = {"seed": 4, "dtype": "float32", "n": 5, "hq": 4, "hkv": 2, "d": 16, "kv_len": 9}
    x, y = make_inputs(case), make_inputs(case)
    out, want = rope_store(*x.values(), validate=False), rope_store(*y.values())
    assert torch.equal(out, want) and torch.equal(x["k_cache"], y["k_cache"]) and torch.equal(x["v_cache"],
                                                                                                y["v_cache"])

    def refuse(*a, **kw):
        raise AssertionError("validated")

    monkeypatch.setattr(rs, "_validate", refuse)
    monkeypatch.setattr(rs, "kernel_available", lambda device: True)
    monkeypatch.setattr(rs, "_launch", lambda *a, **kw: "launched")
    assert rope_store(*make_inputs(case).values(), validate=False) == "launched"
    with pytest.raises(AssertionError, match="validated"):
        rope_store(*make_inputs(case).values())
