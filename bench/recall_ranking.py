"""Which earlier exchange recall finds: BM25, sentence embeddings, and both fused.

Ranking only (no language model, so fast on a CPU). Each planted fact of bench/recall_facts.py
(its validation or test side) is said in a chat of held-apart dialogue (the corpora's split of
the same name, never trained on) `distance` exchanges before a question about it, once in the
fact's words and once in other words. Every earlier exchange is ranked against the question:
hit@1 and hit@K (K: how many recall may bring back). And against ordinary messages of the
dialogue, where nothing is asked back: how often a ranking recalls something anyway (costs a
turn's time, not its answer). Choose thresholds on --split validation; report --split test.

    python -m bench run recall_ranking --split validation
    python -m bench run recall_ranking --split test --out bench/results/recall_ranking_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from bench.recall_facts import split as fact_split  # noqa: E402
from ccm_chat.engine.recall import ExchangeIndex, exchange_text, query_terms  # noqa: E402
from ccm_chat.engine.sentence_encoder import shared_encoder  # noqa: E402

ACK = "Thanks for telling me, I'll remember that."


def pool(split: str, size: int, seed: int) -> list[tuple[str, str]]:
    from ccm_chat.training.data import load_corpora, split_of

    dialogues = [ex for key, ex in sorted(load_corpora().items()) if split_of(key) == split]
    random.Random(seed).shuffle(dialogues)
    out: list[tuple[str, str]] = []
    for d in dialogues:
        out.extend(d)
        if len(out) >= size:
            break
    return out[:size]


class Cache:
    """Each distinct text embedded once: the chats share their filler exchanges."""

    def __init__(self, keep: Path | None = None) -> None:
        self.keep = keep  # a file that keeps the rows between runs (the CPU is slow)
        self.encoder = shared_encoder()
        if self.encoder is None:
            raise SystemExit("the sentence encoder is not installed: pip install "
                             "'ccm-chat[recall]'")
        self.rows: dict[str, np.ndarray] = {}
        if keep and keep.with_suffix(".json").exists():
            texts = json.loads(keep.with_suffix(".json").read_text())
            self.rows = dict(zip(texts, np.load(keep.with_suffix(".npy")), strict=True))

    def save(self) -> None:
        if self.keep:
            texts = list(self.rows)
            self.keep.with_suffix(".json").write_text(json.dumps(texts))
            np.save(self.keep.with_suffix(".npy"), np.stack([self.rows[t] for t in texts]))

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.rows]
        for text, row in zip(todo, self.encoder.encode(todo), strict=True):
            self.rows[text] = row
        return np.stack([self.rows[t] for t in texts])


def ranks(method: str, lexical: list[int], sims: np.ndarray, threshold: float,
          k: int) -> list[int]:
    """`lexical`: BM25's ranking of the chat's exchanges; `sims`: their cosines to the query."""
    if method == "bm25":
        return lexical[:k]
    dense = [int(i) for i in np.argsort(-sims) if sims[i] >= threshold][:20]
    if method == "dense":
        return dense[:k]
    if method == "interleave":  # dense 1, lexical 1, dense 2, lexical 2, ...
        return interleave(dense, lexical, k)
    if method == "dense+lexical1":  # dense 1, lexical 1, then dense
        return interleave(dense[:1], lexical[:1], 2) + [i for i in dense if i not in
                                                         (dense[:1] + lexical[:1])][:k - 2]
    if method == "dense-then-lexical1":  # dense's first k - 1, then lexical's first
        return list(dict.fromkeys(dense[:k - 1] + lexical[:1] + dense[k - 1:]))[:k]
    fused: dict[int, float] = {}
    for ranking in (lexical, dense):  # reciprocal rank fusion
        for r, i in enumerate(ranking):
            fused[i] = fused.get(i, 0.0) + 1.0 / (60 + r)
    return sorted(fused, key=lambda i: -fused[i])[:k]


def interleave(first: list[int], second: list[int], k: int) -> list[int]:
    out: list[int] = []
    for pair in zip(first + [None] * len(second), second + [None] * len(first), strict=True):
        for i in pair:
            if i is not None and i not in out:
                out.append(i)
    return out[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--distances", default="40,150,500")
    parser.add_argument("--values", type=int, default=2, help="values of each fact tried")
    parser.add_argument("--k", type=int, default=4, help="exchanges recall may bring back")
    parser.add_argument("--methods", default="bm25,dense,hybrid,interleave,dense+lexical1")
    parser.add_argument("--thresholds", default="0.2,0.3,0.4",
                        help="least cosine similarity a dense match needs")
    parser.add_argument("--pool", type=int, default=2500, help="filler exchanges")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the embeddings in this file (.json + .npy) between runs")
    args = parser.parse_args()
    distances = [int(d) for d in args.distances.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rng = random.Random(0)
    fillers = pool(args.split, args.pool, seed=1 if args.split == "test" else 2)
    embed = Cache(args.keep)
    started = time.perf_counter()
    embed([exchange_text(u, a) for u, a in fillers])
    embed.save()
    print(f"{len(fillers)} filler exchanges embedded in {time.perf_counter() - started:.1f} s",
          flush=True)
    methods = [("bm25", 0.0)] + [(m, t) for m in ("dense", "hybrid", "interleave", "dense+lexical1",
                                                    "dense-then-lexical1")
                                 for t in thresholds]
    methods = [m for m in methods if m[0] in args.methods.split(",")]
    hits: dict[tuple, list[tuple[bool, bool]]] = {}
    fires: dict[tuple, list[bool]] = {}
    for statement, own, other, values in fact_split(args.split):
        shared = set(query_terms(statement)) & set(query_terms(other))
        assert not shared, (other, shared)  # the other words share no content word
        for value in values[:args.values]:
            for distance in distances:
                start = rng.randrange(len(fillers) - distance - 2)
                chat = ([(statement.format(value), ACK)]
                        + fillers[start:start + distance])
                texts = [exchange_text(u, a) for u, a in chat]
                vectors = embed(texts)
                index = ExchangeIndex(lambda: None)  # words only: the BM25 side
                index.sync(texts)
                ordinary = fillers[start + distance][0]
                for tag, question in (("own", own), ("other", other), ("ordinary", ordinary)):
                    sims = vectors @ embed([question])[0]
                    lexical = index.search(question, 20)
                    for method, threshold in methods:
                        found = ranks(method, lexical, sims, threshold, args.k)
                        key = (method, threshold, distance)
                        if tag == "ordinary":
                            fires.setdefault(key, []).append(bool(found))
                        else:
                            hits.setdefault((*key, tag), []).append(
                                (bool(found) and found[0] == 0, 0 in found))
                index.close()
    rows = []
    for method, threshold in methods:
        for distance in distances:
            row = {"method": method, "threshold": threshold, "distance": distance,
                   "fires_on_ordinary": statistics.mean(fires[(method, threshold, distance)])}
            for tag in ("own", "other"):
                got = hits[(method, threshold, distance, tag)]
                row[f"{tag}_hit@1"] = statistics.mean(h for h, _ in got)
                row[f"{tag}_hit@{args.k}"] = statistics.mean(h for _, h in got)
                row["cases"] = len(got)
            rows.append(row)
    print(f"| ranking | distance | own hit@1 | own hit@{args.k} | other hit@1 | "
          f"other hit@{args.k} | fires on ordinary | cases |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["method"] + (f" >= {r['threshold']}" if r["method"] != "bm25" else "")
        print(f"| {name} | {r['distance']} | {r['own_hit@1']:.2f} | {r[f'own_hit@{args.k}']:.2f}"
              f" | {r['other_hit@1']:.2f} | {r[f'other_hit@{args.k}']:.2f} | "
              f"{r['fires_on_ordinary']:.2f} | {r['cases']} |")
    if args.out:
        write_result(args.out, "cpu", {"split": args.split, "k": args.k, "rows": rows})


if __name__ == "__main__":
    main()
