"""Does flash attention change what an evicting memory remembers? (llama.cpp back end)

A window conversation runs held-apart chitchat exchanges with its cache evicting and
compacting as in the app, once with flash attention off and once on, side by side on one
device. Before each scored exchange, a copy of the live memory scores the exchange's own
tokens (teacher-forced next-token NLL): the memory the app would answer from, not a re-read.
The engine keeps flash attention off for evicting contexts on the CPU and on for them on a GPU
(see engine.llama_backend.LlamaContext); this is the quality side of that choice.

    python bench/eviction_flash.py --device cpu --level balanced \
        --out bench/results/eviction_flash_cpu_balanced.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from ccm_chat.engine import Engine  # isort: skip  (llama_cpp before numpy)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from length import exchanges  # noqa: E402  (a sibling script module)
from machine import write_result  # noqa: E402
from scoring import mean_nll  # noqa: E402


def exchange_nll(engine: Engine, conv, user: str, assistant: str) -> float:
    """Mean NLL of the exchange's tokens read from a copy of `conv`'s memory."""
    state = conv.save_state()
    probe = engine.restore_conversation(state)
    before = len(probe.memory_view().rendered)
    probe.add_turn("user", user)
    probe.add_turn("assistant", assistant)
    tokens = engine.model.tokenize(probe.memory_view().rendered[before:], False, True)
    engine.release(probe)
    reader = engine.restore_conversation(state)
    held = reader.held
    rows = engine.activate(reader).decode(tokens, held, want=range(len(tokens) - 1))
    engine.release(reader)
    return mean_nll([rows[i] for i in range(len(tokens) - 1)], tokens[1:])


def run(device: str, flash: bool, warmup: int, scored: int, level: str) -> dict:
    pairs = exchanges(warmup + scored)
    with Engine.load(n_ctx=4096, compression=level, device=device, compressor=False,
                     flash_attn=flash) as engine:
        conv = engine.new_conversation()
        nlls = []
        for t, (user, assistant) in enumerate(pairs):
            if t >= warmup:
                nlls.append(exchange_nll(engine, conv, user, assistant))
            conv.add_turn("user", user)
            conv.add_turn("assistant", assistant)
        return {"flash_attn": flash, "level": level, "device": engine.info.device,
                "held": conv.stats().memory_tokens, "evicted": conv.memory_view().evicted,
                "mean_nll": statistics.fmean(nlls), "ppl": math.exp(statistics.fmean(nlls)),
                "nlls": nlls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--level", default="balanced")
    parser.add_argument("--warmup", type=int, default=40, help="exchanges before scoring")
    parser.add_argument("--scored", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results/eviction_flash.json"))
    args = parser.parse_args()
    rows = [run(args.device, flash, args.warmup, args.scored, args.level)
            for flash in (False, True)]
    off, on = rows
    diffs = [b - a for a, b in zip(off["nlls"], on["nlls"], strict=True)]
    print(f"{'flash attention':16} {'held':>5} {'evicted':>8} {'ppl':>8}")
    for r in rows:
        print(f"{'on' if r['flash_attn'] else 'off':16} {r['held']:>5} {r['evicted']:>8} "
              f"{r['ppl']:>8.2f}")
    print(f"per exchange NLL, on - off: mean {statistics.fmean(diffs):+.4f}, "
          f"largest {max(diffs, key=abs):+.4f} ({len(diffs)} exchanges)")
    write_result(args.out, args.device, {
        "rows": rows, "nll_diff_mean": statistics.fmean(diffs),
        "nll_diff_max": max(diffs, key=abs)})


if __name__ == "__main__":
    main()
