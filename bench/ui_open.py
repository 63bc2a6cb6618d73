"""How long the chat UI takes to show a long chat: start to first paint of its end.

A conversation of --messages messages (user questions and Markdown replies with a code block,
as a real chat has) is opened at launch (as `ccm-chat --conversation N`) in the real Textual
app, headless, on the scripted engine (the model is not what is measured). The time runs from
starting the app to the first frame in which the transcript shows its last message scrolled
to the end; it is measured with the transcript mounting one page (the app) and, for
comparison, every message (as before issue 14). Medians of --runs.

    python bench/ui_open.py --messages 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ccm_chat.app.service import ChatService  # noqa: E402
from ccm_chat.storage import Store  # noqa: E402
from ccm_chat.ui import app as ui_app  # noqa: E402
from ccm_chat.ui.widgets import chat_view  # noqa: E402
from tests.conftest import scripted_factory  # noqa: E402
from tests.scripted_engine import ScriptedEngine  # noqa: E402

REPLY = ("Here is one way to do it, step by step:\n\n1. Read the file.\n2. Count the words.\n\n"
         "```python\nwith open(path) as f:\n    print(len(f.read().split()))\n```\n\n"
         "That prints the **number of words**; for lines use `splitlines()` instead.")


def text_of(i: int) -> str:
    return f"Question {i}: how do I count the words in a file?" if i % 2 == 0 else f"({i}) {REPLY}"


def make_chat(path: Path, n: int) -> int:
    store = Store(path)
    conv = store.create_conversation("Long chat")
    for i in range(n):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", text_of(i))
    store.close()
    return conv.id


async def open_once(path: Path, cid: int, last: str) -> float:
    store = Store(path)
    app = ui_app.ChatApp(ChatService(store, engine_factory=scripted_factory(ScriptedEngine())),
                         conversation_id=cid)
    start = time.perf_counter()
    async with app.run_test(size=(120, 36)) as pilot:
        view = app.query_one(chat_view.ChatView)
        while True:
            boxes = view.boxes
            if (boxes and boxes[-1].content == last and view.max_scroll_y > 0
                    and view.scroll_y == view.max_scroll_y):
                break
            await pilot.pause(0.005)
        seconds = time.perf_counter() - start
    store.close()
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        cid = make_chat(path, args.messages)
        page = chat_view.PAGE
        for label, mounted in ((f"one page ({page} messages)", page),
                               (f"every message ({args.messages})", args.messages)):
            chat_view.PAGE = mounted
            times = [await open_once(path, cid, text_of(args.messages - 1))
                     for _ in range(args.runs)]
            print(f"{args.messages:,} messages, mounting {label}: first paint of the end in "
                  f"{statistics.median(times):.2f} s (median of {args.runs}: "
                  f"{', '.join(f'{t:.2f}' for t in times)})")
        chat_view.PAGE = page


if __name__ == "__main__":
    asyncio.run(main())
