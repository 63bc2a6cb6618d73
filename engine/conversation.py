"""An engine-side conversation: one KV sequence kept in step with the transcript.

The KV cache holds the tokens of `_rendered`, the chat-template text of the conversation so
far, less what the memory policy evicted. Each call renders the transcript it needs and syncs
the cache to it: the common prefix is kept, anything after it is removed, and only the new
tail is decoded. That one mechanism covers a new turn, a reply cut by a stop string, a
regenerated reply and scoring a candidate. A rollback into text the policy already evicted
cannot be undone in place, so the memory is rebuilt from the messages instead.
"""

from __future__ import annotations

import codecs
import copy
import re
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ccm_chat.engine.chat import ChatMessage, for_model
from ccm_chat.engine.config import CompressionConfig, SamplingParams
from ccm_chat.engine.errors import CancelledError, ContextFullError, EngineError, StateError
from ccm_chat.engine.kv_sequence import KVSequence, MemoryView
from ccm_chat.engine.memory import MemoryPolicy
from ccm_chat.engine.recall import ExchangeIndex, Recalled, choose, forgotten, recall_message
from ccm_chat.engine.reply import Reply, ReplyStats
from ccm_chat.engine.state_blob import (
    StateBlob,
    origin_mismatch,
    runtime,
    runtime_mismatch,
    transcript_digest,
)
from ccm_chat.engine.stops import StopStringMatcher

if TYPE_CHECKING:
    from ccm_chat.engine.engine import Engine

ROLES = ("system", "user", "assistant")
GENERATION_HEADROOM = 64  # cells a policy frees at once when a reply fills the context
# The longest message a compression level takes in, in context windows (a 2 MB paste is
# about 90 at 4,096 tokens, and minutes of decoding on a CPU for the last window of it)
MESSAGE_WINDOWS = 16
CANCEL_BATCH = 128  # tokens a batch takes in while a cancel may come: Esc acts within one
# A saved state's content fingerprint (Conversation._probe): the logits after this text,
# decoded behind the cells; the top ones are kept, and a restore must give them again
PROBE_TEXT = b" the"
PROBE_TOP = 16
PROBE_TOLERANCE = 0.05

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MemoryStats:
    """What the conversation's memory holds and what it stands for."""

    method: str
    memory_tokens: int
    memory_bytes: int
    full_context_tokens: int
    full_context_bytes: int
    context_window: int
    verbatim_exchanges: int = 0  # finished exchanges held as text
    compressed_exchanges: int = 0  # exchanges held as <COMP> slots

    @property
    def ratio(self) -> float:
        return self.full_context_tokens / self.memory_tokens if self.memory_tokens else 1.0


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class Rendered:
    """Chat-template text, and the byte ranges of it that are message text (`plain`; None
    where the template's output could not be lined up with the messages)."""

    text: bytes
    plain: tuple[tuple[int, int], ...] | None = None


def render(model, messages: Sequence[ChatMessage], add_assistant: bool) -> Rendered:
    """The chat as the model's template renders it, with where each message's text lies."""
    text = model.render_chat(messages, add_assistant)
    return Rendered(text, _message_spans(model, messages, add_assistant, text))


def _message_spans(model, messages: Sequence[ChatMessage], add_assistant: bool,
                   text: bytes) -> tuple[tuple[int, int], ...] | None:
    """Where each message's text lies in `text`. The chat rendered with a marker in place
    of each message gives the template's own text around them; the messages fill the gaps,
    whole or trimmed (some templates trim them). None when the two do not line up."""
    tag = b"ccmspan"
    while tag in text:
        tag += b"x"
    marks = [b"%s%d%s" % (tag, i, tag) for i in range(len(messages))]
    shape = model.render_chat([ChatMessage(m.role, mark.decode())
                               for m, mark in zip(messages, marks, strict=True)], add_assistant)
    fixed, at = [], 0
    for mark in marks:
        found = shape.find(mark, at)
        if found < 0:
            return None
        fixed.append(shape[at:found])
        at = found + len(mark)
    fixed.append(shape[at:])
    spans, at = [], 0
    for m, before, after in zip(messages, fixed, fixed[1:], strict=False):
        if not text.startswith(before, at):
            return None
        at += len(before)
        body = for_model(m.content).encode()
        fits = [b for b in (body, body.strip()) if text.startswith(b + after, at)]
        if not fits:
            return None
        spans.append((at, at + len(fits[0])))
        at += len(fits[0])
    return tuple(spans) if text[at:] == fixed[-1] else None


_PER_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _per_model(model, name: str, make: Callable[[], Any]) -> Any:
    """`make()`, made once per model (a fact about its vocabulary)."""
    facts = _PER_MODEL.setdefault(model, {})
    if name not in facts:
        facts[name] = make()
    return facts[name]


def control_texts(model) -> re.Pattern[bytes] | None:
    """The texts of the model's control tokens (`<|im_start|>`...), which a tokenizer told
    to parse special tokens turns into them, as one pattern."""
    def make() -> re.Pattern[bytes] | None:
        texts = set()
        for token in range(model.n_vocab):
            shown = model.piece(token, special=True)
            if shown and model.piece(token, special=False) != shown:
                texts.add(shown)
        by_length = sorted(texts, key=len, reverse=True)
        return re.compile(b"|".join(re.escape(t) for t in by_length)) if texts else None
    return _per_model(model, "control", make)


def spells_text(model) -> bool:
    """Whether the model's token pieces spell the text they came from (byte-level BPE's
    do; a tokenizer that puts a space before the first word does not)."""
    sample = b"Hello world,\n  x = [1, 2] caf\xc3\xa9!"
    return _per_model(model, "spells", lambda: b"".join(
        model.piece(t, special=True)
        for t in model.tokenize(sample, add_special=False, parse_special=False)) == sample)


class Conversation:
    def __init__(
        self,
        engine: Engine,
        system: str | None,
        compression: CompressionConfig,
    ) -> None:
        self.engine = engine
        self.compression = compression  # also sets self.policy
        self.messages: list[ChatMessage] = []
        if system:
            self.messages.append(ChatMessage("system", system))
        self._last_reply: ReplyStats | None = None
        self._pending: Reply | None = None  # a reply not finished yet
        self.kv = KVSequence()  # what the cells in the back end's context stand for
        self._parked: bytes | memoryview | None = b""
        self.recall = True  # bring back earlier exchanges a message asks about (engine.recall)
        self.last_recall: Recalled | None = None  # what the last prompt brought back
        self._index = ExchangeIndex()
        self._recall_prompt: Rendered | None = None  # the prompt, while its recall is held

    @property
    def compression(self) -> CompressionConfig:
        return self._compression

    @compression.setter
    def compression(self, config: CompressionConfig) -> None:
        """A new level takes effect from the next turn, within what the engine was loaded for."""
        if config.kv_type != self.engine.kv_type:
            raise ValueError(
                f"This engine's KV cache is {self.engine.kv_type}, not {config.kv_type}: "
                "load an engine for that level."
            )
        policy = config.policy()
        if policy.budget is not None and not self.engine.evicts:
            raise ValueError(
                f"This engine was loaded for a level that keeps every token; load one with "
                f"compression={config.level!r} to run {config.method!r}."
            )
        if config.method.startswith("ccm-"):
            self._check_compressor(config)
        self._compression = config
        self.policy: MemoryPolicy = policy
        self.recall_tokens = config.recall_tokens  # cells a turn may recall at this level

    def _check_compressor(self, config: CompressionConfig) -> None:
        ccm = self.engine.ccm
        if ccm is None:
            raise ValueError(f"{config.method} needs a trained compressor for this model, and "
                             "none is loaded: train one with `ccm-chat train-compressor`.")
        if config.method == "ccm-merge" and not self.engine.ctx.merges:
            raise ValueError("CCM-merge is not available on the llama.cpp back end: it averages "
                             "cached keys and values, which llama.cpp's cache cannot do. Use "
                             "ccm-concat, or the hf back end (--backend hf).")
        if (config.params.get("compressor") != ccm.files.fingerprint
                or config.params.get("n_comp") != ccm.files.n_comp):
            raise ValueError("This memory was set up for another compressor than the one "
                             "loaded.")

    # -- the public contract ---------------------------------------------------------------------

    def send(
        self,
        text: str,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        **overrides: object,
    ) -> Reply:
        """Add a user turn and stream the assistant's reply, piece by piece.

        Stops at end of generation, a stop string, max_tokens, a full context, when `cancel` is
        set, or when the caller stops reading (then `reply.finish()`, or this conversation's
        next call, ends the turn). Whatever was generated is kept as the reply.
        """
        params = _params(params, overrides)
        self.add_turn("user", text, decode=False)
        return self._reply(params, cancel)

    def generate(
        self,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        **overrides: object,
    ) -> Reply:
        """Stream a reply to the transcript as it stands (after a user turn, or to regenerate)."""
        self._settle()
        return self._reply(_params(params, overrides), cancel)

    def _reply(self, params: SamplingParams, cancel: threading.Event | None) -> Reply:
        self._pending = Reply(self, params, cancel)
        return self._pending

    def add_turn(self, role: str, text: str, decode: bool = True,
                 cancel: threading.Event | None = None) -> None:
        """Append a turn without generating (teacher forcing); its tokens go into memory now.

        The memory policy runs at the end of each exchange, after an assistant turn, as it
        does after a generated reply. `cancel`, checked between decode batches, stops a long
        message with CancelledError: the turn is dropped and the memory is as it was.
        """
        self._settle()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.messages.append(ChatMessage(role, text))
        if decode:
            try:
                self._sync(self._render(add_assistant=False), cancel=cancel)
            except CancelledError:
                self.messages.pop()
                raise
            if role == "assistant":
                self._end_turn()

    def truncate(self, n_messages: int) -> None:
        """Forget every message after the first n (the memory follows at the next sync)."""
        self._settle()
        del self.messages[n_messages:]

    def score(self, reply: str) -> float:
        """Mean token negative log-likelihood of `reply` as the next assistant turn."""
        self._settle()
        tokens = self.engine.model.tokenize(reply.encode(), False, False)
        if not tokens:
            raise ValueError("Cannot score an empty reply.")
        self._sync(self._prompt())
        ctx = self._ctx()
        if not self.policy.make_room(self, len(tokens), ctx.n_ctx - 1):
            raise ContextFullError("The reply does not fit in the context window.")
        self._catch_up(ctx)  # text a compression just moved
        n0 = self.held
        ctx.remove(n0 - 1)
        rows = ctx.decode([self.kv.tokens[-1], *tokens[:-1]], n0 - 1, want=range(len(tokens)))
        rows[len(tokens) - 1] = ctx.logits(-1)
        ctx.remove(n0)
        nll = []
        for j, tok in enumerate(tokens):
            row = rows[j].astype(np.float64)
            top = row.max()
            nll.append(top + np.log(np.exp(row - top).sum()) - row[tok])
        self._forget_recall(add_assistant=True)
        return float(np.mean(nll))

    def memory_view(self) -> MemoryView:
        self._settle()
        return self.kv.view()

    def next_token_logits(self) -> np.ndarray:
        """The model's next-token logits for an assistant reply to the transcript as it is."""
        self._settle()
        decoded, _ = self._sync(self._render(add_assistant=True))
        ctx = self._ctx()
        if decoded == 0:  # logits are only current after a decode
            self._redecode_last(ctx)
        return ctx.logits(-1)

    def stats(self) -> MemoryStats:
        self._settle()
        held, cached = self.kv.held, self.kv.cached
        size = self._ctx().state_size() if cached else 0
        if cached < held:  # the text after new slots takes what the cells before it do
            size += (held - cached) * size // max(1, cached)
        full = self.kv.text_tokens
        n_comp = len(self.engine.ccm.vectors) if self.engine.ccm is not None else 1
        merged = self.compression.method == "ccm-merge"
        return MemoryStats(
            method=self.compression.method,
            memory_tokens=held,
            memory_bytes=size,
            full_context_tokens=full,
            full_context_bytes=full * self.engine.model.f16_bytes_per_token,
            context_window=self.engine.n_ctx,
            verbatim_exchanges=len(self.exchanges),
            compressed_exchanges=self.kv.groups if merged else self.kv.slots // n_comp,
        )

    def rebuild(self, progress: Progress | None = None) -> None:
        """Recompute the memory from the messages.

        A policy that keeps whole tokens (full, window) says which tokens it would hold, and
        only those are decoded, in one batch; one that transforms them (CCM) is replayed turn
        by turn, as if chatted live.
        """
        self._settle()
        ctx = self._ctx()
        ctx.clear()
        self.kv = KVSequence()
        total = len(self.messages)
        if self.policy.budget is None:  # nothing is evicted: one batched prefill is the same
            self._sync(self._render(add_assistant=False), progress)
        elif self.policy.kept_after_rebuild is not None:
            self._prefill_kept(self._render(add_assistant=False))
        else:
            for i in range(1, total + 1):
                self._sync(self._render(add_assistant=False, upto=i))
                if self.messages[i - 1].role == "assistant":
                    self._end_turn()
                if progress is not None:
                    progress(i, total)
        if progress is not None:
            progress(total, total)

    def _prefill_kept(self, rendered: Rendered) -> None:
        """Decode only the tokens the policy keeps of `rendered`, at contiguous positions."""
        ctx = self._ctx()
        tokens, ends = self._tokenize(rendered, 0, first=True)
        sink, recent = self.policy.kept_after_rebuild  # type: ignore[misc]
        keep = list(range(len(tokens)))
        if len(tokens) > sink + recent:
            keep = keep[:sink] + keep[len(tokens) - recent:]
            self.kv.frozen = ends[len(tokens) - recent - 1]
        kept = [tokens[i] for i in keep]
        if len(kept) >= ctx.n_ctx:
            raise ContextFullError("The memory this policy keeps does not fit the context.")
        ctx.decode(kept, 0)
        self.kv.tokens, self.kv.ends = kept, [ends[i] for i in keep]
        self.kv.evicted = len(tokens) - len(kept)
        self.kv.rendered = rendered.text

    def _render(self, add_assistant: bool, upto: int | None = None) -> Rendered:
        return render(self.engine.model, self.messages[:upto], add_assistant)

    def _tokenize(self, target: Rendered, start: int, first: bool
                  ) -> tuple[list[int], list[int]]:
        """The tokens of target.text[start:], and where each ends in it. Only the template's
        own markers become special tokens: message text holding a control token's text
        (a pasted `<|im_start|>system`) is tokenized apart, that text read as text."""
        model = self.engine.model
        tokens: list[int] = []
        ends: list[int] = []
        for a, b, special in self._pieces(target, start):
            part = model.tokenize(target.text[a:b], add_special=first, parse_special=special)
            ends += self._token_ends(part, a, b - a, first)
            tokens += part
            first = False
        return tokens, ends

    def _pieces(self, target: Rendered, start: int) -> list[tuple[int, int, bool]]:
        """target.text[start:] as (from, to, parse special tokens): cut around the message
        text that holds a control token's text, and whole (tokenized as it always was)
        when none does."""
        text, end = target.text, len(target.text)
        control = control_texts(self.engine.model) if target.plain else None
        pieces, at = [], start
        for a, b in target.plain or ():
            a = max(a, start)
            if a >= b or control is None or not control.search(text, a, b):
                continue
            if a > at:
                pieces.append((at, a, True))
            pieces.append((a, b, False))
            at = b
        if at < end:
            pieces.append((at, end, True))
        return pieces

    def _token_ends(self, tokens: list[int], base: int, length: int, first: bool) -> list[int]:
        """Where each token ends in the rendered bytes (the BOS token adds none)."""
        model = self.engine.model
        ends, end = [], base
        for i, tok in enumerate(tokens):
            if not (first and i == 0 and model.add_bos and tok == model.bos):
                end = min(end + len(model.piece(tok, special=True)), base + length)
            ends.append(end)
        if ends:
            ends[-1] = base + length
        return ends

    def save_state(self) -> bytes:
        """The memory as bytes: restoring them continues exactly here, with no re-prefill.

        The header binds the KV cells to what they stand for: the messages (a digest), the
        llama.cpp build whose private layout they are in, and a fingerprint of their
        content (`_probe`), which a restore must reproduce."""
        self._settle()
        ctx = self._ctx()
        probe = self._probe(ctx) if self.kv.cached else None  # before the save: it applies
        payload = ctx.get_state() if self.kv.cached else b""  # any shift still pending
        backend = self.engine.info.backend
        header = {
            "backend": backend,
            "model": self.engine.fingerprint,
            "compression": {"level": self.compression.level, **self.compression.key()},
            "flash_attn": self.engine.flash_attn,
            "runtime": runtime(backend),
            "messages": [[m.role, m.content] for m in self.messages],
            "transcript": transcript_digest((m.role, m.content) for m in self.messages),
            "probe": probe,
            **self.kv.header(),
        }
        return StateBlob(header, payload).to_bytes()

    def _probe(self, ctx) -> dict[str, Any]:
        """A fingerprint of the cached cells' content: the top next-token logits after a
        probe token decoded behind them (and removed again). The probe attends to every
        cell, so cells other than those saved (another chat's, edited ones) give other
        logits, where the same cells give the same ones."""
        row = self._probe_row(ctx)
        top = np.argsort(row)[::-1][:PROBE_TOP]
        return {"ids": [int(i) for i in top],
                "logits": [round(float(row[i]), 4) for i in top]}

    def _probe_row(self, ctx) -> np.ndarray:
        at = self.kv.cached
        ctx.decode(self._probe_tokens(), at)
        try:
            return ctx.logits(-1)
        finally:
            ctx.remove(at)

    def _probe_tokens(self) -> list[int]:
        return self.engine.model.tokenize(PROBE_TEXT, add_special=False, parse_special=False)

    @classmethod
    def from_state(cls, engine: Engine, data: bytes,
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
        conv._check_text()
        conv._check_payload(blob.payload)
        conv._parked = blob.payload
        try:
            conv._ctx()  # load it now, so a bad payload fails here and not mid-reply
        except StateError:
            raise
        except EngineError as exc:
            raise StateError(f"The memory state's KV payload was refused ({exc})") from exc
        if conv.engine.ctx.pos_max() != conv.kv.cached - 1:
            engine.release(conv)
            raise StateError("The memory state's KV payload does not match its header.")
        conv._check_probe(head.get("probe"))
        return conv

    def _check_text(self) -> None:
        """The header's cells against its text: token ids of this vocabulary (slots at the
        front), ends in order inside the text, each token's text where it ends (for a
        tokenizer whose pieces spell the text), and the text the messages' rendering."""
        kv, model = self.kv, self.engine.model
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
        target = self._render(add_assistant=False).text
        if _common_prefix(kv.rendered, target) < kv.frozen:
            raise StateError("The memory state's text is not that of its messages.")

    def _check_payload(self, payload: bytes | memoryview) -> None:
        """The KV payload against the header, where its layout is known (llama.cpp's): the
        header's cells, at contiguous increasing positions in range, and nothing after."""
        if bool(len(payload)) != bool(self.kv.cached):
            raise StateError("The memory state's KV payload does not match its header.")
        if self.engine.info.backend != "llamacpp" or not self.kv.cached:
            return
        from ccm_chat.engine.llama_state import payload_problem

        problem = payload_problem(np.frombuffer(payload, dtype=np.uint8), self.kv.cached,
                                  self.engine.n_ctx, self.engine.model.position_limit)
        if problem:
            raise StateError(f"The memory state's KV payload does not match its header "
                             f"({problem}).")

    def _check_probe(self, saved: Any) -> None:
        """The restored cells give the logits they gave when saved (`_probe`); run now, it
        also proves they decode, so a memory that cannot is refused here, not at a send."""
        if not self.kv.cached:
            return
        try:
            ids = [int(i) for i in saved["ids"]]
            logits = np.asarray(saved["logits"], dtype=np.float64)
            if not ids or len(ids) != len(logits) or not all(
                    0 <= i < self.engine.model.n_vocab for i in ids):
                raise ValueError("ids and logits do not pair up")
        except (KeyError, TypeError, ValueError) as exc:
            self.engine.release(self)
            raise StateError(f"The memory state's content fingerprint is malformed "
                             f"({exc}).") from exc
        try:
            row = self._probe_row(self._ctx())
        except EngineError as exc:
            self.engine.release(self)
            raise StateError(f"The restored memory could not be decoded ({exc}).") from exc
        off = max(float(np.abs(row[ids] - logits).max()), abs(float(row.max()) - logits[0]))
        if not off <= PROBE_TOLERANCE:
            self.engine.release(self)
            raise StateError(
                "The memory state's KV cells are not the ones it was saved with (their "
                f"next-token logits are off by {off:.3g}): edited, or from another chat.")

    # -- the KVMemory handle policies edit -------------------------------------------------------

    @property
    def held(self) -> int:
        """Tokens (KV cells) the memory holds now."""
        return self.kv.held

    def evict(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.held:
            raise ValueError(f"Cannot evict cells [{start}, {end}) of {self.held}.")
        ctx = self._ctx()
        if start >= self.kv.cached:  # text not decoded yet: nothing in the cache to edit
            self.kv.undecoded -= end - start
            self.kv.forget(start, end)
            return
        if end > self.kv.cached:
            self._catch_up(ctx)
        ctx.close_gaps(start, end, 0)
        self.kv.forget(start, end)
        if ctx.needs_compaction and self.kv.cached:
            ctx.compact(self.kv.tokens[self.kv.cached - 1])

    @property
    def slots(self) -> int:
        return self.kv.slots

    @property
    def exchanges(self) -> list[int]:
        """Cells of each finished exchange held as text, oldest first."""
        return self.kv.exchanges

    def compress(self, cells: int | None = None, merge: bool = False,
                 max_slots: int | None = None) -> None:
        """Run the compressor's <COMP> slots over the first `cells` text cells after the slots
        (None: all of them), with its adapter on, then keep only the slots in their place
        (merge: their running mean); the oldest whole groups of slots past `max_slots` go in
        the same step (one position shift for both). The slots see the slots before them and
        that text only, never the text after it, as the compressor was trained."""
        ccm = self.engine.ccm
        if ccm is None:
            raise EngineError("No trained compressor is loaded for this model.")
        ctx = self._ctx()
        n = len(ccm.vectors)
        text = self.held - self.kv.slots if cells is None else min(cells, self.held - self.kv.slots)
        if text <= 0:
            return
        if merge and text != self.held - self.kv.slots:
            raise EngineError("CCM-merge compresses all the text after its slots at once.")
        capacity = ctx.n_ctx - 1
        while self.held + n > capacity and self.kv.slots > n:  # the oldest groups go first
            self.evict(0, n)
        if self.held + n > capacity:  # then the span's oldest text, keeping its last token
            cut = self.held + n - capacity
            if cut > text - 1:
                raise ContextFullError("This exchange is too long to compress in this context.")
            self.evict(self.kv.slots, self.kv.slots + cut)
            text -= cut
        start = self.kv.slots
        end = start + text
        if not merge:
            over = 0 if max_slots is None else start + n - max_slots
            drop = min(start, -(-over // n) * n) if over > 0 else 0
            self._compress_span(ctx, start, end, drop)
            return
        self._catch_up(ctx)
        ctx.decode_embeddings(ccm.vectors, end, ccm.adapter)
        self.kv.add_slots(end, n)
        ctx.remove(start, end)  # the text goes; the new slots move onto the held ones' places
        ctx.shift(end, -1, -end)
        self.kv.forget(start, end)
        if start:
            ctx.merge_slots(n, 1.0 / self.kv.groups)
            self.kv.forget(n, 2 * n)
            self.kv.ends[:n] = [len(self.kv.rendered)] * n  # the mean stands for all of it
        self.kv.slots = n

    def _compress_span(self, ctx, start: int, end: int, drop: int) -> None:
        """Replace text cells [start, end) by their <COMP> slots, as pure CCM would make them.

        The slots see the slots before them and that text only: the text after it leaves the
        cache, and once the slots sit in the text's place it is decoded again behind them:
        on a GPU with the next message (`KVSequence.undecoded`: one batch instead of two,
        none in the turn's after-work), elsewhere at once (`Context.batches_cheaply`). That
        keeps the text held verbatim as the compressor was trained to read it: decoded after
        the memory as it is now. Left as decoded beside the text since compressed, it cost
        0.6-1.2 nats of next-reply NLL (default model, CPU). `drop`: the oldest slot cells
        that go in the same step."""
        ccm = self.engine.ccm
        n = len(ccm.vectors)  # type: ignore[union-attr]
        cached = self.kv.cached
        if cached < end:  # the span is text an earlier step moved: decode it now
            ctx.decode(self.kv.tokens[cached:end], cached)
        elif cached > end:
            ctx.remove(end)
            if ctx.needs_compaction:
                ctx.compact(-1)  # no holes where the slots go
        self.kv.undecoded = self.held - end  # the cache ends with the span now
        ctx.slots_over_text(ccm.vectors, start, end, ccm.adapter,  # type: ignore[union-attr]
                            drop)
        self.kv.add_slots(end, n)
        self.kv.forget(start, end)
        self.kv.slots_joined(n)
        if drop:
            self.kv.forget(0, drop)
        self.kv.undecoded = self.held - start - n + drop
        if not ctx.batches_cheaply:
            self._catch_up(ctx)

    def _catch_up(self, ctx, then: Sequence[int] = ()) -> int:
        """Decode the cells held but not cached yet, and `then` after them, in one batch;
        return how many cells were decoded."""
        cached = self.kv.cached
        backlog = self.kv.tokens[cached:]
        if backlog or then:
            try:
                ctx.decode([*backlog, *then], cached)
            except BaseException:  # some batches may have landed: none of them count
                ctx.remove(cached)
                raise
            self.kv.undecoded = 0
        return len(backlog) + len(then)

    # -- internals -------------------------------------------------------------------------------

    def _ctx(self):
        return self.engine.activate(self)

    def park(self) -> None:
        """Move this conversation's KV out of the shared context into bytes."""
        ctx = self.engine.ctx
        self._parked = ctx.get_state() if self.kv.cached else b""
        ctx.clear()

    def unpark(self) -> None:
        ctx = self.engine.ctx
        ctx.clear()
        if self._parked:
            ctx.set_state(self._parked)
        self._parked = None

    def _sync(self, target: Rendered, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> tuple[int, float]:
        """Make the KV cache hold exactly `target`; return (tokens decoded, seconds).

        `progress(done, total)` hears of each batch of tokens decoded. `cancel` is checked
        between batches: once set, the cache and its bookkeeping go back to what they were
        before the new text, and CancelledError is raised.
        """
        ctx = self._ctx()
        if self._recall_prompt is not None and not target.text.startswith(
                self._recall_prompt.text):
            self._recall_prompt = None  # the common prefix below drops the recalled cells
        common = _common_prefix(self.kv.rendered, target.text)
        if common < self.kv.frozen:
            self.rebuild()
            ctx = self._ctx()
            common = _common_prefix(self.kv.rendered, target.text)
        if common < len(self.kv.rendered):
            keep = bisect_right(self.kv.ends, common)
            if keep < self.kv.cached:
                ctx.remove(keep)
            self.kv.truncate(keep)
        if len(target.text) == len(self.kv.rendered):  # nothing new
            start = time.perf_counter()
            return self._catch_up(ctx), time.perf_counter() - start
        tokens, ends = self._tokenize(target, len(self.kv.rendered), first=not self.kv.tokens)
        capacity = ctx.n_ctx - 1
        self._check_fits(len(tokens), ctx.n_ctx)
        undo = self._undo_point(ctx, len(tokens), capacity) if cancel is not None else None
        backlog = self.kv.undecoded  # decoded with the first batch
        start = time.perf_counter()
        done = 0
        while done < len(tokens):
            if undo is not None and cancel.is_set():  # type: ignore[union-attr]
                self._roll_back(ctx, undo)
                raise CancelledError("Stopped before the whole message was read: it was not "
                                     "sent, and the chat's memory is as it was before it.")
            room = capacity - self.held
            if room < len(tokens) - done:
                self._catch_up(ctx)  # the policy edits the cache as it stands
                chunk = min(len(tokens) - done, max(1, ctx.n_ctx // 2))
                if not self.policy.make_room(self, chunk, capacity):
                    raise ContextFullError(
                        "A single message is longer than this memory policy can take in."
                    )
                room = capacity - self.held
            n = min(room, len(tokens) - done, ctx.n_batch if undo is None else CANCEL_BATCH)
            self._catch_up(ctx, tokens[done : done + n])
            for tok, tok_end in zip(tokens[done : done + n], ends[done : done + n], strict=True):
                self.kv.record(tok, tok_end)
            done += n
            if progress is not None:
                progress(done, len(tokens))
        self.kv.rendered = target.text
        return len(tokens) + backlog, time.perf_counter() - start

    def _check_fits(self, n: int, n_ctx: int) -> None:
        """Refuse, before decoding any of them, `n` new tokens that can never fit: beyond the
        context window with compression off; with a level, more than MESSAGE_WINDOWS
        windows (a level slides over a message longer than the window, keeping its end, so
        of a longer one it would keep only a sliver, after minutes of decoding)."""
        capacity = n_ctx - 1
        if self.policy.budget is None:
            if self.held + n > capacity:
                raise ContextFullError(
                    f"This conversation needs {self.held + n} tokens, more than the context "
                    f"window of {n_ctx}. Start a new chat, raise the context size, or pick a "
                    "compression level in settings."
                )
        elif n > MESSAGE_WINDOWS * n_ctx:
            raise ContextFullError(
                f"This message is {n:,} tokens long, more than a compression level takes in "
                f"at once ({MESSAGE_WINDOWS * n_ctx:,} tokens: {MESSAGE_WINDOWS} times the "
                f"context window of {n_ctx:,}, of which it keeps only the end). Shorten "
                "it, or send it in parts."
            )

    def _undo_point(self, ctx, n: int, capacity: int) -> tuple[KVSequence, bytes | None]:
        """What a cancelled sync puts back: the bookkeeping, and the cache's bytes too when
        the policy will have to make room for the `n` new tokens (an eviction or a
        compression cannot be undone in place)."""
        saved = copy.deepcopy(self.kv)
        state = ctx.get_state() if self.held + n > capacity and self.kv.cached else None
        return saved, state

    def _roll_back(self, ctx, undo: tuple[KVSequence, bytes | None]) -> None:
        saved, state = undo
        if state is not None:
            ctx.set_state(state)
        else:  # only cells after the saved ones were added
            ctx.remove(saved.cached)
        self.kv = saved

    # -- recall: earlier exchanges brought back for one turn (engine.recall) ---------------------

    def _prompt(self) -> Rendered:
        """The chat up to the assistant's header, with the earlier exchanges the last user
        message asks about, which the memory no longer holds verbatim, just before it."""
        plain = self._render(add_assistant=True)
        self.last_recall = None
        last = self.messages[-1] if self.messages else None
        if not (self.recall and self.recall_tokens > 0 and last and last.role == "user"):
            return plain
        texts = forgotten(self.messages[:-1], plain.plain, self.kv.frozen)
        # what the context has room for beside the memory, the new text (bytes: at least its
        # tokens) and a reply's first cells: recall never makes the memory evict
        room = (self.engine.n_ctx - 1 - self.held - GENERATION_HEADROOM
                - (len(plain.text) - len(self.kv.rendered)))
        share = min(self.recall_tokens, room)
        if not texts or share <= 0:
            return plain
        model = self.engine.model
        found = choose(self._index, last.content, texts, share,
                       lambda text: len(model.tokenize(text.encode(), False, False)))
        if not found.exchanges:
            return plain
        note = ChatMessage("system", recall_message([texts[i] for i in found.exchanges]))
        prompt = render(model, [*self.messages[:-1], note, last], True)
        before = self._render(add_assistant=False, upto=-1).text
        if not (prompt.text.startswith(before) and plain.text.startswith(before)):
            return plain  # a template that would move the held text: no recall, no rollback
        self.last_recall = found
        self._recall_prompt = prompt
        return prompt

    def _forget_recall(self, add_assistant: bool) -> None:
        """The recalled exchanges leave the cache, which then holds what it would have held
        had they never come: the text after them is decoded again in their place."""
        if self._recall_prompt is not None:
            self._sync(self._render(add_assistant=add_assistant))

    def _end_turn(self) -> None:
        """An exchange is finished: mark where its text ends, then let the policy work."""
        self.kv.end_exchange()
        self.policy.after_turn(self)


    def _redecode_last(self, ctx) -> None:
        """Logits are only current after a decode: recompute them for the last cell."""
        if not self.kv.tokens:
            raise EngineError("Nothing to generate from: the conversation is empty.")
        if not self._catch_up(ctx):
            ctx.redecode(self.kv.tokens[-1], self.held - 1)

    def _stream(self, reply: Reply) -> Iterator[str]:
        """Generate the reply's tokens; the turn is finished apart, by `_finish`."""
        params, cancel = reply.params, reply.cancel_event
        model = self.engine.model
        try:
            reply.prompt_tokens, reply.prefill_seconds = self._sync(
                self._prompt(), cancel=cancel)
        except CancelledError:  # stopped while reading the prompt in: no reply, memory as was
            return
        reply.prompt_read = True
        ctx = self._ctx()
        if reply.prompt_tokens == 0:
            self._redecode_last(ctx)
        sampler = ctx.sampler(params)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringMatcher(params.stop)
        started = time.perf_counter()
        try:
            while True:
                if cancel.is_set():
                    reply.finish_reason = "cancelled"
                    break
                if reply.tokens >= params.max_tokens:
                    reply.finish_reason = "length"
                    break
                if self.held + 1 > ctx.n_ctx - 1 and not (
                    self.policy.make_room(
                        self, min(GENERATION_HEADROOM, ctx.n_ctx // 4), ctx.n_ctx - 1)
                    or self.policy.make_room(self, 1, ctx.n_ctx - 1)
                ):
                    reply.finish_reason = "context_full"
                    break
                if self.kv.undecoded:  # text a compression to make room moved: its logits
                    self._catch_up(ctx)
                token = sampler.sample(ctx)
                if model.is_end_of_generation(token):
                    reply.finish_reason = "stop"
                    break
                piece = model.piece(token, special=True)
                ctx.decode([token], self.held)
                self.kv.rendered += piece
                self.kv.record(token, len(self.kv.rendered))
                reply.tokens += 1
                text = stops.feed(utf8.decode(piece))
                if text:
                    yield text
                if stops.stopped:
                    reply.finish_reason = "stop"
                    break
        except Exception:
            reply.failed = True
            raise
        finally:
            reply.decode_seconds = time.perf_counter() - started  # not the policy's work
            sampler.close()
            if not stops.stopped:
                reply.tail = stops.feed(utf8.decode(b"", final=True)) + stops.flush()
        if reply.tail:
            tail, reply.tail = reply.tail, ""
            yield tail

    def _finish(self, reply: Reply) -> None:
        """The reply joins the transcript and the policy does its work on the exchange."""
        text = "".join(reply.pieces) + reply.tail
        self.messages.append(ChatMessage("assistant", text))
        if self._pending is reply:
            self._pending = None
        if reply.prompt_read and not reply.failed:
            with suppress(ContextFullError):
                self._forget_recall(add_assistant=False)
        if self.policy.reads_finished_exchange:
            # after a failed decode the cache is left for a rebuild; after a prompt not read
            # in (cancelled), for the next message's sync
            if reply.prompt_read and not reply.failed:
                # the reply's end-of-turn marker, which generation stops before, goes in
                # too: a compressor was trained on exchanges as the template renders them
                with suppress(ContextFullError):
                    self._sync(self._render(add_assistant=False))
                self._end_turn()
        else:
            self._end_turn()
        reply.stats = ReplyStats(text=text, tokens=reply.tokens,
                                 prompt_tokens=reply.prompt_tokens,
                                 prefill_seconds=reply.prefill_seconds,
                                 decode_seconds=reply.decode_seconds,
                                 finish_reason=reply.finish_reason)
        self._last_reply = reply.stats

    def _settle(self) -> None:
        """A reply its caller stopped reading is finished before anything else happens."""
        if self._pending is not None and not self._pending.running:
            self._pending.finish()

    @property
    def last_reply(self) -> ReplyStats | None:
        """How the last reply went (finishing it, if its caller stopped reading early)."""
        self._settle()
        return self._last_reply


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


def _params(params: SamplingParams | None, overrides: dict[str, object]) -> SamplingParams:
    base = params or SamplingParams()
    if not overrides:
        return base
    values = {**base.__dict__, **overrides}
    if isinstance(values.get("stop"), list | str):
        stop = values["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**values)  # type: ignore[arg-type]
