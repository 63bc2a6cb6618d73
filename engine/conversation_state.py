"""A conversation's memory as bytes, and back: `save_state`'s blob, and the checks a blob
passes before it is trusted (its origin, its header against itself and its messages, its
KV payload against its header, and a fingerprint of the cells' content).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.config import CompressionConfig
from ccm_chat.engine.errors import EngineError, StateError
from ccm_chat.engine.kv_sequence import KVSequence
from ccm_chat.engine.rendering import common_prefix, render, spells_text
from ccm_chat.engine.state_blob import (
    StateBlob,
    origin_mismatch,
    runtime,
    runtime_mismatch,
    transcript_digest,
)

if TYPE_CHECKING:
    from ccm_chat.engine.conversation import Conversation
    from ccm_chat.engine.engine import Engine
    from ccm_chat.engine.kv_memory import KVMemory

# A saved state's content fingerprint (`_probe`): the logits after this text, decoded
# behind the cells; the top ones are kept, and a restore must give them again
PROBE_TEXT = b" the"
PROBE_TOP = 16
PROBE_TOLERANCE = 0.05


def save_state(conv: Conversation) -> bytes:
    """The conversation's memory as bytes: restoring them continues exactly there, with no
    re-prefill (Conversation.save_state).

    The header binds the KV cells to what they stand for: the messages (a digest), the
    llama.cpp build whose private layout they are in, and a fingerprint of their
    content (`probe`), which a restore must reproduce."""
    memory, engine, compression = conv.memory, conv.engine, conv.compression
    ctx = memory.ctx()
    probe = _probe(memory, ctx) if memory.kv.cached else None  # before the save: it applies
    payload = ctx.get_state() if memory.kv.cached else b""  # any shift still pending
    backend = engine.info.backend
    header = {
        "backend": backend,
        "model": engine.fingerprint,
        "compression": {"level": compression.level, **compression.key()},
        "flash_attn": engine.flash_attn,
        "runtime": runtime(backend),
        "messages": [[m.role, m.content] for m in conv.messages],
        "transcript": transcript_digest((m.role, m.content) for m in conv.messages),
        "probe": probe,
        **memory.kv.header(),
    }
    return StateBlob(header, payload).to_bytes()


def _probe(memory: KVMemory, ctx) -> dict[str, Any]:
    """A fingerprint of the cached cells' content: the top next-token logits after a
    probe token decoded behind them (and removed again). The probe attends to every
    cell, so cells other than those saved (another chat's, edited ones) give other
    logits, where the same cells give the same ones."""
    row = _probe_row(memory, ctx)
    top = np.argsort(row)[::-1][:PROBE_TOP]
    return {"ids": [int(i) for i in top],
            "logits": [round(float(row[i]), 4) for i in top]}


def _probe_row(memory: KVMemory, ctx) -> np.ndarray:
    at = memory.kv.cached
    ctx.decode(memory.engine.model.tokenize(PROBE_TEXT, add_special=False, parse_special=False),
               at)
    try:
        return ctx.logits(-1)
    finally:
        ctx.remove(at)


def from_state(cls: type[Conversation], engine: Engine, data: bytes,
               transcript: Sequence[tuple[str, str]] | None = None) -> Conversation:
    """The conversation a `save_state` blob holds, checked before it is trusted: its
    origin, its header against itself, its KV cells against its header (positions,
    layout, and the content fingerprint, which also proves the cells decode).
    `transcript`: the (role, content) pairs it must stand for a prefix of."""
    blob = StateBlob.from_bytes(data)
    head = blob.header
    _check_origin(engine, head)
    try:
        comp = CompressionConfig(**head["compression"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"The memory state header is malformed ({exc}).") from exc
    try:
        conv = cls(engine, None, comp)
    except ValueError as exc:  # e.g. made with a compressor this engine does not have
        raise StateError(str(exc)) from exc
    try:
        conv.messages = [ChatMessage(str(r), str(c)) for r, c in head["messages"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"The memory state header is malformed ({exc}).") from exc
    pairs = [(m.role, m.content) for m in conv.messages]
    if head.get("transcript") != transcript_digest(pairs):
        raise StateError("The memory state's messages do not match their digest.")
    if transcript is not None and (
            transcript_digest(list(transcript)[: len(pairs)]) != head["transcript"]):
        raise StateError("The memory state was saved for another transcript.")
    conv.kv = KVSequence.from_header(head, engine.n_ctx)
    _check_text(conv)
    _check_payload(conv.memory, blob.payload)
    conv.memory.parked = blob.payload
    try:
        conv.memory.ctx()  # load it now, so a bad payload fails here and not mid-reply
    except StateError:
        raise
    except EngineError as exc:
        raise StateError(f"The memory state's KV payload was refused ({exc})") from exc
    if conv.engine.ctx.pos_max() != conv.kv.cached - 1:
        engine.release(conv)
        raise StateError("The memory state's KV payload does not match its header.")
    _check_probe(conv, head.get("probe"))
    return conv


def _check_text(conv: Conversation) -> None:
    """The header's cells against its text: token ids of this vocabulary (slots at the
    front), ends in order inside the text, each token's text where it ends (for a
    tokenizer whose pieces spell the text), and the text the messages' rendering."""
    kv, model = conv.kv, conv.engine.model
    text_cells = kv.tokens[kv.slots:]
    if any(t != -1 for t in kv.tokens[:kv.slots]) or any(
            not 0 <= t < model.n_vocab for t in text_cells):
        raise StateError("The memory state's token ids do not belong to this model.")
    size = len(kv.rendered)
    if (kv.ends != sorted(kv.ends) or (kv.ends and not 0 <= kv.ends[0] <= kv.ends[-1] <= size)
            or not 0 <= kv.frozen <= size or kv.evicted < 0):
        raise StateError("The memory state's token bounds do not fit its text.")
    if spells_text(model):
        last = kv.ends[kv.slots - 1] if kv.slots else 0
        for token, end in zip(text_cells, kv.ends[kv.slots:], strict=True):
            if end > last:
                piece = model.piece(token, special=True)
                if kv.rendered[max(0, end - len(piece)):end] != piece:
                    raise StateError("The memory state's tokens do not spell its text.")
            last = end
    target = render(model, conv.messages, add_assistant=False).text
    if common_prefix(kv.rendered, target) < kv.frozen:
        raise StateError("The memory state's text is not that of its messages.")


def _check_payload(memory: KVMemory, payload: bytes | memoryview) -> None:
    """The KV payload against the header, where its layout is known (llama.cpp's): the
    header's cells, at contiguous increasing positions in range, and nothing after."""
    if bool(len(payload)) != bool(memory.kv.cached):
        raise StateError("The memory state's KV payload does not match its header.")
    engine = memory.engine
    if engine.info.backend != "llamacpp" or not memory.kv.cached:
        return
    from ccm_chat.engine.llama_state import payload_problem

    problem = payload_problem(np.frombuffer(payload, dtype=np.uint8), memory.kv.cached,
                              engine.n_ctx, engine.model.position_limit)
    if problem:
        raise StateError(f"The memory state's KV payload does not match its header "
                         f"({problem}).")


def _check_probe(conv: Conversation, saved: Any) -> None:
    """The restored cells give the logits they gave when saved (`_probe`); run now, it
    also proves they decode, so a memory that cannot is refused here, not at a send."""
    engine = conv.engine
    if not conv.kv.cached:
        return
    try:
        ids = [int(i) for i in saved["ids"]]
        logits = np.asarray(saved["logits"], dtype=np.float64)
        if not ids or len(ids) != len(logits) or not all(
                0 <= i < engine.model.n_vocab for i in ids):
            raise ValueError("ids and logits do not pair up")
    except (KeyError, TypeError, ValueError) as exc:
        engine.release(conv)
        raise StateError(f"The memory state's content fingerprint is malformed "
                         f"({exc}).") from exc
    try:
        row = _probe_row(conv.memory, conv.memory.ctx())
    except EngineError as exc:
        engine.release(conv)
        raise StateError(f"The restored memory could not be decoded ({exc}).") from exc
    off = max(float(np.abs(row[ids] - logits).max()), abs(float(row.max()) - logits[0]))
    if not off <= PROBE_TOLERANCE:
        engine.release(conv)
        raise StateError(
            "The memory state's KV cells are not the ones it was saved with (their "
            f"next-token logits are off by {off:.3g}): edited, or from another chat.")


def _check_origin(engine: Engine, head: dict[str, Any]) -> None:
    """Refuse a state made elsewhere: by another model, back end or llama.cpp build, or
    for another KV cache type or V layout."""
    foreign = origin_mismatch(head.get("model"), head.get("backend"), engine.fingerprint,
                              engine.info.backend)
    if foreign:
        raise StateError(f"The memory state was {foreign}.")
    build = runtime_mismatch(head.get("runtime"), engine.info.backend)
    if build:
        raise StateError(f"The memory state was {build}, whose memory layout may differ.")
    kv_type = (head.get("compression") or {}).get("kv_type")
    if kv_type != engine.kv_type:
        raise StateError(
            f"The memory state holds a {kv_type} KV cache; this engine's is {engine.kv_type}."
        )
    saved_flash = head.get("flash_attn")
    if None not in (saved_flash, engine.flash_attn) and saved_flash != engine.flash_attn:
        raise StateError(
            "The memory state's V cache is laid out for flash attention "
            f"{'on' if saved_flash else 'off'}, this engine's for "
            f"{'on' if engine.flash_attn else 'off'} (saved on another device or setting)."
        )

