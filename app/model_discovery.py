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
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ccm_chat.app import paths
from ccm_chat.app.model_catalog import CATALOG, installed_path, models_dir
from ccm_chat.engine.config import LEVEL_BUDGETS, LEVELS

MAX_KEYS = 4096  # metadata entries a header may hold
MAX_KEY_BYTES = 256  # a metadata key's length (the spec allows 65535; none is this long)
MAX_VALUE_BYTES = 4096  # a string value we keep (general.name)
MAX_SKIP_BYTES = 1 << 20  # a string value we skip over (a chat template)
MAX_ARRAY_ITEMS = 1 << 20  # tokenizer vocabularies and merges are 32k-300k
MAX_HEADER_BYTES = 32 << 20  # metadata read in all before the file is given up on
MAX_FILES = 2000  # files looked at under one root
MAX_DEPTH = 8  # folders deep under one root
MAX_MANIFEST_BYTES = 1 << 20

QUANTS = {  # llama.cpp's llama_ftype (general.file_type) -> its name
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_ARCH_KEYS = ("context_length", "block_count", "embedding_length", "attention.head_count",
              "attention.head_count_kv", "attention.key_length", "attention.value_length")
_WANTED = {"general.architecture", "general.name", "general.file_type"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
HASH_CACHE = "model-sha256.json"
# the share of an f16 cell a level's K cache type keeps (V stays f16): see engine.config
_K_SHARE = {"f16": 1.0, "q8_0": 34 / 64, "q4_0": 18 / 64}


class NotGGUF(ValueError):
    """The file is not a GGUF model whose header can be read within the limits."""


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about the model, read cheaply."""

    architecture: str
    name: str
    file_type: int | None
    meta: dict[str, int] = field(default_factory=dict)  # the architecture's keys, short names

    @property
    def quantization(self) -> str:
        if self.file_type is None:
            return "unknown"
        return QUANTS.get(self.file_type, f"type {self.file_type}")

    @property
    def context_length(self) -> int | None:
        return self.meta.get("context_length")

    @property
    def bytes_per_cell(self) -> int | None:
        """K and V of every layer in f16: one uncompressed KV cell, as the engine counts it."""
        layers = self.meta.get("block_count")
        heads = self.meta.get("attention.head_count")
        kv_heads = self.meta.get("attention.head_count_kv", heads)
        width = self.meta.get("embedding_length")
        key = self.meta.get("attention.key_length") or (width // heads if width and heads else 0)
        value = self.meta.get("attention.value_length") or key
        if not (layers and kv_heads and key and value):
            return None
        return 2 * layers * kv_heads * (key + value)


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


class _Reader:
    """Bounded reads of a header: every read and skip counts against a budget, and nothing
    is skipped past the end of the file."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size, self.used = fh, size, 0

    def take(self, n: int) -> bytes:
        self._spend(n)
        data = self.fh.read(n)
        if len(data) != n:
            raise NotGGUF("the header is cut short")
        return data

    def skip(self, n: int) -> None:
        if self.fh.tell() + n > self.size:
            raise NotGGUF("the header points past the end of the file")
        self.fh.seek(n, os.SEEK_CUR)
        self.used += min(n, 64)  # a seek reads nothing; count it a little against the budget

    def _spend(self, n: int) -> None:
        self.used += n
        if self.used > MAX_HEADER_BYTES or self.fh.tell() + n > self.size:
            raise NotGGUF("the header is larger than any model's or runs past the file")

    def number(self, fmt: str) -> int | float:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int) -> bytes | None:
        """A GGUF string up to `limit` bytes; a longer one is skipped (None) up to
        MAX_SKIP_BYTES, and past that the file is refused."""
        n = int(self.number("<Q"))
        if n > MAX_SKIP_BYTES:
            raise NotGGUF(f"a string in the header claims {n} bytes")
        if n > limit:
            self.skip(n)
            return None
        return self.take(n)


def read_gguf_info(path: Path) -> GGUFInfo:
    """The model's name, architecture, quantization and shape from its GGUF header.

    Raises NotGGUF for anything that is not a regular GGUF file readable within the limits
    (a FIFO or device is refused before any read: the open does not block).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise NotGGUF(f"cannot open it: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotGGUF("not a regular file")
        try:
            return _parse(_Reader(fh, st.st_size))
        except (struct.error, OSError, OverflowError, UnicodeDecodeError) as exc:
            raise NotGGUF(f"its header is garbled ({exc})") from exc


def _parse(r: _Reader) -> GGUFInfo:
    if r.take(4) != b"GGUF":
        raise NotGGUF("it does not start with 'GGUF'")
    version = r.number("<I")
    if version not in (2, 3):
        raise NotGGUF(f"GGUF version {version} is not one this reader knows")
    r.number("<Q")  # tensors: their list follows the metadata and is never read
    n_kv = int(r.number("<Q"))
    if n_kv > MAX_KEYS:
        raise NotGGUF(f"its header claims {n_kv} metadata entries")
    found: dict[str, object] = {}
    for _ in range(n_kv):
        raw_key = r.string(MAX_KEY_BYTES)
        if raw_key is None:
            raise NotGGUF("a metadata key is longer than any model's")
        key = raw_key.decode("utf-8", "replace")
        if key.startswith("tokenizer.") and _enough(found):
            break  # the vocabulary follows: megabytes of arrays holding nothing shown here
        kind = int(r.number("<I"))
        value = _value(r, kind, wanted=key in _WANTED or key.endswith(_ARCH_KEYS))
        if value is not None:
            found[key] = value
        if _complete(found):
            break
    return _info(found)


def _value(r: _Reader, kind: int, wanted: bool) -> object:
    """A scalar or short string when wanted, else None; arrays are always skipped."""
    if kind == _STRING:
        raw = r.string(MAX_VALUE_BYTES if wanted else 0)
        return raw.decode("utf-8", "replace") if raw is not None and wanted else None
    if kind == _ARRAY:
        item, count = int(r.number("<I")), int(r.number("<Q"))
        if count > MAX_ARRAY_ITEMS:
            raise NotGGUF(f"an array in the header claims {count} items")
        if item == _STRING:
            for _ in range(count):
                r.string(0)
        elif item in _SCALARS:
            r.skip(count * struct.calcsize(_SCALARS[item]))
        else:
            raise NotGGUF(f"an array of type {item} (nested arrays are not read)")
        return None
    if kind not in _SCALARS:
        raise NotGGUF(f"a metadata value of unknown type {kind}")
    number = r.number(_SCALARS[kind])
    return number if wanted else None


def _enough(found: Mapping[str, object]) -> bool:
    """The keys a shape needs are in (key and value lengths are optional: most models leave
    them to embedding_length / head_count)."""
    arch = found.get("general.architecture")
    return isinstance(arch, str) and all(
        f"{arch}.{k}" in found for k in ("context_length", "block_count", "embedding_length",
                                         "attention.head_count"))


def _complete(found: Mapping[str, object]) -> bool:
    arch = found.get("general.architecture")
    return (isinstance(arch, str) and found.keys() >= _WANTED
            and all(f"{arch}.{k}" in found for k in _ARCH_KEYS))


def _info(found: Mapping[str, object]) -> GGUFInfo:
    arch = found.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise NotGGUF("its header names no architecture")
    meta = {}
    for k in _ARCH_KEYS:
        v = found.get(f"{arch}.{k}")
        if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 32:
            meta[k] = v
    name = found.get("general.name")
    file_type = found.get("general.file_type")
    return GGUFInfo(architecture=arch[:64], name=name[:200] if isinstance(name, str) else "",
                    file_type=file_type if isinstance(file_type, int) else None, meta=meta)


# -- where models are kept ----------------------------------------------------------------------


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
            if digest.startswith("sha256:") and _HEX64.fullmatch(hexpart):
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
            digest = blob if blob and _HEX64.fullmatch(blob) else None
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
            and _HEX64.fullmatch(entry[2])):
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


def candidates(folders: list[str], env: Mapping[str, str]) -> Iterator[Candidate]:
    yield from own_candidates(folders)
    yield from ollama_candidates(env)
    yield from lmstudio_candidates(env)
    yield from hf_candidates(env)
    yield from llamacpp_candidates(env)


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
