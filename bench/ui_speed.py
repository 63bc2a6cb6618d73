"""Decode speed in the terminal UI against the engine alone, side by side in one run.

The UI streams each piece into a Markdown widget on its own thread while the engine decodes
in a worker; this measures what that costs: the same greedy replies, first from the engine
with nothing else running, then typed into the real Textual app (headless, its test pilot)
with the same engine behind it, once with the queued pieces written out every 0.01 s (about
a piece at a time at these speeds, as the app did before it batched) and once every
ChatPane.reply_flush_s (the app as it is), then from the engine alone again. The speed is
the engine's own decode clock (ReplyStats.tokens_per_second, what the status bar shows).
Target: the UI at 90 % or more.

    python bench/ui_speed.py --out bench/results/ui_speed_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import write_result  # noqa: E402
from ccm_chat.app.service import ChatService  # noqa: E402
from ccm_chat.app.settings import Settings  # noqa: E402
from ccm_chat.engine import Engine, SamplingParams  # noqa: E402
from ccm_chat.storage import Store  # noqa: E402
from ccm_chat.ui.app import ChatApp  # noqa: E402
from ccm_chat.ui.widgets.chat_pane import ChatPane  # noqa: E402
from ccm_chat.ui.widgets.prompt_input import PromptInput  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "Explain how a bicycle works.",
           "Give me three tips for better sleep.", "Describe a good morning routine."]


def alone(engine: Engine, max_tokens: int) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = []
    for prompt in PROMPTS:
        reply = engine.new_conversation().send(prompt, params)
        "".join(reply)
        out.append(reply.stats.tokens_per_second)
    return out


async def in_ui(engine: Engine, max_tokens: int, db: Path, flush_s: float) -> list[float]:
    ChatPane.reply_flush_s = flush_s
    store = Store(db)
    Settings(temperature=0.0, max_tokens=max_tokens, context_size=engine.n_ctx).save(store)
    service = ChatService(store, engine_factory=lambda settings, model: engine)
    app = ChatApp(service)
    speeds = []
    async with app.run_test(size=(120, 36)) as pilot:
        for prompt in PROMPTS:
            await app.action_new_chat()
            await pilot.pause(0.2)
            app.query_one(PromptInput).focus()
            app.query_one(PromptInput).insert(prompt)
            await pilot.press("enter")
            started = time.time()
            while time.time() - started < 300:
                await pilot.pause(0.05)
                if time.time() - started > 0.5 and not app.generating:
                    break
            conv = service.list_conversations()[0]
            speeds.append(service.status(conv.id).tokens_per_second or 0.0)
        await pilot.press("ctrl+q")
    store.close()
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flush", type=float, default=ChatPane.reply_flush_s,
                    help="the batched run's seconds between screen updates")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ui_speed.json"))
    args = ap.parse_args()
    with Engine.load(n_ctx=2048, device=args.device) as engine, \
            tempfile.TemporaryDirectory() as tmp:
        batched = args.flush
        engine_alone = alone(engine, args.max_tokens)
        per_piece = asyncio.run(in_ui(engine, args.max_tokens, Path(tmp) / "a.db", 0.01))
        ui = asyncio.run(in_ui(engine, args.max_tokens, Path(tmp) / "b.db", batched))
        engine_again = alone(engine, args.max_tokens)  # bracket the UI runs: load drifts
    ref = statistics.median(engine_alone + engine_again)
    row = {"engine_alone_tok_s": [round(x, 1) for x in engine_alone + engine_again],
           "ui_per_piece_tok_s": [round(x, 1) for x in per_piece],
           "ui_tok_s": [round(x, 1) for x in ui], "flush_s": batched,
           "engine_median": round(ref, 1),
           "ui_per_piece_median": round(statistics.median(per_piece), 1),
           "ui_median": round(statistics.median(ui), 1),
           "ui_per_piece_over_engine": round(statistics.median(per_piece) / ref, 3),
           "ui_over_engine": round(statistics.median(ui) / ref, 3)}
    print("| where | median tok/s | of the engine's | runs |\n|---|---|---|---|")
    print(f"| engine alone | {row['engine_median']} | | {row['engine_alone_tok_s']} |")
    print(f"| in the UI, written every 0.01 s | {row['ui_per_piece_median']} | "
          f"{row['ui_per_piece_over_engine']:.0%} | {row['ui_per_piece_tok_s']} |")
    print(f"| in the UI, batched ({batched:g} s) | {row['ui_median']} | "
          f"{row['ui_over_engine']:.0%} | {row['ui_tok_s']} |")
    write_result(args.out, args.device, {"max_tokens": args.max_tokens, **row})


if __name__ == "__main__":
    main()
