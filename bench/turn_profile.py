"""Where the per-turn memory work goes, call by call, against the turn itself, per level.

Each level chats the same MemoryBank user turns (greedy replies) as bench/turn_overhead.py
does; during the policy's after-turn work every call on the back end's context (decode,
<COMP> embeddings, adapter toggles, remove, shift, compaction, the state round trip, merge)
is timed exclusively (a nested call's time is its own, not its caller's), with the device
synchronized at each call's end so GPU time lands on the call that queued it (the second
context's calls, llama.cpp's, are named `beside.*`). Variants, side by side in one run:
`before`, the compaction as it was before issue 16 (a round trip through Python bytes after
every edit, holes or not) with the adapter toggled in place (llama.cpp); `toggle`, today's
compaction with the adapter toggled in place (each toggle makes llama.cpp re-reserve its
scheduler; llama.cpp); `beside`, the <COMP> slots decoded in a second context that keeps the
adapter on (llama.cpp), the verbatim text after new slots decoded again at once and old
groups evicted in a step of their own, as the first three all do; `shift`, that text
decoded with the next message (on a CPU too, where the app decodes it at once: see
engine.backend.Context.batches_cheaply) and old groups dropped in the compression's step, with
llama.cpp's position shift moving the cells; `pinned`, the cells moved in host memory on the
state's way back (engine.llama_state), but always those after a gap, down (positions from 0,
as before issue 16's third stop); `after`, the code as it is: the side of a gap with fewer
cells moves (LlamaContext._base: a window eviction turns the 4 sink keys, not the window's);
`per-layer`, the code as it is but with keys turned one layer at a time and the cache zeroed
at every state load (the code of issue 16's third stop).
On hf: `beside` (the text decoded again at once), `eager-rows` (the code as it is, but its
<COMP> rows run eagerly, not from a captured CUDA graph) and `after`.
As the text moves into the next turn's prefill, the table shows the prefill and the turn
with the after-turn work (`total`) too. `late` is the median over the last third of the
turns (a level whose slots reached their cap drops a group every turn there).
Each run ends with save -> restore checked exact (next-token logits of the live and the
restored conversation), and each variant's memory is compared with the first's of its level:
the same tokens, and the KL of its next-token distribution from the first's. With --forced
the replies are the data's (teacher forcing), so every variant holds the same text and that
compares how the cells were moved; the turn is then its prefill. Prints a table and writes
JSON.

    python bench/turn_profile.py --backend llamacpp --device gpu \\
        --variants before,toggle,beside,after --out bench/results/turn_profile_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from importlib.resources.abc import Traversable
from pathlib import Path


def _backend_arg() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--backend" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return ""


if _backend_arg() == "hf":  # torch before llama_cpp, which the engine imports first
    import torch

from ccm_chat.engine import Engine, SamplingParams  # noqa: E402  isort: skip
from ccm_chat.training.data import default_data_dir, read_dialogue  # noqa: E402  isort: skip
from ccm_chat.engine.kv_memory import KVMemory  # noqa: E402  isort: skip
import numpy as np  # noqa: E402  isort: skip  (after llama_cpp: first, it segfaults on the GPU host)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from length import configs  # noqa: E402  isort: skip
from machine import write_result  # noqa: E402  isort: skip

DATA = default_data_dir() / "memorybank_en"  # the copy shipped in the package

CALLS = ("decode", "decode_embeddings", "slots_over_text", "_copy_state", "_use_adapter",
         "remove", "shift", "compact", "_round_trip", "_apply_shift", "redecode", "merge_slots",
         "get_state", "set_state")
VARIANTS = ("before", "toggle", "beside", "shift", "pinned", "per-layer", "after")
HF_VARIANTS = ("beside", "eager-rows", "after")


def exchanges(data: Traversable) -> list[tuple[str, str]]:
    """MemoryBank's (user turn, reply) pairs in order (as bench/resume.py reads them, without
    its imports of the app and storage, which a GPU host need not have)."""
    text = read_dialogue(data, "memory_bank_en.json")
    if text is None:
        raise SystemExit(f"No memory_bank_en.json(.gz) in {data}: pass --data.")
    bank = json.loads(text)
    return [(t["query"], t.get("response", "")) for user in bank.values()
            for day in user["history"].values() for t in day]


def softmax(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits.astype(np.float64) - logits.max())
    return p / p.sum()


def memory_cell(row: dict) -> str:
    if "same_memory_as_first" not in row:
        return "(first)"
    return f"{'same' if row['same_memory_as_first'] else 'differs'} ({row['kl_from_first']:.2g})"


def compare_memories(rows: list[dict]) -> None:
    """Each variant's memory against the first variant's of its level: the same tokens, and
    (for teacher-forced chats, where every variant holds the same text) how far its
    next-token distribution is from the first's (KL, nats)."""
    for label in dict.fromkeys(r["level"] for r in rows):
        same = [r for r in rows if r["level"] == label]
        first = softmax(same[0]["next_logits"])
        for r in same[1:]:
            r["same_memory_as_first"] = r["memory_tokens"] == same[0]["memory_tokens"]
            p = softmax(r["next_logits"])
            r["kl_from_first"] = float(np.sum(first * (np.log(first) - np.log(p))))
    for r in rows:
        del r["memory_tokens"], r["next_logits"]


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
        self._timed: set[int] = set()
        self.time_calls(ctx, "")
        if hasattr(ctx, "_beside_for"):  # llama.cpp's second context, timed once it exists
            make = ctx._beside_for

            def beside_for(*args, **kwargs):
                beside = make(*args, **kwargs)
                self.time_calls(beside, "beside.")
                return beside

            ctx._beside_for = beside_for

    def time_calls(self, ctx, prefix: str) -> None:
        if id(ctx) in self._timed:
            return
        self._timed.add(id(ctx))
        for name in CALLS:
            if hasattr(ctx, name):
                setattr(ctx, name, self._wrap(prefix + name, getattr(ctx, name), ctx))

    def _wrap(self, name, fn, ctx):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync(ctx)
                spent = time.perf_counter() - start
                nested = self.stack.pop()
                self.turn[name] += spent - nested
                self.counts[name] += 1
                if self.stack:
                    self.stack[-1] += spent
        return timed


def device_sync(engine: Engine):
    """A function of a context that waits for the work queued on it."""
    if engine.info.backend == "hf":
        cuda = torch.cuda.is_available()
        return lambda ctx: torch.cuda.synchronize() if cuda else None
    import llama_cpp

    return lambda ctx: llama_cpp.llama_synchronize(ctx.ptr)


def run(label: str, level: str, ccm: bool, chat: list[tuple[str, str]], args,
        variant: str) -> dict:
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
    llama = engine.info.backend == "llamacpp"
    if variant not in ("pinned", "per-layer", "after") and llama:
        ctx.moves_on_host = False
    kind = type(ctx)
    patched = {}  # (class, name): what it was, put back at the end
    if variant == "pinned":  # the cells after a gap move down, positions stay from 0
        patched[kind, "_base_step"] = lambda self, start, end, drop, on_host, room: 0
    if variant == "per-layer":
        from ccm_chat.engine.llama_state import SeqState
        turn_rows, clear = SeqState._turn_rows, kind.clear
        patched[SeqState, "_turn_rows"] = lambda self, blocks, *rest: [
            turn_rows(self, [block[i:i + 1]], *rest) for block in blocks
            for i in range(len(block))]
        patched[kind, "clear"] = lambda self, data=True: clear(self, True)
    for (owner, name), replacement in list(patched.items()):
        patched[owner, name] = getattr(owner, name)
        setattr(owner, name, replacement)
    if variant == "eager-rows":
        ctx.row_graphs = False
    deferred = ("shift", "pinned", "per-layer", "after", "eager-rows")
    ctx.batches_cheaply = variant in deferred  # the text waits, on a CPU too
    conv = engine.new_conversation()
    if variant not in deferred:  # old groups evicted in a step of their own
        memory = conv.memory
        memory.compress = (  # type: ignore[method-assign]
            lambda cells=None, merge=False, max_slots=None:
            KVMemory.compress(memory, cells, merge))
    original = conv.policy.after_turn
    policy_s: list[float] = []
    per_turn: list[dict[str, float]] = []

    def timed(memory) -> None:
        prof.turn.clear()
        prof.active = True
        start = time.perf_counter()
        try:
            original(memory)
            prof.sync(ctx)
        finally:
            prof.active = False
        policy_s.append(time.perf_counter() - start)
        per_turn.append(dict(prof.turn))

    conv.policy.after_turn = timed  # type: ignore[method-assign]
    turn_s, prefill_s, reply_tokens = [], [], []
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for user, reply in chat:
        start = time.perf_counter()
        if args.forced:  # the data's reply, so every variant holds the same text
            conv.add_turn("user", user)
            prefill_s.append(time.perf_counter() - start)
            conv.add_turn("assistant", reply)
        else:
            for _ in conv.send(user, params):
                pass
            stats = conv.last_reply  # the turn ends (and the policy runs) here at the latest
            prefill_s.append(stats.prefill_seconds)
            reply_tokens.append(stats.tokens)
        turn_s.append(time.perf_counter() - start - policy_s[-1])
    conv.next_token_logits()  # the header decoded; then the last cell again, as a restore does
    live = conv.next_token_logits()
    restored = engine.restore_conversation(conv.save_state())
    restore_diff = float(abs(restored.next_token_logits() - live).max())
    view = conv.memory_view()
    engine.close()
    for (owner, name), original in patched.items():
        setattr(owner, name, original)
    calls = {name: 1000 * statistics.median(t.get(name, 0.0) for t in per_turn)
             for name in dict.fromkeys(k for t in per_turn for k in t)}
    turn = statistics.median(turn_s)
    policy = statistics.median(policy_s)
    late = len(chat) - len(chat) // 3
    late_share = statistics.median(p / t for p, t in zip(policy_s[late:], turn_s[late:],
                                                         strict=True))
    return {"level": label, "variant": variant, "method": engine.compression.method,
            "turns": len(chat), "forced": args.forced, "turn_s_median": turn,
            "reply_tokens_median": statistics.median(reply_tokens) if reply_tokens else None,
            "policy_ms_median": 1000 * policy,
            "prefill_ms_median": 1000 * statistics.median(prefill_s),
            "total_ms_median": 1000 * statistics.median(
                t + p for t, p in zip(turn_s, policy_s, strict=True)),
            "policy_ms_max": 1000 * max(policy_s), "share_median": policy / turn,
            "share_late_median": late_share,
            "share_max": max(p / t for p, t in zip(policy_s, turn_s, strict=True)),
            "calls_ms_median": calls, "restore_max_abs": restore_diff,
            "held": len(view.tokens), "memory_tokens": list(view.tokens),
            "next_logits": live}


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
                        help=f"comma-separated, of {', '.join(VARIANTS)} (see above)")
    memorybank = os.environ.get("CCM_CHAT_MEMORYBANK")
    parser.add_argument("--data", type=Path, default=Path(memorybank) if memorybank else DATA,
                        help="the MemoryBank folder (default: the copy in the package)")
    parser.add_argument("--forced", action="store_true",
                        help="teacher-forced: the data's replies, not generated ones (the "
                             "variants' memories then compare token for token; the turn is "
                             "its prefill)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/turn_profile.json"))
    args = parser.parse_args()
    chat = exchanges(args.data)[: args.turns]
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else None
    variants = [v.strip() for v in args.variants.split(",")]
    if args.backend == "hf" and not set(variants) <= set(HF_VARIANTS):
        parser.error(f"on hf, --variants takes {', '.join(HF_VARIANTS)}")
    if args.backend != "hf" and not set(variants) <= set(VARIANTS):
        parser.error(f"--variants takes {', '.join(VARIANTS)}")
    rows = []
    for label, level, ccm in configs():
        if wanted is not None and label not in wanted:
            continue
        for variant in variants:
            row = run(label, level, ccm, chat, args, variant)
            rows.append(row)
            calls = ", ".join(f"{k} {v:.1f}" for k, v in row["calls_ms_median"].items() if v)
            replies = row["reply_tokens_median"]
            print(f"{label:20} {variant:6} turn {row['turn_s_median'] * 1000:6.1f} ms"
                  f"{f' ({replies:g} tokens)' if replies is not None else ''}, work "
                  f"{row['policy_ms_median']:6.1f} / {row['policy_ms_max']:6.1f} ms "
                  f"({100 * row['share_median']:.1f} % / {100 * row['share_max']:.1f} %, "
                  f"late {100 * row['share_late_median']:.1f} %), "
                  f"restore diff {row['restore_max_abs']:.2g}; {calls}", flush=True)
    compare_memories(rows)
    print("| level | variant | turn ms (prefill) | after-turn ms (median / max) | total ms | "
          "share (median / late / max) | where it goes (median ms) | restore max diff | "
          "memory as the first row's (KL) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        calls = ", ".join(f"{k} {v:.1f}" for k, v in r["calls_ms_median"].items() if v >= 0.05)
        print(f"| {r['level']} | {r['variant']} | {1000 * r['turn_s_median']:.1f} "
              f"({r['prefill_ms_median']:.1f}) | "
              f"{r['policy_ms_median']:.1f} / {r['policy_ms_max']:.1f} | "
              f"{r['total_ms_median']:.1f} | {100 * r['share_median']:.1f} % / "
              f"{100 * r['share_late_median']:.1f} % / {100 * r['share_max']:.1f} % | {calls} | "
              f"{r['restore_max_abs']:.2g} | {memory_cell(r)} |")
    write_result(args.out, args.device, {"backend": args.backend, "rows": rows})


if __name__ == "__main__":
    main()
