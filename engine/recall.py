"""Recall: the earlier exchanges a new message asks about, found in the transcript.

A budgeted memory keeps recent exchanges word for word and older ones as <COMP> slots or not
at all, so an exact detail said long ago is lost to it. The transcript still has every word,
so before a message is decoded the exchanges no longer held verbatim are ranked against it
and the best are decoded, marked as recalled, just before it; after the reply they leave the
cache again (engine.conversation). Ranking is by meaning: the cosine of sentence embeddings
(engine.sentence_encoder), which finds "my puppy's name?" for "my dog is called Pixel"
(docs/decisions/011-dense-recall-in-numpy.md). Without the encoder it is BM25 over an
in-memory SQLite FTS5 table per conversation: Python's own sqlite3, so the engine stays free
of the storage package.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.sentence_encoder import SentenceEncoder, shared_encoder

# Words that say nothing about which exchange a message refers to. A query made only of them
# recalls nothing: BM25 would rank by chance.
_STOPWORD_TEXT = """
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing don down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just let me more most my myself no nor not now of off on once only or other our
ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
yes ok okay oh hi hello hey please thanks thank really well also still even much many
tell told say said remember know think like want get got go going did done im ive youre dont
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

RECALL_HEADER = "Recalled from earlier in this conversation:"
# Least cosine similarity a recalled exchange needs: chosen on the validation side of
# bench/recall_ranking.py among 0.2-0.4 (decision 011).
DENSE_MIN_SIMILARITY = 0.25


@dataclass(frozen=True)
class Recalled:
    """What one turn brought back: which exchanges (0 = the first), in how many cells."""

    exchanges: tuple[int, ...]
    tokens: int
    seconds: float

    def describe(self) -> str:
        n = len(self.exchanges)
        return f"recalled {n} earlier exchange{'s' if n != 1 else ''}"


def query_terms(text: str) -> list[str]:
    """The content words of a message, lower-cased, each once, in order."""
    words = re.findall(r"[^\W_]+", text.lower())
    return list(dict.fromkeys(w for w in words if len(w) > 1 and w not in STOPWORDS))


def exchange_text(user: str, assistant: str) -> str:
    return f"User: {user}\nAssistant: {assistant}"


def recall_message(texts: Sequence[str]) -> str:
    """The system turn that carries recalled exchanges, oldest first."""
    return "\n\n".join([RECALL_HEADER, *texts])


def forgotten(messages: Sequence[ChatMessage], spans: Sequence[tuple[int, int]] | None,
              frozen: int) -> list[str]:
    """Each finished exchange's text, oldest first, up to the last one that starts in the
    part of the rendered chat the memory no longer holds verbatim (before `frozen`: evicted
    or compressed); the newer exchanges are held word for word, so nothing to bring back.
    `spans`: where each message lies in the rendered chat (None: unknown, so no recall)."""
    if spans is None:
        return []
    exchanges: list[list[str]] = []
    starts: list[int] = []
    for message, (start, _end) in zip(messages, spans, strict=False):
        if message.role == "user":
            exchanges.append([message.content, ""])
            starts.append(start)
        elif message.role == "assistant" and exchanges and not exchanges[-1][1]:
            exchanges[-1][1] = message.content
    count = sum(1 for start in starts if start < frozen)
    return [exchange_text(user, reply) for user, reply in exchanges[:count]]


class ExchangeIndex:
    """One conversation's exchanges, ranked against a message: by sentence embeddings where
    the encoder is installed, else by BM25 (row i + 1 of the FTS5 table holds exchange i).
    `encoder`: a callable giving the encoder or None, asked at the first search (loading it
    costs about a second, so a conversation that never recalls never pays it)."""

    def __init__(self, encoder: Callable[[], SentenceEncoder | None] = shared_encoder
                 ) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE VIRTUAL TABLE exchanges USING fts5(text, tokenize='porter unicode61')")
        self._texts: list[str] = []
        self._find_encoder: Callable[[], SentenceEncoder | None] | None = encoder
        self._encoder: SentenceEncoder | None = None
        self._rows = np.zeros((0, 0), np.float32)  # embeddings of _texts[:len(_rows)]

    @property
    def dense(self) -> bool:
        """Whether ranking is by meaning (known once a search has asked for the encoder)."""
        return self._encoder is not None

    def sync(self, texts: Sequence[str]) -> None:
        """Hold exactly `texts`: an edit or a rollback of the transcript re-indexes from the
        first exchange that changed; a new exchange is one insert."""
        same = 0
        for old, new in zip(self._texts, texts, strict=False):
            if old != new:
                break
            same += 1
        with self._db:
            if same < len(self._texts):
                self._db.execute("DELETE FROM exchanges WHERE rowid > ?", (same,))
            self._db.executemany("INSERT INTO exchanges(rowid, text) VALUES (?, ?)",
                                 [(i + 1, texts[i]) for i in range(same, len(texts))])
        self._texts = list(texts)
        self._rows = self._rows[:same]

    def search(self, query: str, limit: int) -> list[int]:
        """The exchanges that match `query` best, best first (none when it has no content
        word; by meaning, none under DENSE_MIN_SIMILARITY; by words, none that shares one)."""
        terms = query_terms(query)
        if not terms or not self._texts:
            return []
        if self._find_encoder is not None:
            self._encoder, self._find_encoder = self._find_encoder(), None
        if self._encoder is not None:
            return self._dense_search(self._encoder, query, limit)
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self._db.execute(
            "SELECT rowid FROM exchanges WHERE exchanges MATCH ? ORDER BY bm25(exchanges) "
            "LIMIT ?", (match, limit)).fetchall()
        return [rowid - 1 for (rowid,) in rows]

    def _dense_search(self, encoder: SentenceEncoder, query: str, limit: int) -> list[int]:
        if len(self._rows) < len(self._texts):  # each exchange is embedded once
            new = encoder.encode(self._texts[len(self._rows):])
            self._rows = np.concatenate([self._rows.reshape(-1, new.shape[1]), new])
        sims = self._rows @ encoder.encode([query])[0]
        best = np.argsort(-sims, kind="stable")[:limit]
        return [int(i) for i in best if sims[i] >= DENSE_MIN_SIMILARITY]

    def close(self) -> None:
        self._db.close()


def choose(index: ExchangeIndex, query: str, texts: Sequence[str], budget: int,
           count_tokens: Callable[[str], int], limit: int = 4) -> Recalled:
    """The best-ranked exchanges whose text fits `budget` tokens together (one that does not
    fit is passed over for the next), in the order they were said."""
    started = time.perf_counter()
    index.sync(texts)
    picked: list[int] = []
    used = count_tokens(RECALL_HEADER) if budget > 0 else 0
    for i in index.search(query, limit) if budget > 0 else []:
        cost = count_tokens(texts[i]) + 2
        if used + cost <= budget:
            picked.append(i)
            used += cost
    picked.sort()
    return Recalled(tuple(picked), used if picked else 0, time.perf_counter() - started)
