"""A GGUF file's header, read as untrusted input: bounded reads of only the metadata keys
model discovery shows (strings, arrays and key counts capped; tensor data never read),
through a non-blocking open of a regular file only, so a FIFO, a device or a hostile header
is refused at once instead of hanging or filling memory."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAX_KEYS = 4096  # metadata entries a header may hold
MAX_KEY_BYTES = 256  # a metadata key's length (the spec allows 65535; none is this long)
MAX_VALUE_BYTES = 4096  # a string value we keep (general.name)
MAX_SKIP_BYTES = 1 << 20  # a string value we skip over (a chat template)
MAX_ARRAY_ITEMS = 1 << 20  # tokenizer vocabularies and merges are 32k-300k
MAX_HEADER_BYTES = 32 << 20  # metadata read in all before the file is given up on
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
