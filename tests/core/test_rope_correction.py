"""RoPE re-rotation: specs from configs, inv_freq against transformers, keys against the models' own code.

Acceptance: a key rotated at ``p`` by a model's own transformers rotary code, re-rotated by ``delta``, must
equal the key rotated at ``p + delta`` (float64 ground truth from the same inv_freq and attention scaling)
within a relative error of 2e-3 for fp32 (and fp16) and 2e-2 for bf16 keys, for positions up to 28K and deltas
in [-4096, 4096].
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from semblend_core._compat import has_module
from semblend_core.plan import Reason
from semblend_core.rope_correction import (
    REASON_HETEROGENEOUS,
    REASON_MLA,
    REASON_MROPE,
    REASON_NOT_SHIFT_INVARIANT,
    REASON_PER_LAYER_ROPE,
    RopeSpec,
    apply_rope,
    rerotate_keys,
    rerotate_keys_,
    rope_spec_from_config,
    rope_specs_per_layer,
)

needs_torch = pytest.mark.skipif(not has_module("torch"), reason="torch is not installed (semblend[gpu])")
needs_transformers = pytest.mark.skipif(
    not (has_module("torch") and has_module("transformers")), reason="torch+transformers not installed"
)

TOL = {"float32": 2e-3, "bfloat16": 2e-2, "float16": 2e-3}
MAX_POS = 28_000
MAX_DELTA = 4096

LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
YARN_SCALING = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32768,
}  # Qwen2.5-style


def rel_err(out, ref) -> float:
    import torch

    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    return float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64))


def truth(k_raw, positions, spec: RopeSpec):
    """Float64 rotation written independently of the module: the model's key at ``positions``."""
    import torch

    k = k_raw.to(torch.float64).numpy()
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 1)
    ang = pos * spec.inv_freq[None, :]  # [N or 1, R/2]
    cos = (np.cos(ang) * spec.attention_scaling)[:, None, :]
    sin = (np.sin(ang) * spec.attention_scaling)[:, None, :]
    out = k.copy()
    r = spec.rotary_dim
    if spec.interleaved:
        a, b = k[..., 0:r:2], k[..., 1:r:2]
        out[..., 0:r:2] = a * cos - b * sin
        out[..., 1:r:2] = b * cos + a * sin
    else:
        a, b = k[..., : r // 2], k[..., r // 2 : r]
        out[..., : r // 2] = a * cos - b * sin
        out[..., r // 2 : r] = b * cos + a * sin
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------------------
# The models' own rotary code (transformers 5), one callable per style: (k_raw [N,H,D], positions [N]) -> keys
# ------------------------------------------------------------------------------------------------------------


def _hf_rotate(rotary_cls, apply_fn, config, k_raw, positions):
    """Run ``rotary_cls(config)`` + ``apply_fn`` on keys laid out as the models do ([B, H, N, D])."""
    import torch

    rot = rotary_cls(config)
    cos, sin = rot(k_raw, positions.reshape(1, -1))  # [1, N, rotary_dim], already in k_raw's dtype
    k = k_raw.transpose(0, 1).unsqueeze(0)  # [1, H, N, D]
    r = cos.shape[-1]
    if r < k.shape[-1] and apply_fn.__module__.endswith("modeling_phi"):
        # Phi rotates the first rotary_ndims channels in its attention module and concatenates the rest.
        _, k_rot = apply_fn(k[..., :r], k[..., :r], cos, sin)
        k_out = torch.cat([k_rot, k[..., r:]], dim=-1)
    else:
        _, k_out = apply_fn(k, k, cos, sin)  # GPT-NeoX's apply handles the partial slice itself
    return k_out[0].transpose(0, 1).contiguous().to(k_raw.dtype)


def _gptj_rotate(config, k_raw, positions):
    """GPT-J's own path: sinusoid table, gather, cast to the key dtype, rotate_every_two on rotary_dim."""
    import torch
    from transformers.models.gptj import modeling_gptj as g

    r = config.rotary_dim
    table = _gptj_table(r)
    sincos = table[positions].unsqueeze(0).to(k_raw.dtype)  # [1, N, r]
    sin, cos = torch.split(sincos, r // 2, dim=-1)
    k = k_raw.unsqueeze(0)  # GPT-J rotates before permuting heads: [1, N, H, D]
    k_rot = g.apply_rotary_pos_emb(k[..., :r], sin, cos)
    return torch.cat([k_rot, k[..., r:]], dim=-1)[0].to(k_raw.dtype)


@functools.lru_cache(maxsize=4)
def _gptj_table(rotary_dim: int):
    from transformers.models.gptj import modeling_gptj as g

    return g.create_sinusoidal_positions(MAX_POS + MAX_DELTA + 1, rotary_dim)


@functools.cache
def style(name: str):
    """(config, rotate_fn) for one model style; cached because building transformers configs is not free."""
    from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig, PhiConfig, Qwen2Config
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.phi import modeling_phi as phi
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    small = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    if name == "llama":
        cfg = LlamaConfig(**small, rope_theta=500_000.0)
        return cfg, functools.partial(_hf_rotate, llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb, cfg)
    if name in ("llama3", "yarn", "linear"):
        scaling = {
            "llama3": LLAMA31_SCALING,
            "yarn": YARN_SCALING,
            "linear": {"rope_type": "linear", "factor": 4.0},
        }[name]
        cfg = LlamaConfig(
            **small, max_position_embeddings=131072, rope_parameters={**scaling, "rope_theta": 500_000.0}
        )
        return cfg, functools.partial(_hf_rotate, llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb, cfg)
    if name == "qwen2":
        cfg = Qwen2Config(**small, rope_theta=1_000_000.0)
        return cfg, functools.partial(_hf_rotate, qwen2.Qwen2RotaryEmbedding, qwen2.apply_rotary_pos_emb, cfg)
    if name == "gpt_neox":  # partial rotary: 25% of the head
        cfg = GPTNeoXConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=2, rotary_pct=0.25)
        return cfg, functools.partial(_hf_rotate, neox.GPTNeoXRotaryEmbedding, neox.apply_rotary_pos_emb, cfg)
    if name == "phi":  # partial rotary: 50% of the head
        cfg = PhiConfig(
            hidden_size=128, num_attention_heads=4, num_hidden_layers=2, partial_rotary_factor=0.5
        )
        return cfg, functools.partial(_hf_rotate, phi.PhiRotaryEmbedding, phi.apply_rotary_pos_emb, cfg)
    if name == "gptj":  # interleaved pairing, rotary_dim < head_dim
        cfg = GPTJConfig(n_embd=128, n_head=4, n_layer=2, rotary_dim=16)
        return cfg, functools.partial(_gptj_rotate, cfg)
    raise KeyError(name)


STYLES = ["llama", "llama3", "yarn", "linear", "qwen2", "gpt_neox", "phi", "gptj"]


def _raw_keys(n: int, dtype_name: str, seed: int, heads: int = 2, head_dim: int = 32):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, head_dim, generator=gen, dtype=torch.float64).to(getattr(torch, dtype_name))


# ------------------------------------------------------------------------------------------------------------
# Acceptance: model's own K_p, re-rotated by delta, equals K_{p+delta}
# ------------------------------------------------------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", STYLES)
def test_rerotated_model_keys_match_keys_at_shifted_position(name, dtype_name):
    import torch

    cfg, model_rotate = style(name)
    spec = rope_spec_from_config(cfg)
    assert spec.exact, spec.reason
    gen = torch.Generator().manual_seed(10 * STYLES.index(name) + len(dtype_name))
    n = 256
    k_raw = _raw_keys(n, dtype_name, seed=1)
    p = torch.randint(0, MAX_POS + 1, (n,), generator=gen)
    p[:4] = torch.tensor([0, 1, MAX_POS - 1, MAX_POS])
    delta = torch.randint(-MAX_DELTA, MAX_DELTA + 1, (n,), generator=gen)
    delta[:4] = torch.tensor([MAX_DELTA, -1, -MAX_DELTA, 0])
    delta = torch.where(p + delta < 0, -delta, delta)  # keep target positions valid
    k_p = model_rotate(k_raw, p)
    assert k_p.dtype == k_raw.dtype

    out = rerotate_keys(k_p, delta, spec)
    ref = truth(k_raw, (p + delta).numpy(), spec)
    assert out.dtype == k_raw.dtype and out.shape == k_raw.shape
    err = rel_err(out, ref)
    assert err <= TOL[dtype_name], f"{name}/{dtype_name}: relative error {err:.2e}"

    # The ground truth is the model's own rotation (checked where the model computes in fp32).
    if dtype_name == "float32":
        assert rel_err(model_rotate(k_raw, p + delta), ref) <= TOL["float32"]
    # Without correction the same comparison fails by orders of magnitude: the test can fail.
    assert rel_err(k_p, ref) > 0.3


@needs_transformers
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama3", "yarn", "gptj", "phi"])
def test_one_int_delta_for_all_tokens(name, dtype_name):
    import torch

    cfg, model_rotate = style(name)
    spec = rope_spec_from_config(cfg)
    k_raw = _raw_keys(64, dtype_name, seed=2)
    p = torch.arange(MAX_POS - 64, MAX_POS)
    for delta in (MAX_DELTA, -MAX_DELTA, 1, -1, 0):
        out = rerotate_keys(model_rotate(k_raw, p), delta, spec)
        err = rel_err(out, truth(k_raw, (p + delta).numpy(), spec))
        assert err <= TOL[dtype_name], f"delta={delta}: {err:.2e}"


if has_module("hypothesis"):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @needs_transformers
    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(
        name=st.sampled_from(STYLES),
        p=st.integers(0, MAX_POS),
        delta=st.integers(-MAX_DELTA, MAX_DELTA),
        n=st.integers(1, 8),
    )
    def test_property_any_position_and_delta(name, p, delta, n):
        import torch

        cfg, model_rotate = style(name)
        spec = rope_spec_from_config(cfg)
        k_raw = _raw_keys(n, "float32", seed=p)
        pos = torch.full((n,), p, dtype=torch.long)
        out = rerotate_keys(model_rotate(k_raw, pos), delta, spec)
        assert rel_err(out, truth(k_raw, (pos + delta).numpy(), spec)) <= TOL["float32"]


@needs_transformers
def test_wrong_pairing_style_is_caught():
    """GPT-J keys re-rotated with rotate-half pairing are wrong: pairing matters and the test detects it."""
    import dataclasses

    import torch

    cfg, model_rotate = style("gptj")
    spec = rope_spec_from_config(cfg)
    wrong = dataclasses.replace(spec, interleaved=False)
    k_raw = _raw_keys(64, "float32", seed=3)
    p = torch.full((64,), 1000)
    ref = truth(k_raw, (p + 777).numpy(), spec)
    assert rel_err(rerotate_keys(model_rotate(k_raw, p), 777, spec), ref) <= TOL["float32"]
    assert rel_err(rerotate_keys(model_rotate(k_raw, p), 777, wrong), ref) > 0.1


# ------------------------------------------------------------------------------------------------------------
# inv_freq and attention scaling: our float64 formulas against transformers' ROPE_INIT_FUNCTIONS
# ------------------------------------------------------------------------------------------------------------


def _hf_inv_freq(cfg, rotary_cls=None, layer_type=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = cfg.rope_parameters[layer_type] if layer_type else cfg.rope_parameters
    kwargs = {"layer_type": layer_type} if layer_type else {}
    if params["rope_type"] == "default":
        inv, scale = rotary_cls.compute_default_rope_parameters(cfg, **kwargs)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, **kwargs)
    return inv.double().numpy(), float(scale)


def _inv_freq_cases():
    from transformers import (
        GPTNeoXConfig,
        LlamaConfig,
        PhiConfig,
        Qwen2Config,
        StableLmConfig,
    )
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

    big = dict(hidden_size=512, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=131072)
    phi3_short = [1.0 + 0.05 * i for i in range(64)]
    return {
        "default-1e4": (LlamaConfig(**big), LlamaRotaryEmbedding, True),
        "default-5e5": (LlamaConfig(**big, rope_theta=500_000.0), LlamaRotaryEmbedding, True),
        "qwen2-1e6": (Qwen2Config(**big, rope_theta=1_000_000.0), Qwen2RotaryEmbedding, True),
        "linear": (
            LlamaConfig(**big, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
            None,
            True,
        ),
        "llama3": (
            LlamaConfig(**big, rope_parameters={**LLAMA31_SCALING, "rope_theta": 500_000.0}),
            None,
            True,
        ),
        "yarn": (Qwen2Config(**big, rope_parameters={**YARN_SCALING, "rope_theta": 1e6}), None, True),
        "yarn-mscale": (
            LlamaConfig(
                **big,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "original_max_position_embeddings": 4096,
                    "mscale": 0.707,
                    "mscale_all_dim": 1.0,
                    "beta_fast": 16,
                    "beta_slow": 2,
                    "rope_theta": 1e4,
                },
            ),
            None,
            True,
        ),
        "yarn-attn-factor-no-truncate": (
            LlamaConfig(
                **big,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 2.0,
                    "original_max_position_embeddings": 65536,
                    "attention_factor": 1.25,
                    "truncate": False,
                    "rope_theta": 1.5e5,
                },
            ),
            None,
            True,
        ),
        "proportional": (
            LlamaConfig(
                **big,
                rope_parameters={
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1e6,
                },
            ),
            None,
            True,
        ),
        "gpt_neox-partial": (
            GPTNeoXConfig(hidden_size=512, num_attention_heads=4, rotary_pct=0.25),
            GPTNeoXRotaryEmbedding,
            True,
        ),
        "phi-partial": (
            PhiConfig(hidden_size=512, num_attention_heads=4, partial_rotary_factor=0.375),
            PhiRotaryEmbedding,
            True,
        ),
        "stablelm-partial": (
            StableLmConfig(hidden_size=512, num_attention_heads=4),
            StableLmRotaryEmbedding,
            True,
        ),
        "dynamic": (
            LlamaConfig(**big, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
            None,
            False,
        ),
        "longrope": (
            LlamaConfig(
                **big,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": phi3_short,
                    "long_factor": [2.0] * 64,
                    "original_max_position_embeddings": 4096,
                    "rope_theta": 1e4,
                },
            ),
            None,
            False,
        ),
    }


INV_FREQ_CASES = [
    "default-1e4",
    "default-5e5",
    "qwen2-1e6",
    "linear",
    "llama3",
    "yarn",
    "yarn-mscale",
    "yarn-attn-factor-no-truncate",
    "proportional",
    "gpt_neox-partial",
    "phi-partial",
    "stablelm-partial",
    "dynamic",
    "longrope",
]


@needs_transformers
@pytest.mark.parametrize("case", INV_FREQ_CASES)
def test_inv_freq_matches_transformers(case):
    cfg, rotary_cls, exact = _inv_freq_cases()[case]
    spec = rope_spec_from_config(cfg)
    hf_inv, hf_scale = _hf_inv_freq(cfg, rotary_cls)
    assert spec.exact is exact
    if not exact:
        assert spec.reason == REASON_NOT_SHIFT_INVARIANT == Reason.ROPE_NOT_SHIFT_INVARIANT
    assert spec.inv_freq.dtype == np.float64
    assert spec.inv_freq.shape == hf_inv.shape == (spec.rotary_dim // 2,)
    # transformers computes in float32; our float64 values agree to float32 rounding.
    np.testing.assert_allclose(spec.inv_freq, hf_inv, rtol=2e-6, atol=1e-12)
    assert spec.attention_scaling == pytest.approx(hf_scale, rel=1e-9)


@needs_transformers
def test_inv_freq_cases_cover_scaled_and_partial():
    """Guard against a trivial table: scaling really changes inv_freq and partial really shrinks it."""
    cases = _inv_freq_cases()
    base = rope_spec_from_config(cases["default-5e5"][0])
    assert not np.allclose(rope_spec_from_config(cases["llama3"][0]).inv_freq, base.inv_freq)
    assert rope_spec_from_config(cases["yarn-mscale"][0]).attention_scaling != 1.0
    assert rope_spec_from_config(cases["yarn"][0]).attention_scaling == pytest.approx(
        0.1 * math.log(4.0) + 1.0
    )
    assert rope_spec_from_config(cases["gpt_neox-partial"][0]).rotary_dim == 32  # head 128 * 0.25
    assert rope_spec_from_config(cases["stablelm-partial"][0]).rotary_dim == 32  # StableLM default 0.25
    prop = rope_spec_from_config(cases["proportional"][0])
    assert prop.rotary_dim == prop.head_dim and np.count_nonzero(prop.inv_freq) == 16


@needs_transformers
def test_gemma3_per_layer_rope_matches_transformers():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    cfg = Gemma3TextConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=32,
        num_hidden_layers=6,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    whole = rope_spec_from_config(cfg)
    assert not whole.exact and whole.reason == REASON_PER_LAYER_ROPE
    rot = Gemma3RotaryEmbedding(cfg)
    specs = rope_specs_per_layer(cfg)
    assert len(specs) == 6
    for spec, layer_type in zip(specs, cfg.layer_types, strict=True):
        assert spec.exact and spec.layer_type == layer_type
        hf = getattr(rot, f"{layer_type}_inv_freq").double().numpy()
        np.testing.assert_allclose(spec.inv_freq, hf, rtol=2e-6)
        assert spec.sliding_window_layers == (0, 1, 2, 3, 4)
    assert specs[0].rope_type == "default" and specs[5].rope_type == "linear"
    assert specs[0] is specs[1]  # same layer type, same spec object


# ------------------------------------------------------------------------------------------------------------
# Config reading: dicts (config.json, transformers 4 and 5 styles) and objects agree
# ------------------------------------------------------------------------------------------------------------


def test_v4_and_v5_dicts_give_the_same_spec():
    v4 = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA31_SCALING.items() if k != "rope_type"}},
    }
    v5 = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "max_position_embeddings": 131072,
        "rope_parameters": {**LLAMA31_SCALING, "rope_theta": 500000.0},
    }
    a, b = rope_spec_from_config(v4), rope_spec_from_config(v5)
    assert a == b and hash(a) == hash(b)
    assert a.rope_type == "llama3" and a.head_dim == 128 and a.rotary_dim == 128 and a.exact
    c = rope_spec_from_config({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert c != a


@needs_transformers
def test_config_object_and_its_dict_agree():
    for name in STYLES:
        cfg, _ = style(name)
        assert rope_spec_from_config(cfg) == rope_spec_from_config(cfg.to_dict()), name


def test_head_dim_explicit_or_derived():
    spec = rope_spec_from_config({"hidden_size": 2048, "num_attention_heads": 16, "head_dim": 256})
    assert spec.head_dim == 256 and spec.inv_freq.shape == (128,)
    assert rope_spec_from_config({"hidden_size": 2048, "num_attention_heads": 16}).head_dim == 128
    with pytest.raises(ValueError, match="head_dim"):
        rope_spec_from_config({"rope_theta": 1e4})


def test_gptj_style_dict_is_interleaved_with_rotary_dim():
    spec = rope_spec_from_config({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": 64})
    assert spec.interleaved and spec.head_dim == 256 and spec.rotary_dim == 64
    np.testing.assert_allclose(spec.inv_freq, 1.0 / 10000 ** (np.arange(0, 64, 2) / 64))
    full = rope_spec_from_config({"model_type": "gptj", "n_embd": 4096, "n_head": 16, "rotary_dim": None})
    assert full.rotary_dim == 256
    assert not rope_spec_from_config(
        {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2}
    ).interleaved
    assert rope_spec_from_config({"hidden_size": 64, "num_attention_heads": 2}, interleaved=True).interleaved


def test_partial_rotary_keys_in_dicts():
    neox = {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "num_attention_heads": 4,
        "rotary_pct": 0.5,
        "rotary_emb_base": 10000,
    }
    assert rope_spec_from_config(neox).rotary_dim == 64
    assert rope_spec_from_config({**neox, "rotary_pct": None}).rotary_dim == 32  # GPT-NeoX default 0.25
    phi = {"model_type": "phi", "hidden_size": 512, "num_attention_heads": 4}
    assert rope_spec_from_config(phi).rotary_dim == 64  # Phi default 0.5
    odd = rope_spec_from_config({**phi, "partial_rotary_factor": 0.4})  # int(128 * 0.4) = 51
    assert not odd.exact and odd.reason == "odd_rotary_dim"


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_not_exact(rope_type):
    cfg = {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "rope_type": rope_type,
            "factor": 2.0,
            "short_factor": [1.0] * 32,
            "long_factor": [2.0] * 32,
            "original_max_position_embeddings": 2048,
        },
    }
    spec = rope_spec_from_config(cfg)
    assert spec.exact is False and spec.reason == "rope_not_shift_invariant"
    assert spec.rope_type == rope_type and not spec.can_rerotate


def test_unknown_rope_type_is_named_and_never_guessed():
    spec = rope_spec_from_config(
        {
            "hidden_size": 256,
            "num_attention_heads": 4,
            "rope_scaling": {"rope_type": "su_fancy", "factor": 3.0},
        }
    )
    assert spec.exact is False and spec.reason == "unknown_rope_type:su_fancy"
    assert spec.inv_freq.size == 0


@pytest.mark.parametrize(
    "cfg, reason",
    [
        (
            {
                "model_type": "deepseek_v3",
                "hidden_size": 7168,
                "num_attention_heads": 128,
                "kv_lora_rank": 512,
                "qk_rope_head_dim": 64,
            },
            REASON_MLA,
        ),
        (
            {
                "model_type": "qwen2_vl",
                "hidden_size": 1536,
                "num_attention_heads": 12,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            },
            REASON_MROPE,
        ),
        (
            {
                "model_type": "gemma4_text",
                "hidden_size": 256,
                "num_attention_heads": 4,
                "per_layer_config": {"5": {"head_dim": 512}},
            },
            REASON_HETEROGENEOUS,
        ),
        ({"model_type": "gpt2", "n_embd": 768, "n_head": 12}, "no_rope:gpt2"),
        ({"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4}, "rope_theta_missing"),
        (
            {
                "hidden_size": 256,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "layer_types": ["full_attention", "linear_attention"],
            },
            "unsupported_layer_type:linear_attention",
        ),
    ],
)
def test_unsupported_models_decline_with_reason(cfg, reason):
    spec = rope_spec_from_config(cfg)
    assert spec.exact is False and spec.reason == reason


@needs_transformers
def test_mla_and_mrope_config_objects_decline():
    from transformers import DeepseekV3Config, Qwen2VLConfig

    cfg = DeepseekV3Config(hidden_size=256, num_attention_heads=4, num_hidden_layers=2, kv_lora_rank=64)
    assert rope_spec_from_config(cfg).reason == REASON_MLA
    # Qwen2-VL's rotary code uses 3-D positions even when rope_parameters carries no mrope_section.
    vl = Qwen2VLConfig(text_config={"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2})
    assert "mrope_section" not in vl.text_config.rope_parameters
    assert rope_spec_from_config(vl).reason == REASON_MROPE
    assert rope_spec_from_config(vl.text_config).reason == REASON_MROPE


# ------------------------------------------------------------------------------------------------------------
# Sliding windows and NoPE layers are declared
# ------------------------------------------------------------------------------------------------------------


@needs_transformers
def test_sliding_window_layers_from_config_objects():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config, SmolLM3Config

    g2 = rope_spec_from_config(
        Gemma2Config(
            hidden_size=128, num_attention_heads=4, head_dim=32, num_hidden_layers=4, sliding_window=512
        )
    )
    assert g2.sliding_window_layers == (0, 2) and g2.sliding_window == 512 and g2.exact
    mistral = rope_spec_from_config(
        MistralConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=3, sliding_window=4096)
    )
    assert mistral.sliding_window_layers == (0, 1, 2)
    no_sw = rope_spec_from_config(
        MistralConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=3, sliding_window=None)
    )
    assert no_sw.sliding_window_layers == ()
    qwen = Qwen2Config(
        hidden_size=128,
        num_attention_heads=4,
        num_hidden_layers=4,
        use_sliding_window=True,
        max_window_layers=2,
        sliding_window=1024,
    )
    assert rope_spec_from_config(qwen).sliding_window_layers == (2, 3)
    assert (
        rope_spec_from_config(
            Qwen2Config(hidden_size=128, num_attention_heads=4, num_hidden_layers=4)
        ).sliding_window_layers
        == ()
    )
    smol = rope_spec_from_config(SmolLM3Config(hidden_size=128, num_attention_heads=4, num_hidden_layers=8))
    assert smol.nope_layers == (3, 7) and smol.exact


def test_sliding_window_layers_from_plain_dicts():
    base = {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 6}
    gemma3_v4 = {
        **base,
        "model_type": "gemma3_text",
        "head_dim": 32,
        "sliding_window": 1024,
        "sliding_window_pattern": 3,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
    }
    spec = rope_spec_from_config(gemma3_v4)
    assert spec.sliding_window_layers == (0, 1, 3, 4) and spec.reason == REASON_PER_LAYER_ROPE
    local = rope_spec_from_config(gemma3_v4, layer_type="sliding_attention")
    glob = rope_spec_from_config(gemma3_v4, layer_type="full_attention")
    assert local.exact and glob.exact and local.inv_freq[1] > glob.inv_freq[1]
    assert rope_spec_from_config(
        {**base, "model_type": "gemma2", "sliding_window": 4096}
    ).sliding_window_layers == (0, 2, 4)
    assert rope_spec_from_config(
        {**base, "model_type": "mistral", "sliding_window": 4096}
    ).sliding_window_layers == tuple(range(6))
    qwen = {
        **base,
        "model_type": "qwen2",
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 2,
    }
    assert rope_spec_from_config(qwen).sliding_window_layers == ()
    assert rope_spec_from_config({**qwen, "use_sliding_window": True}).sliding_window_layers == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="layer_type"):
        rope_spec_from_config(gemma3_v4, layer_type="nope")


def test_nope_layers_get_identity_specs():
    cfg = {
        "model_type": "smollm3",
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "rope_theta": 2e6,
        "no_rope_layers": [1, 1, 1, 0],
    }
    specs = rope_specs_per_layer(cfg)
    assert [s.rotary_dim for s in specs] == [32, 32, 32, 0]
    assert specs[0].nope_layers == (3,)


# ------------------------------------------------------------------------------------------------------------
# rerotate_keys behaviour, validation and dtypes
# ------------------------------------------------------------------------------------------------------------


def _spec(interleaved=False, rotary_dim=32, head_dim=32, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    return RopeSpec(head_dim=head_dim, rotary_dim=rotary_dim, inv_freq=inv, interleaved=interleaved)


@needs_torch
@pytest.mark.parametrize("interleaved", [False, True])
def test_composition_inverse_and_passthrough(interleaved):
    import torch

    spec = _spec(interleaved, rotary_dim=16, head_dim=24)
    k = torch.randn(10, 3, 24, dtype=torch.float32)
    a, b = rerotate_keys(rerotate_keys(k, 1234, spec), -300, spec), rerotate_keys(k, 934, spec)
    assert rel_err(a, b) < 1e-5
    assert rel_err(rerotate_keys(rerotate_keys(k, 4096, spec), -4096, spec), k) < 1e-5
    out = rerotate_keys(k, 17, spec)
    assert torch.equal(out[..., 16:], k[..., 16:])  # pass-through channels untouched, bit for bit
    assert not torch.allclose(out[..., :16], k[..., :16])
    assert torch.equal(rerotate_keys(k, 0, spec), k)
    # Rotation preserves each pair's norm, hence the head norm.
    torch.testing.assert_close(out.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-5)


@needs_torch
def test_tensor_delta_equals_per_token_int_delta():
    import torch

    spec = _spec()
    k = torch.randn(5, 2, 32)
    deltas = torch.tensor([-4096, -1, 0, 7, 4096])
    out = rerotate_keys(k, deltas, spec)
    for i, d in enumerate(deltas.tolist()):
        torch.testing.assert_close(out[i : i + 1], rerotate_keys(k[i : i + 1], d, spec))
    torch.testing.assert_close(rerotate_keys(k, torch.tensor(7), spec), rerotate_keys(k, 7, spec))
    torch.testing.assert_close(rerotate_keys(k, deltas.to(torch.int32), spec), out)


@needs_torch
def test_apply_rope_then_rerotate_equals_apply_at_shifted_positions():
    import torch

    for spec in (
        _spec(),
        _spec(True, rotary_dim=8),
        RopeSpec(head_dim=32, rotary_dim=32, inv_freq=_spec().inv_freq, attention_scaling=1.3),
    ):
        x = torch.randn(40, 2, 32)
        p = torch.randint(0, MAX_POS, (40,))
        d = torch.randint(-MAX_DELTA, MAX_DELTA, (40,))
        assert rel_err(rerotate_keys(apply_rope(x, p, spec), d, spec), apply_rope(x, p + d, spec)) < 1e-5
        assert rel_err(apply_rope(x, p, spec), truth(x, p.numpy(), spec)) < 1e-6


@needs_torch
def test_in_place_and_out():
    import torch

    spec = _spec()
    k = torch.randn(6, 2, 32, dtype=torch.bfloat16)
    expected = rerotate_keys(k, 99, spec)
    buf = torch.empty_like(k)
    assert rerotate_keys(k, 99, spec, out=buf) is buf and torch.equal(buf, expected)
    k2 = k.clone()
    assert rerotate_keys_(k2, 99, spec) is k2 and torch.equal(k2, expected)
    with pytest.raises(ValueError, match="out must match"):
        rerotate_keys(k, 1, spec, out=torch.empty(6, 2, 32))


@needs_torch
def test_empty_and_single_token():
    import torch

    spec = _spec()
    empty = torch.empty(0, 2, 32, dtype=torch.float16)
    out = rerotate_keys(empty, torch.empty(0, dtype=torch.long), spec)
    assert out.shape == (0, 2, 32) and out.dtype == torch.float16
    one = torch.randn(1, 1, 32)
    assert rel_err(rerotate_keys(apply_rope(one, -3, spec), 3, spec), one) < 1e-6  # K_{-3} moved to 0
    assert rel_err(rerotate_keys(one, 3, spec), truth(one, [3], spec)) < 1e-6


@needs_torch
def test_validation_errors_are_named():
    import torch

    spec = _spec()
    k = torch.randn(4, 2, 32)
    with pytest.raises(ValueError, match=r"\[num_tokens, num_kv_heads, head_dim\]"):
        rerotate_keys(k[0], 1, spec)
    with pytest.raises(ValueError, match="head_dim=32"):
        rerotate_keys(torch.randn(4, 2, 16), 1, spec)
    with pytest.raises(ValueError, match="num_tokens=4"):
        rerotate_keys(k, torch.tensor([1, 2, 3]), spec)
    with pytest.raises(ValueError, match="integer tensor"):
        rerotate_keys(k, torch.tensor([1.0, 2.0, 3.0, 4.0]), spec)
    with pytest.raises(ValueError, match="int"):
        rerotate_keys(k, 1.5, spec)
    with pytest.raises(ValueError, match="dtype"):
        rerotate_keys(k.to(torch.int32), 1, spec)
    with pytest.raises(TypeError):
        rerotate_keys(k.numpy(), 1, spec)
    inexact = RopeSpec(
        head_dim=32, rotary_dim=32, inv_freq=spec.inv_freq, exact=False, reason=REASON_NOT_SHIFT_INVARIANT
    )
    with pytest.raises(ValueError, match="rope_not_shift_invariant"):
        rerotate_keys(k, 1, inexact)
    assert rerotate_keys(k, 1, inexact, allow_inexact=True).shape == k.shape
    unknown = RopeSpec(
        head_dim=32, rotary_dim=32, inv_freq=np.zeros(0), exact=False, reason="unknown_rope_type:x"
    )
    with pytest.raises(ValueError, match="unknown_rope_type:x"):
        apply_rope(k, 1, unknown)


@needs_torch
@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_keys_rejected(fp8):
    import torch

    if not hasattr(torch, fp8):
        pytest.skip(f"torch has no {fp8}")
    k = torch.randn(4, 2, 32).to(getattr(torch, fp8))
    with pytest.raises(ValueError, match="fp8"):
        rerotate_keys(k, 1, _spec())


def test_spec_validation_and_immutability():
    spec = _spec()
    assert not spec.inv_freq.flags.writeable
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeSpec(head_dim=32, rotary_dim=31, inv_freq=np.ones(15))
    with pytest.raises(ValueError, match="inv_freq"):
        RopeSpec(head_dim=32, rotary_dim=32, inv_freq=np.ones(8))
    with pytest.raises(ValueError, match="reason"):
        RopeSpec(head_dim=32, rotary_dim=32, inv_freq=np.ones(16), exact=False)
    assert spec == _spec() and spec != _spec(theta=500000.0) and len({spec, _spec()}) == 1


def test_module_imports_and_builds_specs_without_torch():
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "triton", "transformers", "vllm", "sglang", "tensorrt_llm"):
            sys.modules[name] = None
        import semblend_core
        from semblend_core.rope_correction import rope_spec_from_config
        spec = rope_spec_from_config({"hidden_size": 256, "num_attention_heads": 4, "rope_theta": 1e6})
        assert spec.exact and spec.rotary_dim == 64
        assert all(sys.modules.get(n) is None for n in ("torch", "transformers"))
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
