"""Decode speed against CPU threads: the old default (os.cpu_count() threads) and the new one
(what Engine.load(n_threads=None) picks), alone and beside one CPU-bound neighbour process.

llama.cpp's threads meet after every layer, so a thread that a neighbour pushes off its core
stalls them all: that is what made a reply crawl on a shared machine (issue 14). Both engines
are loaded in one process and their runs interleaved (and the conditions), so the comparison
holds on a noisy machine. A run is one 64-token reply (greedy) in a new conversation, as in
decode_speed.py; tok/s is the engine's own decode rate for it. Prints a table and writes JSON.

    python bench/threads.py --repeats 3 --out bench/results/threads_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ccm_chat.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import engine_run as reply_speed  # noqa: E402  (sibling script modules)
from machine import write_result  # noqa: E402

NEIGHBOUR = "while True: pass"


@contextmanager
def neighbour(active: bool) -> Iterator[None]:
    """One CPU-bound process beside the engine while the block runs (none if not active)."""
    if not active:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        time.sleep(0.5)  # let it take its core
        yield
    finally:
        proc.kill()
        proc.wait()


def threads_of(engine: Engine) -> dict[str, int | None]:
    """The decode and batch thread counts the engine's context runs with."""
    picked = getattr(engine.ctx, "threads", None)
    if picked is None:
        return {"decode": None, "batch": None}
    return {"decode": picked.decode, "batch": picked.batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("bench/results/threads_cpu.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()  # other programs' load: "alone" is only this process's
    old_count = os.cpu_count() or 1
    old = Engine.load(n_ctx=args.n_ctx, device="cpu", n_threads=old_count)
    new = Engine.load(n_ctx=args.n_ctx, device="cpu", n_threads=None)
    picked = threads_of(new)
    engines = {
        f"old default ({old_count} threads)": old,
        f"new default ({picked['decode']} decode / {picked['batch']} batch)": new,
    }
    threads = {name: threads_of(eng) for name, eng in engines.items()}
    for eng in engines.values():  # warm-up: first-call costs out of the measurement
        reply_speed(eng, 8)

    conditions = ("alone", "with 1 CPU-bound neighbour")
    speeds: dict[str, dict[str, list[float]]] = {c: {n: [] for n in engines} for c in conditions}
    generated: dict[str, dict[str, list[int]]] = {c: {n: [] for n in engines}
                                                  for c in conditions}
    for _ in range(args.repeats):  # conditions interleaved too: a machine's load drifts
        for condition in conditions:
            with neighbour(condition != "alone"):
                for name, eng in engines.items():
                    speed, count = reply_speed(eng, args.tokens)
                    speeds[condition][name].append(speed)
                    generated[condition][name].append(count)

    medians = {c: {n: statistics.median(v) for n, v in rows.items()}
               for c, rows in speeds.items()}
    width = max(len(n) for n in engines) + 2
    print(f"{'threads':{width}}" + "".join(f"{c:>30}" for c in conditions))
    for name in engines:
        cells = "".join(
            f"{medians[c][name]:8.1f} tok/s ({', '.join(f'{s:.1f}' for s in speeds[c][name])})"
            .rjust(30) for c in conditions)
        print(f"{name:{width}}{cells}")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    old_name, new_name = list(engines)
    for c in conditions:
        print(f"{c}: new / old = {medians[c][new_name] / medians[c][old_name]:.2f}")

    result = {
        "command": "python bench/threads.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "model": next(iter(engines.values())).info.model_name,
        "tokens": args.tokens,
        "neighbour": f"{sys.executable} -c {NEIGHBOUR!r}",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "threads": threads,
        "tok_per_s": speeds,
        "tokens_generated": generated,
        "median_tok_per_s": medians,
        "new_over_old": {c: medians[c][new_name] / medians[c][old_name] for c in conditions},
    }
    write_result(args.out, "cpu", result, indent=2)
    for eng in engines.values():
        eng.close()


if __name__ == "__main__":
    main()
