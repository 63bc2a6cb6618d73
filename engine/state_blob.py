"""The byte format of a saved conversation memory: a checked envelope around the KV state.

Layout: MAGIC | u32 header length | JSON header | back-end payload | sha256 of all before it.
The header says which model and config made it, so a foreign state is refused, not misread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from ccm_chat.engine.errors import StateError

MAGIC = b"CCMSTATE"
FORMAT_VERSION = 2  # 2: bound to its transcript, its llama.cpp build and its KV content
_DIGEST = 32


@dataclass(frozen=True)
class StateBlob:
    """A state's header and KV payload. The payload read back is a view into the bytes it
    came from, not a copy: an 8B model's cache at 32k tokens is 4.3 GB, and each copy of it
    on the way to the context was seconds of a resume."""

    header: dict[str, Any]
    payload: bytes | memoryview

    def to_bytes(self) -> bytes:
        header = dict(self.header, format=FORMAT_VERSION, payload_len=len(self.payload))
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [MAGIC, struct.pack("<I", len(head)), head, self.payload]
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        return b"".join([*parts, digest.digest()])  # one copy of the payload

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> StateBlob:
        view = memoryview(data).cast("B")
        if bytes(view[: len(MAGIC)]) != MAGIC:
            raise StateError("Not a ccm-chat memory state (wrong magic bytes).")
        if len(view) < len(MAGIC) + 4 + _DIGEST:
            raise StateError("The memory state is truncated.")
        body, digest = view[:-_DIGEST], view[-_DIGEST:]
        (head_len,) = struct.unpack_from("<I", body, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = json.loads(bytes(body[start : start + head_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError("The memory state is truncated or corrupt (bad header).") from exc
        payload = body[start + head_len :]
        if not isinstance(header, dict) or header.get("payload_len") != len(payload):
            raise StateError("The memory state is truncated.")
        if hashlib.sha256(body).digest() != digest:
            raise StateError("The memory state is corrupt (checksum mismatch).")
        if header.get("format") != FORMAT_VERSION:
            raise StateError(f"The memory state is in format {header.get('format')}, written by "
                             f"another version of ccm-chat; this one reads format "
                             f"{FORMAT_VERSION}.")
        return cls(header=header, payload=payload)


def origin_mismatch(saved_model: Any, saved_backend: Any, model: str, backend: str) -> str | None:
    """Why a state made by `saved_model` on `saved_backend` cannot serve this engine, or None.

    The one check of where a state came from: `Conversation.from_state` refuses on it, and the
    app's resume asks it of the stored record before reading the blob at all.
    """
    if saved_backend != backend:
        return f"made by the {saved_backend} back end"
    if saved_model != model:
        return "made by another model"
    return None



def transcript_digest(messages: Iterable[tuple[str, str]]) -> str:
    """A digest of the (role, content) pairs a state stands for: what binds it to them."""
    body = json.dumps([[role, content] for role, content in messages], ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


@functools.cache
def runtime(backend: str) -> str | None:
    """The library build whose private KV layout a state of `backend` holds, or None where
    the layout is the back end's own (the hf back end writes safetensors)."""
    if backend != "llamacpp":
        return None
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        import llama_cpp

        return str(getattr(llama_cpp, "__version__", "unknown"))


def runtime_mismatch(saved: Any, backend: str) -> str | None:
    """Why a state of `backend` written by `saved` cannot be read by this build, or None."""
    here = runtime(backend)
    if saved == here:
        return None
    return f"saved by llama-cpp-python {saved or 'of an unknown version'}, this is {here}"
