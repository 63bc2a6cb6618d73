"""Hybrid memory against pure CCM, sink+window and the full context, at each level's budget.

Side by side in one process, on the llama.cpp engine and the default model:
- next-turn perplexity (mean NLL of the real next reply) after k exchanges of a long chat made
  of held-apart conversations joined end to end;
- recall of a fact planted before those k exchanges (so k exchanges back), scored by
  likelihood against 3 distractors (chance 0.25), at the same checkpoints of the same pass;
- cells and bytes held, and the ratio to the full context.

The dialogues come from the corpora the compressor trains on (training.data.load_corpora),
split by id hash: `--split validation` is what a level's verbatim share is chosen on
(`--shares`), `--split test` gives the reported table; the shipped compressor saw neither.

    python bench/hybrid.py --split validation --only-hybrid --shares 0.25,0.5,0.75 \
        --out bench/results/hybrid_validation.json
    python bench/hybrid.py --split test --out bench/results/hybrid_test.json

`--moves host,shift` runs each method twice, a CCM step's cells moved in host memory and by
llama.cpp's own position shift (engine.llama_state), to see the two read alike.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from contextlib import suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from ccm_chat.engine import CompressionConfig, ContextFullError, Engine  # noqa: E402
from ccm_chat.engine.config import LEVEL_BUDGETS, SINK_TOKENS  # noqa: E402

PETS = ["Biscuit", "Pixel", "Rocket", "Mango", "Juniper", "Pepper", "Noodle", "Clover"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tbilisi", "Perth", "Quebec"]
FACTS = [
    ("By the way, my cat is called {}.", "{} is a lovely name for a cat!",
     "What is my cat called?", "Your cat is called {}.", PETS),
    ("I grew up in {}, you know.", "{} must have been a great place to grow up.",
     "Where did I grow up?", "You grew up in {}.", CITIES),
]


def dialogues(split: str) -> list[list[tuple[str, str]]]:
    """The split's dialogues from every corpus the compressor's training split by (the
    shipped compressor never saw validation or test)."""
    from ccm_chat.training.data import load_corpora, split_of

    return [exchanges for key, exchanges in sorted(load_corpora().items())
            if split_of(key) == split]


def long_chats(pool, count: int, length: int, seed: int) -> list[list[tuple[str, str]]]:
    """`count` chats of `length` exchanges, each held-apart conversations joined."""
    rng = random.Random(seed)
    pool = [d for d in pool if len(d) >= 4]
    chats = []
    for _ in range(count):
        chat: list[tuple[str, str]] = []
        while len(chat) < length:
            chat.extend(rng.choice(pool))
        chats.append(chat[:length])
    return chats


def configs(engine: Engine, level: str, shares: list[float] | None) -> dict[str, CompressionConfig]:
    budget = LEVEL_BUDGETS[level][0]
    files = engine.ccm.files
    n, fp = files.n_comp, files.fingerprint
    out = {
        "window": CompressionConfig(level, "window",
                                    {"sink": SINK_TOKENS, "window": budget - SINK_TOKENS}, "f16"),
        "ccm": CompressionConfig(level, "ccm-concat",
                                 {"n_comp": n, "cap": budget // n, "compressor": fp}, "f16"),
    }
    if shares is None:
        out["hybrid"] = engine.compression_for(level)
    else:
        for share in shares:
            verbatim = int(budget * share)
            out[f"hybrid@{share:g}"] = CompressionConfig(
                level, "ccm-hybrid", {"n_comp": n, "cap": max(1, (budget - verbatim) // n),
                                      "verbatim": verbatim, "compressor": fp}, "f16")
    return out


def walk(engine, config, chat, rng: random.Random, at: list[int]) -> dict[int, tuple]:
    """One pass over a chat with a fact planted first: at each checkpoint k, the mean NLL of
    the real next reply and whether the fact (k exchanges back) is recalled."""
    fact_user, fact_reply, question, answer, values = rng.choice(FACTS)
    right, *wrong = rng.sample(values, 4)
    conv = engine.new_conversation(compression=config)
    out: dict[int, tuple] = {}
    with suppress(ContextFullError):  # the full context: what fitted is kept
        conv.add_turn("user", fact_user.format(right))
        conv.add_turn("assistant", fact_reply.format(right))
        for i, (user, assistant) in enumerate(chat, start=1):
            if i in at:
                conv.add_turn("user", question, decode=False)
                scores = [conv.score(answer.format(v)) for v in (right, *wrong)]
                conv.truncate(len(conv.messages) - 1)
                conv.add_turn("user", user, decode=False)
                nll = conv.score(assistant)
                conv.truncate(len(conv.messages) - 1)
                out[i] = (nll, scores[0] < min(scores[1:]), conv.stats())
            if i == max(at):
                break
            conv.add_turn("user", user)
            conv.add_turn("assistant", assistant)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["validation", "test"], default="test")
    ap.add_argument("--levels", default="light,balanced,aggressive")
    ap.add_argument("--shares", default=None, help="verbatim shares to compare (validation)")
    ap.add_argument("--at", default="2,4,8,16,32,64", help="checkpoints, in exchanges")
    ap.add_argument("--chats", type=int, default=6)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--only-hybrid", action="store_true", help="skip the baselines")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="llamacpp", choices=["llamacpp", "hf"])
    ap.add_argument("--moves", default="host",
                    help="comma-separated, of host and shift (llama.cpp; see above)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/hybrid.json"))
    args = ap.parse_args()
    at = [int(x) for x in args.at.split(",")]
    shares = [float(x) for x in args.shares.split(",")] if args.shares else None
    chats = long_chats(dialogues(args.split), args.chats, max(at) + 1, seed=1)
    started = time.time()
    rows = []
    with Engine.load(n_ctx=args.n_ctx, device=args.device, compression="balanced",
                     backend=args.backend) as engine:
        methods: dict[str, CompressionConfig] = {}
        if not args.only_hybrid:
            methods["full"] = CompressionConfig("off", "full", {}, "f16")
        moves = args.moves.split(",")
        for level in args.levels.split(","):
            for name, config in configs(engine, level, shares).items():
                if name.startswith("hybrid") or not args.only_hybrid:
                    for how in moves:
                        label = f"{level}/{name}" + (f" [{how}]" if len(moves) > 1 else "")
                        methods[label] = config
        for label, config in methods.items():
            if hasattr(engine.ctx, "moves_on_host"):  # None: checked at its first step again
                engine.ctx.moves_on_host = False if label.endswith("[shift]") else None
            t0 = time.time()
            per_at: dict[int, list] = {k: [] for k in at}
            rng = random.Random(3)  # the same facts for every method
            for chat in chats:
                for k, got in walk(engine, config, chat, rng, at).items():
                    per_at[k].append(got)
            for k, got in per_at.items():
                if len(got) < len(chats):  # the full context stops at its window
                    continue
                nll = statistics.fmean(x for x, _, _ in got)
                stats = [s for _, _, s in got]
                rows.append(_row(label, config, f"ppl@{k}", math.exp(nll), nll, stats))
                acc = statistics.fmean(float(ok) for _, ok, _ in got)
                rows.append(_row(label, config, f"recall@{k}", acc, None, stats))
            print(f"{label}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            write_result(args.out, args.device, {  # after each, for a cut run
                "backend": args.backend, "split": args.split, "chats": args.chats,
                "compressor": engine.ccm.files.folder.name if engine.ccm else None,
                "seconds": round(time.time() - started), "rows": rows}, quiet=True)
    print(f"wrote {args.out}")
    print(table(rows))


def _row(label, config, metric, value, nll, stats) -> dict:
    cells = statistics.fmean(s.memory_tokens for s in stats)
    full = statistics.fmean(s.full_context_tokens for s in stats)
    return {"method": label, "policy": config.method, "params": config.params,
            "metric": metric, "value": round(value, 4),
            "mean_nll": None if nll is None else round(nll, 4),
            "cells": round(cells, 1),
            "mb": round(statistics.fmean(s.memory_bytes for s in stats) / 1e6, 2),
            "ratio": round(full / cells, 1) if cells else None, "n": len(stats)}


def table(rows: list[dict]) -> str:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["metric"]): r for r in rows}
    lines = ["| method | " + " | ".join(metrics) + " | cells / ratio at the last ppl |",
             "|---" * (len(metrics) + 2) + "|"]
    last = [m for m in metrics if m.startswith("ppl@")][-1]
    for m in methods:
        vals = [f"{cell[m, x]['value']:.3g}" if (m, x) in cell else "" for x in metrics]
        r = cell.get((m, last))
        tail = f"{r['cells']:.0f} / {r['ratio']}x" if r else ""
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {tail} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
