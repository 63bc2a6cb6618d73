"""What saving a conversation's memory after a reply costs, and opening it again, through the
SQLite store: the store as it was (4 KiB pages, every freed page given back after each save)
against the store as it is (16 KiB pages in a new file, the pruned state's pages kept free for
the next save), side by side in one process on the same states.

For each transcript length an `off` conversation of MemoryBank exchanges is built once on the
default model (its real KV state, the largest a level makes); then each variant, in a new
database, saves that conversation's memory `--saves` times as replies would (the store
prunes the state before each time), and opens it (`latest_memory_state` and the engine's
restore) `--opens` times. Prints a table and writes JSON.

    python bench/state_save.py --lengths 2000,6000 --out bench/results/state_save_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ccm_chat.storage.store as store_module
from ccm_chat.app.resume import save_memory
from ccm_chat.engine import Engine
from ccm_chat.storage import Store
from ccm_chat.storage.store import database_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from resume import DATA, exchanges, fill  # noqa: E402

VARIANTS = {"before": (4 << 10, False), "after": (16 << 10, True)}  # page size, keep pages


def open_store(path: Path, variant: str) -> Store:
    page, keep = VARIANTS[variant]
    store_module.PAGE_SIZE = page
    store = Store(path)
    if not keep:
        reclaim = store._reclaim
        store._reclaim = lambda keep=0: reclaim(0)  # type: ignore[method-assign]
    return store


def measure(engine: Engine, conv, variant: str, folder: Path, saves: int, opens: int) -> dict:
    store = open_store(folder / f"{variant}.db", variant)
    record = store.create_conversation("bench")
    message = None
    for m in conv.messages:  # the transcript the memory was made of
        message = store.add_message(record.id, m.role, m.content)
    save_s = []
    for _ in range(saves):
        start = time.perf_counter()
        save_memory(store, engine, record.id, message.id, conv)
        save_s.append(time.perf_counter() - start)
    open_s = []
    for _ in range(opens):
        start = time.perf_counter()
        state = store.latest_memory_state(record.id)
        copy = engine.restore_conversation(state.blob)
        engine.activate(copy)
        open_s.append(time.perf_counter() - start)
        engine.release(copy)
    row = {"variant": variant, "page_size": store.db.execute("PRAGMA page_size").fetchone()[0],
           "state_bytes": state.size, "save_s": save_s, "save_s_median":
           statistics.median(save_s[1:] or save_s), "open_s_median": statistics.median(open_s),
           "file_bytes": database_size(store.path), "free_bytes": store.size_on_disk()[1]}
    store.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--lengths", default="2000,6000")
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--opens", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help="the MemoryBank folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/state_save.json"))
    args = parser.parse_args()
    engine = Engine.load(compression="off", device=args.device, n_ctx=8192)
    pairs = exchanges(args.data)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        folder = Path(tempfile.mkdtemp(prefix="ccm-state-save-"))
        scratch = Store(folder / "transcript.db")
        conv_id = fill(scratch, engine, length, pairs)
        conv = engine.new_conversation(system=None, compression=engine.compression_for("off"))
        for m in scratch.messages(conv_id):
            conv.add_turn(m.role, m.content)
        scratch.close()
        for variant in VARIANTS:
            row = {"transcript_tokens": length, **measure(engine, conv, variant, folder,
                                                           args.saves, args.opens)}
            rows.append(row)
            print(f"{length:>6} tokens {variant:6}: state {row['state_bytes'] / 1e6:7.1f} MB, "
                  f"save {row['save_s_median']:.2f} s, open {row['open_s_median']:.2f} s, "
                  f"file {row['file_bytes'] / 1e6:7.1f} MB", flush=True)
        engine.release(conv)
    engine.close()
    print("| transcript tokens | state MB | variant | page | save s (median) | open s (median) "
          "| file MB | free MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transcript_tokens']:,} | {r['state_bytes'] / 1e6:,.1f} | {r['variant']} | "
              f"{r['page_size'] >> 10} KiB | {r['save_s_median']:.2f} | {r['open_s_median']:.2f} "
              f"| {r['file_bytes'] / 1e6:,.1f} | {r['free_bytes'] / 1e6:,.1f} |")
    write_result(args.out, args.device, {"rows": rows})


if __name__ == "__main__":
    main()
