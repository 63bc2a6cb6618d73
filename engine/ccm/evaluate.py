"""Scoring a reply under each kind of memory, on the same episodes, with one model.

Every method reads the same episode (exchanges to remember, then a prompt and a reply) and
gives the reply's token NLL: `none` (the prompt alone), `full` (every exchange), `window`
(the first `sink` tokens plus the most recent ones up to a budget, at contiguous positions,
as the engine's window policy holds them) and `ccm` (the compressor's memory, through the
parallel forward that the tests hold equal to the recursive one). Recall is scored by
likelihood: the right answer must have the lowest NLL among distractors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from engine.ccm.compressor import Compressor
from engine.ccm.data import Episode, RecallCase, Tokens

SINK = 4


@dataclass(frozen=True)
class Memory:
    """A way to remember the context: method none/full/window/ccm. A window holds what
    CCM-concat with `per_turn` slots per exchange would: per_turn x exchanges tokens."""

    method: str
    per_turn: int = 0

    def budget(self, episode: Episode) -> int:
        return max(SINK + 1, self.per_turn * len(episode.context))

    def held(self, episode: Episode) -> list[int]:
        """The context tokens kept in the cache (none, all, or the sink and the window)."""
        held = [t for c in episode.context for t in c] if self.method != "none" else []
        if self.method == "window" and len(held) > self.budget(episode):
            held = held[:SINK] + held[len(held) - (self.budget(episode) - SINK):]
        return held

    def slots(self, episode: Episode, n_comp: int = 0, merge: bool = False) -> int:
        held = sum(len(c) for c in episode.context)
        if self.method == "window":
            return min(held, self.budget(episode))
        return {"none": 0, "full": held,
                "ccm": n_comp if merge else n_comp * len(episode.context)}[self.method]


def _reply_nll(logits: torch.Tensor, rows: list[int], prompt_len: int,
               reply: list[int]) -> tuple[float, int]:
    """Sum of NLL over the reply tokens, from the rows (flat indices) of prompt + reply."""
    index = torch.tensor(rows[prompt_len - 1: -1], device=logits.device)
    target = torch.tensor(reply, device=logits.device)
    nll = F.cross_entropy(logits[index].float(), target, reduction="sum")
    return float(nll), len(reply)


@torch.no_grad()
def reply_nll(compressor: Compressor, episode: Episode, memory: Memory) -> tuple[float, int]:
    """(summed NLL, tokens) of the episode's reply given its context under `memory`."""
    final = episode.prompt + episode.reply
    if memory.method == "ccm":
        logits, layout = compressor.parallel_logits([*episode.context, final])
        return _reply_nll(logits, layout.text_index[-1], len(episode.prompt), episode.reply)
    held = memory.held(episode)
    ids = torch.tensor([held + final], device=compressor.comp.device)
    logits = compressor.model(input_ids=ids).logits[0]
    rows = list(range(len(held), len(held) + len(final)))
    return _reply_nll(logits, rows, len(episode.prompt), episode.reply)


def perplexity(compressor: Compressor, episodes: Iterable[Episode], memory: Memory) -> float:
    total, count = 0.0, 0
    for episode in episodes:
        nll, n = reply_nll(compressor, episode, memory)
        total, count = total + nll, count + n
    return float(torch.exp(torch.tensor(total / max(count, 1))))


def recall_accuracy(compressor: Compressor, cases: Iterable[RecallCase],
                    memory: Memory) -> float:
    """Share of cases whose right answer (answers[0]) scores the lowest mean NLL."""
    right = total = 0
    for case in cases:
        scores = []
        for answer in case.answers:
            episode = Episode(case.episode.context, case.episode.prompt, answer)
            nll, n = reply_nll(compressor, episode, memory)
            scores.append(nll / n)
        right += int(min(range(len(scores)), key=scores.__getitem__) == 0)
        total += 1
    return right / max(total, 1)


TURN = re.compile(r"\s*(USER|ASSISTANT): ")
QUESTION = "What is the first topic we discussed? Only give me the topic name."


def longchat_cases(path: Path, tok: Tokens, limit: int | None = None) -> list[RecallCase]:
    """LongEval topics: a long multi-topic chat, then "what was the first topic?", scored
    against the case's other topics."""
    cases = []
    for line in path.read_text().splitlines()[:limit]:
        case = json.loads(line)
        parts = TURN.split(case["prompt"])
        preamble, turns = parts[0], parts[2::2]
        turns[0] = preamble.strip() + " " + turns[0]
        pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
        topics = case["topics"]
        answers = [tok.reply(f"The first topic we discussed was {t[0].lower() + t[1:]}.")
                   for t in topics]
        episode = Episode(tok.exchanges(pairs), tok.prompt(QUESTION, False), answers[0])
        cases.append(RecallCase(episode, answers, len(pairs)))
    return cases
