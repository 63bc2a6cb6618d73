"""Where GGUF models are kept: Ollama's manifests and blobs, LM Studio's folders, the
Hugging Face cache, llama.cpp's cache, ccm-chat's own models folder, and folders named in the
settings. Each yields candidate paths (with a sha256 when the source names files by it);
nothing here opens a model file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ccm_chat.app.model_catalog import CATALOG, installed_path, models_dir

MAX_FILES = 2000  # files looked at under one root
MAX_DEPTH = 8  # folders deep under one root
MAX_MANIFEST_BYTES = 1 << 20
HEX64 = re.compile(r"[0-9a-f]{64}")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"



@dataclass(frozen=True)
class Candidate:
    path: Path
    source: str
    label: str
    sha256: str | None = None


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def ollama_candidates(env: Mapping[str, str]) -> Iterator[Candidate]:
    """Ollama's manifests name each model's blobs: the model layer is the GGUF, its file
    named by its own sha256."""
    root = Path(env["OLLAMA_MODELS"]) if env.get("OLLAMA_MODELS") else (
        _home(env) / ".ollama" / "models")
    manifests = root / "manifests"
    for manifest in _walk(manifests, lambda p: True, depth=4):
        digest = _ollama_model_digest(manifest)
        if digest is None:
            continue
        parts = manifest.relative_to(manifests).parts
        label = f"{'/'.join(parts[-3:-1]).removeprefix('library/')}:{parts[-1]}" \
            if len(parts) >= 2 else manifest.name
        yield Candidate(root / "blobs" / f"sha256-{digest}", "ollama", label, digest)


def _ollama_model_digest(manifest: Path) -> str | None:
    try:
        with manifest.open("rb") as fh:
            data = json.loads(fh.read(MAX_MANIFEST_BYTES + 1)[:MAX_MANIFEST_BYTES])
    except (OSError, ValueError):
        return None
    layers = data.get("layers") if isinstance(data, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            digest = str(layer.get("digest", ""))
            hexpart = digest.removeprefix("sha256:")
            if digest.startswith("sha256:") and HEX64.fullmatch(hexpart):
                return hexpart
    return None


def _gguf_files(root: Path, source: str, depth: int = MAX_DEPTH) -> Iterator[Candidate]:
    for path in _walk(root, lambda p: p.name.lower().endswith(".gguf"), depth):
        yield Candidate(path, source, path.stem)


def lmstudio_candidates(env: Mapping[str, str]) -> Iterator[Candidate]:
    home = _home(env)
    for root in (home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"):
        yield from _gguf_files(root, "lm-studio")


def hf_cache_root(env: Mapping[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    return _home(env) / ".cache" / "huggingface" / "hub"


def hf_candidates(env: Mapping[str, str]) -> Iterator[Candidate]:
    """models--org--name/snapshots/<rev>/**.gguf; a snapshot file links to a blob named by
    its sha256."""
    root = hf_cache_root(env)
    try:
        repos = sorted(p for p in root.iterdir() if p.name.startswith("models--"))
    except OSError:
        return
    for repo in repos[:MAX_FILES]:
        label = repo.name.removeprefix("models--").replace("--", "/")
        for found in _gguf_files(repo / "snapshots", "huggingface"):
            blob = _link_target_name(found.path)
            digest = blob if blob and HEX64.fullmatch(blob) else None
            yield Candidate(found.path, "huggingface", f"{label}/{found.path.name}", digest)


def _link_target_name(path: Path) -> str | None:
    try:
        return Path(os.readlink(path)).name if path.is_symlink() else None
    except OSError:
        return None


def llamacpp_candidates(env: Mapping[str, str]) -> Iterator[Candidate]:
    root = Path(env["LLAMA_CACHE"]) if env.get("LLAMA_CACHE") else (
        _home(env) / ".cache" / "llama.cpp")
    yield from _gguf_files(root, "llama.cpp", depth=1)


def own_candidates(folders: list[str]) -> Iterator[Candidate]:
    for model in CATALOG.values():
        path = installed_path(model)
        if path:
            yield Candidate(path, "ccm-chat", model.name, model.sha256)
    yield from _gguf_files(models_dir(), "ccm-chat", depth=1)
    for folder in folders:
        yield from _gguf_files(Path(folder).expanduser(), folder)


def _walk(root: Path, keep, depth: int) -> Iterator[Path]:
    """Files under root (not following folder links), at most MAX_FILES of them."""
    seen = 0
    stack = [(root, 0)]
    while stack and seen < MAX_FILES:
        folder, level = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_FILES:
                return
            try:
                if entry.is_dir(follow_symlinks=False):
                    if level + 1 < depth:
                        stack.append((Path(entry.path), level + 1))
                elif keep(Path(entry.path)):
                    yield Path(entry.path)
            except OSError:
                continue


def candidates(folders: list[str], env: Mapping[str, str]) -> Iterator[Candidate]:
    yield from own_candidates(folders)
    yield from ollama_candidates(env)
    yield from lmstudio_candidates(env)
    yield from hf_candidates(env)
    yield from llamacpp_candidates(env)
