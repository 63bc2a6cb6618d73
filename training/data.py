"""Training and evaluation episodes: chitchat-dataset conversations and generated recall.

A <COMP> group follows each finished exchange (a user turn and the assistant's reply), as
in the app. An episode is some exchanges to compress, then a user prompt and the reply the
loss (or the score) is taken on. Exchanges are rendered with the model's own chat template
(the first one carries its system preamble). Conversations are split by a hash of their id,
and recall values by a hash of the value, so the held-apart side never changes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from ccm_chat.engine.errors import ModelError

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

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (a batched fast tokenizer when the model's has one)."""
        batch = getattr(self.tokenize, "many", None)
        return batch(texts) if batch else [self.tokenize(t) for t in texts]


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


# -- dialogues: every exchange's reply scored, many corpora, long episodes --------------------

SPLITS = ("train", "validation", "test")
DATA_ENV = "CCM_CHAT_DATA"  # another folder of dialogue sets (topical_chat, ...) to read instead
CHITCHAT_ENV = "CCM_CHAT_CHITCHAT"  # a chitchat dataset.json, where the package is not installed


def split_of(key: str) -> str:
    """test for one key in ten (the old `held_apart` side, so no shipped compressor trained
    on it), validation for another one in ten, train for the rest; by hash, never changing."""
    digit = hashlib.sha256(key.encode()).digest()[0] % 10
    return "test" if digit == 0 else "validation" if digit == 1 else "train"


def default_data_dir() -> Traversable:
    """$CCM_CHAT_DATA, else the sets shipped in the package (assets/dialogue): nothing
    outside the installed code is read."""
    override = os.environ.get(DATA_ENV)
    return Path(override) if override else resources.files("ccm_chat.assets") / "dialogue"


def read_dialogue(folder: Traversable, filename: str) -> str | None:
    """A dialogue file's text, plain or gzipped (`filename`.gz); None when neither is there."""
    for name in (filename, f"{filename}.gz"):
        file = folder / name
        if file.is_file():
            data = file.read_bytes()
            return (gzip.decompress(data) if name.endswith(".gz") else data).decode()
    return None


def load_corpora(data_dir: Traversable | None = None) -> dict[str, list[tuple[str, str]]]:
    """Every dialogue we may train and evaluate on, as (user, assistant) exchanges, keyed
    "source:id": chitchat-dataset, Topical-Chat, Synthetic-Persona-Chat and MemoryBank (a
    user's days, in order, as one long conversation). Sets not present are skipped."""
    data_dir = data_dir or default_data_dir()
    out: dict[str, list[tuple[str, str]]] = {}
    chitchat = os.environ.get(CHITCHAT_ENV)
    try:
        convs = load_chitchat() if not chitchat else {
            cid: [" ".join(u["text"] for u in turn) for turn in conv["messages"]]
            for cid, conv in json.loads(Path(chitchat).read_text()).items()}
    except ModelError:
        convs = {}
    out.update({f"chitchat:{cid}": _pairs(turns) for cid, turns in convs.items()})
    for name in ("topical_chat", "synthetic_persona_chat"):
        for line in (read_dialogue(data_dir / name, "conversations.jsonl") or "").splitlines():
            conv = json.loads(line)
            out[f"{name}:{conv['id']}"] = _pairs([t["text"] for t in conv["turns"]])
    bank = read_dialogue(data_dir / "memorybank_en", "memory_bank_en.json")
    if bank is not None:
        for user, record in json.loads(bank).items():
            days = [record["history"][day] for day in sorted(record["history"])]
            out[f"memorybank:{user}"] = [(x["query"], x["response"]) for d in days for x in d]
    return {k: v for k, v in out.items() if len(v) >= 2}


@dataclass(frozen=True)
class Dialogue:
    """Exchanges as token ids; each one's reply starts at reply_starts[i] (its length: no
    reply to score). `facts`: (fact exchange, question exchange) pairs planted in it."""

    exchanges: list[list[int]]
    reply_starts: list[int]
    facts: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.exchanges)

    def replies(self) -> list[int]:
        return [i for i, (e, s) in enumerate(zip(self.exchanges, self.reply_starts,
                                                  strict=True)) if s < len(e)]


class ExchangeTokens:
    """Exchanges rendered with the model's chat template and tokenized, fast: the template is
    read once (its text around a marker user and assistant turn) and checked against a real
    render; each exchange is then (user part up to the assistant header, reply part)."""

    def __init__(self, tok: Tokens, max_words: int = 48) -> None:
        self.tok, self.max_words = tok, max_words
        u, a = "\x01USER\x01", "\x01ASSISTANT\x01"
        dummy = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
        msgs = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        first = tok.render(msgs, False)
        later = tok.render([*dummy, *msgs], False)[len(tok.render(dummy, False)):]
        header = tok.render([msgs[0]], True)
        self.first_pre, rest = first.split(u)
        self.pre = later.split(u)[0]
        mid_end = header.split(u)[1]  # "<|im_end|>...<|im_start|>assistant\n"
        self.mid = mid_end
        self.post = rest.split(a)[1]
        if rest.split(a)[0] != mid_end:
            raise ModelError("The chat template renders an exchange in a way the trainer "
                             "does not follow (the assistant header moves).")

    def _cut(self, text: str) -> str:
        words = text.split()
        return " ".join(words[: self.max_words])

    def texts(self, user: str, assistant: str, first: bool) -> tuple[str, str]:
        pre = self.first_pre if first else self.pre
        return pre + self._cut(user) + self.mid, self._cut(assistant) + self.post

    def many(self, pairs: list[tuple[str, str]], first: bool = False) -> list[tuple[list[int],
                                                                                     int]]:
        """(ids, reply start) of each exchange (the first carries the preamble if `first`)."""
        parts = [t for i, (u, a) in enumerate(pairs)
                 for t in self.texts(u, a, first and i == 0)]
        ids = self.tok.tokenize_many(parts)
        return [(ids[2 * i] + ids[2 * i + 1], len(ids[2 * i])) for i in range(len(pairs))]


class Corpus:
    """One split's conversations, each tokenized when first used (a whole split takes a
    while on a small CPU); the source of training and evaluation dialogues."""

    def __init__(self, conversations: dict[str, list[tuple[str, str]]], split: str,
                 tokens: ExchangeTokens) -> None:
        self.split, self.tokens = split, tokens
        self.keys = sorted(k for k in conversations if split_of(k) == split)
        self._pairs = [conversations[k] for k in self.keys]
        self._tokenized: dict[int, list[tuple[list[int], int]]] = {}
        self.values = {k: [v for v in vs if _held_value(v) == (split != "train")]
                       for k, vs in POOLS.items()}

    def conversation(self, c: int) -> list[tuple[list[int], int]]:
        if c not in self._tokenized:
            self._tokenized[c] = self.tokens.many(self._pairs[c])
        return self._tokenized[c]

    def __len__(self) -> int:
        return len(self.keys)

    def chain(self, rng: random.Random, count: int, max_tokens: int,
              start_anywhere: bool = True) -> list[tuple[list[int], int]]:
        """About `count` exchanges of real chit-chat: random conversations one after another
        (each from a random exchange on), within `max_tokens`."""
        out: list[tuple[list[int], int]] = []
        tokens = 0
        while len(out) < count:
            conv = self.conversation(rng.randrange(len(self)))
            start = rng.randrange(len(conv) - 1) if start_anywhere else 0
            for ex in conv[start:]:
                if len(out) == count or tokens + len(ex[0]) > max_tokens:
                    return out
                out.append(ex)
                tokens += len(ex[0])
        return out

    def fact(self, rng: random.Random, kind: str | None = None):
        """A planted fact: (kind, (statement exchange), (question exchange), value, values)
        with 3 distractor values."""
        kind_, statement, question, answer = (rng.choice(FACTS) if kind is None else
                                              next(f for f in FACTS if f[0] == kind))
        picks = rng.sample(self.values[kind_], 4)
        said, asked = self.tokens.many([(statement.format(v=picks[0]), rng.choice(ACKS)),
                                        (question, answer.format(v=picks[0]))])
        return kind_, said, asked, picks, answer

    def answers(self, question: str, answer: str, values: list[str]) -> list[list[int]]:
        """Each value's answer to the question: the reply ids of that exchange."""
        got = self.tokens.many([(question, answer.format(v=v)) for v in values])
        return [ids[start:] for ids, start in got]


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def _with_preamble(corpus: Corpus, exchanges: list[tuple[list[int], int]],
                   first_text: tuple[str, str] | None = None) -> list[tuple[list[int], int]]:
    """The first exchange re-rendered with the template's preamble (what the chat's first
    turn carries)."""
    if not exchanges:
        return exchanges
    pre = corpus.tokens.tok.tokenize(corpus.tokens.first_pre)
    later = corpus.tokens.tok.tokenize(corpus.tokens.pre)
    ids, start = exchanges[0]
    if ids[:len(later)] == later:
        ids, start = pre + ids[len(later):], start - len(later) + len(pre)
    return [(ids, start), *exchanges[1:]]


def training_dialogue(corpus: Corpus, rng: random.Random, min_exchanges: int = 4,
                      max_exchanges: int = 256, max_tokens: int = 8192,
                      recall_share: float = 0.5, max_distance: int = 200) -> Dialogue:
    """Real chit-chat of log-uniform length, and with `recall_share` facts planted in it
    (one to three, of different kinds) and asked for 2..200 exchanges later."""
    count = _log_uniform(rng, min_exchanges, max_exchanges)
    exchanges = corpus.chain(rng, count, max_tokens - 160)
    facts: list[tuple[int, int]] = []
    if rng.random() < recall_share and len(exchanges) >= 3:
        kinds = rng.sample([f[0] for f in FACTS], rng.randint(1, 3))
        taken: set[int] = set()
        for kind in kinds:
            top = min(max_distance, len(exchanges) - 1)
            distance = _log_uniform(rng, 2, top) if top > 2 else 2
            if distance >= len(exchanges):
                continue
            ask = rng.randrange(distance, len(exchanges))
            said = ask - distance
            if {ask, said} & taken:
                continue
            _, said_ex, asked_ex, _, _ = corpus.fact(rng, kind)
            exchanges[said], exchanges[ask] = said_ex, asked_ex
            taken |= {ask, said}
            facts.append((said, ask))
    exchanges = _with_preamble(corpus, exchanges)
    return Dialogue([e for e, _ in exchanges], [s for _, s in exchanges], tuple(sorted(facts)))


@dataclass(frozen=True)
class Probe:
    """An evaluation case: exchanges to remember, the final user prompt (up to the assistant
    header), and replies to score after it (for recall the right one first)."""

    context: list[list[int]]
    prompt: list[int]
    answers: list[list[int]]
    distance: int = 0  # recall: how many exchanges back the fact was said


def next_turn_probes(corpus: Corpus, at: int, count: int, seed: int = 0,
                     max_tokens: int = 8000) -> list[Probe]:
    """Exchange `at` of a conversation (its reply scored) after `at - 1` exchanges: as many of
    its own conversation as there are, the rest real chit-chat before it."""
    rng = random.Random(seed * 1_000 + at)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    probes = []
    for c in order:
        conv = corpus.conversation(c)
        target = min(at - 1, len(conv) - 1)
        if target < min(at - 1, 3):
            continue
        own = conv[:target + 1]
        budget = max_tokens - sum(len(e) for e, _ in own)
        before = corpus.chain(rng, at - 1 - target, budget) if at - 1 > target else []
        if len(before) < at - 1 - target:
            continue
        exchanges = _with_preamble(corpus, before + own)
        *context, (last, start) = exchanges
        probes.append(Probe([e for e, _ in context], last[:start], [last[start:]]))
        if len(probes) == count:
            break
    return probes


def recall_probes(corpus: Corpus, distance: int, count: int, seed: int = 0,
                  max_tokens: int = 8000) -> list[Probe]:
    """A fact said `distance` exchanges before its question (real chit-chat between, and a
    little before), the right answer first among 3 distractors."""
    rng = random.Random(seed * 1_000 + distance + 7)
    probes = []
    while len(probes) < count:
        before = corpus.chain(rng, rng.randint(0, 2), 400)
        filler = corpus.chain(rng, distance - 1, max_tokens - 600)
        if len(filler) < distance - 1:
            continue
        kind, said, asked, values, answer = corpus.fact(rng)
        question = next(f[2] for f in FACTS if f[0] == kind)
        exchanges = _with_preamble(corpus, [*before, said, *filler, asked])
        *context, (last, start) = exchanges
        probes.append(Probe([e for e, _ in context], last[:start],
                            corpus.answers(question, answer, values), distance))
    return probes
