"""GGUF models the user already has: where Ollama, LM Studio, the Hugging Face cache and
llama.cpp keep them, ccm-chat's own models folder, and folders named in the settings.

Every file found is untrusted. Its header is read with bounded reads (only the metadata keys
shown here; strings, arrays and key counts capped; tensor data never read), through a
non-blocking open of a regular file only, so a FIFO, a device or a hostile header is skipped
at once instead of hanging or filling memory.

Whether a compressor exists is known only from the file's sha256 (what the engine matches
compressors by, engine/ccm/files.py). Hashing gigabytes is slow, so discovery uses a digest
it gets for free (an Ollama or Hugging Face blob is named by it, an installed catalogue model
was checked when joined) or one cached by (path, size, mtime) in the cache dir (`ccm-chat
models --hash` fills it); otherwise it says "unknown". A wrong cheap answer costs nothing:
the engine hashes the file itself when it loads it.

The header reader is app/gguf_header.py, the places models are kept app/model_sources.py;
this module puts them together.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ccm_chat.app import paths
from ccm_chat.app.gguf_header import QUANTS, GGUFInfo, NotGGUF, read_gguf_info
from ccm_chat.app.model_catalog import models_dir
from ccm_chat.app.model_sources import (
    HEX64,
    MAX_MANIFEST_BYTES,
    Candidate,
    candidates,
    hf_cache_root,
    hf_candidates,
    llamacpp_candidates,
    lmstudio_candidates,
    ollama_candidates,
    own_candidates,
)
from ccm_chat.engine.config import LEVEL_BUDGETS, LEVELS

__all__ = [
    "QUANTS", "Candidate", "FoundModel", "GGUFInfo", "LevelUse", "NotGGUF", "cached_sha256",
    "candidates", "describe", "discover", "has_compressor", "hf_cache_root", "hf_candidates",
    "human_size", "level_use", "llamacpp_candidates", "lmstudio_candidates", "models_dir",
    "ollama_candidates", "own_candidates", "read_gguf_info", "remember_sha256", "train_hint",
]

HASH_CACHE = "model-sha256.json"
# the share of an f16 cell a level's K cache type keeps (V stays f16): see engine.config
_K_SHARE = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}


@dataclass(frozen=True)
class FoundModel:
    """A GGUF file found on disk, where it came from, and what it holds."""

    path: Path
    source: str  # ollama, lm-studio, huggingface, llama.cpp, ccm-chat, a settings folder
    label: str  # the name its source gives it (an Ollama tag, a repo), else the file's
    size: int
    info: GGUFInfo
    sha256: str | None  # known cheaply, else None
    compressor: bool | None  # None: unknown until the file's sha256 is known

    @property
    def name(self) -> str:
        return self.info.name or self.label

    @property
    def compressor_text(self) -> str:
        return {True: "yes", False: "no", None: "unknown"}[self.compressor]


# -- the header ---------------------------------------------------------------------------------


# -- the cheap sha256 and the compressor --------------------------------------------------------


def _hash_cache_path() -> Path:
    return paths.cache_dir() / HASH_CACHE


def cached_sha256(path: Path, st: os.stat_result) -> str | None:
    """The file's sha256 if it was hashed before at this size and mtime."""
    try:
        with _hash_cache_path().open("rb") as fh:
            data = json.loads(fh.read(MAX_MANIFEST_BYTES))
        entry = data.get(str(path))
    except (OSError, ValueError, AttributeError):
        return None
    if (isinstance(entry, list) and len(entry) == 3 and entry[0] == st.st_size
            and entry[1] == st.st_mtime_ns and isinstance(entry[2], str)
            and HEX64.fullmatch(entry[2])):
        return entry[2]
    return None


def remember_sha256(path: Path) -> str:
    """Hash the file (slow for a large one) and keep it in the cache by (path, size, mtime)."""
    from ccm_chat.engine.models import model_fingerprint

    resolved = path.resolve()
    st = resolved.stat()
    digest = model_fingerprint(resolved)
    cache = _hash_cache_path()
    try:
        with cache.open("rb") as fh:
            data = json.loads(fh.read(MAX_MANIFEST_BYTES))
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[str(resolved)] = [st.st_size, st.st_mtime_ns, digest]
    cache.parent.mkdir(parents=True, exist_ok=True)
    temp = cache.with_suffix(".tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, cache)
    return digest


def has_compressor(sha256: str | None) -> bool | None:
    if sha256 is None:
        return None
    from ccm_chat.engine.ccm.files import find_compressor

    try:
        return find_compressor(sha256) is not None
    except (OSError, ValueError):
        return None


# -- putting it together ------------------------------------------------------------------------


def discover(folders: list[str] | None = None,
             env: Mapping[str, str] | None = None) -> list[FoundModel]:
    """Every readable GGUF model in the usual places and `folders`, each file once (the
    first source to name it wins); files that are not GGUF models are left out."""
    env = os.environ if env is None else env
    found: list[FoundModel] = []
    seen: set[Path] = set()
    for cand in candidates(list(folders or []), env):
        model = _examine(cand, seen)
        if model is not None:
            found.append(model)
    return found


def _examine(cand: Candidate, seen: set[Path]) -> FoundModel | None:
    try:
        real = cand.path.resolve()
        st = real.stat()
    except (OSError, RuntimeError):
        return None
    if real in seen or not stat.S_ISREG(st.st_mode):
        return None
    seen.add(real)
    try:
        info = read_gguf_info(real)
    except NotGGUF:
        return None
    if info.architecture in {"clip", "adapter"}:  # projectors and LoRAs are not chat models
        return None
    digest = cand.sha256 or cached_sha256(real, st)
    return FoundModel(path=cand.path, source=cand.source, label=cand.label, size=st.st_size,
                      info=info, sha256=digest, compressor=has_compressor(digest))


# -- what each level holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class LevelUse:
    level: str
    cells: int
    bytes: int

    def describe(self) -> str:
        return f"{self.level}: {self.cells} cells, {_mb(self.bytes)}"


def level_use(info: GGUFInfo, context_size: int) -> list[LevelUse]:
    """Cells and bytes each level holds after a turn on this model (off: the whole context,
    at most `context_size` and the model's own length), K cache typed as the level types it
    on llama.cpp without a compressor."""
    per_cell = info.bytes_per_cell
    if per_cell is None:
        return []
    full = min(context_size, info.context_length or context_size)
    rows = []
    for level in LEVELS:
        budget, kv_type = LEVEL_BUDGETS[level]
        cells = full if budget is None else min(budget, full)
        rows.append(LevelUse(level, cells, int(cells * per_cell * (1 + _K_SHARE[kv_type]) / 2)))
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"


def human_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def train_hint(model: FoundModel) -> str:
    return (f"ccm-chat train-compressor --model {model.path}  (trains one for this model; "
            "it takes a GPU)")


def describe(model: FoundModel, context_size: int, device: str) -> list[str]:
    """The lines the listing and the picker show for a found model."""
    info = model.info
    lines = [
        f"{model.name}  [{model.source}: {model.label}]",
        f"  {model.path}",
        f"  {info.architecture}, {info.quantization}, {human_size(model.size)}, context "
        f"{info.context_length or 'unknown'}, compressor: {model.compressor_text}",
    ]
    use = level_use(info, context_size)
    if use:
        lines.append(f"  on {device}: " + "; ".join(u.describe() for u in use))
    if model.compressor is False:
        lines.append(f"  no compressor: {train_hint(model)}")
    elif model.compressor is None:
        lines.append("  compressor unknown until the file is hashed (`ccm-chat models --hash`)")
    return lines
