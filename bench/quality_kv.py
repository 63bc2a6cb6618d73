"""Quality against memory for KV cache quantization, on the llama.cpp back end.

The same held-apart sets as bench/quality.py (same tokens, same scoring by reply likelihood),
run through llama.cpp itself, because the K cache quantization the training-free levels use
is llama.cpp's: the whole context kept with the K cache f16 (the reference), q8_0 and q4_0,
and sink + window with a q8_0 K cache (what a training-free level runs) at the budgets of
bench/quality.py's window rows. The V cache stays f16, as in the app. Rows have quality.py's
shape, so bench/plot_quality.py draws them beside the rest.

    python bench/quality_kv.py --limit 20 --sets ppl@16,recall \
        --out bench/results/quality_kv_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from ccm_chat.engine import Engine  # isort: skip  (llama_cpp before numpy and torch)
import numpy as np  # isort: skip
from quality import datasets, model_tokens_of, result_row, table  # isort: skip
from machine import write_result  # isort: skip
from scoring import mean_nll  # isort: skip

from ccm_chat.engine.llama_backend import LlamaContext  # noqa: E402
from ccm_chat.training.data import Episode  # noqa: E402
from ccm_chat.training.evaluate import Memory  # noqa: E402

# bits a value takes in llama.cpp's cache: q8_0 is 32 int8 + an f16 scale per block
BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}


def reply_nlls(ctx: LlamaContext, episode: Episode, answers: list[list[int]],
               memory: Memory) -> list[float]:
    """Mean NLL of each answer after the prompt, the context decoded once."""
    ctx.clear()
    held = memory.held(episode)
    if held:
        ctx.decode(held, 0)
    out = []
    for reply in answers:
        final = episode.prompt + reply
        first = len(episode.prompt) - 1
        rows = ctx.decode(final, len(held), want=range(first, len(final) - 1))
        out.append(mean_nll([rows[i] for i in range(first, len(final) - 1)], reply))
        ctx.remove(len(held), -1)
    return out


def evaluate(ctx: LlamaContext, memory: Memory, sets: dict, label: str, n: int,
             bytes_per_cell: float, f16_bytes: float) -> list[dict]:
    rows = []
    for name, cases in sets.items():
        start = time.perf_counter()
        episodes = [getattr(c, "episode", c) for c in cases]
        if name.startswith("ppl"):
            nll = sum(reply_nlls(ctx, e, [e.reply], memory)[0] * len(e.reply) for e in episodes)
            value = float(np.exp(nll / sum(len(e.reply) for e in episodes)))
        else:
            value = statistics.mean(
                float(int(np.argmin(reply_nlls(ctx, c.episode, c.answers, memory)) == 0))
                for c in cases)
        cells = [len(memory.held(e)) for e in episodes]
        rows.append(result_row(label, n, name, value, episodes, cells, bytes_per_cell,
                               f16_bytes, start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="cases per set")
    parser.add_argument("--sets", default="", help="comma list of sets to run (default all)")
    parser.add_argument("--window", default="1,2,4,8", help="window budgets (slots/exchange)")
    parser.add_argument("--longchat", type=Path, default=None,
                        help="LongChat's 5_topics.jsonl (LongEval topics): the longchat set")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    sets = datasets(model_tokens_of(None), args.limit, args.longchat,
                    [x for x in args.sets.split(",") if x])
    engine = Engine.load(compression="off", device="cpu", compressor=False, n_ctx=256)
    model = engine.model
    f16_bytes = model.f16_bytes_per_token
    n_ctx = 16 + max(sum(map(len, getattr(c, "episode", c).context))
                     + len(getattr(c, "episode", c).prompt) + 48
                     for cases in sets.values() for c in cases)
    rows: list[dict] = []
    runs = [("full, K f16", "f16", Memory("full"), 0), ("full, K q8_0", "q8_0", Memory("full"), 0),
            ("full, K q4_0", "q4_0", Memory("full"), 0)]
    runs += [("sink+window, K q8_0", "q8_0", Memory("window", int(n)), int(n))
             for n in args.window.split(",") if n]
    for label, kv_type, memory, n in runs:
        ctx = LlamaContext(model, n_ctx, n_threads=os.cpu_count(), kv_type=kv_type)
        per_cell = f16_bytes * (1 + BITS[kv_type] / 16) / 2  # K at kv_type, V at f16
        rows += evaluate(ctx, memory, sets, label, n, per_cell, f16_bytes)
        ctx.close()
    engine.close()
    result = {"device": "cpu",
              "seconds": time.perf_counter() - started, "rows": rows}
    write_result(args.out, "cpu", result, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
