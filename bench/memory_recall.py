"""What each memory remembers, side by side in one run: far-back recall, next-turn NLL, cells.

Long chats of held-apart dialogue (the test split of the corpora the compressor trains on, see
training.data; the compressor never saw them), a fact planted in the first exchange with
values it never trained on. Every memory walks the same chats, teacher-forced; at each
checkpoint it is asked for the fact by likelihood of the right answer against 3 distractors
(chance 0.25), once in the fact's own words and once in words it does not share (where
lexical ranking alone cannot find it), and the real next reply is scored (mean NLL; the gain
is over no memory). Then a few real replies are generated with recall on and off from the
same memory, to time what recall adds to a turn.

    python bench/memory_recall.py                       # the default model, CPU, small
    python bench/memory_recall.py --device gpu --model Q.gguf --chats 20 \
        --distances 5,40,150,500 --nll-at 4,16,64

Memories: none, full (the whole chat, while it fits), and at each level: window (sink +
recent window), window+recall, and where the model has a compressor ccm (pure), hybrid and
hybrid+recall.
"""

from __future__ import annotations

import argparse
import json
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

# (statement, reply, question in its words, question in other words, answer, values)
FACTS = [
    ("By the way, my dog is called {}.", "{} is a lovely name for a dog!",
     "What is my dog called?", "Do you know what my puppy's name is?", "Your dog is called {}.",
     ["Biscuit", "Pixel", "Rocket", "Mango", "Juniper", "Pepper", "Noodle", "Clover"]),
    ("I grew up in {}, you know.", "{} must have been a great place to grow up.",
     "Where did I grow up?", "Which town was my childhood home?", "You grew up in {}.",
     ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tbilisi", "Perth", "Quebec"]),
    ("I work as a {} these days.", "Being a {} sounds interesting.",
     "What do I work as these days?", "What is my occupation?", "You work as a {}.",
     ["nurse", "carpenter", "pilot", "chemist", "librarian", "plumber", "dentist", "baker"]),
    ("My favourite food is {}.", "{} is a great choice!",
     "What is my favourite food?", "Which dish do I enjoy eating most?",
     "Your favourite food is {}.",
     ["lasagna", "sushi", "pancakes", "curry", "paella", "dumplings", "tacos", "ramen"]),
]


def dialogues(split: str) -> list[list[tuple[str, str]]]:
    from ccm_chat.training.data import load_corpora, split_of

    return [ex for key, ex in sorted(load_corpora().items())
            if split_of(key) == split and len(ex) >= 4]


def long_chat(pool, length: int, rng: random.Random) -> list[tuple[str, str]]:
    chat: list[tuple[str, str]] = []
    while len(chat) < length:
        chat.extend(rng.choice(pool))
    return chat[:length]


def memories(engine: Engine, levels: list[str]) -> dict[str, tuple[CompressionConfig, bool]]:
    """name -> (config, recall on)."""
    kv = engine.kv_type  # one engine serves them all: its K cache type
    out = {"none": (CompressionConfig("off", "full", {}, kv), False),
           "full": (CompressionConfig("off", "full", {}, kv), False)}
    for level in levels:
        budget = LEVEL_BUDGETS[level][0]
        window = CompressionConfig(level, "window",
                                   {"sink": SINK_TOKENS, "window": budget - SINK_TOKENS}, kv)
        out[f"{level}/window"] = (window, False)
        out[f"{level}/window+recall"] = (window, True)
        if engine.ccm is not None:
            files = engine.ccm.files
            out[f"{level}/ccm"] = (CompressionConfig(
                level, "ccm-concat", {"n_comp": files.n_comp, "cap": budget // files.n_comp,
                                      "compressor": files.fingerprint}, kv), False)
            hybrid = engine.compression_for(level)
            out[f"{level}/hybrid"] = (hybrid, False)
            out[f"{level}/hybrid+recall"] = (hybrid, True)
    return out


def recalled(conv, question: str, answer: str, values: list[str]) -> bool:
    conv.add_turn("user", question, decode=False)
    try:
        scores = [conv.score(answer.format(v)) for v in values]
    finally:
        conv.truncate(len(conv.messages) - 1)
    return scores[0] < min(scores[1:])


def walk(engine, name, config, recall, chat, fact, values, distances, nll_at) -> dict:
    """One pass over one chat: {"recall@d": ok, "para@d": ok, "nll@k": x, "cells@..": n}."""
    statement, reply, question, paraphrase, answer, _ = fact
    out: dict = {}
    stop = max([*distances, *nll_at])
    if name == "none":  # no memory: each probe read on its own
        for d in distances:
            for tag, q in (("recall", question), ("para", paraphrase)):
                conv = engine.new_conversation(compression=config)
                out[f"{tag}@{d}"] = recalled(conv, q, answer, values)
        for k in nll_at:
            conv = engine.new_conversation(compression=config)
            conv.add_turn("user", chat[k - 1][0], decode=False)
            out[f"nll@{k}"] = conv.score(chat[k - 1][1])
        return out
    conv = engine.new_conversation(compression=config)
    conv.recall = recall
    with suppress(ContextFullError):  # the full context stops where it no longer fits
        conv.add_turn("user", statement.format(values[0]))
        conv.add_turn("assistant", reply.format(values[0]))
        for i in range(1, stop + 1):
            if i in distances:
                out[f"recall@{i}"] = recalled(conv, question, answer, values)
                out[f"para@{i}"] = recalled(conv, paraphrase, answer, values)
                out[f"cells@{i}"] = conv.stats().memory_tokens
            if i in nll_at:  # the real reply of exchange i, after i - 1 exchanges of chat
                conv.add_turn("user", chat[i - 1][0], decode=False)
                out[f"nll@{i}"] = conv.score(chat[i - 1][1])
                conv.truncate(len(conv.messages) - 1)
            if i == stop:
                break
            conv.add_turn("user", chat[i - 1][0])
            conv.add_turn("assistant", chat[i - 1][1])
    out["_conv"] = conv
    return out


def turn_times(engine, conv, question: str, turns: int) -> dict:
    """A real turn from the same memory (a reply of up to 48 tokens), recall off and on:
    the turn's work apart from generating the reply (prefill, recall, the memory's
    after-work), whose length recall may change, against the whole turn with recall off."""
    state = conv.save_state()
    work: dict[str, list[float]] = {"off": [], "on": []}
    whole_off: list[float] = []
    ranking: list[float] = []
    for _ in range(turns):
        for mode in ("off", "on"):
            c = engine.restore_conversation(state)
            c.recall = mode == "on"
            t0 = time.perf_counter()
            reply = c.send(question, max_tokens=48, temperature=0)
            for _piece in reply:
                pass
            stats = reply.finish()  # the recalled cells leave, the policy works
            took = time.perf_counter() - t0
            work[mode].append(took - stats.decode_seconds)
            if mode == "off":
                whole_off.append(took)
            elif c.last_recall is not None:
                ranking.append(c.last_recall.seconds)
            engine.release(c)
    off, on = statistics.median(work["off"]), statistics.median(work["on"])
    whole = statistics.median(whole_off)
    return {"turn_s_recall_off": round(whole, 4), "work_s_recall_off": round(off, 4),
            "work_s_recall_on": round(on, 4), "recall_added_share": round((on - off) / whole, 4),
            "ranking_s": round(statistics.median(ranking), 5) if ranking else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="test", choices=["validation", "test"])
    ap.add_argument("--levels", default="light,balanced,aggressive")
    ap.add_argument("--only", default=None, help="comma-separated memory names to run")
    ap.add_argument("--distances", default="5,40")
    ap.add_argument("--nll-at", default="4,16")
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--timed-turns", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: auto)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_recall.json"))
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="join the rows of these result files (one run split by --only) "
                         "into --out, with its table and plot, and run nothing")
    args = ap.parse_args()
    if args.merge is not None:
        merge(args.merge, args.out)
        return
    distances = [int(x) for x in args.distances.split(",")]
    nll_at = [int(x) for x in args.nll_at.split(",")]
    rng = random.Random(11)
    pool = dialogues(args.split)
    chats = [long_chat(pool, max([*distances, *nll_at]) + 1, rng) for _ in range(args.chats)]
    facts = []
    for c in range(args.chats):
        fact = FACTS[c % len(FACTS)]
        facts.append((fact, rng.sample(fact[5], 4)))
    rows: dict[str, dict] = {}
    started = time.time()
    with Engine.load(model=args.model, n_ctx=args.n_ctx, device=args.device,
                     compression="balanced", n_threads=args.threads) as engine:
        chosen = memories(engine, args.levels.split(","))
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
        for name, (config, recall) in chosen.items():
            t0 = time.time()
            got: dict[str, list] = {}
            timing = None
            for chat, (fact, values) in zip(chats, facts, strict=True):
                res = walk(engine, name, config, recall, chat, fact, values, distances, nll_at)
                conv = res.pop("_conv", None)
                for key, value in res.items():
                    got.setdefault(key, []).append(value)
                if conv is not None and recall and timing is None and args.timed_turns:
                    timing = turn_times(engine, conv, fact[2], args.timed_turns)
                if conv is not None:
                    engine.release(conv)
            row = {"method": config.method, "level": config.level, "recall": recall,
                   "seconds": round(time.time() - t0, 1)}
            for key, values_ in got.items():
                if len(values_) == len(chats):  # a memory that stopped early is not scored
                    row[key] = round(statistics.fmean(float(v) for v in values_), 4)
            if timing:
                row.update(timing)
            rows[name] = row
            print(f"{name}: {row}", file=sys.stderr, flush=True)
            write_result(args.out, args.device, {
                "model": args.model or "default", "split": args.split, "chats": args.chats,
                "distances": distances, "nll_at": nll_at,
                "seconds": round(time.time() - started), "rows": rows})
    with_gains(rows, nll_at)
    write_result(args.out, args.device, {
        "model": args.model or "default", "split": args.split, "chats": args.chats,
        "distances": distances, "nll_at": nll_at, "seconds": round(time.time() - started),
        "rows": rows})
    print(table(rows, distances, nll_at))


def with_gains(rows: dict[str, dict], nll_at: list[int]) -> None:
    """Each memory's next-turn NLL gain over no memory."""
    none = rows.get("none", {})
    for row in rows.values():
        for k in nll_at:
            if f"nll@{k}" in row and f"nll@{k}" in none:
                row[f"gain@{k}"] = round(none[f"nll@{k}"] - row[f"nll@{k}"], 4)


def merge(paths: list[Path], out: Path) -> None:
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    rows = {name: row for part in parts for name, row in part["rows"].items()}
    with_gains(rows, first["nll_at"])
    result = {k: v for k, v in first.items() if k not in ("rows", "command")}
    result.update(rows=rows, merged_from=[str(p) for p in paths],
                  commands=sorted({p["command"] for p in parts}))
    write_result(out, "cpu", result)  # the first part's machine, commit and versions stay
    print(table(rows, first["distances"], first["nll_at"]))
    plot(rows, first["distances"], out.with_suffix(".png"))


def plot(rows: dict[str, dict], distances: list[int], path: Path) -> None:
    """Planted-fact recall against distance, one line per memory (both question wordings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, tag, title in ((axes[0], "recall", "asked in the fact's words"),
                           (axes[1], "para", "asked in other words")):
        for name, row in rows.items():
            ys = [row.get(f"{tag}@{d}") for d in distances]
            if any(y is not None for y in ys):
                ax.plot(distances, ys, marker="o", label=name,
                        linestyle="-" if "recall" in name else "--")
        ax.axhline(0.25, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("exchanges back")
        ax.set_title(title)
    axes[0].set_ylabel("planted fact recalled (chance 0.25)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(rows: dict[str, dict], distances: list[int], nll_at: list[int]) -> str:
    cols = ([f"recall@{d}" for d in distances] + [f"para@{d}" for d in distances]
            + [f"nll@{k}" for k in nll_at] + [f"cells@{distances[-1]}"])
    lines = ["| memory | " + " | ".join(cols) + " | recall's share of a turn |",
             "|---" * (len(cols) + 2) + "|"]
    for name, row in rows.items():
        vals = [f"{row[c]:.3g}" if c in row else "-" for c in cols]
        share = row.get("recall_added_share")
        lines.append(f"| {name} | " + " | ".join(vals)
                     + f" | {'-' if share is None else f'{share:+.1%}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
