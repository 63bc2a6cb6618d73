"""One assistant reply as an object: iterate it for the text, then it finishes the turn."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import CancelledError
from ccm_chat.engine.stops import StopStringMatcher

if TYPE_CHECKING:
    from ccm_chat.engine.conversation import Conversation


@dataclass(frozen=True)
class ReplyStats:
    """How the reply went: finish_reason is stop, length, context_full or cancelled."""

    text: str
    tokens: int
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == "cancelled"


class Reply:
    """A reply being generated (as simonw/llm's Response): `for piece in reply` streams it.

    When the text ends the turn is finished: the reply joins the transcript and the memory
    policy does its work (for CCM, compressing the exchange). That is `finish()`, which the
    iteration calls when it runs to its end; a caller that stops early calls `finish()` (or
    the conversation's next call does), so the policy's work never runs in a generator's
    clean-up at some later garbage collection, maybe on another thread.
    """

    def __init__(self, conv: Conversation, params: SamplingParams,
                 cancel: threading.Event | None) -> None:
        self._conv = conv
        self.params = params
        self.cancel_event = cancel or threading.Event()
        self.pieces: list[str] = []
        self.stats: ReplyStats | None = None
        # filled in as it streams, read by the conversation when it ends the turn
        self.tail = ""
        self.tokens = 0
        self.prompt_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.finish_reason = "cancelled"
        self.failed = False
        self.prompt_read = False  # the prompt is in the memory (a cancel can stop it before)
        self.running = False  # inside a step of the stream (the conversation must not end it)
        self._stream: Iterator[str] | None = None
        self._pieces: Iterator[str] | None = None

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            if self.stats is not None:  # finished: read `stats` and `pieces`
                raise StopIteration
            self._pieces = self._run()
        self.running = True
        try:
            return next(self._pieces)
        finally:
            self.running = False

    def _run(self) -> Iterator[str]:
        self._stream = self._generate()
        for piece in self._stream:
            self.pieces.append(piece)
            yield piece
        self.finish()

    def _generate(self) -> Iterator[str]:
        """Generate the reply's tokens through the conversation's steps; the turn is
        finished apart, by `finish`."""
        conv, params, cancel = self._conv, self.params, self.cancel_event
        try:
            self.prompt_tokens, self.prefill_seconds = conv.read_prompt(cancel)
        except CancelledError:  # stopped while reading the prompt in: no reply, memory as was
            return
        self.prompt_read = True
        sampler = conv.sampler(params, redecode=self.prompt_tokens == 0)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringMatcher(params.stop)
        started = time.perf_counter()
        try:
            while True:
                if cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                if self.tokens >= params.max_tokens:
                    self.finish_reason = "length"
                    break
                if not conv.room_for_token():
                    self.finish_reason = "context_full"
                    break
                piece = conv.step(sampler)
                if piece is None:
                    self.finish_reason = "stop"
                    break
                self.tokens += 1
                text = stops.feed(utf8.decode(piece))
                if text:
                    yield text
                if stops.stopped:
                    self.finish_reason = "stop"
                    break
        except Exception:
            self.failed = True
            raise
        finally:
            self.decode_seconds = time.perf_counter() - started  # not the policy's work
            sampler.close()
            if not stops.stopped:
                self.tail = stops.feed(utf8.decode(b"", final=True)) + stops.flush()
        if self.tail:
            tail, self.tail = self.tail, ""
            yield tail

    def cancel(self) -> None:
        """Stop at the next token; what was written is kept, marked cancelled."""
        self.cancel_event.set()

    def finish(self) -> ReplyStats:
        """End the turn (idempotent): keep the reply and let the memory policy work."""
        if self.stats is None:
            if self._stream is not None:
                self._stream.close()  # its clean-up frees the sampler; nothing more
            self._conv.end_reply(self)
        assert self.stats is not None
        return self.stats

    close = finish  # a caller that stops reading closes it, as it would a generator

    @property
    def text(self) -> str:
        return "".join(self.pieces) + (self.tail if self.stats is None else "")
