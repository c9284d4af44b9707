"""Partial attention: torch reference, host-wrapper validation, and the Triton kernel against an fp64 reference.

Tolerance rule (STYLE rule 10): ``err(kernel) <= 2 * err(torch at the same dtype) + atol`` where ``err`` is
``||out - ref64|| / ||ref64||``. ``atol`` is the dtype's unit roundoff: the kernel rounds the softmax weights to the
input dtype before ``P @ V`` (as every tensor-core flash kernel does), one rounding more than torch's CPU SDPA.

The Triton kernel runs on CPU through ``TRITON_INTERPRET=1``, which must be set before triton is imported, so those
cases run in one subprocess per session; the same cases, larger, run on CUDA under ``@pytest.mark.gpu``.

Split KV (``splits > 1``: partial states per key range, merged by a second kernel) is forced in the interpreter
through ``_launch(splits=...)``; on CUDA the wrapper's heuristic picks it for few queries over a long KV.
"""

from __future__ import annotations

import math
import os

import pytest
import triton_interpreter

torch = pytest.importorskip("torch")

from semblend_core.partial_attention import (
    kernel_available,
    partial_attention,
    partial_attention_reference,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATOL = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


# --------------------------------------------------------------------------- shared case machinery
def make_inputs(case: dict, device: str = "cpu"):
    """Fresh random inputs for one case. ``case`` keys: seed, dtype, num_q, heads, kv_heads, head_dim, kv_len,
    positions ("sorted" | "unsorted" | "tail" | "dups" | "full" | "low"), layout ("contiguous" | "strided");
    optional: scale_keys, blocks (tile override), splits (KV split override)."""
    g = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    nq, h, kh, d, n = case["num_q"], case["heads"], case["kv_heads"], case["head_dim"], case["kv_len"]
    mode = case.get("positions", "sorted")
    if mode == "full":
        nq = n
        pos = torch.arange(n)
    elif mode == "tail":  # a prefill chunk: the last num_q positions
        pos = torch.arange(n - nq, n)
    elif mode == "dups":
        pos = torch.sort(torch.randint(0, n, (nq,), generator=g)).values
    elif mode == "low":  # every query in the first eighth of the KV: most splits hold no visible key at all
        pos = torch.randint(0, max(1, n // 8), (nq,), generator=g)
    else:
        pos = torch.randperm(n, generator=g)[:nq]
        if mode == "sorted":
            pos = torch.sort(pos).values
        # Always include the extremes when there is room: key 0 only, and the whole KV.
        if nq >= 2:
            pos[0], pos[-1] = (0, n - 1) if mode == "sorted" else (n - 1, 0)
    if case.get("layout", "contiguous") == "strided":
        # vLLM-like: K and V interleaved in one buffer, q a slice of a fused qkv projection.
        kv = torch.randn(n, 2, kh, d, generator=g).to(dtype)
        k, v = kv[:, 0], kv[:, 1]
        qkv = torch.randn(nq, h + 2 * kh, d, generator=g).to(dtype)
        q = qkv[:, :h]
    else:
        q = torch.randn(nq, h, d, generator=g).to(dtype)
        k = torch.randn(n, kh, d, generator=g).to(dtype)
        v = torch.randn(n, kh, d, generator=g).to(dtype)
    if case.get("scale_keys"):
        k = (k.float() * case["scale_keys"]).to(dtype)  # peaky softmax
    return tuple(t.to(device) for t in (q, k, v)) + (pos.to(device=device, dtype=torch.int64),)


def rel_err(out, ref) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def run_case(case: dict, device: str = "cpu") -> dict:
    """Kernel (through the public wrapper) and torch-at-dtype errors against the fp64 reference."""
    from semblend_core.partial_attention import _launch

    q, k, v, pos = make_inputs(case, device)
    ref = partial_attention_reference(q.double(), k.double(), v.double(), pos)
    base = partial_attention_reference(q, k, v, pos)
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)  # poison: every element written
    if case.get("blocks") or case.get("splits"):
        scale = 1.0 / math.sqrt(q.shape[-1])
        blocks = tuple(case["blocks"]) if case.get("blocks") else None
        returned = _launch(q, k, v, pos, scale, out=out, blocks=blocks, splits=case.get("splits"))
    else:
        returned = partial_attention(q, k, v, pos, out=out)
    assert returned is out and out.dtype == q.dtype and out.shape == q.shape
    result = {"kernel": rel_err(out, ref), "torch": rel_err(base, ref), "nan": bool(torch.isnan(out).any())}
    if case.get("positions") == "full":
        # Full query set == ordinary causal attention (independent torch path: is_causal, no explicit mask).
        group = q.shape[1] // k.shape[1]
        causal = torch.nn.functional.scaled_dot_product_attention(
            q.double().transpose(0, 1)[None], k.double().repeat_interleave(group, 1).transpose(0, 1)[None],
            v.double().repeat_interleave(group, 1).transpose(0, 1)[None], is_causal=True)[0].transpose(0, 1)
        result["kernel_vs_causal"] = rel_err(out, causal)
        result["ref_vs_causal"] = float((ref - causal).norm() / causal.norm())
    return result


def check(case: dict, res: dict) -> None:
    assert not res["nan"], f"unwritten or NaN output for {case}"
    bound = 2 * res["torch"] + ATOL[case["dtype"]]
    assert res["kernel"] <= bound, f"{case}: kernel err {res['kernel']:.3e} > {bound:.3e} (torch {res['torch']:.3e})"
    if "kernel_vs_causal" in res:
        assert res["ref_vs_causal"] < 1e-12
        assert res["kernel_vs_causal"] <= bound


SHAPES = [
    # (num_q, heads, kv_heads, head_dim, kv_len, positions, layout)
    (1, 4, 4, 32, 37, "sorted", "contiguous"),       # single query, GQA 1, kv_len not a multiple of any block
    (9, 28, 4, 64, 70, "sorted", "strided"),         # GQA 7 (Qwen2.5-7B ratio), ragged rows, strided K/V
    (13, 8, 2, 80, 50, "unsorted", "contiguous"),    # GQA 4, head_dim not a power of two, unsorted queries
    (17, 7, 1, 32, 33, "tail", "contiguous"),        # prefill chunk: the last 17 positions, GQA 7 with 1 KV head
    (20, 4, 1, 16, 23, "dups", "strided"),           # duplicate positions
    (0, 28, 4, 64, 19, "full", "contiguous"),        # every position: equals full causal attention
]


SPLIT_SHAPES = [
    # (num_q, heads, kv_heads, head_dim, kv_len, positions, layout, splits)
    (9, 14, 2, 64, 300, "sorted", "contiguous", 4),   # GQA 7; split_len 80, kv_len not a multiple; early row
                                                      # blocks lie wholly below the later splits
    (13, 8, 2, 96, 201, "unsorted", "contiguous", 8),  # head_dim 96 (EVEN_D False); split 7 starts past kv_len
    (20, 4, 1, 80, 77, "dups", "strided", 2),          # duplicate positions, head_dim 80, strided K/V
    (11, 14, 2, 32, 500, "low", "contiguous", 8),      # all positions < 62: splits 1..7 empty for every row
    (1, 4, 4, 32, 37, "sorted", "contiguous", 8),      # single query (position 36): 3 splits of 16, 5 empty
    (0, 14, 2, 32, 40, "full", "contiguous", 4),       # every position: equals full causal attention
    (7, 12, 3, 48, 333, "unsorted", "strided", 3),     # splits need not be a power of two
]


def interp_cases() -> list[dict]:
    cases = []
    seed = 0
    for dtype in DTYPES:
        for nq, h, kh, d, n, mode, layout in SHAPES:
            seed += 1
            cases.append({"seed": seed, "dtype": dtype, "num_q": nq, "heads": h, "kv_heads": kh, "head_dim": d,
                          "kv_len": n, "positions": mode, "layout": layout})
    # GPU-like tiles in the interpreter: rows and keys spanning several blocks with ragged tails.
    cases.append({"seed": 99, "dtype": "float16", "num_q": 11, "heads": 28, "kv_heads": 4, "head_dim": 64,
                  "kv_len": 150, "positions": "sorted", "layout": "contiguous", "blocks": [32, 64, 4, 1]})
    cases.append({"seed": 98, "dtype": "bfloat16", "num_q": 40, "heads": 8, "kv_heads": 2, "head_dim": 32,
                  "kv_len": 97, "positions": "unsorted", "layout": "strided", "blocks": [64, 32, 4, 1],
                  "scale_keys": 4.0})
    # Split KV: on CPU the default split tile is 16 keys, so split_len = ceil(ceil(kv_len / splits) / 16) * 16.
    seed = 200
    for dtype in DTYPES:
        for nq, h, kh, d, n, mode, layout, splits in SPLIT_SHAPES:
            seed += 1
            cases.append({"seed": seed, "dtype": dtype, "num_q": nq, "heads": h, "kv_heads": kh, "head_dim": d,
                          "kv_len": n, "positions": mode, "layout": layout, "splits": splits})
    # GPU-like tiles with splits: unmasked tiles cross split boundaries ("tail": lo_full is large), peaky softmax
    # (split maxima far apart).
    cases.append({"seed": 299, "dtype": "bfloat16", "num_q": 12, "heads": 28, "kv_heads": 4, "head_dim": 128,
                  "kv_len": 1000, "positions": "tail", "layout": "contiguous", "blocks": [32, 64, 4, 1],
                  "splits": 4})
    cases.append({"seed": 298, "dtype": "float16", "num_q": 30, "heads": 8, "kv_heads": 2, "head_dim": 96,
                  "kv_len": 700, "positions": "unsorted", "layout": "strided", "blocks": [64, 32, 4, 1],
                  "splits": 8, "scale_keys": 4.0})
    return cases


@pytest.fixture(scope="module")
def interp_results():
    return triton_interpreter.run_cases("test_partial_attention", interp_cases())


@pytest.mark.parametrize("case", interp_cases(), ids=lambda c: f"{c['dtype']}-q{c['num_q']}-h{c['heads']}/{c['kv_heads']}"
                         f"-d{c['head_dim']}-n{c['kv_len']}-{c['positions']}-{c['layout']}"
                         + ("-tiles" if c.get("blocks") else "") + (f"-s{c['splits']}" if c.get("splits") else ""))
def test_kernel_interpreter(case, interp_results):
    check(case, interp_results[triton_interpreter.case_key(case)])


# --------------------------------------------------------------------------- reference and wrapper (no triton)
def naive(q, k, v, pos, scale=None):
    """Per-query, per-head loop in float64: an implementation independent of SDPA."""
    nq, h, d = q.shape
    group = h // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(nq, h, d, dtype=torch.float64)
    for i in range(nq):
        p = int(pos[i])
        for j in range(h):
            kk = k[: p + 1, j // group].double()
            w = torch.softmax((kk @ q[i, j].double()) * scale, dim=0)
            out[i, j] = w @ v[: p + 1, j // group].double()
    return out


@pytest.mark.parametrize("group", [1, 4, 7])
def test_reference_matches_naive_loop(group):
    case = {"seed": group, "dtype": "float32", "num_q": 6, "heads": 2 * group, "kv_heads": 2, "head_dim": 16,
            "kv_len": 21, "positions": "unsorted", "layout": "strided"}
    q, k, v, pos = make_inputs(case)
    ref = partial_attention_reference(q.double(), k.double(), v.double(), pos, scale=0.3)
    torch.testing.assert_close(ref, naive(q, k, v, pos, scale=0.3), rtol=1e-10, atol=1e-12)


def test_cpu_wrapper_without_interpreter_uses_reference():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the wrapper runs the kernel on CPU")
    assert not kernel_available("cpu")
    case = {"seed": 5, "dtype": "bfloat16", "num_q": 5, "heads": 8, "kv_heads": 2, "head_dim": 16, "kv_len": 12}
    q, k, v, pos = make_inputs(case)
    torch.testing.assert_close(partial_attention(q, k, v, pos), partial_attention_reference(q, k, v, pos),
                               rtol=0, atol=0)


def test_empty_query_set():
    q = torch.randn(0, 4, 16)
    k = torch.randn(10, 2, 16)
    out = partial_attention(q, k, k.clone(), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 4, 16) and out.dtype == q.dtype
    assert partial_attention_reference(q, k, k.clone(), torch.zeros(0, dtype=torch.int32)).shape == (0, 4, 16)


def test_single_key():
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 1, 8)
    v = torch.randn(1, 1, 8)
    out = partial_attention(q, k, v, torch.zeros(1, dtype=torch.int64))
    torch.testing.assert_close(out, v.expand(1, 2, 8))  # softmax over one key is 1


@pytest.mark.parametrize("programs, kv_len, block_n, sms, expected", [
    (72, 8192, 64, 132, 4),       # Qwen2.5-7B heads, 80 queries (18 row blocks of 32 x 4 KV heads) on an H100
    (72, 32768, 64, 132, 4),
    (36, 8192, 64, 132, 8),       # 2 * 132 / 36 = 7.3 -> 8
    (100, 8192, 64, 132, 2),      # 2.64 -> 2 (nearest power of two in log scale)
    (9, 1 << 20, 64, 132, 32),    # capped at 32
    (36, 1024, 64, 132, 4),       # at least 256 keys per split
    (36, 1024, 128, 132, 2),      # ... and at least 4 key tiles
    (36, 511, 64, 132, 1),        # too short to split
    (132, 8192, 64, 132, 1),      # the grid already fills the SMs
    (500, 32768, 64, 132, 1),
])
def test_pick_splits(programs, kv_len, block_n, sms, expected):
    from semblend_core.partial_attention import _pick_splits

    assert _pick_splits(programs, kv_len, block_n, sms) == expected


@pytest.mark.parametrize("splits", [0, -1, 2.0, True])
def test_launch_rejects_bad_splits(splits):
    pytest.importorskip("triton")
    from semblend_core.partial_attention import _launch

    q, k, v = torch.randn(2, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="splits"):
        _launch(q, k, v, torch.tensor([3, 9]), 0.25, splits=splits)


@pytest.mark.parametrize("bad, err, match", [
    ({"q": torch.randn(3, 4)}, ValueError, "q must be 3-D"),
    ({"k": torch.randn(10, 3, 16)}, ValueError, "k shape"),
    ({"k": torch.randn(10, 3, 16), "v": torch.randn(10, 3, 16)}, ValueError, "not a multiple of num_kv_heads"),
    ({"q": torch.randn(3, 4, 8)}, ValueError, "head_dim"),
    ({"q": torch.randn(3, 4, 16, dtype=torch.float64)}, TypeError, "q.dtype"),
    ({"v": torch.randn(10, 2, 16, dtype=torch.float16)}, TypeError, "v.dtype|dtypes differ"),
    ({"pos": torch.tensor([0, 1])}, ValueError, "q_positions must have shape"),
    ({"pos": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "q_positions.dtype"),
    ({"pos": torch.tensor([0, 5, 10])}, ValueError, r"\[0, kv_len=10\)"),
    ({"pos": torch.tensor([-1, 5, 9])}, ValueError, r"\[0, kv_len=10\)"),
    ({"q": [1, 2]}, TypeError, "q must be a torch.Tensor"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"out": torch.empty(3, 4, 8)}, ValueError, "out must match q"),
])
def test_validation_errors(bad, err, match):
    args = {"q": torch.randn(3, 4, 16), "k": torch.randn(10, 2, 16), "v": torch.randn(10, 2, 16),
            "pos": torch.tensor([0, 4, 9])}
    args.update(bad)
    kw = {key: args[key] for key in ("scale", "out") if key in args}
    with pytest.raises(err, match=match):
        partial_attention(args["q"], args["k"], args["v"], args["pos"], **kw)


# --------------------------------------------------------------------------- CUDA
GPU_SHAPES = [
    (1, 32, 8, 128, 1000, "sorted", "contiguous"),
    (77, 28, 4, 128, 4099, "sorted", "strided"),       # Qwen2.5-7B heads, ragged everything
    (300, 32, 8, 128, 2048, "unsorted", "contiguous"),  # GQA 4
    (64, 14, 2, 64, 777, "tail", "contiguous"),         # prefill chunk, GQA 7
    (129, 12, 12, 80, 513, "dups", "strided"),          # GQA 1, head_dim 80
    (0, 28, 4, 128, 1031, "full", "contiguous"),        # equals full causal attention
    (45, 8, 4, 256, 300, "sorted", "contiguous"),       # head_dim 256 (Gemma-like), smaller tiles
]


def gpu_cases() -> list[dict]:
    return [{"seed": 1000 + i, "dtype": dt, "num_q": nq, "heads": h, "kv_heads": kh, "head_dim": d, "kv_len": n,
             "positions": mode, "layout": layout}
            for dt in DTYPES for i, (nq, h, kh, d, n, mode, layout) in enumerate(GPU_SHAPES)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", gpu_cases(), ids=lambda c: f"{c['dtype']}-q{c['num_q']}-h{c['heads']}/{c['kv_heads']}"
                         f"-d{c['head_dim']}-n{c['kv_len']}-{c['positions']}-{c['layout']}")
def test_kernel_cuda(case):
    pytest.importorskip("triton")
    assert kernel_available("cuda")
    res = run_case(case, device="cuda")
    check(case, res)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("blocks", [(32, 64, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3)])
def test_kernel_cuda_tiles(blocks):
    pytest.importorskip("triton")
    case = {"seed": 7, "dtype": "bfloat16", "num_q": 250, "heads": 28, "kv_heads": 4, "head_dim": 128,
            "kv_len": 3001, "positions": "unsorted", "layout": "strided", "blocks": list(blocks)}
    check(case, run_case(case, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_len", [8192, 32768])
@pytest.mark.parametrize("positions", ["sorted", "unsorted"])
def test_kernel_cuda_split_heuristic(kv_len, positions):
    """SemBlend's blended prefill: ~80 recomputed queries over a long KV, Qwen2.5-7B heads. The default path
    (no ``splits`` given) must choose split KV on a GPU with more SMs than the unsplit grid, and stay accurate."""
    pytest.importorskip("triton")
    from semblend_core.partial_attention import _pick_blocks, _pick_splits, _sm_count

    dev = torch.device("cuda")
    heads, kv_heads, head_dim, num_q = 28, 4, 128, 80
    block_m, block_n, _, _ = _pick_blocks(num_q * heads // kv_heads, head_dim, kv_heads, dev, torch.bfloat16)
    programs = -(-num_q * heads // kv_heads // block_m) * kv_heads
    sms = _sm_count(torch.cuda.current_device())
    if programs < sms:
        assert _pick_splits(programs, kv_len, block_n, sms) > 1
    case = {"seed": 3000 + kv_len, "dtype": "bfloat16", "num_q": num_q, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "kv_len": kv_len, "positions": positions, "layout": "contiguous"}
    check(case, run_case(case, device="cuda"))


def test_unvalidated_call_equals_validated_and_skips_the_checks(monkeypatch):
    """``validate=False`` (the executor's per-layer calls after its first) computes the same result, and where the
    kernel runs it goes straight to the launch without the argument checks (the CPU twin checks on its own)."""
    import semblend_core.partial_attention as pa

    case = {"seed": 9, "dtype": "float32", "num_q": 5, "heads": 4, "kv_heads": 2, "head_dim": 16, "kv_len": 20,
            "positions": "unsorted", "layout": "strided"}
    q, k, v, pos = make_inputs(case)
    torch.testing.assert_close(partial_attention(q, k, v, pos, scale=0.25, validate=False),
                               partial_attention(q, k, v, pos, scale=0.25), rtol=0, atol=0)

    def refuse(*a, **kw):
        raise AssertionError("validated")

    launched = []
    monkeypatch.setattr(pa, "_validate", refuse)
    monkeypatch.setattr(pa, "kernel_available", lambda device: True)
    monkeypatch.setattr(pa, "_launch", lambda *a, **kw: launched.append(a) or "launched")
    assert partial_attention(q, k, v, pos, validate=False) == "launched"
    assert launched[0][4] == pytest.approx(16 ** -0.5)  # the default scale, computed without the checks
    with pytest.raises(AssertionError, match="validated"):
        partial_attention(q, k, v, pos)
