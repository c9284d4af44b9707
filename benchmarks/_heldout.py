"""Held-out documents for the quality benchmarks: the Lee news corpus from gensim's test data (benchmarks only).

``lee_background.cor`` (299 Australian Broadcasting Corporation news reports, one per line, ~200 words each) and
``lee.cor`` (50 more) ship inside the ``gensim`` wheel under ``gensim/test/test_data/``. No model of this project
was tuned on them and, unlike ACLSum, no earlier SemBlend benchmark chose its settings on them. Nothing is
imported from gensim (its ``__init__`` needs scipy): the files are read from

1. ``--lee-dir`` / ``$SEMBLEND_LEE_DIR`` (a folder holding the two files, e.g. carried to an offline machine),
2. a gensim wheel in ``~/.cache/semblend/gensim-data`` (``pip download --no-deps gensim==4.4.0 -d <that folder>``),
3. an installed ``gensim`` package (found by spec, not imported).

Both files are pinned by sha256: another corpus under the same name fails loudly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from pathlib import Path

LEE_FILES = {
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}
GENSIM_INSTALL = "pip download --no-deps gensim==4.4.0 -d ~/.cache/semblend/gensim-data"
_MEMBER = "gensim/test/test_data/"


def _read(name: str, lee_dir: str | os.PathLike | None) -> bytes:
    for root in (lee_dir, os.environ.get("SEMBLEND_LEE_DIR")):
        if root and (Path(root) / name).is_file():
            return (Path(root) / name).read_bytes()
    cache = Path(os.path.expanduser("~")) / ".cache" / "semblend" / "gensim-data"
    for wheel in sorted(cache.glob("gensim-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            if _MEMBER + name in zf.namelist():
                return zf.read(_MEMBER + name)
    spec = importlib.util.find_spec("gensim")
    for loc in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(loc) / "test" / "test_data" / name
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"{name} (Lee corpus) not found; {GENSIM_INSTALL}, or set SEMBLEND_LEE_DIR")


def lee_articles(lee_dir: str | os.PathLike | None = None) -> list[str]:
    """The 350 news reports (background corpus first, then ``lee.cor``), whitespace-normalised, in file order."""
    out: list[str] = []
    for name, digest in LEE_FILES.items():
        raw = _read(name, lee_dir)
        got = hashlib.sha256(raw).hexdigest()
        if got != digest:
            raise ValueError(f"{name}: sha256 {got}, pinned {digest}")
        out += [" ".join(line.split()) for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
    return out
