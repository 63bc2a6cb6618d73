"""Per-turn cost of the memory policy against the turn itself, per level, side by side.

Each level chats the same MemoryBank user turns (greedy replies); the time spent in the
policy's after-turn work (eviction, position shift, compaction) is measured against the
turn's prefill + generation time. Prints a table and writes JSON. `--flash-attn both` runs
each level with llama.cpp's flash attention off and on, side by side (the engine's own
choice is `auto`: off only for an evicting context on the CPU).

    python bench/turn_overhead.py --device cpu --out bench/results/turn_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from ccm_chat.engine import Engine, SamplingParams  # isort: skip  (llama_cpp before numpy)
from length import configs  # isort: skip
from resume import DATA, exchanges  # isort: skip
from machine import write_result  # isort: skip


FLASH = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}


def time_after_turn(conv) -> list[float]:
    """Time the policy's after-turn work of `conv` from now on: the list fills, a turn each."""
    policy_s: list[float] = []
    original = conv.policy.after_turn

    def timed(memory) -> None:
        start = time.perf_counter()
        original(memory)
        policy_s.append(time.perf_counter() - start)

    conv.policy.after_turn = timed  # type: ignore[method-assign]
    return policy_s


def run(label: str, level: str, ccm: bool, users: list[str], device: str,
        max_tokens: int, flash: bool | None) -> dict:
    engine = Engine.load(compression=level, device=device, n_ctx=4096, compressor=ccm,
                         flash_attn=flash)
    if flash is not None:
        label += f" (flash {'on' if flash else 'off'})"
    if ccm and engine.compression.method == "window":
        engine.close()
        raise SystemExit("no compressor for the default model: train or reinstall one")
    conv = engine.new_conversation()
    policy_s = time_after_turn(conv)
    turn_s, speeds = [], []
    for user in users:
        start = time.perf_counter()
        for _ in conv.send(user, SamplingParams(temperature=0.0, max_tokens=max_tokens)):
            pass
        turn_s.append(time.perf_counter() - start - policy_s[-1])
        speeds.append(conv.last_reply.tokens_per_second)
    stats = conv.stats()
    engine.close()
    return {"level": label, "turns": len(users), "method": engine.compression.method,
            "flash_attn": engine.flash_attn,
            "turn_s_median": statistics.median(turn_s),
            "policy_ms_median": 1000 * statistics.median(policy_s),
            "policy_ms_max": 1000 * max(policy_s),
            "decode_tok_s_last5": statistics.median(speeds[-5:]),
            "tokens_held": stats.memory_tokens, "tokens_seen": stats.full_context_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench/results/turn_overhead.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="the MemoryBank folder")
    parser.add_argument("--flash-attn", choices=tuple(FLASH), default="auto")
    args = parser.parse_args()
    users = [user for user, _ in exchanges(args.data)[:args.turns]]
    rows = [run(label, level, ccm, users, args.device, args.max_tokens, flash)
            for label, level, ccm in configs() for flash in FLASH[args.flash_attn]]
    print(f"{'level':30} {'turn s':>7} {'policy ms (median / max)':>25} {'tok/s':>7} "
          f"{'held':>6} {'seen':>6}")
    for r in rows:
        print(f"{r['level']:30} {r['turn_s_median']:>7.2f} {r['policy_ms_median']:>12.1f} / "
              f"{r['policy_ms_max']:<10.1f} {r['decode_tok_s_last5']:>7.1f} "
              f"{r['tokens_held']:>6} {r['tokens_seen']:>6}")
    write_result(args.out, args.device, {
        "device": args.device,
        "command": f"python bench/turn_overhead.py --device {args.device} --turns "
                   f"{args.turns} --max-tokens {args.max_tokens} --flash-attn {args.flash_attn}",
        "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
