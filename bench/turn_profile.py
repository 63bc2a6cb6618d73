"""Where the per-turn memory work goes, call by call, against the turn itself, per level.

Each level chats the same MemoryBank user turns (greedy replies) as bench/turn_overhead.py
does; during the policy's after-turn work every call on the back end's context (decode,
<COMP> embeddings, adapter toggles, remove, shift, compaction, the state round trip, merge)
is timed exclusively (a nested call's time is its own, not its caller's), with the device
synchronized at each call's end so GPU time lands on the call that queued it. Variants
(llama.cpp), side by side in one run: `before`, the compaction as it was before issue 16 (a
round trip through Python bytes after every edit, holes or not) with the adapter toggled in
place; `toggle`, today's compaction with the adapter toggled in place (each toggle makes
llama.cpp re-reserve its scheduler); `after`, the code as it is (the <COMP> slots decoded in
a second context that keeps the adapter on).
Each run ends with save -> restore checked exact (next-token logits of the live and the
restored conversation). Prints a table and writes JSON.

    python bench/turn_profile.py --backend llamacpp --device gpu --variants before,toggle,after \\
        --out bench/results/turn_profile_gpu_fast.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


def _backend_arg() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--backend" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return ""


if _backend_arg() == "hf":  # torch before llama_cpp, which the engine imports first
    import torch

from ccm_chat.engine import Engine, SamplingParams  # noqa: E402  isort: skip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from length import configs  # noqa: E402  isort: skip
from machine import write_result  # noqa: E402  isort: skip

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "memorybank_en"

CALLS = ("decode", "decode_embeddings", "slots_over_text", "_copy_state", "_use_adapter",
         "remove", "shift", "compact", "_round_trip", "redecode", "merge_slots", "get_state",
         "set_state")


def user_turns(data: Path) -> list[str]:
    """MemoryBank's user turns in order (as bench/resume.py reads them, without its imports
    of the app and storage, which a GPU host need not have)."""
    bank = json.loads((data / "memory_bank_en.json").read_text())
    return [t["query"] for user in bank.values() for day in user["history"].values()
            for t in day]


def legacy_compact(ctx, last_token: int) -> None:
    """LlamaContext.compact before issue 16: the round trip after every edit, through bytes."""
    last = ctx.pos_max()
    if last_token < 0:
        ctx.decode([max(ctx.model.bos, 0)], last + 1)
        ctx.remove(last + 1)
        ctx.set_state(ctx.get_state())
        return
    ctx.redecode(last_token, last)
    ctx.set_state(ctx.get_state())
    ctx.redecode(last_token, last)


class Profiler:
    """Exclusive time per context call, collected only while `active`."""

    def __init__(self, ctx, sync) -> None:
        self.ctx, self.sync = ctx, sync
        self.active = False
        self.stack: list[float] = []  # time nested calls took, one entry per open call
        self.turn: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        for name in CALLS:
            if hasattr(ctx, name):
                setattr(ctx, name, self._wrap(name, getattr(ctx, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                spent = time.perf_counter() - start
                nested = self.stack.pop()
                self.turn[name] += spent - nested
                self.counts[name] += 1
                if self.stack:
                    self.stack[-1] += spent
        return timed


def device_sync(engine: Engine):
    if engine.info.backend == "hf":
        return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    import llama_cpp

    return lambda: llama_cpp.llama_synchronize(engine.ctx.ptr)


def run(label: str, level: str, ccm: bool, users: list[str], args, variant: str) -> dict:
    compressor = (args.compressor or True) if ccm else False
    engine = Engine.load(args.model, compression=level, device=args.device, n_ctx=4096,
                         compressor=compressor, backend=args.backend)
    if ccm and engine.compression.method == "window":
        engine.close()
        raise SystemExit("no compressor for the default model: train or reinstall one")
    ctx = engine.ctx
    if variant == "before":
        ctx.compact = lambda last_token: legacy_compact(ctx, last_token)
    if variant in ("before", "toggle"):
        ctx.adapter_beside = False
    prof = Profiler(ctx, device_sync(engine))
    conv = engine.new_conversation()
    original = conv.policy.after_turn
    policy_s: list[float] = []
    per_turn: list[dict[str, float]] = []

    def timed(memory) -> None:
        prof.turn.clear()
        prof.active = True
        start = time.perf_counter()
        try:
            original(memory)
            prof.sync()
        finally:
            prof.active = False
        policy_s.append(time.perf_counter() - start)
        per_turn.append(dict(prof.turn))

    conv.policy.after_turn = timed  # type: ignore[method-assign]
    turn_s = []
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for user in users:
        start = time.perf_counter()
        for _ in conv.send(user, params):
            pass
        _ = conv.last_reply  # the turn ends (and the policy runs) here at the latest
        turn_s.append(time.perf_counter() - start - policy_s[-1])
    conv.next_token_logits()  # the header decoded; then the last cell again, as a restore does
    live = conv.next_token_logits()
    restored = engine.restore_conversation(conv.save_state())
    restore_diff = float(abs(restored.next_token_logits() - live).max())
    view = conv.memory_view()
    engine.close()
    calls = {name: 1000 * statistics.median(t.get(name, 0.0) for t in per_turn)
             for name in CALLS if any(name in t for t in per_turn)}
    turn = statistics.median(turn_s)
    policy = statistics.median(policy_s)
    return {"level": label, "variant": variant, "method": engine.compression.method,
            "turns": len(users), "turn_s_median": turn, "policy_ms_median": 1000 * policy,
            "policy_ms_max": 1000 * max(policy_s), "share_median": policy / turn,
            "share_max": max(p / t for p, t in zip(policy_s, turn_s, strict=True)),
            "calls_ms_median": calls, "restore_max_abs": restore_diff,
            "held": len(view.tokens), "memory_tokens": list(view.tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("llamacpp", "hf"), default="llamacpp")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model", type=Path, default=None,
                        help="a GGUF or model folder (default: the embedded default model)")
    parser.add_argument("--compressor", type=Path, default=None,
                        help="the model's compressor folder (default: the one found for it)")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--configs", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--variants", default="after",
                        help="comma-separated, of before, toggle, after (llama.cpp; see above)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CCM_CHAT_MEMORYBANK", DATA)), help="the MemoryBank folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/turn_profile.json"))
    args = parser.parse_args()
    users = user_turns(args.data)[: args.turns]
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else None
    variants = [v.strip() for v in args.variants.split(",")]
    if not set(variants) <= {"before", "toggle", "after"}:
        parser.error("--variants takes before, toggle and after")
    rows = []
    for label, level, ccm in configs():
        if wanted is not None and label not in wanted:
            continue
        for variant in variants:
            row = run(label, level, ccm, users, args, variant)
            rows.append(row)
            calls = ", ".join(f"{k} {v:.1f}" for k, v in row["calls_ms_median"].items() if v)
            print(f"{label:20} {variant:6} turn {row['turn_s_median'] * 1000:6.1f} ms, work "
                  f"{row['policy_ms_median']:6.1f} / {row['policy_ms_max']:6.1f} ms "
                  f"({100 * row['share_median']:.1f} % / {100 * row['share_max']:.1f} %), "
                  f"restore diff {row['restore_max_abs']:.2g}; {calls}", flush=True)
    for label in dict.fromkeys(r["level"] for r in rows):
        same = [r for r in rows if r["level"] == label]
        for r in same[1:]:  # the variants keep the same memory
            r["same_memory_as_first"] = r["memory_tokens"] == same[0]["memory_tokens"]
    for r in rows:
        del r["memory_tokens"]
    print("| level | variant | turn ms | after-turn ms (median / max) | share (median / max) | "
          "where it goes (median ms) | restore max diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        calls = ", ".join(f"{k} {v:.1f}" for k, v in r["calls_ms_median"].items() if v >= 0.05)
        print(f"| {r['level']} | {r['variant']} | {1000 * r['turn_s_median']:.1f} | "
              f"{r['policy_ms_median']:.1f} / {r['policy_ms_max']:.1f} | "
              f"{100 * r['share_median']:.1f} % / {100 * r['share_max']:.1f} % | {calls} | "
              f"{r['restore_max_abs']:.2g} |")
    write_result(args.out, args.device, {"backend": args.backend, "rows": rows})


if __name__ == "__main__":
    main()
