"""Memory and speed against conversation length, every level and method side by side.

One long conversation (held-apart chitchat-dataset exchanges, one after another) is fed
exchange by exchange (teacher-forced) to an engine per configuration: off, and each level
with the training-free sink + window (K cache quantized) and with the shipped CCM
compressor. After every exchange the KV bytes held are recorded; at exchanges 1, 10, 50, 100,
200 a copy of the conversation (restored from its saved state) answers a question, and the
time to its first token and its decode speed are measured, next to llama-cpp-python's own
`Llama.eval` + `Llama.sample` loop on the same tokens the uncompressed conversation holds
(the reference decode speed at that length). Prints tables, writes JSON, draws two plots.
`--backend both` runs llama.cpp and then transformers, each in its own process (on a CUDA
host torch must load before llama_cpp, see the README's host notes), and puts their decode
speeds side by side in one table and JSON.

    python bench/length.py --device cpu --out bench/results/length_cpu.json
    python bench/length.py --backend both --device gpu --configs "off,balanced: window" \
        --out bench/results/length_gpu_fast.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING


def _backend_arg() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--backend" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return ""


if _backend_arg() == "hf":  # torch before llama_cpp, which the engine imports first
    import torch  # noqa: F401

from ccm_chat.engine import ContextFullError, Engine, SamplingParams  # noqa: E402
from ccm_chat.training.data import CHITCHAT_ENV, chitchat_pool, load_chitchat  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from plots import line_chart  # noqa: E402  (a sibling script module)

if TYPE_CHECKING:  # the hf run on a CUDA host must not load llama_cpp next to torch
    from llama_cpp import Llama

CHECKPOINTS = (1, 10, 50, 100, 200)
QUESTION = "Can you remind me what we talked about at the start?"
REPLY_TOKENS = 32
REPEATS = 3


def chitchat() -> dict[str, list[str]]:
    """The chitchat conversations: the package's, or a dataset.json named by CCM_CHAT_CHITCHAT
    (a GPU host without the package)."""
    path = os.environ.get(CHITCHAT_ENV)
    if not path:
        return load_chitchat()
    return {cid: [" ".join(u["text"] for u in turn) for turn in conv["messages"]]
            for cid, conv in json.loads(Path(path).read_text()).items()}


def exchanges(n: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for conv in chitchat_pool(chitchat(), held_out=True):
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
    """Time to first token and decode speed of a reply from a copy of `conv` (medians of
    REPEATS, so one hiccup of a shared machine does not make the row)."""
    runs = [probe_once(engine, conv) for _ in range(REPEATS)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def probe_once(engine: Engine, conv) -> dict:
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
    return statistics.median(reference_once(llm, tokens) for _ in range(REPEATS))


def reference_once(llm: Llama, tokens: list[int]) -> float:
    llm.reset()
    llm.eval(tokens)
    start = time.perf_counter()
    for _ in range(REPLY_TOKENS):
        llm.eval([llm.sample(temp=0.0)])
    return REPLY_TOKENS / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    pairs = exchanges(args.exchanges)
    threads = os.cpu_count() or 1
    curves, probes, engine_info = {}, [], ""
    result: dict = {}
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else None
    for label, level, ccm in configs():
        if wanted is not None and label not in wanted:
            continue
        engine = Engine.load(n_ctx=args.n_ctx, compression=level, device=args.device,
                             backend=args.backend, compressor=ccm, n_threads=threads)
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
                if label == "off" and args.backend == "llamacpp":
                    # llama-cpp-python's loop, flash attention as the engine's
                    # context has it (on: it keeps every token) and as Llama's default (off)
                    for fa in (True, False):
                        row[f"reference_fa_{'on' if fa else 'off'}_tok_s"] = reference(
                            ref_llm(engine, args, threads, fa), list(conv.memory_view().tokens))
                    row["reference_tok_s"] = row["reference_fa_on_tok_s"]
                probes.append(row)
                print(f"{label:>20} turn {t:>3}: held {stats.memory_tokens:>5} "
                      f"ttft {row['ttft_s']:.3f} s  decode {row['decode_tok_s']:.1f} tok/s"
                      + (f"  (llama-cpp-python {row['reference_fa_on_tok_s']:.1f} flash attn "
                         f"on, {row['reference_fa_off_tok_s']:.1f} off)"
                         if "reference_tok_s" in row else ""), flush=True)
        curves[label] = curve
        engine_info = f"{engine.info.backend} on {engine.info.device}"
        print(f"{label:>20}: {len(curve)} exchanges in {time.perf_counter() - started:.0f} s, "
              f"{curve[-1]['bytes'] / 1e6:.1f} MB held at the end", flush=True)
        engine.close()
        result = {"cpus": threads, "device": args.device, "backend": args.backend,
                  "engine": engine_info, "n_ctx": args.n_ctx, "curves": curves,
                  "probes": probes}
        write_result(args.out, args.device, result, quiet=True)  # so far: a cut run keeps it
    return result


_REF: dict[bool, Llama] = {}


def ref_llm(engine: Engine, args: argparse.Namespace, threads: int, flash: bool) -> Llama:
    if flash not in _REF:
        from llama_cpp import Llama

        _REF[flash] = Llama(str(engine.info.model_path), n_ctx=args.n_ctx, n_threads=threads,
                            n_gpu_layers=-1 if args.device == "gpu" else 0, verbose=False,
                            flash_attn=flash)
    return _REF[flash]


def plot(result: dict, out: Path) -> list[Path]:
    memory = {label: ([c["turn"] for c in curve], [c["bytes"] / 1e6 for c in curve],
                      "--" if "window" in label else "-")
              for label, curve in result["curves"].items()}
    speed = {}
    for label in dict.fromkeys(p["config"] for p in result["probes"]):
        rows = [p for p in result["probes"] if p["config"] == label]
        speed[label] = ([p["turn"] for p in rows], [p["decode_tok_s"] for p in rows], "o-")
    refs = [p for p in result["probes"] if "reference_tok_s" in p]
    for fa, style in (("on", "k:"), ("off", "k-.")):
        speed[f"llama-cpp-python loop, uncompressed, flash attn {fa}"] = (
            [p["turn"] for p in refs], [p.get(f"reference_fa_{fa}_tok_s") for p in refs], style)
    device = result.get("engine", result["device"])
    return [
        line_chart(out.with_name(out.stem + "_memory.png"), memory, "exchanges",
                   "KV memory held (MB, log)", f"Memory vs conversation length ({device})",
                   logy=True),
        line_chart(out.with_name(out.stem + "_speed.png"), speed, "exchanges",
                   "decode tokens/s", f"Decode speed vs conversation length ({device})"),
    ]


def both(args: argparse.Namespace) -> dict:
    """Each back end in its own process, then their probes side by side."""
    runs = {}
    parts = Path(tempfile.mkdtemp(prefix="ccm-length-"))  # only the merged JSON is kept
    for backend in ("llamacpp", "hf"):
        part = parts / f"{args.out.stem}_{backend}.json"
        command = [sys.executable, __file__, "--backend", backend, "--device", args.device,
                   "--n-ctx", str(args.n_ctx), "--exchanges", str(args.exchanges),
                   "--configs", args.configs, "--out", str(part)]
        try:
            subprocess.run(command, check=True, timeout=args.child_seconds)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"{backend}: {exc}", flush=True)  # keep what it wrote so far
        if part.exists():
            runs[backend] = json.loads(part.read_text())
    if len(runs) < 2:
        return {"command": " ".join(sys.argv), "side_by_side": [], "runs": runs}
    rows = []
    hf_probes = {(p["config"], p["turn"]): p for p in runs["hf"]["probes"]}
    for p in runs["llamacpp"]["probes"]:
        other = hf_probes.get((p["config"], p["turn"]))
        if other is None:
            continue
        rows.append({"config": p["config"], "turn": p["turn"], "held": p["held"],
                     "llamacpp_tok_s": p["decode_tok_s"], "hf_tok_s": other["decode_tok_s"],
                     "hf_share": other["decode_tok_s"] / p["decode_tok_s"],
                     "llamacpp_ttft_s": p["ttft_s"], "hf_ttft_s": other["ttft_s"],
                     "reference_tok_s": p.get("reference_tok_s")})
    return {"command": " ".join(sys.argv), "machine": runs["hf"]["machine"],
            "engines": {b: r["engine"] for b, r in runs.items()}, "n_ctx": args.n_ctx,
            "side_by_side": rows, "runs": runs}


def plot_side_by_side(result: dict, out: Path) -> Path:
    series = {}
    for label in dict.fromkeys(r["config"] for r in result["side_by_side"]):
        rows = [r for r in result["side_by_side"] if r["config"] == label]
        for key, name, style in (("llamacpp_tok_s", "llama.cpp", "o-"), ("hf_tok_s", "hf", "s--")):
            series[f"{label}: {name}"] = ([r["turn"] for r in rows], [r[key] for r in rows], style)
    engines = ", ".join(result.get("engines", {}).values())
    return line_chart(out.with_name(out.stem + "_speed.png"), series, "exchanges",
                      "decode tokens/s", f"Decode speed, both back ends ({engines})")


def print_side_by_side(result: dict) -> None:
    print("| config | exchange | held | llama.cpp tok/s | hf tok/s | hf / llama.cpp | "
          "TTFT llama.cpp / hf | llama-cpp-python loop tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["side_by_side"]:
        ref = f"{r['reference_tok_s']:.1f}" if r.get("reference_tok_s") else ""
        print(f"| {r['config']} | {r['turn']} | {r['held']} | {r['llamacpp_tok_s']:.1f} | "
              f"{r['hf_tok_s']:.1f} | {100 * r['hf_share']:.0f} % | "
              f"{r['llamacpp_ttft_s']:.3f} / {r['hf_ttft_s']:.3f} s | {ref} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--backend", choices=("llamacpp", "hf", "both"), default="llamacpp")
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--exchanges", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--configs", default="",
                        help="comma-separated config labels to run (default: all)")
    parser.add_argument("--child-seconds", type=float, default=None,
                        help="with --backend both: each back end's run stops after this")
    parser.add_argument("--out", type=Path, default=Path("bench/results/length_cpu.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw from --out's JSON")
    args = parser.parse_args()
    if args.backend == "both":
        result = json.loads(args.out.read_text()) if args.replot else both(args)
        write_result(args.out, args.device, result)  # a replot keeps the run's machine, commit
        print_side_by_side(result)
        if result["side_by_side"]:
            print("plot:", plot_side_by_side(result, args.out))
        return
    if args.replot:
        result = json.loads(args.out.read_text())
    else:
        result = run(args)
        print(f"wrote {args.out}")
    print("| config | turn | held | ttft s | decode tok/s | llama-cpp-python tok/s (FA on / off) |")
    print("|---|---|---|---|---|---|")
    for p in result["probes"]:
        ref = (f"{p['reference_fa_on_tok_s']:.1f} / {p['reference_fa_off_tok_s']:.1f}"
               if "reference_tok_s" in p else "")
        print(f"| {p['config']} | {p['turn']} | {p['held']} | {p['ttft_s']:.3f} | "
              f"{p['decode_tok_s']:.1f} | {ref} |")
    for path in plot(result, args.out):
        print("plot:", path)


if __name__ == "__main__":
    main()
