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

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.ccm.layout import Block, block_layout
from ccm_chat.engine.config import SINK_TOKENS
from ccm_chat.training.data import Episode, RecallCase, Tokens


@dataclass(frozen=True)
class Memory:
    """A way to remember the context: method none/full/window/ccm. A window holds what
    CCM-concat with `per_turn` slots per exchange would: per_turn x exchanges tokens."""

    method: str
    per_turn: int = 0

    def budget(self, episode: Episode) -> int:
        return max(SINK_TOKENS + 1, self.per_turn * len(episode.context))

    def held(self, episode: Episode) -> list[int]:
        """The context tokens kept in the cache (none, all, or the sink and the window)."""
        held = [t for c in episode.context for t in c] if self.method != "none" else []
        if self.method == "window" and len(held) > self.budget(episode):
            held = held[:SINK_TOKENS] + held[len(held) - (self.budget(episode) - SINK_TOKENS):]
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


# -- probes: any memory, the hybrid read too, every answer in one forward ---------------------


@dataclass(frozen=True)
class Read:
    """How a probe's context is held: `none`, `full`, `ccm` (the slots of all but the last
    `window` exchanges, those verbatim after them: the app's hybrid memory; window 0 is pure
    CCM) or `window` (sink + most recent tokens, as many cells as `ccm` at `window` would
    hold with n = `per_exchange`)."""

    method: str
    window: int = 0
    per_exchange: int = 0

    @property
    def label(self) -> str:
        if self.method == "ccm":
            return f"ccm w={self.window}" if self.window else "ccm"
        if self.method == "window":
            return f"sink+window ({self.per_exchange}/ex, w={self.window})"
        return self.method


def _held(read: Read, context: list[list[int]], n: int, merge: bool) -> tuple[int, list[int]]:
    """(groups of slots kept, raw tokens kept) for this read of the context."""
    if read.method == "none":
        return 0, []
    if read.method == "full":
        return 0, [t for c in context for t in c]
    groups = max(0, len(context) - read.window)
    verbatim = [t for c in context[groups:] for t in c]
    if read.method == "ccm":
        return groups, verbatim
    n = read.per_exchange or n  # a window at the budget of that many slots an exchange
    budget = max(SINK_TOKENS + 1, (min(groups, 1) * n if merge else groups * n) + len(verbatim))
    held = [t for c in context for t in c]
    if len(held) > budget:
        held = held[:SINK_TOKENS] + held[len(held) - (budget - SINK_TOKENS):]
    return 0, held


def probe_cells(read: Read, context: list[list[int]], n: int, merge: bool = False) -> int:
    """Cells the memory holds for this context (slots plus raw tokens)."""
    groups, raw = _held(read, context, n, merge)
    return (min(groups, 1) * n if merge else groups * n) + len(raw)


@torch.no_grad()
def probe_nll(compressor: Compressor, probe, read: Read) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each of the probe's answers given its context under `read`:
    one forward, the compression blocks once and one read block per answer."""
    groups, raw = _held(read, probe.context, compressor.n_comp, compressor.method == "merge")
    blocks = [(probe.context[i], i, True) for i in range(groups)]
    blocks += [(raw + probe.prompt + a, groups, False) for a in probe.answers]
    layout = block_layout([Block(len(t), g, c) for t, g, c in blocks], compressor.n_comp,
                          compressor.method)
    rows, spans = [], []
    for k, answer in enumerate(probe.answers):
        index = layout.text_index[groups + k]
        spans.append((len(rows), len(answer)))
        rows += index[len(index) - len(answer) - 1:-1]
    device = compressor.comp.device
    logits, _ = compressor.block_logits(blocks, torch.tensor(rows, device=device))
    logp = F.log_softmax(logits.float(), -1)
    target = torch.tensor([t for a in probe.answers for t in a], device=device)
    token = -logp.gather(1, target[:, None])[:, 0]
    return [(float(token[a:a + n].sum()), n) for a, n in spans]


def probe_recall(compressor: Compressor, probes, read: Read) -> float:
    """Share of probes whose right answer (the first) has the lowest mean token NLL."""
    right = 0
    for probe in probes:
        scores = [nll / n for nll, n in probe_nll(compressor, probe, read)]
        right += int(min(range(len(scores)), key=scores.__getitem__) == 0)
    return right / max(len(probes), 1)
