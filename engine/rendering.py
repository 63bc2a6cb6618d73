"""The chat as the model's template renders it, and that text as tokens: where each message's
text lies in it, and where each token ends, so the KV cells can be lined up with the text.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ccm_chat.engine.chat import ChatMessage, for_model


def common_prefix(a: bytes, b: bytes) -> int:
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


def tokenize(model, target: Rendered, start: int, first: bool) -> tuple[list[int], list[int]]:
    """The tokens of target.text[start:], and where each ends in it. Only the template's
    own markers become special tokens: message text holding a control token's text
    (a pasted `<|im_start|>system`) is tokenized apart, that text read as text."""
    tokens: list[int] = []
    ends: list[int] = []
    for a, b, special in _pieces(model, target, start):
        part = model.tokenize(target.text[a:b], add_special=first, parse_special=special)
        ends += _token_ends(model, part, a, b - a, first)
        tokens += part
        first = False
    return tokens, ends


def _pieces(model, target: Rendered, start: int) -> list[tuple[int, int, bool]]:
    """target.text[start:] as (from, to, parse special tokens): cut around the message
    text that holds a control token's text, and whole (tokenized as it always was)
    when none does."""
    text, end = target.text, len(target.text)
    control = control_texts(model) if target.plain else None
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


def _token_ends(model, tokens: list[int], base: int, length: int, first: bool) -> list[int]:
    """Where each token ends in the rendered bytes (the BOS token adds none)."""
    ends, end = [], base
    for i, tok in enumerate(tokens):
        if not (first and i == 0 and model.add_bos and tok == model.bos):
            end = min(end + len(model.piece(tok, special=True)), base + length)
        ends.append(end)
    if ends:
        ends[-1] = base + length
    return ends
