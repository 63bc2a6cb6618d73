"""Training and evaluation episodes: chitchat-dataset conversations and generated recall.

A <COMP> group follows each finished exchange (a user turn and the assistant's reply), as
in the app. An episode is some exchanges to compress, then a user prompt and the reply the
loss (or the score) is taken on. Exchanges are rendered with the model's own chat template
(the first one carries its system preamble). Conversations are split by a hash of their id,
and recall values by a hash of the value, so the held-apart side never changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from engine.errors import ModelError

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_assistant) -> text
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Episode:
    """Context turns to compress, then the final prompt and the reply the loss is taken on."""

    context: list[list[int]]
    prompt: list[int]
    reply: list[int]


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


def held_apart(key: str) -> bool:
    """One key in ten, by hash: never trained on."""
    return hashlib.sha256(key.encode()).digest()[0] % 10 == 0


@dataclass(frozen=True)
class Tokens:
    """The model's template and tokenizer, and how long a turn may be."""

    render: Render
    tokenize: Tokenize
    max_turn_tokens: int = 96

    def exchanges(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Each (user, assistant) exchange's share of the rendered chat, tokenized."""
        messages: list[dict[str, str]] = []
        texts = [""]
        for user, assistant in pairs:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
            texts.append(self.render(messages, False))
        out = []
        for a, b in zip(texts, texts[1:], strict=False):
            head = b[len(a):]
            user_end = head.index(pairs[len(out)][0]) + len(pairs[len(out)][0])
            cap = self.max_turn_tokens
            out.append(self.tokenize(head[:user_end])[:cap] + self.tokenize(head[user_end:])[:cap])
        return out

    def prompt(self, user: str, first: bool) -> list[int]:
        """A user turn and the assistant header (with the preamble if nothing came before)."""
        before = [] if first else [{"role": "user", "content": "."},
                                   {"role": "assistant", "content": "."}]
        text = self.render([*before, {"role": "user", "content": user}], True)
        text = text[len(self.render(before, False)) if before else 0:]
        return self.tokenize(text)[: self.max_turn_tokens + 8]

    def reply(self, text: str) -> list[int]:
        return self.tokenize(text)[: self.max_turn_tokens]


def _pairs(turns: list[str]) -> list[tuple[str, str]]:
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]


def chitchat_pool(conversations: dict[str, list[str]], held_out: bool,
                  min_exchanges: int = 2) -> list[list[tuple[str, str]]]:
    """The exchanges of every conversation on one side of the split."""
    return [pairs for cid, turns in sorted(conversations.items())
            if held_apart(cid) == held_out and len(pairs := _pairs(turns)) >= min_exchanges]


def conversation_episode(tok: Tokens, pairs: list[tuple[str, str]], at: int) -> Episode:
    """Exchanges 0..at-1 as context, exchange `at` as prompt and reply."""
    user, assistant = pairs[at]
    return Episode(context=tok.exchanges(pairs[:at]), prompt=tok.prompt(user, at == 0),
                   reply=tok.reply(assistant))


def chitchat_episodes(tok: Tokens, pool: list[list[tuple[str, str]]], seed: int = 0,
                      max_context: int = 16) -> Iterator[Episode]:
    """An endless stream of random windows of 1..max_context exchanges plus the next."""
    rng = random.Random(seed)
    while True:
        pairs = rng.choice(pool)
        at = rng.randrange(1, len(pairs))
        start = max(0, at - rng.randint(1, max_context))
        yield conversation_episode(tok, pairs[start:], at - start)


# -- generated recall dialogues: a fact planted early, asked for exchanges later --------------

FACTS = (  # (pool, statement, question, answer)
    ("name", "By the way, my name is {v}.", "Do you remember my name?", "Your name is {v}."),
    ("pet", "I have a dog called {v}.", "What is my dog called?", "Your dog is called {v}."),
    ("city", "I live in {v}.", "Which city do I live in?", "You live in {v}."),
    ("job", "I work as a {v}.", "What do I do for a living?", "You work as a {v}."),
    ("food", "My favourite food is {v}.", "What is my favourite food?",
     "Your favourite food is {v}."),
    ("number", "My locker number is {v}.", "What is my locker number?",
     "Your locker number is {v}."),
    ("hobby", "In my free time I love {v}.", "What do I love doing in my free time?",
     "You love {v}."),
)
def _words(text: str) -> list[str]:
    return text.split()


POOLS = {
    "name": _words(
        "Alice Bruno Chloe Dmitri Elena Farid Greta Hiro Imani Jonas Keiko Liam Maya "
        "Nikolai Olga Pedro Quinn Rosa Sanjay Tomas Uma Viktor Wendy Xavier Yara Zane "
        "Amara Bjorn Carmen Diego Esther Felix Gwen Hassan Ingrid Jamal Kira Lucas Mira "
        "Noah Priya Rafael Sofia Theo Valentina Yusuf Zoe Anton Beatrix Cyrus"
    ),
    "pet": _words(
        "Pixel Biscuit Pepper Shadow Maple Rocket Luna Ziggy Waffles Noodle Bruno Coco "
        "Ginger Pickles Rusty Sprout Tofu Mochi Bandit Clover Domino Echo Fudge Gizmo "
        "Hazel Jasper Kiwi Lemon Mango Nacho Olive Peanut Quincy Rolo Sushi Taco Velvet "
        "Wally Yoyo Zorro"
    ),
    "city": _words(
        "Lisbon Oslo Nairobi Denver Osaka Krakow Lima Montreal Auckland Seville Hanoi "
        "Porto Tallinn Boston Dublin Cairo Bogota Helsinki Munich Perth Quito Riga "
        "Santiago Tbilisi Utrecht Valencia Warsaw Zagreb Austin Bergen Calgary Dakar "
        "Geneva Havana Istanbul Jakarta Kyoto Lagos Milan"
    ),
    "job": ["nurse", "carpenter", "pilot", "chemist", "librarian", "plumber", "dentist",
            "translator", "baker", "firefighter", "architect", "photographer", "farmer",
            "journalist", "mechanic", "pharmacist", "teacher", "surveyor", "welder", "tailor",
            "gardener", "lawyer", "geologist", "barber", "electrician", "florist", "locksmith",
            "paramedic", "sculptor", "watchmaker"],
    "food": ["lasagna", "sushi", "pancakes", "curry", "paella", "dumplings", "tacos", "ramen",
             "falafel", "risotto", "pierogi", "goulash", "burritos", "couscous", "moussaka",
             "pho", "gnocchi", "kimchi", "empanadas", "waffles", "hummus", "fondue", "biryani",
             "ceviche", "brownies", "pretzels", "meatballs", "omelettes", "noodles", "pizza"],
    "number": [str(n) for n in range(11, 99)],
    "hobby": ["painting", "hiking", "chess", "knitting", "surfing", "baking", "fishing",
              "gardening", "climbing", "pottery", "juggling", "birdwatching", "skating",
              "cycling", "dancing", "sailing", "archery", "origami", "camping", "rowing",
              "fencing", "kayaking", "woodworking", "photography", "singing", "skiing",
              "running", "sewing", "drawing", "swimming"],
}
def _held_value(value: str) -> bool:
    """One value in three is only ever asked for in evaluation (pools are small)."""
    return hashlib.sha256(value.encode()).digest()[0] % 3 == 0


ACKS = ("Got it, I'll remember that.", "Nice, thanks for telling me!", "Noted!",
        "That's good to know.", "Thanks for sharing that with me.")


@dataclass(frozen=True)
class RecallCase:
    """A recall episode and the answers it is scored against (the right one first)."""

    episode: Episode
    answers: list[list[int]]
    fillers: int


def recall_cases(tok: Tokens, pool: list[list[tuple[str, str]]], held_out: bool,
                 seed: int = 0, fillers: tuple[int, int] = (1, 8),
                 distractors: int = 3) -> Iterator[RecallCase]:
    """Endless recall dialogues: the fact, `fillers` chitchat exchanges, then the question."""
    rng = random.Random(seed)
    values = {k: [v for v in vs if _held_value(v) == held_out] for k, vs in POOLS.items()}
    while True:
        kind, statement, question, answer = rng.choice(FACTS)
        picks = rng.sample(values[kind], min(len(values[kind]), distractors + 1))
        n_fill = rng.randint(*fillers)
        filler = [p for conv in rng.sample(pool, 3) for p in conv][:n_fill]
        pairs = [(statement.format(v=picks[0]), rng.choice(ACKS)), *filler]
        episode = Episode(context=tok.exchanges(pairs), prompt=tok.prompt(question, False),
                          reply=tok.reply(answer.format(v=picks[0])))
        yield RecallCase(episode, [tok.reply(answer.format(v=v)) for v in picks], len(filler))


def mixed_episodes(tok: Tokens, pool: list[list[tuple[str, str]]], seed: int = 0,
                   recall_share: float = 0.5) -> Iterator[Episode]:
    """Training stream: chitchat windows and recall dialogues, mixed."""
    rng = random.Random(seed + 1)
    chat = chitchat_episodes(tok, pool, seed)
    recall = recall_cases(tok, pool, held_out=False, seed=seed)
    while True:
        yield next(recall).episode if rng.random() < recall_share else next(chat)
