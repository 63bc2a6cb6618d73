"""Recall of earlier exchanges: ranked in the transcript, decoded for one turn, then gone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from ccm_chat.engine import Engine
from ccm_chat.engine.recall import ExchangeIndex, choose, exchange_text, query_terms
from ccm_chat.engine.sentence_encoder import shared_encoder
from tests.device import TEST_DEVICE

FACT = ("By the way, my dog is called Biscuit.", "Biscuit is a lovely name for a dog!")
FILLER = [
    ("What should I cook tonight?", "How about a simple pasta with tomatoes and basil?"),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late."),
    ("I might paint the kitchen green.", "Green can make a kitchen feel fresh and calm."),
    ("Is it worth learning the guitar at forty?", "Yes, adults learn quickly with practice."),
    ("The train was late again this morning.", "That is frustrating, I hope it improves."),
    ("Should I read more novels or history?", "Both are rewarding; pick what excites you."),
]
QUESTION = "What is my dog called?"


# -- the ranking, on its own ----------------------------------------------------------------------

def test_query_terms_drop_words_that_name_no_exchange() -> None:
    assert query_terms("What is my DOG called, do you remember?") == ["dog", "called"]
    assert query_terms("ok thanks!") == []


RANKINGS = {"meaning": shared_encoder, "words": lambda: None}  # without an encoder: BM25


@pytest.fixture(params=list(RANKINGS))
def index(request) -> Iterator[ExchangeIndex]:
    index = ExchangeIndex(RANKINGS[request.param])
    yield index
    index.close()


def test_the_index_ranks_the_exchange_a_question_is_about_first(index) -> None:
    texts = [exchange_text(u, a) for u, a in [*FILLER[:3], FACT, *FILLER[3:]]]
    index.sync(texts)
    assert index.search("Do you know what my dog is called?", 3)[0] == 3
    assert index.search("ok thanks", 3) == []  # no content word: nothing, not noise


def test_a_question_in_other_words_is_found_by_meaning_only(index, request) -> None:
    texts = [exchange_text(u, a) for u, a in [*FILLER[:3], FACT, *FILLER[3:]]]
    index.sync(texts)
    found = index.search("Remind me, what's my puppy's moniker?", 2)
    # the dev set-up installs the encoder (the recall extra): "meaning" must really be it
    assert index.dense == (request.node.callspec.params["index"] == "meaning")
    if index.dense:
        assert found[:1] == [3]
    else:
        assert 3 not in found  # it shares no content word with the fact


def test_the_index_follows_an_edited_transcript(index) -> None:
    index.sync([exchange_text(*FILLER[0]), exchange_text(*FACT)])
    assert index.search("my dog", 2)[:1] == [1]
    index.sync([exchange_text(*FILLER[0]), exchange_text(*FILLER[1])])  # edited away
    assert index.search("my dog", 2) == []  # nothing left about a dog
    index.sync([exchange_text(*FILLER[0]), exchange_text(*FILLER[1]), exchange_text(*FACT)])
    assert index.search("my dog", 2)[:1] == [2]


def test_choose_passes_over_what_does_not_fit_and_keeps_the_order_said(index) -> None:
    long_fact = ("My dog " + "really " * 60 + "loves parks.", "Dogs love parks.")
    texts = [exchange_text(*FACT), exchange_text(*FILLER[0]), exchange_text(*long_fact)]
    words = lambda text: len(text.split())  # noqa: E731  (a stand-in token count)
    got = choose(index, "my dog and dinner tonight, what should I cook", texts, 48, words)
    assert got.exchanges == (0, 1)  # the long one does not fit in 48
    assert 0 < got.tokens <= 48
    assert choose(index, "dog", texts, 3, words).exchanges == ()  # nothing fits


# -- on the real default model ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["hybrid", "window"])
def engine(request) -> Iterator[Engine]:
    """The aggressive level, with the shipped compressor (hybrid) and without (window)."""
    with Engine.load(n_ctx=2048, device=TEST_DEVICE, compression="aggressive",
                     compressor=request.param == "hybrid") as eng:
        yield eng


def long_chat(engine: Engine, recall: bool = True):
    conv = engine.new_conversation()
    conv.recall = recall
    for user, assistant in [FACT, *FILLER]:
        conv.add_turn("user", user)
        conv.add_turn("assistant", assistant)
    assert conv.compression.method in ("ccm-hybrid", "window")
    assert b"Biscuit" not in conv.memory_view().rendered[conv.memory_view().frozen:]
    return conv


def test_a_question_recalls_the_exchange_the_memory_no_longer_holds(engine) -> None:
    conv = long_chat(engine)
    reply = conv.send(QUESTION, max_tokens=4, temperature=0)
    seen = []
    for _piece in reply:  # mid-reply, the recalled exchange sits before the question
        seen.append(conv.kv.rendered)
    assert seen and FACT[0].encode() in seen[0]
    assert conv.last_recall is not None and conv.last_recall.exchanges == (0,)
    assert conv.last_recall.describe() == "recalled 1 earlier exchange"
    # after the reply the recalled cells are gone and positions are contiguous
    view = conv.memory_view()
    assert b"Recalled from earlier" not in view.rendered
    ctx = engine.activate(conv)
    assert (ctx.pos_min(), ctx.pos_max()) == (0, conv.kv.cached - 1)
    assert conv.held <= conv.policy.budget


def test_the_memory_after_a_recall_turn_is_the_one_without_recall(engine) -> None:
    with_recall = long_chat(engine)
    text = "".join(with_recall.send(QUESTION, max_tokens=6, temperature=0))
    assert with_recall.last_recall and with_recall.last_recall.exchanges
    without = long_chat(engine, recall=False)
    without.add_turn("user", QUESTION)
    without.add_turn("assistant", text)  # the same reply, teacher-forced
    assert with_recall.memory_view() == without.memory_view()
    np.testing.assert_allclose(with_recall.next_token_logits(), without.next_token_logits(),
                               atol=1e-3)


def test_save_restore_and_rebuild_stay_exact_after_a_recall_turn(engine) -> None:
    conv = long_chat(engine)
    "".join(conv.send(QUESTION, max_tokens=6, temperature=0))
    assert conv.last_recall and conv.last_recall.exchanges
    state = conv.save_state()
    assert b"Recalled from earlier" not in state
    restored = engine.restore_conversation(state)
    assert restored.memory_view() == conv.memory_view()
    rebuilt = engine.new_conversation()
    rebuilt.messages = list(conv.messages)
    rebuilt.rebuild()
    # a window's rebuild decodes the kept tokens in one batch: no exchange bounds to keep
    assert replace(rebuilt.memory_view(), exchanges=()) == replace(conv.memory_view(),
                                                                   exchanges=())
    want = conv.next_token_logits()
    np.testing.assert_allclose(restored.next_token_logits(), want, atol=1e-3)
    if engine.ccm is not None:  # a hybrid rebuild replays the chat; a window's reads only the
        # tokens it keeps, which never saw the evicted ones (so it is not the live memory)
        np.testing.assert_allclose(rebuilt.next_token_logits(), want, atol=1e-3)


def test_scoring_reads_the_recalled_exchange_and_leaves_nothing_behind(engine) -> None:
    conv = long_chat(engine)
    before = conv.memory_view()
    conv.add_turn("user", QUESTION, decode=False)
    conv.score("Your dog is called Biscuit.")
    assert conv.last_recall is not None and conv.last_recall.exchanges == (0,)
    conv.truncate(len(conv.messages) - 1)
    assert b"Recalled from earlier" not in conv.memory_view().rendered
    assert conv.stats().memory_tokens <= before.tokens.__len__() + 16  # the question, at most


def test_a_recall_that_cannot_fit_is_skipped_and_the_turn_goes_on(engine) -> None:
    conv = long_chat(engine)
    conv.recall_tokens = 4  # less than any exchange
    text = "".join(conv.send(QUESTION, max_tokens=4, temperature=0))
    assert conv.last_recall is None and conv.messages[-1].content == text


def test_recall_off_and_short_chats_recall_nothing(engine) -> None:
    off = long_chat(engine, recall=False)
    "".join(off.send(QUESTION, max_tokens=3, temperature=0))
    assert off.last_recall is None
    empty = engine.new_conversation()
    "".join(empty.send(QUESTION, max_tokens=3, temperature=0))
    assert empty.last_recall is None  # nothing earlier
    one = engine.new_conversation()
    one.add_turn("user", FACT[0])
    one.add_turn("assistant", FACT[1])
    "".join(one.send(QUESTION, max_tokens=3, temperature=0))
    assert one.last_recall is None  # still held verbatim: nothing to bring back


def test_only_exchanges_the_memory_no_longer_holds_are_candidates() -> None:
    from ccm_chat.engine.chat import ChatMessage
    from ccm_chat.engine.recall import forgotten

    messages = [ChatMessage("system", "Be kind."), ChatMessage("user", "a"),
                ChatMessage("assistant", "b"), ChatMessage("user", "c"),
                ChatMessage("assistant", "d"), ChatMessage("user", "e")]
    spans = [(10, 18), (30, 31), (50, 51), (70, 71), (90, 91), (110, 111)]
    assert forgotten(messages[:-1], spans, frozen=0) == []  # everything is held
    assert forgotten(messages[:-1], spans, frozen=40) == [exchange_text("a", "b")]
    assert forgotten(messages[:-1], spans, frozen=75) == [exchange_text("a", "b"),
                                                          exchange_text("c", "d")]
    assert forgotten(messages[:-1], None, frozen=75) == []  # where the text lies: unknown


def test_a_chat_through_the_app_recalls_and_says_so(engine, store) -> None:
    """The user's path: the service at a level, a fact said early, asked for later."""
    from ccm_chat.app.service import ChatService

    service = ChatService(store, engine_factory=lambda settings, model: engine)
    service.update_settings(service.with_settings(compression="aggressive", max_tokens=6,
                                                  temperature=0.0))
    list(service.send(None, FACT[0]))
    conv_id = store.latest_conversation().id
    for user, _ in FILLER:
        list(service.send(conv_id, user))
    list(service.send(conv_id, QUESTION))
    assert (service.status(conv_id).recalled or "").startswith("recalled ")
    saved = [m.content for m in store.messages(conv_id)]
    assert saved[0] == FACT[0] and saved[-2] == QUESTION  # the transcript as it was said


def test_recall_takes_no_more_than_the_context_has_room_for(engine) -> None:
    conv = long_chat(engine)
    held = conv.held
    conv.recall_tokens = 1_000_000  # a share larger than the context: bounded by its room
    "".join(conv.send(QUESTION, max_tokens=3, temperature=0))
    assert conv.last_recall is not None and conv.last_recall.exchanges
    assert conv.last_recall.tokens <= engine.n_ctx - held
    assert conv.last_reply.finish_reason != "context_full"
