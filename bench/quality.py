"""Quality vs memory: does the compressed memory keep what the next turn needs?

On held-apart data only (conversations and recall values the training never saw), one
model, every method side by side on the same episodes:
- next-turn perplexity on chitchat conversations at exchange 4, 8, 16, 32;
- recall accuracy on generated dialogues (a fact, 1-8 exchanges, the question) and on
  LongEval topics ("what was the first topic?"), by likelihood against distractors;
- memory held (slots), bytes, and the ratio full-context tokens / slots.
Methods: none, full, sink + window at the budget of CCM-concat with n slots per exchange,
and each trained compressor given with --compressor (CCM-concat or CCM-merge).

    python bench/quality.py --baselines --window 2 --compressor DIR --device gpu \\
        --out bench/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from ccm_chat.engine.ccm.compressor import Compressor
from ccm_chat.engine.ccm.files import CARD, CompressorFiles
from ccm_chat.training.data import (
    chitchat_pool,
    conversation_episode,
    load_chitchat,
    recall_cases,
)
from ccm_chat.training.evaluate import Memory, longchat_cases, perplexity, recall_accuracy
from ccm_chat.training.recipe import load_for_training, model_tokens

from machine import write_result  # isort: skip  (bench/ is sys.path[0])

TURNS = (4, 8, 16, 32)


def datasets(tok, limit: int, longchat: Path | None, only: list[str] | None = None):
    if only == ["longchat"]:
        if longchat is None:
            raise SystemExit("The longchat set needs --longchat (LongEval's 5_topics.jsonl).")
        return {"longchat": longchat_cases(longchat, tok, limit)}
    held = chitchat_pool(load_chitchat(), held_out=True)
    sets = {f"ppl@{t}": [conversation_episode(tok, pairs, t - 1)
                         for pairs in held if len(pairs) >= t][:limit] for t in TURNS}
    sets["recall"] = list(islice(recall_cases(tok, held, held_out=True, seed=123), limit))
    if longchat is not None and longchat.exists():
        sets["longchat"] = longchat_cases(longchat, tok, limit)
    return {k: v for k, v in sets.items() if not only or k in only}


def evaluate(compressor: Compressor, memory: Memory, sets, label: str, n: int) -> list[dict]:
    rows = []
    bytes_per_slot = kv_bytes_per_token(compressor.model.config)
    for name, cases in sets.items():
        start = time.perf_counter()
        episodes = [getattr(c, "episode", c) for c in cases]
        if name.startswith("ppl"):
            value = perplexity(compressor, episodes, memory)
        else:
            value = recall_accuracy(compressor, cases, memory)
        merge = compressor.method == "merge"
        slots = [memory.slots(e, n, merge) for e in episodes]
        rows.append(result_row(label, n, name, value, episodes, slots, bytes_per_slot,
                               bytes_per_slot, start))
    return rows


def result_row(label: str, n: int, name: str, value: float, episodes: list, slots: list[int],
               bytes_per_slot: float, f16_bytes_per_token: float, start: float) -> dict:
    """One table row (printed as it comes): the ratio is the full context's f16 KV bytes over
    the bytes held, so a quantized cache and fewer cells compare on one axis."""
    held = statistics.mean(slots)
    full = statistics.mean(sum(len(c) for c in e.context) for e in episodes)
    ratio = full * f16_bytes_per_token / (held * bytes_per_slot) if held else None
    print(f"{label:>22} n={n} {name:>9}: {value:.3f}  slots {held:.0f} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return {"method": label, "n": n, "set": name, "value": value, "slots": held,
            "full_tokens": full, "bytes": held * bytes_per_slot, "ratio": ratio,
            "cases": len(episodes)}


def kv_bytes_per_token(config) -> int:
    """f16 K and V over all layers: what a cell costs in llama.cpp's cache."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head * 2


def load_compressor(folder: Path | None, device: str, model: str | None) -> Compressor:
    _, hf, _ = load_for_training(model, device)
    if folder is None:  # baselines: a compressor shell whose LoRA is never switched on
        return Compressor(hf, n_comp=1).to(hf.device)
    card = json.loads((folder / CARD).read_text())
    comp = Compressor(hf, card["n_comp"], card["rank"], card["alpha"], card["method"])
    comp.load_trainable(CompressorFiles.open(folder).weights)
    return comp.to(hf.device)


def table(rows: list[dict]) -> str:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["n"]) for r in rows))
    head = f"| method | n | {' | '.join(sets)} | slots@16 | ratio@16 |"
    lines = [head, "|" + "---|" * (len(sets) + 4)]
    for method, n in keys:
        got = {r["set"]: r for r in rows if (r["method"], r["n"]) == (method, n)}
        cells = [f"{got[s]['value']:.3f}" if s in got else "" for s in sets]
        ref = got.get("ppl@16")
        slots = f"{ref['slots']:.0f}" if ref else ""
        ratio = f"{ref['ratio']:.1f}x" if ref and ref["ratio"] else ""
        lines.append(f"| {method} | {n or ''} | {' | '.join(cells)} | {slots} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", type=Path, action="append", default=[])
    parser.add_argument("--baselines", action="store_true", help="none and full-context rows")
    parser.add_argument("--window", type=int, action="append", default=[],
                        help="a sink+window row at CCM-concat's budget for N slots per exchange")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--limit", type=int, default=100, help="cases per set")
    parser.add_argument("--longchat", type=Path, default=None,
                        help="LongChat's 5_topics.jsonl (LongEval topics): the longchat set")
    parser.add_argument("--sets", default="", help="comma list of sets to run (default all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: list[dict] = []
    started = time.perf_counter()
    if args.baselines or args.window:
        comp = load_compressor(None, args.device, args.model)
        sets = datasets(model_tokens_of(args.model), args.limit, args.longchat,
                        [x for x in args.sets.split(",") if x])
        if args.baselines:
            rows += evaluate(comp, Memory("none"), sets, "none", 0)
            rows += evaluate(comp, Memory("full"), sets, "full", 0)
        for n in args.window:
            rows += evaluate(comp, Memory("window", n), sets, "sink+window", n)
    for folder in args.compressor:
        comp = load_compressor(folder, args.device, args.model)
        sets = datasets(model_tokens_of(args.model), args.limit, args.longchat,
                        [x for x in args.sets.split(",") if x])
        rows += evaluate(comp, Memory("ccm"), sets, f"ccm-{comp.method}", comp.n_comp)
    result = {
        "command": " ".join(sys.argv), "machine": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seconds": time.perf_counter() - started, "rows": rows,
    }
    write_result(args.out, "gpu" if torch.cuda.is_available() else "cpu", result, indent=2)
    print(table(rows))


def model_tokens_of(model: str | None):
    from transformers import AutoTokenizer

    from ccm_chat.engine.hf_weights import converted_dir
    from ccm_chat.engine.models import model_cache_dir, resolve_model_path

    path = resolve_model_path(model, allow_dir=True)
    if path.is_dir():
        return model_tokens(AutoTokenizer.from_pretrained(path))
    converted = converted_dir(path, model_cache_dir())
    if (converted / "tokenizer_config.json").exists():
        return model_tokens(AutoTokenizer.from_pretrained(converted))
    return model_tokens(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


if __name__ == "__main__":
    main()
