"""Fused gather -> re-rotate K -> scatter: Triton kernel and torch reference against a float64 ground truth.

Ground truth: a numpy float64 rotation written pair by pair, on source values read through per-layout accessors
written here (not through ``kv_layout``'s geometry). Tolerance rule (STYLE rule 10), with ``err`` the max abs error
on K: ``err(kernel) <= 2 * err(reference at the same dtype) + atol``, ``atol`` one unit in the last place of the
largest |K| for the dtype. The reference itself must land within a few roundings of the truth, V and pass-through
channels must be bit-exact, and every slot not written must be untouched (destinations are filled with random
"poison" first and compared bit for bit).

On CPU the kernel runs in Triton's interpreter: ``TRITON_INTERPRET=1`` is set per test (the wrapper re-imports the
kernel module in the matching mode), so other test modules keep their environment. Note the interpreter converts
float32 -> bfloat16 by truncation while the GPU rounds to nearest even; the tolerance rule covers both. The same
checks, larger, run on CUDA under ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from semblend_core import triton_kernels as tk
from semblend_core.kv_layout import (
    DONOR_CONTIGUOUS,
    FLASHINFER_NHD,
    HF_CONTIGUOUS,
    LAYOUTS,
    SGLANG_TOKEN_POOL,
    VLLM_FLASH_HND,
    VLLM_FLASH_NHD,
    KvCacheView,
    KvLayoutError,
    views_overlap,
)
from semblend_core.rope_correction import RopeSpec
from semblend_core.triton_kernels import (
    KvIndexError,
    RopeSpecError,
    rerotate_scatter,
    rerotate_scatter_reference,
)

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Unit roundoff-ish: the reference's error bound (relative to max |K|) and the rule's atol (one ulp).
REF_EPS = {"float32": 2.0 ** -20, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
ATOL_ULP = {"float32": 2.0 ** -22, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]


@pytest.fixture
def kernel_on(monkeypatch):
    """Returns a function ``device -> None`` that makes ``backend="triton"`` runnable there (or skips)."""

    def enable(device: str) -> None:
        pytest.importorskip("triton")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        if tk.kernel_backend(torch.device(device)) != "triton":
            pytest.skip(f"triton kernel not runnable on {device}")

    return enable


# --------------------------------------------------------------------------------------------- rope and truth
def make_rope(kind: str, head_dim: int) -> RopeSpec:
    rotary_dim = head_dim if kind in ("neox", "gptj") else head_dim // 2
    if rotary_dim % 2:
        rotary_dim -= 1
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    return RopeSpec(head_dim=head_dim, rotary_dim=rotary_dim, inv_freq=inv_freq, interleaved=kind.startswith("gptj"))


def truth_rotate(k: np.ndarray, delta: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """float64, one channel pair at a time: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. k: [T, H, D]."""
    out = k.copy()
    half = rope.rotary_dim // 2
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if rope.interleaved else (i, i + half)
        ang = delta.astype(np.float64) * rope.inv_freq[i]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        out[:, :, a] = k[:, :, a] * c - k[:, :, b] * s
        out[:, :, b] = k[:, :, b] * c + k[:, :, a] * s
    return out


# ------------------------------------------------------------------------------- layouts, accessed independently
def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def alloc(case: str, layers: int, slots: int, heads: int, dim: int, dtype, device, gen, bs: int = 4):
    nb = math.ceil(slots / bs)
    r = lambda *s: _randn(s, dtype, device, gen)
    if case == "donor":
        return KvCacheView.from_donor_store(r(layers, 2, slots, heads, dim))
    if case == "vllm_nhd":
        return KvCacheView(VLLM_FLASH_NHD, [r(2, nb, bs, heads, dim) for _ in range(layers)])
    if case == "vllm_hnd":
        return KvCacheView(VLLM_FLASH_HND, [r(2, nb, heads, bs, dim) for _ in range(layers)])
    if case == "vllm_hnd_strided":  # an HND view of an NHD allocation: strides, not shapes, carry the layout
        return KvCacheView(VLLM_FLASH_HND, [r(2, nb, bs, heads, dim).permute(0, 1, 3, 2, 4) for _ in range(layers)])
    if case == "flashinfer":
        return KvCacheView(FLASHINFER_NHD, [r(nb, 2, bs, heads, dim) for _ in range(layers)])
    if case == "sglang":
        return KvCacheView.from_separate(
            SGLANG_TOKEN_POOL, [r(slots, heads, dim) for _ in range(layers)], [r(slots, heads, dim) for _ in range(layers)]
        )
    if case == "hf":  # [batch, heads, seq, dim]; slot = row * seq + pos
        return KvCacheView.from_separate(
            HF_CONTIGUOUS, [r(nb, heads, bs, dim) for _ in range(layers)], [r(nb, heads, bs, dim) for _ in range(layers)]
        )
    raise AssertionError(case)


def read(case: str, view: KvCacheView, layer: int, slots, bs: int = 4):
    """(k, v) rows ``[T, H, D]`` at ``slots``, by plain indexing of the engine-shaped tensors."""
    s = torch.as_tensor(slots, dtype=torch.int64, device=view.device)
    blk, off = s // bs, s % bs
    t = view.layers[layer]
    if case == "donor":
        return t[0][s], t[1][s]
    if case == "vllm_nhd":
        return t[0, blk, off], t[1, blk, off]
    if case in ("vllm_hnd", "vllm_hnd_strided"):
        return t[0, blk, :, off], t[1, blk, :, off]
    if case == "flashinfer":
        return t[blk, 0, off], t[blk, 1, off]
    if case == "sglang":
        return t[0][s], t[1][s]
    if case == "hf":
        return t[0][blk, :, off], t[1][blk, :, off]
    raise AssertionError(case)


def num_slots(case: str, view: KvCacheView, bs: int = 4) -> int:
    k = view.kv(0)[0]
    return k.shape[0] if case in ("donor", "sglang") else k.shape[0] * bs


def clone_view(view: KvCacheView) -> KvCacheView:
    layers = [tuple(x.clone() for x in e) if isinstance(e, tuple) else e.clone() for e in view.layers]
    return KvCacheView(view.layout, layers)


def snapshot(case, view, bs=4):
    """Every slot of every layer as float64 numpy, via the independent accessors."""
    everything = torch.arange(num_slots(case, view, bs))
    return [[x.double().cpu().numpy() for x in read(case, view, layer, everything, bs)] for layer in range(view.num_layers)]


# ------------------------------------------------------------------------------------------------- one check
def run_and_check(
    device, dtype_name, src_case, dst_case, rope_kind, delta_kind, n_tokens, *, heads=3, dim=24, layers=2,
    bs=4, seed=0, block_tokens=4, backends=("triton", "reference"), same_cache=False, shift=0, dst_dtype=None,
):
    """Run each backend on a fresh copy of one random plan; check against the float64 truth; return errors."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[dtype_name]
    out_dtype_name = dst_dtype or dtype_name
    rope = make_rope(rope_kind, dim)
    n_src_slots, n_dst_slots = n_tokens + 11, n_tokens + 9
    src = alloc(src_case, layers, n_src_slots, heads, dim, dtype, device, gen, bs)
    dst0 = src if same_cache else alloc(dst_case, layers, n_dst_slots, heads, dim, DTYPES[out_dtype_name], device,
                                        gen, bs)
    if same_cache:  # shift tokens [0, n) to [shift, shift + n) inside one cache
        src_slots = torch.arange(n_tokens) + max(0, -shift)
        dst_slots = src_slots + shift
    else:
        src_slots = torch.randperm(num_slots(src_case, src, bs), generator=gen)[:n_tokens]
        dst_slots = torch.randperm(num_slots(dst_case, dst0, bs), generator=gen)[:n_tokens]
    if delta_kind == "scalar":
        delta = int(torch.randint(-4000, 4000, (1,), generator=gen))
        delta_np = np.full(n_tokens, delta, dtype=np.int64)
    else:
        delta_t = torch.randint(-4000, 4000, (n_tokens,), generator=gen)
        delta, delta_np = delta_t.to(device), delta_t.numpy()
    src_before = snapshot(src_case, src, bs)
    dst_before = snapshot(dst_case, dst0, bs)
    s_np, d_np = src_slots.numpy(), dst_slots.numpy()
    untouched = np.setdiff1d(np.arange(num_slots(dst_case, dst0, bs)), d_np)

    errors = {}
    for backend in backends:
        if same_cache:
            src_run = dst = clone_view(src)
        else:
            src_run, dst = src, clone_view(dst0)
        kwargs = {"backend": backend, "block_tokens": block_tokens} if backend == "triton" else {}
        fn = rerotate_scatter if backend == "triton" else rerotate_scatter_reference
        fn(src_run, dst, src_slots.to(device), dst_slots.to(device), delta, rope, **kwargs)
        after = snapshot(dst_case, dst, bs)
        err = 0.0
        for layer in range(layers):
            k_src, v_src = src_before[layer][0][s_np], src_before[layer][1][s_np]
            k_true = truth_rotate(k_src, delta_np, rope)
            k_out, v_out = after[layer][0][d_np], after[layer][1][d_np]
            err = max(err, float(np.abs(k_out - k_true).max()) if n_tokens else 0.0)
            scale = max(1.0, float(np.abs(k_true).max()) if n_tokens else 1.0)
            assert err <= 64 * REF_EPS[out_dtype_name] * scale, f"{backend}: K error {err} (layer {layer})"
            # V and channels past rotary_dim: copied, bit-exact when dtypes match; across dtypes within one ulp
            # (the interpreter truncates to bfloat16, torch and the GPU round to nearest even).
            pas_out, pas_src = k_out[..., rope.rotary_dim:], k_src[..., rope.rotary_dim:]
            if out_dtype_name == dtype_name:
                np.testing.assert_array_equal(v_out, v_src, err_msg=f"{backend}: V layer {layer}")
                np.testing.assert_array_equal(pas_out, pas_src, err_msg=f"{backend}: pass-through")
            else:
                ulp = ATOL_ULP[out_dtype_name]
                np.testing.assert_allclose(v_out, v_src, rtol=ulp, atol=0, err_msg=f"{backend}: V layer {layer}")
                np.testing.assert_allclose(pas_out, pas_src, rtol=ulp, atol=0, err_msg=f"{backend}: pass-through")
            # Poison check: every slot not written keeps its exact old content.
            for kv in (0, 1):
                np.testing.assert_array_equal(after[layer][kv][untouched], dst_before[layer][kv][untouched],
                                              err_msg=f"{backend}: untouched slots changed (layer {layer})")
        errors[backend] = (err, scale if n_tokens else 1.0)
    if "reference" in errors:
        ref_err, scale = errors["reference"]
        assert ref_err <= REF_EPS[out_dtype_name] * scale, f"reference error {ref_err} over bound"
        if "triton" in errors:
            atol = ATOL_ULP[out_dtype_name] * scale
            assert errors["triton"][0] <= 2 * ref_err + atol, f"kernel {errors['triton'][0]} vs reference {ref_err}"
    return errors


# ----------------------------------------------------------------------------------------- dtype x layout grid
PAIRS = [  # (src layout, dst layout, rope, delta)
    ("donor", "vllm_nhd", "neox", "per_token"),
    ("donor", "vllm_hnd", "gptj", "scalar"),
    ("donor", "sglang", "neox_partial", "per_token"),
    ("donor", "hf", "gptj_partial", "per_token"),
    ("vllm_nhd", "vllm_hnd_strided", "neox", "scalar"),  # paged donor
    ("flashinfer", "sglang", "gptj", "per_token"),
    ("hf", "flashinfer", "neox_partial", "scalar"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("src_case, dst_case, rope_kind, delta_kind", PAIRS, ids=[f"{a}->{b}" for a, b, *_ in PAIRS])
def test_matches_float64_truth(device, dtype, src_case, dst_case, rope_kind, delta_kind, kernel_on):
    kernel_on(device)
    big = device == "cuda"
    run_and_check(device, dtype, src_case, dst_case, rope_kind, delta_kind,
                  n_tokens=300 if big else 13, heads=4 if big else 3, dim=128 if big else 24,
                  layers=3 if big else 2, bs=16 if big else 4, block_tokens=None if big else 4,
                  seed=hash((dtype, src_case)) % 1000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_kind", ["neox", "gptj", "neox_partial", "gptj_partial"])
def test_rope_variants_odd_head_dim(device, rope_kind, kernel_on):
    """head_dim 20 and 5 heads: padded tiles (DIM_PAD 32, HEADS_PAD 8) must mask correctly."""
    kernel_on(device)
    run_and_check(device, "float32", "donor", "vllm_nhd", rope_kind, "per_token", n_tokens=9, heads=5, dim=20)


@pytest.mark.parametrize("device", DEVICES)
def test_single_token_and_ragged_tail(device, kernel_on):
    kernel_on(device)
    run_and_check(device, "bfloat16", "donor", "vllm_hnd", "neox", "per_token", n_tokens=1, block_tokens=4)
    run_and_check(device, "bfloat16", "donor", "vllm_hnd", "neox", "per_token", n_tokens=9, block_tokens=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift", [3, 1, 0, -3])
def test_overlapping_shift_in_place(device, shift, kernel_on):
    """Donor and destination are one cache; tokens move by ``shift`` slots (and positions): read before write.

    With one token per program and programs run in order (the interpreter), a kernel without staging would read
    slots that an earlier program had already overwritten (shift > 0 moves up; -3 moves down).
    """
    kernel_on(device)
    run_and_check(device, "float32", "sglang", "sglang", "neox", "scalar", n_tokens=10, same_cache=True,
                  shift=shift, block_tokens=1)
    run_and_check(device, "bfloat16", "vllm_nhd", "vllm_nhd", "gptj", "per_token", n_tokens=10, same_cache=True,
                  shift=shift, block_tokens=2)


@pytest.mark.parametrize("device", DEVICES)
def test_large_delta_precision(device, kernel_on):
    """|delta| up to 32K: float64 angles keep float32 results near one rounding; an fp32 angle would not."""
    kernel_on(device)
    dim, n = 128, 16
    rope = make_rope("neox", dim)
    gen = torch.Generator().manual_seed(7)
    src = alloc("donor", 1, n, 2, dim, torch.float32, device, gen)
    dst = alloc("donor", 1, n, 2, dim, torch.float32, device, gen)
    delta = torch.tensor([32767, -32768, 30001, -29999] * 4)
    rerotate_scatter(src, dst, torch.arange(n).to(device), torch.arange(n).to(device), delta.to(device), rope,
                     backend="triton")
    k_src = src.layers[0][0].double().cpu().numpy()
    k_true = truth_rotate(k_src, delta.numpy(), rope)
    err = np.abs(dst.layers[0][0].double().cpu().numpy() - k_true).max() / np.abs(k_true).max()
    assert err < 2e-6, err
    # The alternative this design rejects: the angle formed in float32.
    ang32 = delta.float()[:, None] * torch.tensor(rope.inv_freq, dtype=torch.float32)[None, :]
    naive = tk._rotate_reference(torch.tensor(k_src, dtype=torch.float32), torch.cos(ang32), torch.sin(ang32), rope)
    naive_err = np.abs(naive.double().numpy() - k_true).max() / np.abs(k_true).max()
    assert naive_err > 20 * err, (naive_err, err)


@pytest.mark.parametrize("device", DEVICES)
def test_delta_zero_is_an_exact_copy(device, kernel_on):
    kernel_on(device)
    gen = torch.Generator().manual_seed(3)
    src = alloc("donor", 2, 12, 2, 16, torch.bfloat16, device, gen)
    dst = alloc("vllm_nhd", 2, 12, 2, 16, torch.bfloat16, device, gen)
    ss, ds = torch.tensor([5, 0, 7]), torch.tensor([11, 2, 4])
    rerotate_scatter(src, dst, ss.to(device), ds.to(device), 0, make_rope("neox", 16), backend="triton")
    for layer in range(2):
        for a, b in zip(read("vllm_nhd", dst, layer, ds), read("donor", src, layer, ss)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_fp32_donor_into_bf16_cache(device, kernel_on):
    kernel_on(device)
    run_and_check(device, "float32", "donor", "vllm_nhd", "neox", "per_token", n_tokens=7, dst_dtype="bfloat16")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_plan_launches_nothing(backend, kernel_on, monkeypatch):
    if backend == "triton":
        kernel_on("cpu")

    def boom(*a, **k):
        raise AssertionError("launched on an empty plan")

    monkeypatch.setattr(tk, "_launch", boom)
    monkeypatch.setattr(tk, "_reference_run", boom)
    gen = torch.Generator().manual_seed(0)
    src = alloc("donor", 2, 8, 2, 16, torch.float16, "cpu", gen)
    dst = alloc("sglang", 2, 8, 2, 16, torch.float16, "cpu", gen)
    before = snapshot("sglang", dst)
    empty = torch.zeros(0, dtype=torch.int64)
    fn = rerotate_scatter if backend == "triton" else rerotate_scatter_reference
    fn(src, dst, empty, empty, empty, make_rope("neox", 16))
    fn(src, dst, [], [], 5, make_rope("neox", 16))
    after = snapshot("sglang", dst)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[0], b[0])


def test_reference_runs_on_cpu_without_interpreter(monkeypatch):
    """The auto backend on CPU without TRITON_INTERPRET is the reference; it matches the float64 truth."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tk.kernel_backend(torch.device("cpu")) == "reference"
    monkeypatch.setattr(tk, "_launch", lambda *a, **k: pytest.fail("kernel launched on CPU without interpreter"))
    gen = torch.Generator().manual_seed(4)
    src = alloc("donor", 1, 6, 2, 8, torch.float32, "cpu", gen)
    dst = alloc("hf", 1, 8, 2, 8, torch.float32, "cpu", gen)
    rope = make_rope("gptj", 8)
    rerotate_scatter(src, dst, [0, 5], [7, 1], torch.tensor([100, -7]), rope)
    k_true = truth_rotate(read("donor", src, 0, [0, 5])[0].double().numpy(), np.array([100, -7]), rope)
    np.testing.assert_allclose(read("hf", dst, 0, [7, 1])[0].double().numpy(), k_true, atol=1e-5)


# ------------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("case", ["donor", "vllm_nhd", "vllm_hnd", "vllm_hnd_strided", "flashinfer", "sglang", "hf"])
def test_geometry_row_offset_matches_engine_indexing(case):
    """kv_layout's strides locate the same element as plain engine-shaped indexing, for K and V."""
    view = alloc(case, 2, 12, 3, 8, torch.float32, "cpu", torch.Generator().manual_seed(0))
    g = view.geometry()
    for layer in range(2):
        k, v = view.kv(layer)
        for slot in (0, 5, 11):
            kk, vv = read(case, view, layer, [slot])
            for head in range(3):
                for t, row in ((k, kk), (v, vv)):
                    flat = t.as_strided((8,), (1,), t.storage_offset() + g.row_offset(slot, head))
                    assert torch.equal(flat, row[0, head])


def test_layout_registry_and_shape_doc():
    assert LAYOUTS["vllm_flash_nhd"] is VLLM_FLASH_NHD
    assert VLLM_FLASH_HND.shape_doc() == "[2, num_blocks, num_kv_heads, block_size, head_dim]"
    assert SGLANG_TOKEN_POOL.shape_doc() == "K and V each [num_slots, num_kv_heads, head_dim]"
    assert HF_CONTIGUOUS.layer_rank == 4 and DONOR_CONTIGUOUS.layer_rank == 4 and FLASHINFER_NHD.layer_rank == 5


def test_views_overlap():
    buf = torch.zeros(2, 2, 10, 2, 8)
    a = KvCacheView.from_donor_store(buf)
    assert views_overlap(a, a)
    assert not views_overlap(a, KvCacheView.from_donor_store(torch.zeros_like(buf)))
    big = torch.zeros(4, 2, 10, 2, 8)
    lo, hi = KvCacheView.from_donor_store(big[:2]), KvCacheView.from_donor_store(big[2:])
    assert not views_overlap(lo, hi)
    assert views_overlap(lo, KvCacheView.from_donor_store(big[1:3]))
    # Separate K/V pools that interleave in one allocation but never share bytes.
    pool = torch.zeros(2, 8, 2, 4)
    k_only = KvCacheView.from_separate(SGLANG_TOKEN_POOL, [pool[0]], [pool[0]])
    v_only = KvCacheView.from_separate(SGLANG_TOKEN_POOL, [pool[1]], [pool[1]])
    assert not views_overlap(k_only, v_only)


# ---------------------------------------------------------------------------------------------- validation
def _good():
    gen = torch.Generator().manual_seed(0)
    src = alloc("donor", 2, 8, 2, 16, torch.bfloat16, "cpu", gen)
    dst = alloc("vllm_nhd", 2, 8, 2, 16, torch.bfloat16, "cpu", gen)
    return {"src": src, "dst": dst, "src_slots": torch.tensor([0, 1, 2]), "dst_slots": torch.tensor([3, 4, 5]),
            "delta": 4, "rope": make_rope("neox", 16)}


def _fp8_view():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    return KvCacheView(VLLM_FLASH_NHD, [torch.zeros(2, 2, 4, 2, 16).to(torch.float8_e4m3fn) for _ in range(2)])


def fake_rope(**over):
    """A RopeSpec-shaped object that skips RopeSpec's own checks: the wrapper must validate what it is given."""
    fields = {"head_dim": 16, "rotary_dim": 16, "inv_freq": np.ones(8), "interleaved": False, "exact": True,
              "reason": ""}
    return types.SimpleNamespace(**{**fields, **over})


BAD = {
    "fp8": (lambda g: {**g, "dst": _fp8_view()}, KvLayoutError, "fp8"),
    "float64": (lambda g: {**g, "src": KvCacheView.from_donor_store(torch.zeros(2, 2, 8, 2, 16, dtype=torch.float64))},
                KvLayoutError, "float64"),
    "rank": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [torch.zeros(2, 8, 2, 16)] * 2)}, KvLayoutError,
             "expected rank 5"),
    "kv_axis": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [torch.zeros(3, 2, 4, 2, 16)] * 2)},
                KvLayoutError, "K/V axis"),
    "pair_for_stacked": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [(torch.zeros(2, 4, 2, 16),) * 2] * 2)},
                         KvLayoutError, "one tensor per layer"),
    "layers_differ": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [torch.zeros(2, 2, 4, 2, 16),
                                                                         torch.zeros(2, 3, 4, 2, 16)])},
                      KvLayoutError, "all layers must be allocated alike"),
    "layer_count": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [g["dst"].layers[0]])}, KvLayoutError,
                    "1 layers"),
    "heads": (lambda g: {**g, "dst": KvCacheView(VLLM_FLASH_NHD, [torch.zeros(2, 2, 4, 3, 16)] * 2)}, KvLayoutError,
              "num_kv_heads"),
    "channels_strided": (lambda g: {**g, "dst": KvCacheView(
        VLLM_FLASH_NHD, [torch.zeros(2, 2, 4, 2, 32, dtype=torch.bfloat16)[..., ::2]] * 2)}, KvLayoutError,
        "contiguous"),
    "no_layers": (lambda g: {**g, "src": KvCacheView(DONOR_CONTIGUOUS, [])}, KvLayoutError, "no layers"),
    "not_a_view": (lambda g: {**g, "src": torch.zeros(3)}, KvLayoutError, "KvCacheView"),
    "src_oob": (lambda g: {**g, "src_slots": torch.tensor([0, 1, 8])}, KvIndexError, "src_slots"),
    "dst_oob": (lambda g: {**g, "dst_slots": torch.tensor([0, 1, 8])}, KvIndexError, "dst_slots"),
    "negative": (lambda g: {**g, "src_slots": torch.tensor([0, -1, 2])}, KvIndexError, "src_slots"),
    "dup_dst": (lambda g: {**g, "dst_slots": torch.tensor([3, 4, 3])}, KvIndexError, "duplicate"),
    "length": (lambda g: {**g, "dst_slots": torch.tensor([3, 4])}, KvIndexError, "dst_slots: 2 entries"),
    "delta_length": (lambda g: {**g, "delta": torch.tensor([1, 2])}, KvIndexError, "delta: 2 entries"),
    "float_slots": (lambda g: {**g, "src_slots": torch.tensor([0.0, 1.0, 2.0])}, KvIndexError, "integer"),
    "slots_2d": (lambda g: {**g, "src_slots": torch.zeros(3, 1, dtype=torch.int64)}, KvIndexError, "1-D"),
    "delta_bool": (lambda g: {**g, "delta": True}, KvIndexError, "bool"),
    "inexact_rope": (lambda g: {**g, "rope": RopeSpec(head_dim=16, rotary_dim=16, inv_freq=np.ones(8), exact=False, reason="dynamic ntk")},
                     RopeSpecError, "dynamic ntk"),
    "odd_rotary": (lambda g: {**g, "rope": fake_rope(rotary_dim=15, inv_freq=np.ones(7))}, RopeSpecError, "even"),
    "rope_head_dim": (lambda g: {**g, "rope": make_rope("neox", 32)}, RopeSpecError, "head_dim 32"),
    "inv_freq_len": (lambda g: {**g, "rope": fake_rope(inv_freq=np.ones(5))}, RopeSpecError, "inv_freq"),
}


@pytest.mark.parametrize("fn", [rerotate_scatter, rerotate_scatter_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("name", list(BAD))
def test_validation_errors(name, fn, monkeypatch):
    monkeypatch.setattr(tk, "_launch", lambda *a, **k: pytest.fail("launched despite invalid input"))
    make, err, match = BAD[name]
    args = make(_good())
    before = clone_view(args["dst"]) if name in ("src_oob", "dst_oob", "dup_dst", "negative") else None
    with pytest.raises(err, match=match):
        fn(**args)
    if before is not None:  # index errors are found before anything is written
        for b, a in zip(snapshot("vllm_nhd", before), snapshot("vllm_nhd", args["dst"])):
            np.testing.assert_array_equal(a[0], b[0])


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        rerotate_scatter(**_good(), backend="cuda")


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rerotate_scatter(**_good(), backend="triton")
