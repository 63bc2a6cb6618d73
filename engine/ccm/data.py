"""Training episodes from the chitchat-dataset wheel (real human conversations).

Each conversation alternates user / assistant turns. An episode takes a random run of turns
ending on an assistant turn: the earlier turns are compressed, the last user turn is the
prompt and the assistant turn the reply the loss is taken on. Turns are rendered with the
model's own chat template, as the chat app feeds them. Conversations are split by a hash of
their id, so the held-apart split never changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import random
from collections.abc import Callable, Iterator

from engine.ccm.train import Episode
from engine.errors import ModelError

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_assistant) -> text
Tokenize = Callable[[str], list[int]]


def load_chitchat() -> dict[str, list[str]]:
    """Conversation id -> its turns (a turn's utterances joined)."""
    try:
        dist = md.distribution("chitchat-dataset")
    except md.PackageNotFoundError as exc:
        raise ModelError("Training needs the chitchat-dataset package: "
                         "pip install chitchat-dataset") from exc
    file = next(f for f in dist.files or [] if f.name == "dataset.json")
    data = json.loads(file.read_text())
    return {cid: [" ".join(u["text"] for u in turn) for turn in conv["messages"]]
            for cid, conv in data.items()}


def held_apart(conversation_id: str) -> bool:
    """One conversation in ten, by id hash: never trained on."""
    return hashlib.sha256(conversation_id.encode()).digest()[0] % 10 == 0


def _segments(turns: list[str], render: Render) -> list[str]:
    """Each turn's own share of the rendered chat (the first carries any system preamble)."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    texts = [render(messages[: i + 1], False) for i in range(len(messages))]
    return [texts[0]] + [b[len(a):] for a, b in zip(texts, texts[1:], strict=False)]


def chitchat_episodes(
    conversations: dict[str, list[str]],
    render: Render,
    tokenize: Tokenize,
    seed: int = 0,
    max_context_turns: int = 8,
    max_turn_tokens: int = 96,
    held_out: bool = False,
) -> Iterator[Episode]:
    """An endless stream of random episodes from one side of the split."""
    rng = random.Random(seed)
    pool = [turns for cid, turns in conversations.items()
            if held_apart(cid) == held_out and len(turns) >= 3]
    while True:
        turns = rng.choice(pool)
        end = rng.randrange(2, len(turns), 1)
        end -= (end % 2 == 0)  # the reply is an assistant turn (odd index)
        if end < 1:
            continue
        start = max(0, end - 1 - rng.randint(1, max_context_turns))
        start -= start % 2  # begin on a user turn
        segments = _segments(turns[start: end + 1], render)
        ids = [tokenize(s)[:max_turn_tokens] for s in segments]
        prompt_text = render([{"role": "user", "content": turns[end - 1]}], True)
        header = prompt_text[len(render([{"role": "user", "content": turns[end - 1]}],
                                        False)):]
        prompt = tokenize(segments[-2] + header)[:max_turn_tokens]
        reply = tokenize(turns[end])[:max_turn_tokens]
        if ids[:-2] and reply:
            yield Episode(context=ids[:-2], prompt=prompt, reply=reply)
