"""Resume: time from opening an old conversation to the first token of the next reply.

Restored from the SQLite memory state vs rebuilt by re-reading the transcript, at several
transcript lengths, for compression off and balanced, side by side in one process. The
transcripts are MemoryBank exchanges (assets/dialogue/memorybank_en), repeated to length.
Prints a table and writes JSON.

    python bench/resume.py --device cpu --out bench/results/resume_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from importlib.resources.abc import Traversable
from pathlib import Path

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.engine import Engine, SamplingParams
from ccm_chat.storage import Store
from ccm_chat.training.data import default_data_dir, read_dialogue

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from plots import line_chart  # noqa: E402  (a sibling script module)

DATA = default_data_dir() / "memorybank_en"  # the copy shipped in the package
QUESTION = "What did we talk about first?"


def exchanges(data: Traversable = DATA) -> list[tuple[str, str]]:
    text = read_dialogue(data, "memory_bank_en.json")
    if text is None:
        raise SystemExit(f"No memory_bank_en.json(.gz) in {data}: pass --data.")
    bank = json.loads(text)
    pairs = []
    for user in bank.values():
        for day in user["history"].values():
            pairs += [(t["query"], t["response"]) for t in day]
    return pairs


def fill(store: Store, engine: Engine, tokens: int, pairs: list[tuple[str, str]]) -> int:
    """A conversation whose transcript is about `tokens` tokens long."""
    conv = store.create_conversation("bench")
    count = 0
    i = 0
    while count < tokens:
        user, reply = pairs[i % len(pairs)]
        i += 1
        store.add_message(conv.id, "user", user)
        store.add_message(conv.id, "assistant", reply)
        count += len(engine.model.tokenize(f"{user}\n{reply}".encode(), False, False)) + 10
    return conv.id


def first_token(service: ChatService, conv_id: int,
                cancel: threading.Event | None = None) -> tuple[float, str, float]:
    """(seconds from open to the first token, how the memory was made, seconds to open);
    setting `cancel` stops a rebuild (RebuildCancelled)."""
    start = time.perf_counter()
    report = service.open(conv_id, cancel=cancel)
    opened = time.perf_counter() - start
    live = service._live[conv_id]
    pieces = live.send(QUESTION, SamplingParams(temperature=0.0, max_tokens=1))
    next(pieces, None)  # a reply may end at once (random weights): its first token was made
    seconds = time.perf_counter() - start
    pieces.close()  # the reply's end (and the policy's after-turn work) is not the first token
    return seconds, report.kind, opened


def fresh(store: Store, settings: Settings, engine: Engine) -> ChatService:
    """A service as a new session has it: nothing live, the engine already loaded."""
    return ChatService(store, settings=settings, engine_factory=lambda s, m: engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--lengths", default="1000,4000,16000,64000")
    parser.add_argument("--ccm-max-length", type=int, default=16000,
                        help="longest transcript rebuilt under CCM (a rebuild replays every "
                             "exchange: minutes past this on a small CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/resume.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="the MemoryBank folder")
    parser.add_argument("--replot", action="store_true", help="only redraw from --out's JSON")
    args = parser.parse_args()
    if args.replot:
        print("plot:", plot(json.loads(args.out.read_text()), args.out))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    pairs = exchanges(args.data)

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="ccm-resume-"))
    for level, ccm in (("off", False), ("balanced", False), ("balanced", True)):
        engine = Engine.load(n_ctx=8192 if level == "off" else 2048, compression=level,
                             device=args.device, compressor=ccm)
        settings = Settings(compression=level, context_size=engine.n_ctx)
        name = f"{level} ({engine.compression.method})" if level != "off" else level
        for length in lengths:
            if ccm and length > args.ccm_max_length:
                continue
            store = Store(tmp / f"{level}-{ccm}-{length}.db")
            conv_id = fill(store, engine, length, pairs)
            row = {"level": name, "transcript_tokens": length, "method":
                   engine.compression.method}
            if level == "off" and length > engine.n_ctx - 64:
                row["note"] = f"does not fit the {engine.n_ctx}-token context without compression"
                rows.append(row)
                store.close()
                continue
            rebuilt, kind, _ = first_token(fresh(store, settings, engine), conv_id)  # saves too
            assert kind == "rebuilt", kind
            restored = []
            for _ in range(args.repeats):
                seconds, kind, opened = first_token(fresh(store, settings, engine), conv_id)
                assert kind == "restored", kind
                restored.append((seconds, opened))
            state = store.latest_memory_state(conv_id)
            row.update(
                rebuild_first_token_s=rebuilt,
                restore_first_token_s=statistics.median(s for s, _ in restored),
                restore_open_s=statistics.median(o for _, o in restored),
                state_bytes=state.size,
                tokens_held=state.tokens_held,
                tokens_seen=state.tokens_seen,
                full_f16_kv_bytes=state.tokens_seen * engine.model.f16_bytes_per_token,
            )
            row["speedup"] = row["rebuild_first_token_s"] / row["restore_first_token_s"]
            rows.append(row)
            store.close()
        engine.close()

    header = (f"{'level':22} {'tokens':>7} {'rebuild→1st tok':>16} {'restore→1st tok':>16} "
              f"{'speedup':>8} {'state MB':>9} {'full KV MB':>11}")
    print(header)
    for r in rows:
        if "note" in r:
            print(f"{r['level']:22} {r['transcript_tokens']:>7} {r['note']}")
            continue
        print(f"{r['level']:22} {r['transcript_tokens']:>7} {r['rebuild_first_token_s']:>15.2f}s "
              f"{r['restore_first_token_s']:>15.3f}s {r['speedup']:>7.0f}x "
              f"{r['state_bytes'] / 1e6:>9.1f} {r['full_f16_kv_bytes'] / 1e6:>11.1f}")
    write_result(args.out, args.device, {
        "device": args.device,
        "command": "python bench/resume.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("data", "replot")),
        "rows": rows,
    }, indent=2)
    print("plot:", plot(json.loads(args.out.read_text()), args.out))


def plot(result: dict, out: Path) -> Path:
    """First-token time against transcript length: restored (solid) vs rebuilt (dashed)."""
    series = {}
    for level in dict.fromkeys(r["level"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["level"] == level and "note" not in r]
        x = [r["transcript_tokens"] for r in rows]
        series[f"{level}: restored"] = (x, [r["restore_first_token_s"] for r in rows], "o-")
        series[f"{level}: rebuilt"] = (x, [r["rebuild_first_token_s"] for r in rows], "x--")
    return line_chart(out.with_suffix(".png"), series, "transcript tokens (log)",
                      "open -> first token, s (log)",
                      f"Resume: restored state vs re-reading the transcript "
                      f"({result['device']})", logx=True, logy=True)


if __name__ == "__main__":
    main()
