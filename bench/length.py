"""Memory and speed against conversation length, every level and method side by side.

One long conversation (held-apart chitchat-dataset exchanges, one after another) is fed
exchange by exchange (teacher-forced) to an engine per configuration: off, and each level
with the training-free sink + window (K cache quantized) and with the shipped CCM
compressor. After every exchange the KV bytes held are recorded; at exchanges 1, 10, 50, 100,
200 a copy of the conversation (restored from its saved state) answers a question, and the
time to its first token and its decode speed are measured, next to llama-cpp-python's own
`Llama.eval` + `Llama.sample` loop on the same tokens the uncompressed conversation holds
(the reference decode speed at that length). Prints tables, writes JSON, draws two plots.

    python bench/length.py --device cpu --out bench/results/length_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from llama_cpp import Llama

from engine import ContextFullError, Engine, SamplingParams
from engine.ccm.data import chitchat_pool, load_chitchat

CHECKPOINTS = (1, 10, 50, 100, 200)
QUESTION = "Can you remind me what we talked about at the start?"
REPLY_TOKENS = 32


def exchanges(n: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for conv in chitchat_pool(load_chitchat(), held_out=True):
        pairs += conv
        if len(pairs) >= n:
            return pairs[:n]
    return pairs


def configs() -> list[tuple[str, str, bool]]:
    """(label, level, with the compressor)."""
    out = [("off", "off", False)]
    for level in ("light", "balanced", "aggressive"):
        out += [(f"{level}: window", level, False), (f"{level}: ccm", level, True)]
    return out


def probe(engine: Engine, conv) -> dict:
    """Time to first token and decode speed of a reply from a copy of `conv`."""
    copy = engine.restore_conversation(conv.save_state())
    start = time.perf_counter()
    pieces = copy.send(QUESTION, SamplingParams(temperature=0.0, max_tokens=REPLY_TOKENS))
    next(pieces)
    ttft = time.perf_counter() - start
    for _ in pieces:
        pass
    reply = copy.last_reply
    engine.release(copy)
    return {"ttft_s": ttft, "decode_tok_s": reply.tokens_per_second, "tokens": reply.tokens}


def reference(llm: Llama, tokens: list[int]) -> float:
    llm.reset()
    llm.eval(tokens)
    start = time.perf_counter()
    for _ in range(REPLY_TOKENS):
        llm.eval([llm.sample(temp=0.0)])
    return REPLY_TOKENS / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    pairs = exchanges(max(CHECKPOINTS))
    threads = os.cpu_count() or 1
    curves, probes = {}, []
    for label, level, ccm in configs():
        engine = Engine.load(n_ctx=args.n_ctx, compression=level, device=args.device,
                             compressor=ccm, n_threads=threads)
        if ccm and engine.compression.method == "window":
            engine.close()
            continue
        conv = engine.new_conversation()
        curve = []
        started = time.perf_counter()
        for t, (user, assistant) in enumerate(pairs, 1):
            try:
                conv.add_turn("user", user)
                conv.add_turn("assistant", assistant)
            except ContextFullError:
                break
            stats = conv.stats()
            curve.append({"turn": t, "bytes": stats.memory_bytes, "held": stats.memory_tokens,
                          "full_tokens": stats.full_context_tokens})
            if t in CHECKPOINTS and (label == "off" or level == "balanced"):
                row = {"config": label, "turn": t, "held": stats.memory_tokens,
                       "full_tokens": stats.full_context_tokens, **probe(engine, conv)}
                if label == "off":
                    row["reference_tok_s"] = reference(ref_llm(engine, args, threads),
                                                       conv._kv_tokens)
                probes.append(row)
                print(f"{label:>20} turn {t:>3}: held {stats.memory_tokens:>5} "
                      f"ttft {row['ttft_s']:.3f} s  decode {row['decode_tok_s']:.1f} tok/s"
                      + (f"  (llama-cpp-python {row['reference_tok_s']:.1f})"
                         if "reference_tok_s" in row else ""), flush=True)
        curves[label] = curve
        print(f"{label:>20}: {len(curve)} exchanges in {time.perf_counter() - started:.0f} s, "
              f"{curve[-1]['bytes'] / 1e6:.1f} MB held at the end", flush=True)
        engine.close()
    return {"command": " ".join(sys.argv), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": threads,
            "device": args.device, "n_ctx": args.n_ctx, "curves": curves, "probes": probes}


_REF: dict[str, Llama] = {}


def ref_llm(engine: Engine, args: argparse.Namespace, threads: int) -> Llama:
    if "llm" not in _REF:
        _REF["llm"] = Llama(str(engine.info.model_path), n_ctx=args.n_ctx, n_threads=threads,
                            n_gpu_layers=-1 if args.device == "gpu" else 0, verbose=False)
    return _REF["llm"]


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in result["curves"].items():
        ax.plot([c["turn"] for c in curve], [c["bytes"] / 1e6 for c in curve], label=label,
                linestyle="--" if "window" in label else "-")
    ax.set_yscale("log")
    ax.set_xlabel("exchanges")
    ax.set_ylabel("KV memory held (MB, log)")
    ax.set_title(f"Memory vs conversation length ({result['device']})")
    ax.legend(fontsize=8)
    memory = out.with_name(out.stem + "_memory.png")
    fig.tight_layout()
    fig.savefig(memory, dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(p["config"] for p in result["probes"]):
        rows = [p for p in result["probes"] if p["config"] == label]
        ax.plot([p["turn"] for p in rows], [p["decode_tok_s"] for p in rows], "o-",
                label=label)
    refs = [p for p in result["probes"] if "reference_tok_s" in p]
    ax.plot([p["turn"] for p in refs], [p["reference_tok_s"] for p in refs], "k:",
            label="llama-cpp-python loop, uncompressed")
    ax.set_xlabel("exchanges")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode speed vs conversation length ({result['device']})")
    ax.legend(fontsize=8)
    speed = out.with_name(out.stem + "_speed.png")
    fig.tight_layout()
    fig.savefig(speed, dpi=110)
    return [memory, speed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("bench/results/length_cpu.json"))
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| config | turn | held | ttft s | decode tok/s | llama-cpp-python tok/s |")
    print("|---|---|---|---|---|---|")
    for p in result["probes"]:
        ref = f"{p['reference_tok_s']:.1f}" if "reference_tok_s" in p else ""
        print(f"| {p['config']} | {p['turn']} | {p['held']} | {p['ttft_s']:.3f} | "
              f"{p['decode_tok_s']:.1f} | {ref} |")
    for path in plot(result, args.out):
        print("plot:", path)


if __name__ == "__main__":
    main()
