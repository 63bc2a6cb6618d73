"""Decode speed: ccm-chat's engine loop vs llama-cpp-python's own Llama.eval/sample loop.

Same model, same context size, same threads, greedy, interleaved repeats in one process so
the ratio holds on a noisy machine. Prints a table and writes JSON.

    python bench/decode_speed.py --device cpu --out bench/results/decode_speed_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from llama_cpp import Llama

from ccm_chat.engine import Engine, SamplingParams

from machine import write_result  # isort: skip  (bench/ is sys.path[0])

PROMPT = "Write a very long story about a dragon who learns to cook, with many chapters."


def reference_run(llm: Llama, prompt_tokens: list[int], n: int) -> float:
    llm.reset()
    llm.eval(prompt_tokens)
    start = time.perf_counter()
    for _ in range(n):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    return n / (time.perf_counter() - start)


def engine_run(engine: Engine, n: int) -> tuple[float, int]:
    conv = engine.new_conversation()
    for _ in conv.send(PROMPT, SamplingParams(temperature=0.0, max_tokens=n)):
        pass
    reply = conv.last_reply
    return reply.tokens_per_second, reply.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_speed.json"))
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    engine = Engine.load(n_ctx=args.n_ctx, device=args.device, n_threads=threads)
    gpu_layers = -1 if args.device == "gpu" else 0
    conv = engine.new_conversation()
    conv.add_turn("user", PROMPT, decode=False)
    prompt = engine.model.render_chat(conv.messages, add_assistant=True)
    refs = {}
    for fa in (False, True):
        refs[fa] = Llama(str(engine.info.model_path), n_ctx=args.n_ctx, n_threads=threads,
                         n_gpu_layers=gpu_layers, flash_attn=fa, verbose=False)
    prompt_tokens = refs[False].tokenize(prompt, add_bos=False, special=True)

    rows: dict[str, list[float]] = {"engine": [], "llama-cpp-python (fa off)": [],
                                    "llama-cpp-python (fa on)": []}
    generated = []
    for _ in range(args.repeats):
        speed, count = engine_run(engine, args.tokens)
        rows["engine"].append(speed)
        generated.append(count)
        rows["llama-cpp-python (fa off)"].append(
            reference_run(refs[False], prompt_tokens, args.tokens))
        rows["llama-cpp-python (fa on)"].append(
            reference_run(refs[True], prompt_tokens, args.tokens))

    best_ref = max(statistics.median(v) for k, v in rows.items() if k != "engine")
    ours = statistics.median(rows["engine"])
    print(f"{'loop':32} {'median tok/s':>12} {'runs':>30}")
    for name, speeds in rows.items():
        runs = ", ".join(f"{s:.1f}" for s in speeds)
        print(f"{name:32} {statistics.median(speeds):12.1f} {runs:>30}")
    print(f"engine / best reference: {ours / best_ref:.3f} "
          f"(engine generated {generated} tokens; reference {args.tokens})")
    result = {
        "command": "python bench/decode_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{threads} threads, device {engine.info.device}",
        "model": engine.info.model_name,
        "n_ctx": args.n_ctx,
        "tokens": args.tokens,
        "tok_per_s": {k: v for k, v in rows.items()},
        "median_tok_per_s": {k: statistics.median(v) for k, v in rows.items()},
        "engine_over_best_reference": ours / best_ref,
    }
    write_result(args.out, args.device, result, indent=2)  # its own machine line stays


if __name__ == "__main__":
    main()
