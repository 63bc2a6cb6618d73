"""Old compressor against new, side by side on held-apart test data (never tuned on).

One model, the same probes for every memory: next-turn perplexity at exchange 4 ... 128 with
the share of the full-context gain over no context that a memory recovers,
(ppl_none - ppl) / (ppl_none - ppl_full); recall of a fact 2 ... 128 exchanges back by
likelihood against 3 distractors; LongEval topics; and the cells and f16 KV bytes held.
Memories: none, full, sink + window at each compressor's pure-CCM budget, and each
compressor as pure CCM and as the app's hybrid read (the last w exchanges verbatim).

    python bench/compressor_quality.py --compressor OLD --compressor NEW --window 0 2 4 \\
        --out bench/results/compressor_quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ccm_chat.engine.ccm.files import CARD
from ccm_chat.training.data import (
    Corpus,
    ExchangeTokens,
    Probe,
    load_corpora,
    next_turn_probes,
    recall_probes,
)
from ccm_chat.training.evaluate import Read, longchat_cases, probe_cells, probe_nll

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from quality import kv_bytes_per_token, load_compressor, model_tokens_of  # noqa: E402

PPL_AT = (4, 8, 16, 32, 64, 128)
RECALL_AT = (2, 8, 32, 128)


def probe_sets(corpus: Corpus, tokens, limit: int, longchat: Path | None,
               ppl_at=PPL_AT, recall_at=RECALL_AT, shuffled: bool = False,
               ) -> dict[str, list[Probe]]:
    sets = {f"ppl@{k}": next_turn_probes(corpus, k, limit, seed=1) for k in ppl_at}
    if shuffled:  # a control: each reply after another conversation's memory
        sets |= {f"{name} shuffled": shuffle(probes) for name, probes in list(sets.items())}
    sets |= {f"recall@{d}": recall_probes(corpus, d, limit, seed=2) for d in recall_at}
    if longchat is not None and longchat.exists():
        sets["longeval5"] = [Probe(c.episode.context, c.episode.prompt, c.answers, c.fillers)
                             for c in longchat_cases(longchat, tokens.tok, limit)]
    return sets


def shuffle(probes: list[Probe]) -> list[Probe]:
    """Each probe's prompt and reply after the next probe's context: what a memory gives a
    reply when it holds nothing of its conversation (adaptation, not memory)."""
    return [Probe(probes[(i + 1) % len(probes)].context, p.prompt, p.answers)
            for i, p in enumerate(probes)]


def run(compressor, read: Read, sets, label: str, name: str) -> list[dict]:
    rows = []
    n, merge = compressor.n_comp, compressor.method == "merge"
    per_cell = kv_bytes_per_token(compressor.model.config)
    for set_name, probes in sets.items():
        start = time.perf_counter()
        scored = [probe_nll(compressor, p, read) for p in probes]
        if set_name.startswith("ppl"):
            value = float(torch.exp(torch.tensor(sum(s[0][0] for s in scored)
                                                 / sum(s[0][1] for s in scored))))
        else:
            value = statistics.mean(float(min(range(len(s)), key=lambda i: s[i][0] / s[i][1])
                                          == 0) for s in scored)
        cells = statistics.mean(probe_cells(read, p.context, n, merge) for p in probes)
        full = statistics.mean(sum(len(c) for c in p.context) for p in probes)
        row = {"memory": label, "compressor": name, "n": n, "window": read.window,
               "set": set_name, "value": value, "cells": cells, "bytes": cells * per_cell,
               "full_cells": full, "ratio": full / cells if cells else None,
               "cases": len(probes), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{label:>34} {set_name:>10}: {value:.3f}  cells {cells:.0f} "
              f"({row['seconds']} s)", flush=True)
        rows.append(row)
    return rows


def add_recovery(rows: list[dict]) -> None:
    """gain = (ppl_none - ppl) / (ppl_none - ppl_full) on every perplexity row."""
    ref = {(r["memory"], r["set"]): r["value"] for r in rows if r["memory"] in ("none", "full")}
    for r in rows:
        own = r["set"].removesuffix(" shuffled")  # a control is measured on its own scale
        if r["set"].startswith("ppl") and ("none", own) in ref:
            none, full = ref[("none", own)], ref[("full", own)]
            r["gain"] = (none - r["value"]) / (none - full) if none != full else None


def table(rows: list[dict]) -> str:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    keys = list(dict.fromkeys(r["memory"] for r in rows))
    lines = [f"| memory | {' | '.join(sets)} | cells@16 | ratio@16 | cells@128 | ratio@128 |",
             "|" + "---|" * (len(sets) + 5)]
    for key in keys:
        got = {r["set"]: r for r in rows if r["memory"] == key}
        cells = []
        for s in sets:
            r = got.get(s)
            if r is None:
                cells.append("")
            elif "gain" in r and r["gain"] is not None and r["memory"] not in ("none", "full"):
                cells.append(f"{r['value']:.2f} ({r['gain']:.0%})")
            else:
                cells.append(f"{r['value']:.2f}")
        extra = []
        for at in ("ppl@16", "ppl@128"):
            r = got.get(at)
            extra += [f"{r['cells']:.0f}" if r else "",
                      f"{r['ratio']:.1f}x" if r and r["ratio"] else ""]
        lines.append(f"| {key} | {' | '.join(cells)} | {' | '.join(extra)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", type=Path, action="append", default=[])
    parser.add_argument("--window", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--limit", type=int, default=50, help="probes per set")
    parser.add_argument("--ppl-at", type=int, nargs="*", default=list(PPL_AT))
    parser.add_argument("--recall-at", type=int, nargs="*", default=list(RECALL_AT))
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--longchat", type=Path, default=None,
                        help="LongChat's 5_topics.jsonl (LongEval topics): the longchat set")
    parser.add_argument("--baselines", type=int, nargs="*", default=None, metavar="N",
                        help="none, full and sink+window at the pure-CCM budget of N slots "
                             "an exchange (default: each compressor's n); --baselines alone: "
                             "none and full only")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--shuffled", action="store_true",
                        help="also each perplexity set with another conversation's context")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="only combine these result files (same probes) into --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(f.read_text())["rows"]]
        add_recovery(rows)
        first = json.loads(args.merge[0].read_text())
        result = {**first, "merged": [str(f) for f in args.merge], "rows": rows}
        write_result(args.out, "cpu", result, indent=2)  # the first file's machine stays
        print(table(rows))
        return
    tokens = ExchangeTokens(model_tokens_of(args.model))
    corpus = Corpus(load_corpora(args.data_dir), args.split, tokens)
    sets = probe_sets(corpus, tokens, args.limit, args.longchat, args.ppl_at, args.recall_at,
                      args.shuffled)
    cards = [(f, json.loads((f / CARD).read_text())) for f in args.compressor]
    rows = []
    if not args.no_baselines:
        base = load_compressor(None, args.device, args.model)
        rows += run(base, Read("none"), sets, "none", "")
        rows += run(base, Read("full"), sets, "full", "")
        per = args.baselines if args.baselines is not None else [c["n_comp"] for _, c in cards]
        for n in dict.fromkeys(per):
            rows += run(base, Read("window", 0, n), sets, f"sink+window at ccm n={n}", "")
        del base
    for folder, card in cards:
        comp = load_compressor(folder, args.device, args.model)
        name = f"{folder.name} ({card['steps']} steps)"
        for w in args.window:
            label = f"{folder.name} {'pure CCM' if w == 0 else f'hybrid w={w}'}"
            rows += run(comp, Read("ccm", w), sets, label, name)
        del comp
    add_recovery(rows)
    result = {"split": args.split, "seconds": time.perf_counter() - started, "rows": rows}
    write_result(args.out, "gpu" if torch.cuda.is_available() else "cpu", result, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
